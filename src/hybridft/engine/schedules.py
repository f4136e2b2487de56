"""Per-group learning-rate schedules as multipliers for ``torch.optim.lr_scheduler.LambdaLR``."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch


SCHEDULES = ("constant", "linear", "cosine")


def multiplier(name: str, *, total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """step -> factor on the base lr: linear warmup over ``warmup_steps``, then constant,
    linear decay to 0, or cosine decay to 0 at ``total_steps``."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if name == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def scheduler(
    optimizer: torch.optim.Optimizer, names: Sequence[str], *, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """One LambdaLR over all of ``optimizer``'s groups, group i following schedule ``names[i]``."""
    lambdas = [multiplier(n, total_steps=total_steps, warmup_steps=warmup_steps) for n in names]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
