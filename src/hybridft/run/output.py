"""A run's output directory: chosen and checked before anything is written (:mod:`hybridft.run.lock`
then holds it for the run), and the logs a run appends to it every step."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from hybridft.engine.zo import ZOUpdate
from hybridft.run import checkpoint, disk, zo_log
from hybridft.run.config import TrainConfig

LOGS = ("metrics.jsonl", zo_log.LOG)  # appended every step; cut back to the checkpoint on resume


def prepare_output_dir(config: TrainConfig, overwrite: bool, resume: bool = False) -> Path:
    """The run directory; refuses one that already holds a run unless ``overwrite`` (or
    ``resume``, which needs one). Writes nothing."""
    if config.output_dir is None:
        if resume:
            raise ValueError("resuming needs the run's directory")
        return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.method}-{config.task}"
    out = Path(config.output_dir)
    check_output_dir(out, overwrite, resume)
    return out


def check_output_dir(out: Path, overwrite: bool, resume: bool) -> None:
    """Refuse ``out`` if it is a file, holds a run (unless ``overwrite`` or ``resume``) or holds
    none to ``resume``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out} exists and is not a directory")
    if resume and not (out / "config.json").exists():
        raise ValueError(f"{out} holds no run to resume (no config.json)")
    if (out / "config.json").exists() and not (overwrite or resume):
        raise ValueError(f"{out} already holds a run; choose another --output-dir, pass --overwrite, or --resume it")


def open_logs(out: Path, main: bool) -> contextlib.AbstractContextManager[checkpoint.Logs | None]:
    """The run's logs, opened for appending by rank 0 (``main``); None on the other ranks."""
    if not main:
        return contextlib.nullcontext()
    with disk.writing("the logs", out):
        return checkpoint.Logs(out, LOGS)


def log(logs: checkpoint.Logs, out: Path, record: dict[str, Any], update: ZOUpdate | None) -> None:
    """One line of ``metrics.jsonl`` and, for a step that applied a ZO update, of the ZO log."""
    with disk.writing("the logs", out):
        logs.append(LOGS[0], json.dumps(record))
        if update is not None:
            logs.append(LOGS[1], zo_log.to_json(update))
