"""A run directory's metrics as the study reads them: the per-step log (``metrics.jsonl``) and
the dev-accuracy curve from it and ``eval.json``."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, training seconds, dev accuracy) at every evaluation of a run, before and after included."""
    evaluation = json.loads((run_dir / "eval.json").read_text())
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    points = [(0, 0.0, evaluation["dev_accuracy_before"])]
    points += [(r["step"], r["seconds"], r["dev_accuracy"]) for r in metrics if "dev_accuracy" in r]
    points.append((evaluation["steps"], metrics[-1]["seconds"] if metrics else 0.0, evaluation["dev_accuracy_after"]))
    return points


def mean_curve(curves: list[list[tuple[int, float, float]]]) -> list[tuple[int, float, float]]:
    """(step, seconds, dev accuracy) of the seeds' ``curve``s averaged, at the evaluations they share."""
    return [(points[0][0], statistics.fmean(p[1] for p in points), statistics.fmean(p[2] for p in points))
            for points in zip(*curves)]
