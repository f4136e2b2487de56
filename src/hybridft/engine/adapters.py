"""The FO part of the adapter methods (hybrid, fo-lora, zo-lora): the peft config each kind names.

| kind     | what the adapter trains (always with the model's new task head, if it has one)       |
|----------|---------------------------------------------------------------------------------------|
| lora     | low-rank updates B A of the target linear layers                                      |
| ia3      | scaling vectors of the keys, values and feed-forward (peft's per-architecture modules) |
| prompt   | ``num_virtual_tokens`` input embeddings prepended to every input (prompt tuning)      |
| prefix   | keys and values of ``num_virtual_tokens`` positions in every layer (prefix tuning)   |
| none     | nothing: the task head alone (a peft model with ``modules_to_save`` only)             |
| a file   | the peft config in it (an ``adapter_config.json`` as peft writes it)                  |

Prompt and prefix tuning need a peft task type, which exists for sequence classification and
causal LMs, not for multiple choice; prefix tuning also needs a model whose forward takes
``past_key_values`` (transformers' BERT does not). Each is refused in one line where it cannot work.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

PEFT_KINDS = ("lora", "ia3", "prompt", "prefix", "none")
CONFIG_FILE = "adapter_config.json"
# The transformers auto class a model is loaded with -> peft's task type for prompt learning.
TASK_TYPES = {"AutoModelForSequenceClassification": "SEQ_CLS", "AutoModelForCausalLM": "CAUSAL_LM"}


def lora_config(
    *, r: int, alpha: int, dropout: float, target_modules: Sequence[str] | str | None, head_modules: Sequence[str]
) -> Any:
    """A LoRA config; ``head_modules`` (new, randomly initialised weights) are trained in full."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      modules_to_save=list(head_modules) or None)


def adapter_config(kind: str, *, head: str, head_modules: Sequence[str], r: int = 8, alpha: int = 16,
                   dropout: float = 0.0, target_modules: Sequence[str] | str | None = "all-linear",
                   num_virtual_tokens: int = 10) -> Any:
    """The peft config of ``kind`` (one of PEFT_KINDS, or the path of a peft config file) for a
    model loaded with the auto class ``head`` whose new modules are ``head_modules``; ``r``,
    ``alpha``, ``dropout`` and ``target_modules`` are LoRA's, ``num_virtual_tokens`` prompt and
    prefix tuning's."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig
    from peft.utils.constants import DUMMY_TARGET_MODULES

    heads = list(head_modules) or None
    if kind == "lora":
        return lora_config(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, head_modules=head_modules)
    if kind == "ia3":
        return IA3Config(modules_to_save=heads)
    if kind == "none":
        if not heads:
            raise ValueError("peft kind 'none' trains the new task head alone, and this model has none")
        return LoraConfig(target_modules=DUMMY_TARGET_MODULES, modules_to_save=heads)  # peft's adapter of no module
    if kind in ("prompt", "prefix"):
        config_class = PromptTuningConfig if kind == "prompt" else PrefixTuningConfig
        return config_class(task_type=task_type(f"{kind} tuning", head), num_virtual_tokens=num_virtual_tokens,
                            modules_to_save=heads)
    return from_file(kind, head=head, head_modules=head_modules)


def task_type(method: str, head: str) -> str:
    """peft's task type for the prompt-learning ``method`` (named in the error) on a ``head`` model."""
    if head not in TASK_TYPES:
        raise ValueError(f"{method} has no peft task type for {head} (peft's prompt learning covers sequence "
                         "classification and causal LMs); use lora, ia3 or none")
    return TASK_TYPES[head]


def from_file(path: str | Path, *, head: str, head_modules: Sequence[str]) -> Any:
    """The peft config saved in ``path`` (a file, or a folder holding adapter_config.json), made
    trainable (peft saves ``inference_mode=True``), with ``head_modules`` added to its
    ``modules_to_save`` and, for prompt learning, the task type of ``head``."""
    from peft import PeftConfig

    file = Path(path) / CONFIG_FILE if Path(path).is_dir() else Path(path)
    try:
        values = PeftConfig.from_json_file(str(file))
        if not isinstance(values, dict) or "peft_type" not in values:
            raise ValueError("it names no peft_type")
        config = PeftConfig.from_peft_type(**PeftConfig.check_kwargs(**values))
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"cannot read the peft config {file}: {str(error).splitlines()[0]}") from error
    config.inference_mode = False
    if head_modules and not hasattr(config, "modules_to_save"):
        raise ValueError(f"{file}: a {_name(config.peft_type)} adapter cannot also train the task head "
                         f"({', '.join(head_modules)}): it has no modules_to_save")
    if head_modules:
        config.modules_to_save = list(dict.fromkeys([*(config.modules_to_save or []), *head_modules]))
    if config.is_prompt_learning:
        wanted = task_type(_name(config.peft_type), head)
        if config.task_type not in (None, wanted):
            raise ValueError(f"{file}: task_type {_name(config.task_type)} does not fit a {head} model ({wanted})")
        config.task_type = wanted
    return config


def _name(value: Any) -> str:
    """A peft enum member's value (``PeftType.IA3`` -> ``IA3``); str() would give the member's name."""
    return str(getattr(value, "value", value))


def check_fits(model: nn.Module, peft_config: Any) -> None:
    """Raise a one-line ValueError where ``peft_config`` cannot work on ``model`` although peft
    would wrap it (peft's own error would come at the first forward): prefix tuning of a
    classifier whose forward, and its backbone's, take no ``past_key_values`` (peft's own test)."""
    if getattr(peft_config, "peft_type", None) != "PREFIX_TUNING" or getattr(peft_config, "task_type", None) != "SEQ_CLS":
        return
    backbone = getattr(model, "base_model", model)
    if not any("past_key_values" in inspect.signature(m.forward).parameters for m in (model, backbone)):
        raise ValueError(f"peft prefix tuning needs a classifier whose forward takes past_key_values, and "
                         f"{type(model).__name__} does not; use prompt, lora, ia3 or none")


def wrap(model: nn.Module, peft_config: Any) -> nn.Module:
    """Apply a peft config; a target pattern that matches no module, or a config the model cannot
    take, is a one-line ValueError."""
    from peft import get_peft_model

    check_fits(model, peft_config)
    try:
        return get_peft_model(model, peft_config)
    except ValueError as error:
        raise ValueError(f"peft could not wrap the model: {str(error).splitlines()[0]}") from error
