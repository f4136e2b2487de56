"""The seven methods as (partition, rules) over one engine, so comparisons are fair.

| method  | peft adapter | ZO rule on            | FO rule on                     |
|---------|--------------|-----------------------|--------------------------------|
| hybrid  | yes          | base weights          | adapter + task head            |
| fo-lora | yes          | -                     | adapter + task head            |
| zo-lora | yes          | adapter + task head   | -                              |
| fo-full | no           | -                     | all weights                    |
| zo-full | no           | all weights (MeZO)    | -                              |
| lomo    | no           | -                     | all weights, SGD in backward   |
| adalomo | no           | -                     | all weights, AdaLomo in backward |

The adapter is LoRA unless chosen otherwise (IA3, prompt or prefix tuning, none: the task head
alone, or a peft config file): ``hybridft.engine.adapters``. ``lomo`` is fo-full whose FO rule is
``FusedSGD`` (``fused.py``, LOMO): each weight updated inside backward, so no full set of
gradients and no optimizer state is held; ``adalomo`` is the same with ``FusedAdaLomo`` (AdaLomo:
Adafactor's factored second moment and relative step, no first moment), whose state is a row and
a column per matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hybridft.engine.directions import DirectionSampler
from hybridft.engine.estimators import Estimator, TwoSided
from hybridft.engine.fused import FusedAdaLomo, FusedSGD
from hybridft.engine.optim import HybridOptimizer
from hybridft.engine.rules import ZOSGD, UpdateRule
from hybridft.engine.split import Partition, split
from hybridft.engine.storage import StochasticRounding, StorageRule

METHODS = ("hybrid", "fo-lora", "fo-full", "zo-full", "zo-lora", "lomo", "adalomo")
USES_ADAPTER = {"hybrid": True, "fo-lora": True, "zo-lora": True, "fo-full": False, "zo-full": False, "lomo": False,
                "adalomo": False}
# Methods whose FO rule runs inside the backward pass, and that rule (a name of ``fo_optimizer``):
# it replaces --fo-optimizer, and rules out gradient accumulation and data parallelism (fused.py).
FUSED_FO = {"lomo": "fused-sgd", "adalomo": "fused-adalomo"}


@dataclass(frozen=True)
class Groups:
    """Which parameters each rule owns (canonical or peft names -> parameter)."""

    partition: Partition
    zo: dict[str, nn.Parameter]
    fo: dict[str, nn.Parameter]
    frozen: dict[str, nn.Parameter]


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
        "lomo": ({}, base | adapter, {}),
        "adalomo": ({}, base | adapter, {}),
    }[method]
    frozen = frozen | partition.inactive
    for group, flag in ((zo, False), (frozen, False), (fo, True)):
        for p in group.values():
            p.requires_grad_(flag)
    return Groups(partition=partition, zo=dict(zo), fo=dict(fo), frozen=dict(frozen))


def fo_optimizer(name: str, params: Sequence[nn.Parameter], *, lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The FO rule ``name``: plain SGD (``sgd``, the analysis'), AdamW (``adamw``), or SGD fused
    into the backward pass (``fused-sgd``, lomo's: no momentum, which would be optimizer state), or
    AdaLomo fused into it (``fused-adalomo``, adalomo's: no momentum either)."""
    if name in ("fused-sgd", "fused-adalomo"):
        if momentum:
            raise ValueError(f"{name} updates inside backward and keeps no first moment, so no momentum; got {momentum}")
        fused = FusedSGD if name == "fused-sgd" else FusedAdaLomo
        return fused(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown FO optimizer {name!r}; choose sgd, adamw, fused-sgd or fused-adalomo")


def build_optimizer(
    model: nn.Module,
    groups: Groups,
    *,
    zo_lr: float,
    seed: int,
    fo: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    estimator: Estimator = TwoSided(),
    directions: DirectionSampler = DirectionSampler(),
    rule: UpdateRule = ZOSGD(),
    storage: StorageRule = StochasticRounding(),
) -> HybridOptimizer:
    """The hybrid optimizer for ``groups``: the ZO step composed of ``estimator``, ``directions``,
    ``rule`` and ``storage`` on the ZO group, and ``fo(params)`` (e.g. a ``functools.partial`` of
    ``fo_optimizer``) on the FO group, if it has parameters."""
    fo_part = fo(list(groups.fo.values())) if groups.fo and fo is not None else None
    if groups.fo and fo is None:
        raise ValueError("the method trains an FO group; give build_optimizer an FO optimizer (fo=...)")
    return HybridOptimizer(model, groups.zo, fo_part, lr=zo_lr, seed=seed, estimator=estimator,
                           directions=directions, rule=rule, storage=storage)
