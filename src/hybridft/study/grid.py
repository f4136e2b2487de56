"""A bench grid: its config (models x tasks x methods x seeds, learning-rate grids), its cells,
and the learning rates chosen on dev.

For each (model, task, method) every point of the method's learning-rate grid runs with the
selection seed (``seeds[0]``); the best final dev accuracy wins, and the other seeds run at that
point. A cell is finished when its run directory holds ``eval.json``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybridft.data import yaml12
from hybridft.run.config import METHODS, TrainConfig, underscored

LR_FIELDS = ("zo_lr", "fo_lr")
Point = tuple[tuple[str, float], ...]  # one point of a learning-rate grid: ((field, value), ...)


@dataclass(frozen=True)
class BenchConfig:
    """A benchmark grid. ``train`` holds TrainConfig fields shared by every cell; ``per_model``,
    ``per_task`` and ``per_method`` override them (a ZO method's --z-cache, say); ``lr_grid[method]``
    maps zo_lr/fo_lr to the values tried. ``variants`` names a method with settings of its own
    (``hybrid-layers: {method: hybrid, zo-directions: layer-subset}``), usable wherever a method
    name is; a variant without a grid of its own uses its method's. ``reference``: the method
    (or variant) every other is compared with, paired by seed, in the report."""

    output_dir: str
    models: tuple[str, ...]
    tasks: tuple[str, ...]
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    train: dict[str, Any] = field(default_factory=dict)
    per_model: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_task: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_method: dict[str, dict[str, Any]] = field(default_factory=dict)
    lr_grid: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    isolate: bool = True  # each cell in a fresh process (peak memory per cell); False: in this process
    keep_models: bool = False  # keep each cell's saved model and checkpoints (tens of MiB to GiB per cell)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    reference: str | None = None

    def base_method(self, name: str) -> str:
        """The training method of a method or variant name."""
        return self.variants[name]["method"] if name in self.variants else name

    def validate(self) -> None:
        if not (self.models and self.tasks and self.methods and self.seeds):
            raise ValueError("a bench needs at least one model, task, method and seed")
        names = (*METHODS, *self.variants)
        for name, values in self.variants.items():
            if name in METHODS or values.get("method") not in METHODS:
                raise ValueError(f"variants.{name}: a variant needs a name that is not a method and a method: "
                                 f"one of {', '.join(METHODS)}")
        for where, used in (("", self.methods), ("per_method: ", self.per_method),
                            ("reference: ", [self.reference] if self.reference else [])):
            unknown = sorted(set(used) - set(names))
            if unknown:
                raise ValueError(f"{where}unknown method(s) {', '.join(unknown)}; choose from {', '.join(names)}")
        if self.reference and self.reference not in self.methods:
            raise ValueError(f"reference: {self.reference} is not among the bench's methods")
        known = {f.name for f in dataclasses.fields(TrainConfig)} - {"model", "task", "method", "seed", "output_dir"}
        overrides = [*self.per_model.items(), *self.per_task.items(), *self.per_method.items(),
                     *((f"variants.{k}", {f: x for f, x in v.items() if f != "method"}) for k, v in self.variants.items())]
        for where, values in [("train", self.train), *overrides]:
            bad = sorted(set(values) - known)
            if bad:
                raise ValueError(f"bench config {where}: unknown or per-cell train field(s) {', '.join(bad)}")
        for method, grid in self.lr_grid.items():
            if method not in names or not set(grid) <= set(LR_FIELDS) or not all(grid.values()):
                raise ValueError(f"lr_grid.{method}: expected a method name mapping zo_lr/fo_lr to non-empty lists")
        for model in self.models:
            for task in self.tasks:
                for method in self.methods:
                    for lrs in lr_points(self, method):
                        cell_config(self, Cell(model, task, method, self.seeds[0], lrs), Path(".")).validate()


def load_bench(path: str | Path, output_dir: str | None = None) -> BenchConfig:
    """Read a bench YAML file (dashes or underscores in keys); ``output_dir`` overrides the file's."""
    with open(path, encoding="utf-8") as f:
        data = yaml12.load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping")
    data = underscored(data)
    if output_dir is not None:
        data["output_dir"] = output_dir
    known = {f.name for f in dataclasses.fields(BenchConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown bench field(s) {', '.join(unknown)}")
    if "output_dir" not in data:
        raise ValueError(f"{path}: the bench needs an output_dir (in the file or with --output-dir)")
    for name in ("models", "tasks", "methods", "seeds"):
        if name in data:
            data[name] = tuple(data[name] if isinstance(data[name], list) else [data[name]])
    data["train"] = underscored(data.get("train") or {})
    for name in ("per_model", "per_task", "per_method", "lr_grid", "variants"):
        data[name] = {key: underscored(values or {}) for key, values in (data.get(name) or {}).items()}
    bench = BenchConfig(**data)
    bench.validate()
    return bench


@dataclass(frozen=True)
class Cell:
    model: str
    task: str
    method: str
    seed: int
    lrs: Point

    @property
    def name(self) -> str:
        lr_tag = "-".join(f"{k.replace('_', '')}{v:g}" for k, v in self.lrs) or "default"
        return f"{slug(self.model)}/{self.task}/{self.method}/{lr_tag}-seed{self.seed}"


def slug(text: str) -> str:
    """A model name or path as one directory name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text.rstrip("/")).strip("_") or "model"


def lr_points(bench: BenchConfig, method: str) -> list[Point]:
    """Every point of the method's learning-rate grid (one empty point: the train defaults)."""
    grid = bench.lr_grid.get(method) or bench.lr_grid.get(bench.base_method(method), {})
    keys = [k for k in LR_FIELDS if k in grid]
    return [tuple(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def cell_config(bench: BenchConfig, cell: Cell, root: Path) -> TrainConfig:
    method = bench.base_method(cell.method)
    variant = {k: v for k, v in bench.variants.get(cell.method, {}).items() if k != "method"}
    if cell.method in bench.variants:  # the method's settings, then the variant's, then per_method of the variant
        variant |= bench.per_method.get(cell.method, {})
    values = {**bench.train, **bench.per_model.get(cell.model, {}), **bench.per_task.get(cell.task, {}),
              **bench.per_method.get(method, {}), **variant, **dict(cell.lrs)}
    return TrainConfig(**{**values, "model": cell.model, "task": cell.task, "method": method, "seed": cell.seed,
                          "output_dir": str(root / "cells" / cell.name), "progress": False,
                          "plot": False})  # the bench draws its own figures


def cell_result(bench: BenchConfig, cell: Cell, root: Path) -> dict[str, Any] | None:
    path = root / "cells" / cell.name / "eval.json"
    return json.loads(path.read_text()) if path.exists() else None


def grid_scores(bench: BenchConfig, root: Path, model: str, task: str, method: str) -> list[tuple[Point, float | None]]:
    """Every point of the method's learning-rate grid with its final dev accuracy at the selection
    seed (None where that cell has not finished)."""
    scores = []
    for lrs in lr_points(bench, method):
        result = cell_result(bench, Cell(model, task, method, bench.seeds[0], lrs), root)
        scores.append((lrs, result and result["dev_accuracy_after"]))
    return scores


def best_point(bench: BenchConfig, root: Path, model: str, task: str, method: str) -> Point | None:
    """The grid point with the best final dev accuracy at the selection seed (None until all ran)."""
    return chosen(grid_scores(bench, root, model, task, method))


def chosen(scores: list[tuple[Point, float | None]]) -> Point | None:
    """The best point of ``grid_scores``' list (None until every point has a score)."""
    if any(accuracy is None for _, accuracy in scores):
        return None
    return max(scores, key=lambda s: s[1])[0]  # max keeps the first of equal scores


def cells(bench: BenchConfig, root: Path) -> Iterator[Cell]:
    """Cells in run order: per (model, task, method) the grid at the selection seed, then the other
    seeds at the chosen point (which is only known once the grid has run)."""
    for model, task, method in itertools.product(bench.models, bench.tasks, bench.methods):
        yield from (Cell(model, task, method, bench.seeds[0], lrs) for lrs in lr_points(bench, method))
        best = best_point(bench, root, model, task, method)
        if best is None:
            raise RuntimeError(f"the learning-rate grid of {model}/{task}/{method} did not finish")
        yield from (Cell(model, task, method, seed, best) for seed in bench.seeds[1:])


def count(bench: BenchConfig) -> int:
    groups = len(bench.models) * len(bench.tasks)
    return groups * sum(len(lr_points(bench, m)) + len(bench.seeds) - 1 for m in bench.methods)


def finished(bench: BenchConfig, root: Path) -> int:
    """How many of the cells the bench will run have finished. Cells at a point no longer chosen (a
    grid widened after its other seeds ran) are kept on disk but not counted."""
    done = 0
    for model, task, method in itertools.product(bench.models, bench.tasks, bench.methods):
        scores = grid_scores(bench, root, model, task, method)
        done += sum(accuracy is not None for _, accuracy in scores)
        best = chosen(scores)
        if best is not None:
            done += sum(cell_result(bench, Cell(model, task, method, seed, best), root) is not None
                        for seed in bench.seeds[1:])
    return done


def group_runs(bench: BenchConfig, root: Path, model: str, task: str, method: str) -> list[Path]:
    """The finished run directories of the seeds at the chosen learning rates."""
    best = best_point(bench, root, model, task, method)
    if best is None:
        return []
    found = [Cell(model, task, method, seed, best) for seed in bench.seeds]
    return [root / "cells" / c.name for c in found if cell_result(bench, c, root) is not None]


def saved_bench(root: Path) -> BenchConfig:
    """The bench a bench directory holds (its ``bench.json``), with ``output_dir`` set to ``root``."""
    saved = json.loads((root / "bench.json").read_text())
    return BenchConfig(**{**saved, "output_dir": str(root),
                          **{k: tuple(saved[k]) for k in ("models", "tasks", "methods", "seeds")}})
