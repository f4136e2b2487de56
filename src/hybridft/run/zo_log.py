"""The ZO log format: a run's ZO-trained weights stored as a few scalars per step.

Each line of ``zo_updates.jsonl`` is one applied :class:`~hybridft.engine.zo.ZOUpdate` (step, seeds,
projected gradients, learning rate, weight decay, distribution); steps the divergence guard
skipped applied nothing and have no line. Floats are written with ``repr``, which round-trips
exactly, so :mod:`hybridft.run.replay` rebuilds the ZO group bit for bit from these lines.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hybridft.engine.zo import ZOUpdate

LOG = "zo_updates.jsonl"


# Fields a rule adds to the log only when it is used (their defaults mean plain ZO-SGD directions),
# so a plain run's lines are those written before the rules existed.
_OPTIONAL = {f.name: f.default for f in dataclasses.fields(ZOUpdate) if f.name in ("rank", "v_seeds", "layer_fraction", "mask_fraction")}


def to_json(update: ZOUpdate) -> str:
    """One log line (without the newline)."""
    record = dataclasses.asdict(update)
    return json.dumps({k: v for k, v in record.items() if k not in _OPTIONAL or v != _OPTIONAL[k]})


def from_json(line: str) -> ZOUpdate:
    record: dict[str, Any] = json.loads(line)
    record["seeds"] = tuple(int(s) for s in record["seeds"])
    record["projected_grads"] = tuple(float(g) for g in record["projected_grads"])
    record["v_seeds"] = tuple(int(s) for s in record.get("v_seeds", ()))
    return ZOUpdate(**record)


def read(path: Path) -> list[ZOUpdate]:
    """The updates of a log, in order; a damaged line is a one-line ValueError naming it."""
    updates = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                updates.append(from_json(line))
            except (ValueError, TypeError, KeyError) as error:
                raise ValueError(f"{path}:{number}: not a ZO update ({error})") from error
    steps = [u.step for u in updates]
    if steps != sorted(set(steps)):
        raise ValueError(f"{path}: steps are not strictly increasing (a log of several runs?)")
    return updates


def rms_move(updates: Sequence[ZOUpdate]) -> float | None:
    """How far the logged updates moved a ZO weight, root-mean-square over the group:

        sqrt(sum_t (lr_t / q_t)^2 * sum_i g_ti^2)  ~=  ||theta_T - theta_0|| / sqrt(d)

    since each step adds -lr/q * sum_i g_i z_i with fresh directions of unit variance per
    coordinate (Gaussian or Rademacher); the two sides agree up to O(1/sqrt(d)) for the d weights
    of the group. Weight decay's shrink is not included. None for a log of batch-row directions,
    whose z covers only some rows of the embedding, or of layer subsets, which move only some
    blocks each step (no single figure per weight). Cost: none.
    """
    if any(u.rows or u.layer_fraction < 1 for u in updates):
        return None
    return math.sqrt(sum((u.lr / len(u.seeds)) ** 2 * sum(g * g for g in u.projected_grads) for u in updates))
