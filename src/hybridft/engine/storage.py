"""Storage rules: how a ZO update computed in float32 is stored into the weights' own dtype.

float32 (and float64) weights take every update exactly, whatever the rule. bfloat16/float16
weights cannot: an update under half a weight's spacing (about 2^-9 of its size in bfloat16,
2^-12 in float16) is lost by round-to-nearest, and at MeZO's learning rates that is most of
them (README, "Low precision"). Each rule is a small object:

- ``StochasticRounding`` (default): the update is computed in a float32 copy and stored by
  rounding each value up or down with the probability that keeps its expectation exact
  (E[stored] = exact). The noise comes from a generator seeded by (step seed, parameter key),
  so replay reproduces it. Extra memory: a float32 copy of the parameter (of the updated rows
  only, when an update touches only some rows).
- ``NearestRounding`` (MeZO's): the update is added in the weights' dtype, each op rounding to
  nearest. No extra memory.

``STORAGE_RULES`` maps the name a ``ZOUpdate`` logs (``rounding``) to its rule, for replay.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from hybridft.engine.rng import generator
from hybridft.engine.zo import ROUNDINGS, HyperparameterError, Rounding

HALF_PRECISION = (torch.bfloat16, torch.float16)
_ROUNDING_SALT = 0x5EED_0F_0DD_B175  # separates the rounding noise's stream from z's

# apply(target, compact): add the update to ``target``, which is the parameter itself or a float32
# copy of it, or (compact) a float32 copy of only the updated rows.
Apply = Callable[[torch.Tensor, bool], None]


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


@dataclass(frozen=True)
class NearestRounding:
    """Add the update in the weights' dtype (MeZO's; loses updates under half a weight's spacing)."""

    name: ClassVar[Rounding] = "nearest"

    def store_(self, param: torch.Tensor, apply: Apply, *, seed: int, key: int,
               rows: torch.Tensor | None = None) -> None:
        apply(param, False)


@dataclass(frozen=True)
class StochasticRounding:
    """Compute the update in float32, store it into bf16/fp16 by unbiased stochastic rounding.

    ``rows``: the update changes only these rows of ``param`` (then only they are copied to
    float32 and rounded); None: it may change every value."""

    name: ClassVar[Rounding] = "stochastic"

    def store_(self, param: torch.Tensor, apply: Apply, *, seed: int, key: int,
               rows: torch.Tensor | None = None) -> None:
        if param.dtype not in HALF_PRECISION:
            apply(param, False)
            return
        noise = generator(seed ^ key ^ _ROUNDING_SALT, param.device)
        if rows is None:
            exact = param.float()  # extra memory: this parameter in float32, once
            apply(exact, False)
            param.copy_(stochastic_round(exact, param.dtype, noise))
        else:
            exact = param[rows].float()
            apply(exact, True)
            param.index_copy_(0, rows, stochastic_round(exact, param.dtype, noise))


StorageRule = NearestRounding | StochasticRounding
STORAGE_RULES: dict[str, StorageRule] = {"stochastic": StochasticRounding(), "nearest": NearestRounding()}


def storage_rule(name: str) -> StorageRule:
    """The storage rule called ``name`` (a ``--zo-rounding`` value, a logged ``rounding``)."""
    if name not in STORAGE_RULES:
        raise HyperparameterError("rounding", f"must be one of {', '.join(ROUNDINGS)}; got {name!r}")
    return STORAGE_RULES[name]
