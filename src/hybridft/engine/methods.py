"""The five methods as (partition, rules) over one engine, so comparisons are fair.

| method  | peft adapter | ZO rule on            | FO rule on                     |
|---------|--------------|-----------------------|--------------------------------|
| hybrid  | yes          | base weights          | adapter + task head            |
| fo-lora | yes          | -                     | adapter + task head            |
| zo-lora | yes          | adapter + task head   | -                              |
| fo-full | no           | -                     | all weights                    |
| zo-full | no           | all weights (MeZO)    | -                              |
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hybridft.engine.optim import HybridOptimizer
from hybridft.engine.split import Partition, split

METHODS = ("hybrid", "fo-lora", "fo-full", "zo-full", "zo-lora")
USES_ADAPTER = {"hybrid": True, "fo-lora": True, "zo-lora": True, "fo-full": False, "zo-full": False}


@dataclass(frozen=True)
class Groups:
    """Which parameters each rule owns (canonical or peft names -> parameter)."""

    partition: Partition
    zo: dict[str, nn.Parameter]
    fo: dict[str, nn.Parameter]
    frozen: dict[str, nn.Parameter]


def lora_config(
    *, r: int, alpha: int, dropout: float, target_modules: Sequence[str] | str | None, head_modules: Sequence[str]
) -> object:
    """A LoRA config; ``head_modules`` (new, randomly initialised weights) are trained in full."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      modules_to_save=list(head_modules) or None)


def wrap(model: nn.Module, peft_config: object) -> nn.Module:
    """Apply a peft config; a target pattern that matches no module is a one-line ValueError."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config)
    except ValueError as error:
        raise ValueError(f"peft could not wrap the model: {str(error).splitlines()[0]}") from error


def assign(method: str, model: nn.Module) -> Groups:
    """Split ``model`` (already wrapped when the method uses an adapter) and give each group its
    rule. Sets requires_grad: True exactly on the FO group, so the ZO group never gets .grad."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    partition = split(model)
    if USES_ADAPTER[method] and not partition.adapter:
        raise ValueError(f"method {method!r} needs an adapter but the model has no adapter parameters")
    base, adapter = partition.base, partition.adapter
    zo, fo, frozen = {
        "hybrid": (base, adapter, {}),
        "fo-lora": ({}, adapter, base),
        "zo-lora": (adapter, {}, base),
        "fo-full": ({}, base | adapter, {}),
        "zo-full": (base | adapter, {}, {}),
    }[method]
    frozen = frozen | partition.inactive
    for group, flag in ((zo, False), (frozen, False), (fo, True)):
        for p in group.values():
            p.requires_grad_(flag)
    return Groups(partition=partition, zo=dict(zo), fo=dict(fo), frozen=dict(frozen))


def build_optimizer(
    model: nn.Module,
    groups: Groups,
    *,
    zo_lr: float,
    fo_lr: float,
    eps: float,
    seed: int,
    fo_optimizer: str = "sgd",
    fo_momentum: float = 0.0,
    zo_weight_decay: float = 0.0,
    fo_weight_decay: float = 0.0,
    num_directions: int = 1,
    one_sided: bool = False,
    distribution: str = "gaussian",
    **zo_modes: Any,
) -> HybridOptimizer:
    """The hybrid optimizer for ``groups``: the ZO rule plus SGD (default) or AdamW on the FO group.
    ``zo_modes``: HybridOptimizer's step-cost options (fused, z_cache, z_dtype, embedding_rows, threads)."""
    fo: torch.optim.Optimizer | None = None
    if groups.fo:
        params = list(groups.fo.values())
        if fo_optimizer == "sgd":
            fo = torch.optim.SGD(params, lr=fo_lr, momentum=fo_momentum, weight_decay=fo_weight_decay)
        elif fo_optimizer == "adamw":
            fo = torch.optim.AdamW(params, lr=fo_lr, weight_decay=fo_weight_decay)
        else:
            raise ValueError(f"unknown FO optimizer {fo_optimizer!r}; choose sgd or adamw")
    return HybridOptimizer(model, groups.zo, fo, lr=zo_lr, eps=eps, weight_decay=zo_weight_decay,
                           num_directions=num_directions, one_sided=one_sided,
                           distribution=distribution, seed=seed, **zo_modes)  # type: ignore[arg-type]
