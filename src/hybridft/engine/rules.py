"""Update rules: what a step does to the ZO weights given its projected gradients, and how a
logged update (``ZOUpdate``) is applied again for replay.

``ZOSGD`` (the analysis' rule, MeZO's ZO-SGD with decoupled weight decay):

    theta <- theta (1 - lr wd) - lr / q * sum_i g_i z_i

Cost per step: q passes of direction generation over the ZO weights (none with a z-cache),
no state. The result is stored into the weights' dtype by a storage rule (``storage.py``).
A new rule is one class here with ``log`` (the ``ZOUpdate`` of a step: the scalars replay
needs) and ``apply_`` (that update applied to one parameter), plus its fields in ``ZOUpdate``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from hybridft.engine.directions import active_keys
from hybridft.engine.rng import parameter_key
from hybridft.engine.storage import StorageRule, storage_rule
from hybridft.engine.zo import HyperparameterError, ZOUpdate, add_direction_, direction, direction_blocks, magnitude_mask


@dataclass(frozen=True)
class ZOSGD:
    """theta <- theta (1 - lr weight_decay) - lr / q sum_i g_i z_i (``weight_decay`` >= 0)."""

    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise HyperparameterError("weight_decay", f"must be 0 or positive, got {self.weight_decay}")

    def log(self, **fields: object) -> ZOUpdate:
        """The step's log entry: ``fields`` (step, seeds, projected_grads, lr and what the
        direction sampler and storage rule record) plus this rule's own."""
        return ZOUpdate(weight_decay=self.weight_decay, **fields)  # type: ignore[arg-type]

    @staticmethod
    @torch.no_grad()
    def apply_(param: torch.Tensor, *, key: int, update: ZOUpdate,
               z_of: Callable[[int], torch.Tensor] | None = None, storage: StorageRule | None = None) -> None:
        """Apply ``update`` to one parameter, in place, stored by ``storage`` (default: the
        storage rule the update logs, ``update.rounding``).

        ``z_of(i)`` may hand over the direction of ``update.seeds[i]`` (from a z-cache); by
        default it is regenerated, a block at a time where that gives the same z
        (``direction_blocks``). Extra memory: one block of z (one direction's slice where blocks
        do not apply), plus what the storage rule needs."""
        rows = update.rows_of(key, param.device)
        only_rows = rows is not None and not update.weight_decay  # then no other row changes
        # The magnitude mask of the weights before this update (a cached z is masked already).
        mask = magnitude_mask(param, update.mask_fraction) if update.mask_fraction < 1 and z_of is None else None

        def apply(target: torch.Tensor, compact: bool) -> None:
            _sgd_(target, param, key=key, update=update, z_of=z_of, rows=rows, compact=compact, mask=mask)

        (storage or storage_rule(update.rounding)).store_(param, apply, seed=update.seeds[0], key=key,
                                             rows=rows if only_rows else None)


def _sgd_(target: torch.Tensor, param: torch.Tensor, *, key: int, update: ZOUpdate,
          z_of: Callable[[int], torch.Tensor] | None, rows: torch.Tensor | None, compact: bool,
          mask: torch.Tensor | None = None) -> None:
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
                param, seed=seed, key=key, distribution=update.distribution, dtype=update.z_dtype, rows=rows,
                low_rank=update.low_rank(i))
            if mask is not None:
                z.masked_fill_(~(mask if rows is None else mask[rows]), 0)
            if compact:
                target.add_(z.to(target.dtype), alpha=alpha)
            else:
                add_direction_(target, z, alpha=alpha, rows=rows)
        else:
            for start, z in direction_blocks(param, seed=seed, key=key, distribution=update.distribution,
                                             dtype=update.z_dtype, low_rank=update.low_rank(i)):
                if mask is not None:
                    z.masked_fill_(~mask[start : start + len(z)], 0)
                target[start : start + len(z)].add_(z, alpha=alpha)


UpdateRule = ZOSGD


def update_(param: torch.Tensor, *, key: int, update: ZOUpdate,
            z_of: Callable[[int], torch.Tensor] | None = None) -> None:
    """Apply one logged ZO update to one parameter, in place (see ``ZOSGD.apply_``)."""
    ZOSGD.apply_(param, key=key, update=update, z_of=z_of)


def replay_(named_params: Iterable[tuple[str, torch.Tensor]], updates: Sequence[ZOUpdate]) -> None:
    """Re-apply a log of ZO updates, in order, to parameters named by their canonical names.

    Starting from the weights the run started from, this reproduces its ZO-trained weights
    bit for bit (same ops, same order, same dtype and device).
    """
    named = [(parameter_key(name), name, param) for name, param in named_params]
    names = {key: name for key, name, _ in named}
    for update in updates:
        active = active_keys(names, update.layer_fraction, update.seeds[0]) if update.layer_fraction < 1 else None
        for key, _, param in named:
            if active is None or key in active:
                update_(param, key=key, update=update)
