"""Save a trained model so that plain ``transformers`` (+ ``peft``) loads it back.

Layout of ``out``:
  model/    the full base model, including every base weight ZO changed (transformers format)
  adapter/  the peft adapter and task head, if the method has one (peft format)
  merged/   optional: base with the adapter merged in, loadable by transformers alone

(``HybridTrainer`` keeps the Trainer's layout, the adapter in ``out`` itself, and adds ``model/``.)

Saving only the adapter, as LoRA tools do, would silently drop the ZO updates of the base.
All tensors are written as safetensors.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from hybridft.engine.split import canonical_name, peft_created


def is_peft(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors (parameters and persistent buffers, live, not copies) under
    their plain transformers names; peft's own tensors are left out. Tied tensors appear
    under each of their names."""
    created = {id(p) for p in peft_created(model)}
    base = model.get_base_model()  # type: ignore[operator]
    return {canonical_name(k): v for k, v in base.state_dict(keep_vars=True).items() if id(v) not in created}


def save_base(model: nn.Module, directory: str | Path) -> None:
    """Save a peft model's base, with every weight ZO changed, as a plain transformers checkpoint."""
    state = {k: v.detach() for k, v in base_state(model).items()}
    model.get_base_model().save_pretrained(directory, state_dict=state, safe_serialization=True)  # type: ignore[operator]


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(directory / name))
    return tensors


@torch.no_grad()
def load_base_(model: nn.Module, directory: str | Path) -> None:
    """Copy what ``save_base`` wrote back into a peft model's base, in place. Every base tensor
    must be in the checkpoint (a tied one under any of its names) and nothing else may be."""
    directory = Path(directory)
    saved = _read_safetensors(directory)
    names_of: dict[int, list[str]] = defaultdict(list)
    tensor_of: dict[int, torch.Tensor] = {}
    for name, tensor in base_state(model).items():
        names_of[id(tensor)].append(name)
        tensor_of[id(tensor)] = tensor
    unknown = set(saved) - {n for names in names_of.values() for n in names}
    if unknown:
        raise ValueError(f"{directory} holds tensors the model does not have, e.g. {sorted(unknown)[0]}")
    for key, names in names_of.items():
        found = [n for n in names if n in saved]
        if not found:
            raise ValueError(f"{directory} lacks the base tensor {names[0]}")
        tensor_of[key].copy_(saved[found[0]])


def save(model: nn.Module, tokenizer: object, out: str | Path, *, merged: bool = False) -> None:
    """Write ``model/``, ``adapter/`` (peft models) and optionally ``merged/`` under ``out``.

    ``merged=True`` merges the adapter into the model in place: call it last.
    """
    out = Path(out)
    if not is_peft(model):
        model.save_pretrained(out / "model", safe_serialization=True)  # type: ignore[operator]
        tokenizer.save_pretrained(out / "model")  # type: ignore[attr-defined]
        return
    save_base(model, out / "model")
    tokenizer.save_pretrained(out / "model")  # type: ignore[attr-defined]
    model.save_pretrained(out / "adapter", safe_serialization=True)  # type: ignore[operator]
    if merged:
        plain = model.merge_and_unload()  # type: ignore[operator]
        plain.save_pretrained(out / "merged", safe_serialization=True)
        tokenizer.save_pretrained(out / "merged")  # type: ignore[attr-defined]


def load(out: str | Path, *, trust_remote_code: bool = False) -> nn.Module:
    """Load what ``save`` (or ``HybridTrainer.save_model``) wrote, with plain transformers and peft
    (eval mode), as the class it was saved from (a sequence classifier, a multiple-choice model or a causal LM)."""
    import transformers

    out = Path(out)
    base = out / "model" if (out / "model").is_dir() else out  # a Trainer's output of a model without adapter
    config = transformers.AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    model_class = getattr(transformers, (config.architectures or ["AutoModelForSequenceClassification"])[0])
    model = model_class.from_pretrained(base, trust_remote_code=trust_remote_code)
    adapter = out / "adapter" if (out / "adapter").exists() else out if (out / "adapter_config.json").exists() else None
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()
