"""Save a trained model so that plain ``transformers`` (+ ``peft``) loads it back.

Layout of ``out``:
  model/    the full base model, including every base weight ZO changed (transformers format)
  adapter/  the peft adapter and task head, if the method has one (peft format)
  merged/   optional: base with the adapter merged in, loadable by transformers alone

Saving only the adapter, as LoRA tools do, would silently drop the ZO updates of the base.
All tensors are written as safetensors.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from hybridft.split import canonical_name, peft_created


def _is_peft(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save(model: nn.Module, tokenizer: object, out: str | Path, *, merged: bool = False) -> None:
    """Write ``model/``, ``adapter/`` (peft models) and optionally ``merged/`` under ``out``.

    ``merged=True`` merges the adapter into the model in place: call it last.
    """
    out = Path(out)
    if not _is_peft(model):
        model.save_pretrained(out / "model", safe_serialization=True)  # type: ignore[operator]
        tokenizer.save_pretrained(out / "model")  # type: ignore[attr-defined]
        return
    base = model.get_base_model()  # type: ignore[operator]
    created = {id(p) for p in peft_created(model)}
    state = {canonical_name(k): v.detach() for k, v in base.state_dict(keep_vars=True).items() if id(v) not in created}
    base.save_pretrained(out / "model", state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(out / "model")  # type: ignore[attr-defined]
    model.save_pretrained(out / "adapter", safe_serialization=True)  # type: ignore[operator]
    if merged:
        plain = model.merge_and_unload()  # type: ignore[operator]
        plain.save_pretrained(out / "merged", safe_serialization=True)
        tokenizer.save_pretrained(out / "merged")  # type: ignore[attr-defined]


def load(out: str | Path, *, trust_remote_code: bool = False) -> nn.Module:
    """Load what ``save`` wrote, with plain transformers and peft (eval mode), as the class it was
    saved from (a sequence classifier, a multiple-choice model or a causal LM)."""
    import transformers

    out = Path(out)
    config = transformers.AutoConfig.from_pretrained(out / "model", trust_remote_code=trust_remote_code)
    model_class = getattr(transformers, (config.architectures or ["AutoModelForSequenceClassification"])[0])
    model = model_class.from_pretrained(out / "model", trust_remote_code=trust_remote_code)
    if (out / "adapter").exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, out / "adapter")
    return model.eval()
