"""The error of the engine's two-sided ZO estimate against the exact directional derivative, by eps.

For a direction z (the engine's own, regenerated from a seed) and an exact gradient g of the ZO
block (backprop, analysis only):

    p(eps) = [f_S(theta + eps z) - f_S(theta - eps z)] / (2 eps)      (hybridft.engine.perturb, as in training)
    error(eps) = |p(eps) - z . g| / |z . g|

A large eps pays the truncation error (third derivatives along z; the second-order term cancels
in the two-sided difference); a small eps pays floating-point cancellation in the loss
difference. The scan shows where the two balance. Cost: 2 forwards per (eps, direction) and one
generation of z per direction for the exact value.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from hybridft.engine.modes import evaluating
from hybridft.engine.perturb import perturbed
from hybridft.engine.zo import direction, parameter_key, projected_grad, step_seed


def exact_projection(zo_params: Mapping[str, nn.Parameter], grads: Sequence[torch.Tensor], *, seed: int) -> float:
    """z(seed) . g over the ZO block, with z generated exactly as the optimizer generates it."""
    total = 0.0
    for (name, p), g in zip(zo_params.items(), grads, strict=True):
        total += float((direction(p, seed=seed, key=parameter_key(name)).double() * g.double()).sum())
    return total


@torch.no_grad()
def eps_scan(
    model: nn.Module,
    zo_params: Mapping[str, nn.Parameter],
    grads: Sequence[torch.Tensor],
    loss_fn: Callable[[], torch.Tensor],
    *,
    eps_grid: Sequence[float],
    directions: int,
    seed: int,
) -> list[dict[str, float]]:
    """One row per eps: the median relative error over ``directions`` seeded directions (eval mode)."""
    keys = {p: parameter_key(name) for name, p in zo_params.items()}
    errors: dict[float, list[float]] = {eps: [] for eps in eps_grid}
    with evaluating(model):
        for i in range(directions):
            s = step_seed(seed, 0, i)
            exact = exact_projection(zo_params, grads, seed=s)
            for eps in eps_grid:
                with perturbed(model, keys, seed=s, scale=eps):
                    plus = float(loss_fn())
                with perturbed(model, keys, seed=s, scale=-eps):
                    minus = float(loss_fn())
                errors[eps].append(abs(projected_grad(plus, minus, eps) - exact) / max(abs(exact), 1e-30))
    return [{"eps": eps, "error": statistics.median(errors[eps])} for eps in eps_grid]


def advise_eps(scan: Sequence[dict[str, float]], *, slack: float = 2.0) -> float:
    """The largest eps of a scan whose median error is within ``slack`` times the smallest: near the
    balance of truncation (grows with eps) and floating-point cancellation (grows as eps shrinks),
    on the side that is more robust to lower precision."""
    if not scan:
        raise ValueError("no eps scan to advise from")
    best = min(row["error"] for row in scan)
    return max(row["eps"] for row in scan if row["error"] <= slack * best)
