"""Zeroth-order (SPSA / MeZO-style) estimation over tensors, with seed-regenerated directions.

One two-sided estimate along a direction z ~ N(0, I) (or Rademacher) costs two forward
passes and no backward:

    projected_grad = [L(theta + eps z) - L(theta - eps z)] / (2 eps)       # a scalar
    theta <- theta - lr * (projected_grad * z + weight_decay * theta)

z is never stored. Each parameter's slice of z is drawn from a local ``torch.Generator``
seeded by ``(step seed, parameter key)``, where the key is a hash of the parameter's
canonical name. So z is the same whatever the order in which parameters are visited, on
whichever device or shard a parameter lives, and the global RNG is never touched.

Everything here is a plain function over tensors; no state is kept between calls.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Distribution = Literal["gaussian", "rademacher"]
DISTRIBUTIONS: tuple[str, ...] = ("gaussian", "rademacher")

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One round of splitmix64: a bijective 64-bit mixer (decorrelates nearby seeds)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def parameter_key(name: str) -> int:
    """A stable 64-bit identity for a parameter, from its canonical name (not its position)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def step_seed(seed: int, step: int, direction: int = 0) -> int:
    """The seed of direction ``direction`` at optimizer step ``step`` of a run seeded ``seed``."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ step) ^ direction)


def direction(
    like: torch.Tensor, *, seed: int, key: int, distribution: Distribution = "gaussian"
) -> torch.Tensor:
    """The slice of z for one parameter: same shape, dtype and device as ``like``.

    Drawn in fp32 from a fresh generator seeded by ``(seed, key)`` and cast to ``like``'s
    dtype, so a bf16 copy of a model sees the rounding of the same fp32 direction.
    Cost: one pass of random-number generation over ``like.numel()`` values.
    """
    generator = torch.Generator(device=like.device)
    generator.manual_seed(_splitmix64(seed ^ key) & ((1 << 63) - 1))
    if distribution == "gaussian":
        z = torch.randn(like.shape, generator=generator, device=like.device, dtype=torch.float32)
    elif distribution == "rademacher":
        z = torch.empty(like.shape, device=like.device, dtype=torch.float32)
        z.bernoulli_(0.5, generator=generator).mul_(2.0).sub_(1.0)
    else:
        raise ValueError(f"unknown ZO distribution {distribution!r}; choose from {DISTRIBUTIONS}")
    return z.to(like.dtype)


@torch.no_grad()
def perturb_(
    param: torch.Tensor, *, seed: int, key: int, scale: float, distribution: Distribution = "gaussian"
) -> None:
    """theta <- theta + scale * z, in place. Not exactly invertible in floating point:
    callers that need theta back bit for bit keep a copy (see ``perturb.perturbed``)."""
    param.add_(direction(param, seed=seed, key=key, distribution=distribution), alpha=scale)


def projected_grad(loss_plus: float, loss_minus: float, eps: float, *, one_sided: bool = False) -> float:
    """The directional-derivative estimate g = z . grad L.

    Two-sided: (L(theta + eps z) - L(theta - eps z)) / (2 eps), error O(eps^2).
    One-sided: (L(theta + eps z) - L(theta)) / eps, where ``loss_minus`` is L(theta); error O(eps).
    """
    if one_sided:
        return (loss_plus - loss_minus) / eps
    return (loss_plus - loss_minus) / (2.0 * eps)


@dataclass(frozen=True)
class ZOUpdate:
    """Everything one ZO step did to the weights: a handful of scalars (the replay log entry).

    theta <- theta * (1 - lr * weight_decay) - lr / q * sum_i projected_grads[i] * z(seeds[i])
    """

    step: int
    seeds: tuple[int, ...]
    projected_grads: tuple[float, ...]
    lr: float
    weight_decay: float
    distribution: Distribution = "gaussian"


@torch.no_grad()
def update_(param: torch.Tensor, *, key: int, update: ZOUpdate) -> None:
    """Apply one logged ZO update to one parameter, in place.

    Cost: len(update.seeds) passes of direction generation over the parameter; no extra
    memory beyond one direction at a time.
    """
    if update.weight_decay:
        param.mul_(1.0 - update.lr * update.weight_decay)
    q = len(update.seeds)
    for seed, g in zip(update.seeds, update.projected_grads, strict=True):
        z = direction(param, seed=seed, key=key, distribution=update.distribution)
        param.add_(z, alpha=-update.lr * g / q)


def replay_(named_params: Iterable[tuple[str, torch.Tensor]], updates: Sequence[ZOUpdate]) -> None:
    """Re-apply a log of ZO updates, in order, to parameters named by their canonical names.

    Starting from the weights the run started from, this reproduces its ZO-trained weights
    bit for bit (same ops, same order, same dtype and device).
    """
    keyed = [(parameter_key(name), param) for name, param in named_params]
    for update in updates:
        for key, param in keyed:
            update_(param, key=key, update=update)
