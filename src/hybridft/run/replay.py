"""The ZO replay log: a run's ZO-trained weights stored as a few scalars per step.

Each line of ``zo_updates.jsonl`` is one applied :class:`~hybridft.engine.zo.ZOUpdate` (step, seeds,
projected gradients, learning rate, weight decay, distribution); steps the divergence guard
skipped applied nothing and have no line. Since z is regenerated from (seed, parameter name),

    theta_T = replay(theta_0, log)

rebuilds the ZO group bit for bit (same ops in the same order and dtype; floats are written
with ``repr``, which round-trips exactly). For a hybrid run the ZO group is the base model; the
adapter and head are first-order and are taken from the run's saved ``adapter/``. For
``zo-full`` and ``zo-lora`` the log alone rebuilds everything that was trained.
Cost of a replay: len(log) passes of direction generation over the ZO group, no forward.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hybridft.engine.zo import ZOUpdate, replay_

LOG = "zo_updates.jsonl"


def to_json(update: ZOUpdate) -> str:
    """One log line (without the newline)."""
    return json.dumps(dataclasses.asdict(update))


def from_json(line: str) -> ZOUpdate:
    record: dict[str, Any] = json.loads(line)
    record["seeds"] = tuple(int(s) for s in record["seeds"])
    record["projected_grads"] = tuple(float(g) for g in record["projected_grads"])
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
    whose z covers only some rows of the embedding (no single figure per weight). Cost: none.
    """
    if any(u.rows for u in updates):
        return None
    return math.sqrt(sum((u.lr / len(u.seeds)) ** 2 * sum(g * g for g in u.projected_grads) for u in updates))


def rebuild(run_dir: str | Path, output_dir: str | Path | None = None) -> Path:
    """Rebuild a finished run's model from its initial weights (its config's ``model``, head
    initialised by its seed), its ZO log and, for hybrid, its saved adapter; save it in the
    layout of :mod:`hybridft.run.export` under ``output_dir`` (default ``RUN_DIR/replayed``)."""
    from hybridft.run import export
    from hybridft.run.checkpoint import run_config
    from hybridft.run.train import build

    run_dir = Path(run_dir)
    config = run_config(run_dir)
    out = Path(output_dir) if output_dir is not None else run_dir / "replayed"
    if (out / "model").exists():
        raise ValueError(f"{out} already holds a model; choose another --output-dir")
    if not (run_dir / LOG).exists():
        raise ValueError(f"{run_dir} has no {LOG} (a run from before the log)")
    updates = read(run_dir / LOG)
    run = build(config.replace(progress=False))
    if not run.groups.zo:
        raise ValueError(f"method {config.method!r} makes no ZO updates; there is nothing to replay")
    if run.groups.fo:
        load_adapter(run.model, run_dir / "adapter")
    replay_(run.groups.zo.items(), updates)
    export.save(run.model, run.tokenizer, out)
    print(f"replayed {len(updates)} ZO updates of {run_dir}; saved to {out}")
    return out


def load_adapter(model: Any, adapter_dir: Path) -> None:
    """Load a saved peft adapter's weights (adapter + head) into ``model`` in place."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = adapter_dir / "adapter_model.safetensors"
    if not path.exists():
        raise ValueError(f"{path} is missing: the first-order part of the run (adapter and head) is needed")
    result = set_peft_model_state_dict(model, load_file(str(path)))
    if result.unexpected_keys:
        raise ValueError(f"{path} does not fit the model (e.g. {result.unexpected_keys[0]})")
