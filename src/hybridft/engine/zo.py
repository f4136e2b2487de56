"""Zeroth-order (SPSA / MeZO-style) estimation over tensors, with seed-regenerated directions.

One two-sided estimate along a direction z ~ N(0, I) (or Rademacher) costs two forward
passes and no backward:

    projected_grad = [L(theta + eps z) - L(theta - eps z)] / (2 eps)       # a scalar
    theta <- theta - lr * (projected_grad * z + weight_decay * theta)

z is never stored. Each parameter's slice of z is drawn from a local ``torch.Generator``
seeded by ``(step seed, parameter key)``, where the key is a hash of the parameter's
canonical name. So z is the same whatever the order in which parameters are visited, on
whichever device or shard a parameter lives, and the global RNG is never touched.

Everything here is a plain function over tensors; no state is kept between calls. The objects
a step is composed of build on it: estimators (``estimators.py``: where the loss is evaluated),
the direction sampler (``directions.py``), update rules (``rules.py``, which also replays a
logged ``ZOUpdate``) and storage rules (``storage.py``: rounding into half precision).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from hybridft.engine.rng import generator, parameter_key, step_seed

__all__ = ["DISTRIBUTIONS", "ROUNDINGS", "Z_DTYPES", "Distribution", "HyperparameterError", "LowRank", "Rounding",
           "ZDtype", "ZOUpdate", "add_direction_", "direction", "direction_blocks", "direction_rows", "magnitude_mask",
           "parameter_key", "perturb_", "projected_grad", "step_seed"]

Distribution = Literal["gaussian", "rademacher"]
DISTRIBUTIONS: tuple[str, ...] = ("gaussian", "rademacher")
ZDtype = Literal["float32", "param"]
Z_DTYPES: tuple[str, ...] = ("float32", "param")
Rounding = Literal["stochastic", "nearest"]
ROUNDINGS: tuple[str, ...] = ("stochastic", "nearest")
LowRank = tuple[int, int]  # (rank r, seed of V): z = U V^T / sqrt(r) for 2-D weights
_V_SALT = 0x10_5A_1E_F7  # separates V's stream from U's


class HyperparameterError(ValueError):
    """A ZO hyperparameter no step can use, raised where the rule object is made. ``name`` is
    the hyperparameter, so that an edge (CLI, Trainer arguments) can name its own flag."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name} {problem}")
        self.name, self.problem = name, problem


def direction(
    like: torch.Tensor,
    *,
    seed: int,
    key: int,
    distribution: Distribution = "gaussian",
    dtype: ZDtype = "float32",
    rows: torch.Tensor | None = None,
    low_rank: LowRank | None = None,
) -> torch.Tensor:
    """The slice of z for one parameter: same shape, dtype and device as ``like``.

    Drawn from a fresh generator seeded by ``(seed, key)``. ``dtype="float32"`` draws in fp32
    and casts to ``like``'s dtype, so a bf16 copy of a model sees the rounding of the same fp32
    direction; ``dtype="param"`` draws in ``like``'s dtype directly (cheaper for bf16/fp16
    weights, a different z). With ``rows`` (a 1-D index tensor), z has support on those rows
    of ``like`` only and shape ``(len(rows), *like.shape[1:])``: the batch-row estimator of an
    input embedding. Cost: one pass of random-number generation over the values returned.

    With ``low_rank = (r, v_seed)`` a 2-D ``like`` (m x n) gets z = U V^T / sqrt(r), U (m x r)
    drawn from ``(seed, key)`` and V (n x r) from ``(v_seed, key)``, entries of unit variance:
    (m + n) r values generated instead of m n (LOZO's directions). Other shapes keep dense z.
    """
    draw_dtype = torch.float32 if dtype == "float32" else like.dtype
    if low_rank is not None and like.dim() == 2:
        rank, v_seed = low_rank
        u = _draw((like.shape[0], rank), seed ^ key, distribution, draw_dtype, like.device)
        v = _draw((like.shape[1], rank), v_seed ^ key ^ _V_SALT, distribution, draw_dtype, like.device)
        u = u if rows is None else u[rows]
        z = u[:, :1] * v[:, 0]  # sum of r outer products, elementwise: z[rows] is bitwise the rows of z
        for k in range(1, rank):
            z.addcmul_(u[:, k : k + 1], v[:, k])
        return z.mul_(1.0 / math.sqrt(rank)).to(like.dtype)
    shape = like.shape if rows is None else (len(rows), *like.shape[1:])
    return _draw(shape, seed ^ key, distribution, draw_dtype, like.device).to(like.dtype)


def magnitude_mask(param: torch.Tensor, fraction: float) -> torch.Tensor:
    """Sparse-MeZO's mask: True on the ``fraction`` of ``param``'s values smallest in magnitude
    (|w| <= the k-th smallest |w|, k = ceil(fraction * numel); ties at the threshold included).
    A function of the values alone, so replay re-derives it from the weights at that step.
    Cost: one selection over the values; memory: one bool per value."""
    magnitudes = param.detach().abs()
    k = max(1, math.ceil(fraction * magnitudes.numel()))
    threshold = magnitudes.flatten().kthvalue(k).values
    return magnitudes <= threshold


def _draw(shape: torch.Size | tuple[int, ...], seed: int, distribution: Distribution, dtype: torch.dtype,
          device: torch.device) -> torch.Tensor:
    """Values of unit variance from a generator seeded by ``seed``: N(0, 1) or uniform on {-1, +1}."""
    g = generator(seed, device)
    if distribution == "gaussian":
        return torch.randn(shape, generator=g, device=device, dtype=dtype)
    if distribution == "rademacher":
        return _signs(shape, generator=g, dtype=dtype, device=device)
    raise HyperparameterError("distribution", f"must be one of {', '.join(DISTRIBUTIONS)}; got {distribution!r}")


BLOCK_VALUES = 1 << 20


def direction_blocks(
    like: torch.Tensor, *, seed: int, key: int, distribution: Distribution = "gaussian", dtype: ZDtype = "float32",
    block_values: int = BLOCK_VALUES, low_rank: LowRank | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """``direction(like, ...)`` as consecutive blocks of rows ``(first_row, z[first_row:...])``,
    so a consumer holds about ``block_values`` values of z instead of ``like.numel()``.

    Blocks are used where they reproduce the whole draw bit for bit: a CPU generator's fp32
    Gaussian stream is the same drawn at once or in consecutive pieces of a multiple of 16
    values (tested); elsewhere (CUDA, Rademacher, other draw dtypes, small tensors, low-rank z)
    the one block is the whole z.
    """
    row = math.prod(like.shape[1:]) if like.dim() > 1 else 1
    blockwise = (like.device.type == "cpu" and distribution == "gaussian" and dtype == "float32"
                 and like.dim() >= 1 and like.numel() > 2 * block_values and (low_rank is None or like.dim() != 2))
    if not blockwise:
        yield 0, direction(like, seed=seed, key=key, distribution=distribution, dtype=dtype, low_rank=low_rank)
        return
    g = generator(seed ^ key, like.device)
    rows_per_block = 16 * max(1, block_values // (16 * row))  # a multiple of 16 values per block
    start, n_rows = 0, like.shape[0]
    while start < n_rows:
        stop = min(start + rows_per_block, n_rows)
        if (n_rows - stop) * row < 16:
            stop = n_rows  # never leave a last block shorter than 16 values
        z = torch.randn((stop - start, *like.shape[1:]), generator=g, dtype=torch.float32)
        yield start, z.to(like.dtype)
        start = stop


def direction_rows(
    like: torch.Tensor, rows: torch.Tensor, *, seed: int, key: int, distribution: Distribution = "gaussian",
    dtype: ZDtype = "float32", block_values: int = BLOCK_VALUES, low_rank: LowRank | None = None,
) -> torch.Tensor:
    """``direction(like, ...)[rows]`` for sorted ``rows``, holding one block of z at a time."""
    if low_rank is not None and like.dim() == 2:
        return direction(like, seed=seed, key=key, distribution=distribution, dtype=dtype, rows=rows, low_rank=low_rank)
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
    written before the field existed rounded to nearest. ``rank`` > 0: 2-D weights had low-rank
    z of that rank, V drawn from ``v_seeds[i]``. ``layer_fraction`` < 1: only the blocks
    ``directions.active_keys`` derives from seeds[0] and the parameter names were touched.
    ``mask_fraction`` < 1: z of each tensor was masked to its smallest-magnitude values
    (``magnitude_mask`` of the weights before the update).
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
    rank: int = 0
    v_seeds: tuple[int, ...] = ()
    layer_fraction: float = 1.0
    mask_fraction: float = 1.0

    def low_rank(self, i: int) -> LowRank | None:
        """Direction i's (rank, V seed) for 2-D weights, or None for dense z."""
        return (self.rank, self.v_seeds[i]) if self.rank else None

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
