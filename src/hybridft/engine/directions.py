"""The direction z of one ZO step, as every ZO parameter sees it: generated on demand or cached,
over a whole parameter or over the rows of an input embedding that the batch reads.

``zo.direction`` draws one parameter's slice of z from (seed, key). ``Directions`` adds what a
step needs on top of it:

- a **z-cache** (opt-in): each slice is generated once per step and kept, so the +eps and
  -eps evaluations and the update reuse it. Generation passes per step: 1 instead of 3;
  extra memory: one copy of the ZO weights (in their dtype) for the length of the step.
- **batch rows** (opt-in, untied input embeddings only): the embedding's z has support on the
  rows of the tokens in the batch, ``z = P_B z'`` with ``P_B`` the projection on those rows.
  L(theta; B) does not depend on the other rows, so the two loss values, hence the projected
  gradient g, are exactly those of the full-support z; the update ``g P_B z'`` drops the
  pure-noise term on rows the batch never read. It is unbiased for grad L(theta; B) (the
  batch gradient is zero outside those rows) with lower variance. Rows are recorded at the
  first forward that runs the embedding and logged in ``ZOUpdate.rows`` for replay.
- **parallel generation**: whole-model passes (cache fill, update) run one parameter per task
  on ``threads`` threads; each slice comes from its own generator, so z is identical.

``DirectionSampler`` is the rule a ``HybridOptimizer`` takes: the distribution of z and these
options, checked once when it is made; each step it hands out that step's ``Directions``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from hybridft.engine.rng import generator, step_seed
from hybridft.engine.zo import (DISTRIBUTIONS, Z_DTYPES, Distribution, HyperparameterError, LowRank, ZDtype, direction,
                                direction_rows, magnitude_mask)

T = TypeVar("T")


def parallel_map(fn: Callable[[T], object], items: Iterable[T], threads: int) -> None:
    """Run ``fn`` on every item, on ``threads`` threads (torch ops release the GIL)."""
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in pool.map(fn, items):
            pass


class Directions:
    """z(seed) for the ZO parameters of one step (one of its q directions).

    ``row_keys``: parameters whose z is restricted to batch rows; ``rows`` (key -> sorted row
    ids) is shared by a step's directions and filled by ``record_rows``. ``cache``: keep z.
    """

    def __init__(
        self,
        seed: int,
        *,
        distribution: Distribution = "gaussian",
        dtype: ZDtype = "float32",
        row_keys: frozenset[int] = frozenset(),
        rows: dict[int, torch.Tensor] | None = None,
        cache: bool = False,
        low_rank: LowRank | None = None,
        active: frozenset[int] | None = None,
        mask_fraction: float | None = None,
        masks: dict[int, torch.Tensor] | None = None,
    ) -> None:
        self.seed = seed
        self.distribution: Distribution = distribution
        self.dtype: ZDtype = dtype
        self.row_keys = row_keys
        self.rows = {} if rows is None else rows
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None
        self.low_rank = low_rank  # (rank, V seed): low-rank z for 2-D weights
        self.active = active  # the keys this step perturbs and updates (None: all)
        self.mask_fraction = mask_fraction  # z masked to each tensor's smallest-magnitude values
        self.masks = {} if masks is None else masks  # key -> mask, shared by a step's directions

    def mask(self, param: torch.Tensor, key: int) -> torch.Tensor | None:
        """This step's magnitude mask of ``param`` (None without one), computed at its first use,
        when ``param`` holds the step's unperturbed weights, and kept for the step."""
        if self.mask_fraction is None:
            return None
        if key not in self.masks:
            self.masks[key] = magnitude_mask(param, self.mask_fraction)
        return self.masks[key]

    def draw(self, param: torch.Tensor, key: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``zo.direction`` with this direction's seed and options."""
        return direction(param, seed=self.seed, key=key, distribution=self.distribution, dtype=self.dtype, rows=rows,
                         low_rank=self.low_rank)

    def record_rows(self, key: int, rows: torch.Tensor) -> None:
        """Fix the support of a batch-row parameter's z; every later forward must read the same rows."""
        if key not in self.row_keys:
            return
        seen = self.rows.setdefault(key, rows)
        if seen is not rows and not torch.equal(seen, rows):
            raise ValueError("batch-row directions: the input embedding read different tokens within one step")

    def z(self, param: torch.Tensor, key: int) -> torch.Tensor:
        """This parameter's slice of z: full shape, or ``(len(rows), ...)`` for a batch-row parameter."""
        if self.cache is not None and key in self.cache:
            return self.cache[key]
        rows = self.rows.get(key, param.new_empty(0, dtype=torch.long)) if key in self.row_keys else None
        z = self.draw(param, key, rows)
        mask = self.mask(param, key)
        if mask is not None:
            z.masked_fill_(~(mask if rows is None else mask[rows]), 0)
        if self.cache is not None:
            self.cache[key] = z
        return z

    def z_rows(self, param: torch.Tensor, key: int, rows: torch.Tensor) -> torch.Tensor:
        """z on ``rows`` of ``param`` (a perturbation that only the batch's rows need); without
        a cache, the full-support z is generated a block at a time (``zo.direction_rows``)."""
        if key in self.row_keys:
            self.record_rows(key, rows)
            return self.z(param, key)
        if self.cache is None:
            z = direction_rows(param, rows, seed=self.seed, key=key, distribution=self.distribution, dtype=self.dtype,
                               low_rank=self.low_rank)
            mask = self.mask(param, key)
            return z if mask is None else z.masked_fill_(~mask[rows], 0)
        return self.z(param, key)[rows]

    def fill_cache(self, keys: Mapping[nn.Parameter, int], threads: int = 1) -> None:
        """Generate every full-support slice now, in parallel (batch-row slices wait for the batch)."""
        if self.cache is None:
            raise ValueError("fill_cache needs Directions(cache=True)")
        parallel_map(lambda item: self.z(*item), [(p, k) for p, k in keys.items() if k not in self.row_keys
                                                  and (self.active is None or k in self.active)], threads)

    def cache_bytes(self) -> int:
        return sum(z.numel() * z.element_size() for z in (self.cache or {}).values())

    def logged_rows(self) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """The rows of each batch-row parameter, for ``ZOUpdate.rows`` (empty: the embedding never ran)."""
        return tuple((k, tuple(self.rows[k].tolist()) if k in self.rows else ()) for k in sorted(self.row_keys))


@dataclass(frozen=True)
class DirectionSampler:
    """How a step's directions are drawn: z ~ N(0, I) (``gaussian``) or uniform on {-1, +1}
    (``rademacher``), drawn in float32 or in the weights' dtype (``z_dtype``), generated on
    demand or once per step (``cache``), restricted to the batch's input-embedding rows
    (``embedding_rows``), on ``threads`` threads for whole-model passes."""

    distribution: Distribution = "gaussian"
    z_dtype: ZDtype = "float32"
    cache: bool = False
    embedding_rows: bool = False
    threads: int = 1

    def __post_init__(self) -> None:
        if self.distribution not in DISTRIBUTIONS:
            raise HyperparameterError("distribution", f"must be one of {', '.join(DISTRIBUTIONS)}; got {self.distribution!r}")
        if self.z_dtype not in Z_DTYPES:
            raise HyperparameterError("z_dtype", f"must be one of {', '.join(Z_DTYPES)}; got {self.z_dtype!r}")
        if not isinstance(self.threads, int) or self.threads < 1:
            raise HyperparameterError("threads", f"must be at least 1, got {self.threads}")

    def settings(self) -> dict[str, Any]:
        """What a checkpoint records of this sampler (``HybridOptimizer.settings``)."""
        return {"distribution": self.distribution, "z_dtype": self.z_dtype, "z_cache": self.cache,
                "embedding_rows": self.embedding_rows}

    def log_fields(self, directions: Sequence[Directions]) -> dict[str, Any]:
        """What a step's ``ZOUpdate`` must record of its directions for replay."""
        return {"distribution": self.distribution, "z_dtype": self.z_dtype, "rows": directions[0].logged_rows()}

    def row_keys(self, module: nn.Module, keys: Mapping[nn.Parameter, int]) -> frozenset[int]:
        """The keys whose z is restricted to batch rows: the input embedding's, with ``embedding_rows``."""
        return frozenset([input_embedding_key(module, keys)]) if self.embedding_rows else frozenset()

    def step(self, seed: int, step: int, num_directions: int, keys: Mapping[nn.Parameter, int],
             row_keys: frozenset[int] = frozenset(), names: Mapping[int, str] | None = None) -> list[Directions]:
        """The ``num_directions`` directions of step ``step`` of a run seeded ``seed`` (their
        batch rows shared); with ``cache``, full-support slices are generated now. ``names``:
        key -> canonical parameter name (for samplers that choose by name)."""
        rows: dict[int, torch.Tensor] = {}
        masks: dict[int, torch.Tensor] = {}
        directions = [Directions(step_seed(seed, step, i), distribution=self.distribution, dtype=self.z_dtype,
                                 row_keys=row_keys, rows=rows, cache=self.cache, masks=masks,
                                 **self._options(seed, step, i, names)) for i in range(num_directions)]
        if self.cache:
            for d in directions:
                d.fill_cache(keys, self.threads)
        return directions

    def _options(self, seed: int, step: int, i: int, names: Mapping[int, str] | None) -> dict[str, Any]:
        """Direction i's extra options (a subclass's: low rank, active keys)."""
        return {}

    def map(self, fn: Callable[[T], object], items: Iterable[T]) -> None:
        """``fn`` over ``items`` on this sampler's threads (a whole-model pass over z)."""
        parallel_map(fn, items, self.threads)


_V_STEP_SALT = 0x0F_A7_E5  # V's seeds: their own stream of (seed, step) seeds


@dataclass(frozen=True)
class LowRankSampler(DirectionSampler):
    """LOZO's directions (Chen et al. 2024, arXiv 2410.07698): each 2-D weight (m x n) gets
    z = U V^T / sqrt(r), U and V of rank ``rank`` with unit-variance entries; U is drawn anew every
    step, V is kept for ``v_every`` steps (LOZO's lazy V). Other tensors keep dense z. z's entries
    still have unit variance, so learning rates carry over in scale. Cost per 2-D weight and
    generation: (m + n) r values drawn and an m x n product, instead of m n values drawn."""

    rank: int = 2
    v_every: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.rank, int) or self.rank < 1:
            raise HyperparameterError("rank", f"must be at least 1, got {self.rank}")
        if not isinstance(self.v_every, int) or self.v_every < 1:
            raise HyperparameterError("v_every", f"must be at least 1, got {self.v_every}")

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "sampler": "LowRankSampler", "rank": self.rank, "v_every": self.v_every}

    def log_fields(self, directions: Sequence[Directions]) -> dict[str, Any]:
        return {**super().log_fields(directions), "rank": self.rank,
                "v_seeds": tuple(d.low_rank[1] for d in directions if d.low_rank is not None)}

    def _options(self, seed: int, step: int, i: int, names: Mapping[int, str] | None) -> dict[str, Any]:
        return {"low_rank": (self.rank, step_seed(seed ^ _V_STEP_SALT, step // self.v_every, i))}


_BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


def block_of(name: str) -> str:
    """The transformer block a parameter belongs to (``layer.3``), from its canonical name; every
    parameter outside the numbered blocks (embeddings, final norm, head) is one unit, ``other``."""
    found = _BLOCK.search(name)
    return f"block.{found.group(1)}" if found else "other"


def active_keys(names: Mapping[int, str], fraction: float, seed: int) -> frozenset[int]:
    """The keys of a seeded random ``fraction`` of the units (``block_of``), at least one unit:
    LeZO's layer subset of one step. Derived from the step seed and the names alone (replay)."""
    units = sorted({block_of(n) for n in names.values()})
    count = max(1, round(fraction * len(units)))
    order = torch.randperm(len(units), generator=generator(seed ^ _UNIT_SALT, torch.device("cpu"))).tolist()
    chosen = {units[j] for j in order[:count]}
    return frozenset(k for k, n in names.items() if block_of(n) in chosen)


_UNIT_SALT = 0x1E_20_B1_0C
SAMPLERS = ("dense", "low-rank", "layer-subset", "magnitude-mask")


@dataclass(frozen=True)
class MagnitudeMaskSampler(DirectionSampler):
    """Sparse-MeZO's directions (Liu et al. 2024, arXiv 2402.15751): z of each ZO tensor is
    masked to the ``fraction`` of its values smallest in magnitude (``zo.magnitude_mask`` of the
    weights at the start of the step), so only those are perturbed and updated. Cost per step:
    the dense rule's generation plus one selection per tensor; memory: one bool per ZO weight
    for the step. The mask is a function of the weights, so replay re-derives it."""

    fraction: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0 < self.fraction <= 1):
            raise HyperparameterError("mask_fraction", f"must be in (0, 1], got {self.fraction}")

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "sampler": "MagnitudeMaskSampler", "fraction": self.fraction}

    def log_fields(self, directions: Sequence[Directions]) -> dict[str, Any]:
        return {**super().log_fields(directions), "mask_fraction": self.fraction}

    def _options(self, seed: int, step: int, i: int, names: Mapping[int, str] | None) -> dict[str, Any]:
        return {"mask_fraction": self.fraction}


@dataclass(frozen=True)
class LayerSubsetSampler(DirectionSampler):
    """LeZO's directions (Wang et al. 2024, arXiv 2410.18754): each step perturbs and updates only
    the ZO weights of a seeded random ``fraction`` of the transformer blocks (``block_of``: the
    numbered blocks, plus the rest of the model as one more unit); the others get no z, no
    generation and no update. Cost per step: ``fraction`` of the generation passes; the forwards
    are unchanged. The subset is derived from the step's first seed, so replay re-derives it."""

    fraction: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0 < self.fraction <= 1):
            raise HyperparameterError("fraction", f"must be in (0, 1], got {self.fraction}")

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "sampler": "LayerSubsetSampler", "fraction": self.fraction}

    def log_fields(self, directions: Sequence[Directions]) -> dict[str, Any]:
        return {**super().log_fields(directions), "layer_fraction": self.fraction}

    def _options(self, seed: int, step: int, i: int, names: Mapping[int, str] | None) -> dict[str, Any]:
        if names is None:
            raise ValueError("LayerSubsetSampler needs the parameters' names")
        return {"active": active_keys(names, self.fraction, step_seed(seed, step, 0))}


def reads_rows_only(module: nn.Module) -> bool:
    """Whether ``module``'s forward reads only the rows of its weight indexed by its input:
    a plain ``nn.Embedding`` (not a subclass with its own forward) without ``max_norm``."""
    return (isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward
            and module.max_norm is None)


def input_embedding_key(module: nn.Module, keys: Mapping[nn.Parameter, int]) -> int:
    """The key of the input-embedding weight, checked fit for batch-row directions: in the ZO
    set, a plain ``nn.Embedding``, and untied (a tied output layer reads every row)."""
    get = getattr(module, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    embedding = getattr(embedding, "base_layer", embedding)  # peft's LoRA embedding wraps the original
    if not isinstance(embedding, nn.Module) or not reads_rows_only(embedding):
        raise ValueError("batch-row directions need an input embedding that is a plain nn.Embedding")
    weight = embedding.weight
    if weight not in keys:
        raise ValueError("batch-row directions: the input embedding is not in the ZO set")
    readers = [m for m in module.modules() if any(p is weight for p in m._parameters.values())]
    if len(readers) > 1:
        raise ValueError("batch-row directions need an untied input embedding; this model ties it to another "
                         "layer, which reads every row")
    return keys[weight]


def direction_sampler(kind: str = "dense", *, rank: int = 2, v_every: int = 1, fraction: float = 0.25,
                      mask_fraction: float = 0.25, **common: Any) -> DirectionSampler:
    """The sampler the flag ``--zo-directions`` names (``common``: DirectionSampler's fields)."""
    if kind == "dense":
        return DirectionSampler(**common)
    if kind == "low-rank":
        return LowRankSampler(**common, rank=rank, v_every=v_every)
    if kind == "layer-subset":
        return LayerSubsetSampler(**common, fraction=fraction)
    if kind == "magnitude-mask":
        return MagnitudeMaskSampler(**common, fraction=mask_fraction)
    raise HyperparameterError("directions", f"must be one of {', '.join(SAMPLERS)}; got {kind!r}")
