"""Pairs of nearby points and the smoothness ratios they give, with exact gradients of both blocks.

At a point x (the current weights) with a mini-batch loss f_S, for a unit direction u in block C
and a radius delta, the pair is (x, y = x + delta u), only block C moving:

    ratio_BC = ||grad_B f_S(y) - grad_B f_S(x)|| / delta     for both blocks B
    rayleigh_C = <u, grad_C f_S(y) - grad_C f_S(x)> / delta   (the curvature along u)

Direction kinds: ``gradient`` (u = grad_C f_S(x) normalised: where an FO step moves), ``random``
(u ~ N(0, I) normalised: where the zero-mean part of a ZO step moves) and ``power`` (u = the
normalised response H_CC u of the previous pair of this block: a power iteration streamed along
the trajectory, towards the largest curvature).

Exact gradients are for analysis only: ``block_grads`` switches requires_grad on for the ZO
block and back off on exit, and uses ``torch.autograd.grad``, which writes no ``.grad``.
Cost: one forward+backward over all weights per gradient; 1 + 2 * len(kinds) per point.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from hybridft.engine.modes import evaluating

KINDS = ("gradient", "random", "power")
Blocks = Mapping[str, Sequence[nn.Parameter]]
Tensors = list[torch.Tensor]


def norm(tensors: Sequence[torch.Tensor]) -> float:
    """The Euclidean norm of a block given as a list of tensors (accumulated in float64)."""
    return float(sum((t.double() ** 2).sum() for t in tensors) ** 0.5) if tensors else 0.0


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))


def block_grads(model: nn.Module, blocks: Blocks, loss_fn: Callable[[], torch.Tensor]) -> tuple[float, dict[str, Tensors]]:
    """The loss and its exact gradient for every block, in eval mode (deterministic f_S).
    requires_grad flags and the train/eval mode are restored; no ``.grad`` is written."""
    params = [p for ps in blocks.values() for p in ps]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad(), evaluating(model):
            loss = loss_fn()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    out: dict[str, Tensors] = {}
    i = 0
    for name, ps in blocks.items():
        out[name] = [torch.zeros_like(p) if g is None else g for p, g in zip(ps, grads[i : i + len(ps)])]
        i += len(ps)
    return float(loss.detach()), out


@contextmanager
def displaced(params: Sequence[nn.Parameter], direction: Sequence[torch.Tensor], scale: float) -> Iterator[None]:
    """Inside the block the parameters are at theta + scale * direction; on exit they are restored
    bit for bit from a copy (even if the body raises). Extra memory: one copy of ``params``."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, u in zip(params, direction, strict=True):
            p.add_(u.to(p.dtype), alpha=scale)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def unit(tensors: Sequence[torch.Tensor]) -> Tensors | None:
    """The direction scaled to norm 1, or None for a zero direction."""
    size = norm(tensors)
    return [t / size for t in tensors] if size > 0 else None


def direction(kind: str, *, grad: Tensors, params: Sequence[nn.Parameter], generator: torch.Generator,
              previous: Tensors | None) -> Tensors | None:
    """The unit direction of one kind (see the module docstring); None if it is zero."""
    if kind == "gradient":
        return unit(grad)
    if kind == "random" or (kind == "power" and previous is None):
        return unit([torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device) for p in params])
    if kind == "power":
        return unit(previous)  # type: ignore[arg-type]
    raise ValueError(f"unknown direction kind {kind!r}; choose from {', '.join(KINDS)}")


@dataclass(frozen=True)
class Pair:
    """One measured pair: which block moved, along which kind of direction, and what it gave."""

    item: int  # which (point, batch) it was measured at
    moved: str
    kind: str
    radius: float
    grad_norm: dict[str, float]  # ||grad_B f_S(x)|| for each block B
    ratio: dict[str, float]  # ||grad_B f_S(y) - grad_B f_S(x)|| / radius for each block B
    rayleigh: float


def measure_point(
    model: nn.Module,
    blocks: Blocks,
    loss_fn: Callable[[], torch.Tensor],
    *,
    item: int,
    kinds: Sequence[str],
    radius: float,
    generator: torch.Generator,
    power: dict[str, Tensors],
) -> tuple[float, dict[str, Tensors], list[Pair]]:
    """The loss, the exact block gradients at x, and one pair per (moved block, kind).
    ``power`` holds each block's last response H_CC u and is updated in place."""
    loss, grads = block_grads(model, blocks, loss_fn)
    grad_norm = {b: norm(g) for b, g in grads.items()}
    pairs = []
    for moved, params in blocks.items():
        for kind in kinds if params else ():
            u = direction(kind, grad=grads[moved], params=params, generator=generator, previous=power.get(moved))
            if u is None:
                continue
            with displaced(params, u, radius):
                _, moved_grads = block_grads(model, blocks, loss_fn)
            diff = {b: [y - x for y, x in zip(moved_grads[b], grads[b])] for b in blocks}
            if kind == "power":
                power[moved] = diff[moved]
            pairs.append(Pair(item=item, moved=moved, kind=kind, radius=radius, grad_norm=grad_norm,
                              ratio={b: norm(diff[b]) / radius for b in blocks if blocks[b]},
                              rayleigh=dot(u, diff[moved]) / radius))
    return loss, grads, pairs
