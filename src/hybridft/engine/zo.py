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
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Distribution = Literal["gaussian", "rademacher"]
DISTRIBUTIONS: tuple[str, ...] = ("gaussian", "rademacher")
ZDtype = Literal["float32", "param"]
Z_DTYPES: tuple[str, ...] = ("float32", "param")
Rounding = Literal["stochastic", "nearest"]
ROUNDINGS: tuple[str, ...] = ("stochastic", "nearest")
HALF_PRECISION = (torch.bfloat16, torch.float16)
_ROUNDING_SALT = 0x5EED_0F_0DD_B175  # separates the rounding noise's stream from z's

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
    like: torch.Tensor,
    *,
    seed: int,
    key: int,
    distribution: Distribution = "gaussian",
    dtype: ZDtype = "float32",
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The slice of z for one parameter: same shape, dtype and device as ``like``.

    Drawn from a fresh generator seeded by ``(seed, key)``. ``dtype="float32"`` draws in fp32
    and casts to ``like``'s dtype, so a bf16 copy of a model sees the rounding of the same fp32
    direction; ``dtype="param"`` draws in ``like``'s dtype directly (cheaper for bf16/fp16
    weights, a different z). With ``rows`` (a 1-D index tensor), z has support on those rows
    of ``like`` only and shape ``(len(rows), *like.shape[1:])``: the batch-row estimator of an
    input embedding. Cost: one pass of random-number generation over the values returned.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown ZO distribution {distribution!r}; choose from {DISTRIBUTIONS}")
    if dtype not in Z_DTYPES:
        raise ValueError(f"unknown z dtype {dtype!r}; choose from {Z_DTYPES}")
    shape = like.shape if rows is None else (len(rows), *like.shape[1:])
    generator = torch.Generator(device=like.device)
    generator.manual_seed(_splitmix64(seed ^ key) & ((1 << 63) - 1))
    draw_dtype = torch.float32 if dtype == "float32" else like.dtype
    if distribution == "gaussian":
        z = torch.randn(shape, generator=generator, device=like.device, dtype=draw_dtype)
    else:
        z = _signs(shape, generator=generator, dtype=draw_dtype, device=like.device)
    return z.to(like.dtype)


BLOCK_VALUES = 1 << 20


def direction_blocks(
    like: torch.Tensor, *, seed: int, key: int, distribution: Distribution = "gaussian", dtype: ZDtype = "float32",
    block_values: int = BLOCK_VALUES,
) -> Iterator[tuple[int, torch.Tensor]]:
    """``direction(like, ...)`` as consecutive blocks of rows ``(first_row, z[first_row:...])``,
    so a consumer holds about ``block_values`` values of z instead of ``like.numel()``.

    Blocks are used where they reproduce the whole draw bit for bit: a CPU generator's fp32
    Gaussian stream is the same drawn at once or in consecutive pieces of a multiple of 16
    values (tested); elsewhere (CUDA, Rademacher, other draw dtypes, small tensors) the one
    block is the whole z.
    """
    row = math.prod(like.shape[1:]) if like.dim() > 1 else 1
    blockwise = (like.device.type == "cpu" and distribution == "gaussian" and dtype == "float32"
                 and like.dim() >= 1 and like.numel() > 2 * block_values)
    if not blockwise:
        yield 0, direction(like, seed=seed, key=key, distribution=distribution, dtype=dtype)
        return
    generator = torch.Generator(device=like.device)
    generator.manual_seed(_splitmix64(seed ^ key) & ((1 << 63) - 1))
    rows_per_block = 16 * max(1, block_values // (16 * row))  # a multiple of 16 values per block
    start, n_rows = 0, like.shape[0]
    while start < n_rows:
        stop = min(start + rows_per_block, n_rows)
        if (n_rows - stop) * row < 16:
            stop = n_rows  # never leave a last block shorter than 16 values
        z = torch.randn((stop - start, *like.shape[1:]), generator=generator, dtype=torch.float32)
        yield start, z.to(like.dtype)
        start = stop


def direction_rows(
    like: torch.Tensor, rows: torch.Tensor, *, seed: int, key: int, distribution: Distribution = "gaussian",
    dtype: ZDtype = "float32", block_values: int = BLOCK_VALUES,
) -> torch.Tensor:
    """``direction(like, ...)[rows]`` for sorted ``rows``, holding one block of z at a time."""
    pieces = []
    for start, block in direction_blocks(like, seed=seed, key=key, distribution=distribution, dtype=dtype,
                                         block_values=block_values):
        inside = rows[(rows >= start) & (rows < start + len(block))]
        pieces.append(block[inside - start])
    return torch.cat(pieces)


_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _signs(shape: torch.Size | tuple[int, ...], *, generator: torch.Generator, dtype: torch.dtype,
           device: torch.device) -> torch.Tensor:
    """Rademacher +-1 values, 8 per random byte (one generator draw per byte, not per value)."""
    n = math.prod(shape)
    random_bytes = torch.empty((n + 7) // 8, dtype=torch.uint8, device=device).random_(0, 256, generator=generator)
    bits = (random_bytes.unsqueeze(-1) >> _BIT_SHIFTS.to(device)) & 1
    return bits.view(-1)[:n].to(dtype).mul_(2).sub_(1).view(shape)


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

    ``rows`` lists, for each parameter under the batch-row estimator (an input embedding), its
    key and the rows its z had support on (the batch's token ids): replay needs them.
    ``rounding`` says how the result was stored into bf16/fp16 weights (float32 ones take it
    exactly): ``stochastic`` (unbiased, noise drawn from (seeds[0], key)) or ``nearest``; logs
    written before the field existed rounded to nearest.
    """

    step: int
    seeds: tuple[int, ...]
    projected_grads: tuple[float, ...]
    lr: float
    weight_decay: float
    distribution: Distribution = "gaussian"
    z_dtype: ZDtype = "float32"
    rows: tuple[tuple[int, tuple[int, ...]], ...] = ()
    rounding: Rounding = "nearest"

    def rows_of(self, key: int, device: torch.device) -> torch.Tensor | None:
        """The rows parameter ``key``'s z is restricted to, or None for a full-support z."""
        for k, rows in self.rows:
            if k == key:
                return torch.tensor(rows, dtype=torch.long, device=device)
        return None


def add_direction_(param: torch.Tensor, z: torch.Tensor, *, alpha: float, rows: torch.Tensor | None = None) -> None:
    """param += alpha * z, where z covers all of ``param`` or only its ``rows``."""
    if rows is None:
        param.add_(z, alpha=alpha)
    else:
        param.index_add_(0, rows, z.to(param.dtype), alpha=alpha)  # a float32 copy of a bf16/fp16 param: z upcast


@torch.no_grad()
def update_(
    param: torch.Tensor, *, key: int, update: ZOUpdate, z_of: Callable[[int], torch.Tensor] | None = None
) -> None:
    """Apply one logged ZO update to one parameter, in place.

    ``z_of(i)`` may hand over the direction of ``update.seeds[i]`` (from a z-cache); by default
    it is regenerated, a block at a time where that gives the same z (``direction_blocks``).
    Cost: len(update.seeds) passes of direction generation over the parameter (none with a
    cache); extra memory: one block of z (one direction's slice where blocks do not apply).
    A bf16/fp16 parameter with ``update.rounding == "stochastic"`` is updated in a float32 copy
    and stored back by ``stochastic_round`` (extra memory: the copy; of the batch's rows only
    under the batch-row estimator without weight decay, the only rows that change then).
    """
    if param.dtype in HALF_PRECISION and update.rounding == "stochastic":
        generator = torch.Generator(device=param.device)
        generator.manual_seed(_splitmix64(update.seeds[0] ^ key ^ _ROUNDING_SALT) & ((1 << 63) - 1))
        rows = update.rows_of(key, param.device)
        if rows is None or update.weight_decay:
            exact = param.float()  # the update in float32 (extra memory: this parameter in float32, once)
            _apply_(exact, param, key=key, update=update, z_of=z_of, rows=rows)
            param.copy_(stochastic_round(exact, param.dtype, generator))
        else:
            exact = param[rows].float()
            _apply_(exact, param, key=key, update=update, z_of=z_of, rows=rows, compact=True)
            param.index_copy_(0, rows, stochastic_round(exact, param.dtype, generator))
    else:
        _apply_(param, param, key=key, update=update, z_of=z_of, rows=update.rows_of(key, param.device))


def _apply_(target: torch.Tensor, param: torch.Tensor, *, key: int, update: ZOUpdate,
            z_of: Callable[[int], torch.Tensor] | None, rows: torch.Tensor | None, compact: bool = False) -> None:
    """target <- target * (1 - lr wd) - lr/q sum_i g_i z_i, with z drawn as for ``param`` (the
    directions the perturbed forwards used; ``rows``: ``update.rows_of(key)``); ``target`` is
    ``param`` or a float32 copy of it, or with ``compact`` a float32 copy of ``rows`` (no weight decay)."""
    if update.weight_decay:
        target.mul_(1.0 - update.lr * update.weight_decay)
    q = len(update.seeds)
    for i, (seed, g) in enumerate(zip(update.seeds, update.projected_grads, strict=True)):
        alpha = -update.lr * g / q
        if z_of is not None or rows is not None:
            z = z_of(i) if z_of is not None else direction(
                param, seed=seed, key=key, distribution=update.distribution, dtype=update.z_dtype, rows=rows)
            if compact:
                target.add_(z.to(target.dtype), alpha=alpha)
            else:
                add_direction_(target, z, alpha=alpha, rows=rows)
        else:
            for start, z in direction_blocks(param, seed=seed, key=key, distribution=update.distribution,
                                             dtype=update.z_dtype):
                target[start : start + len(z)].add_(z, alpha=alpha)


def stochastic_round(exact: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """``exact`` (float32) in ``dtype``, rounded to one of its two neighbours there with the
    probability that makes the expectation exact: E[result] = exact. Round-to-nearest would
    drop every change under half the spacing; this keeps it on average. Cost: one uniform draw
    per value; extra memory: a few float32 temporaries of ``exact``'s size."""
    nearest = exact.to(dtype)
    near = nearest.float()
    toward = torch.where(exact > near, float("inf"), float("-inf")).to(dtype)
    other = torch.nextafter(nearest, toward)  # the neighbour on exact's other side
    gap = other.float() - near  # never 0: other is the next representable value
    chance = (exact - near) / gap  # in [0, 1/2]: nearest is the closer neighbour
    return torch.where(torch.rand(exact.shape, generator=generator, device=exact.device) < chance, other, nearest)


def replay_(named_params: Iterable[tuple[str, torch.Tensor]], updates: Sequence[ZOUpdate]) -> None:
    """Re-apply a log of ZO updates, in order, to parameters named by their canonical names.

    Starting from the weights the run started from, this reproduces its ZO-trained weights
    bit for bit (same ops, same order, same dtype and device).
    """
    keyed = [(parameter_key(name), param) for name, param in named_params]
    for update in updates:
        for key, param in keyed:
            update_(param, key=key, update=update)
