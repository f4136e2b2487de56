"""``hybridft bench``: a grid of models x tasks x methods x seeds, one ``hybridft train`` run per cell.

For each (model, task, method) the learning rates are chosen on the dev split: every point of
the method's grid runs with the selection seed, the best final dev accuracy wins, and the other
seeds run at that point. Each cell is a fresh process (so its peak memory is its own) writing an
ordinary run directory; a cell whose ``eval.json`` exists is finished and never re-run, so a
killed bench resumes where it stopped (a cell killed mid-run continues from its last checkpoint;
SIGTERM ends the running cell's process with the bench's). After every cell the summary and plots
are rewritten.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from hybridft.run.config import METHODS, TrainConfig

LR_FIELDS = ("zo_lr", "fo_lr")
PLOT_EVERY_SECONDS = 120  # results are rewritten after every cell, plots at most this often (and at the end)


@dataclass(frozen=True)
class BenchConfig:
    """A benchmark grid. ``train`` holds TrainConfig fields shared by every cell; ``per_model``,
    ``per_task`` and ``per_method`` override them (a ZO method's --z-cache, say); ``lr_grid[method]``
    maps zo_lr/fo_lr to the values tried."""

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

    def validate(self) -> None:
        if not (self.models and self.tasks and self.methods and self.seeds):
            raise ValueError("a bench needs at least one model, task, method and seed")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        known = {f.name for f in dataclasses.fields(TrainConfig)} - {"model", "task", "method", "seed", "output_dir"}
        unknown = sorted(set(self.per_method) - set(METHODS))
        if unknown:
            raise ValueError(f"per_method: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        overrides = [*self.per_model.items(), *self.per_task.items(), *self.per_method.items()]
        for where, values in [("train", self.train), *overrides]:
            bad = sorted(set(values) - known)
            if bad:
                raise ValueError(f"bench config {where}: unknown or per-cell train field(s) {', '.join(bad)}")
        for method, grid in self.lr_grid.items():
            if method not in METHODS or not set(grid) <= set(LR_FIELDS) or not all(grid.values()):
                raise ValueError(f"lr_grid.{method}: expected a method name mapping zo_lr/fo_lr to non-empty lists")
        for model in self.models:
            for task in self.tasks:
                for method in self.methods:
                    for lrs in lr_points(self, method):
                        cell_config(self, Cell(model, task, method, self.seeds[0], lrs), Path(".")).validate()


def load_bench(path: str | Path, output_dir: str | None = None) -> BenchConfig:
    """Read a bench YAML file (dashes or underscores in keys); ``output_dir`` overrides the file's."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
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
    for name in ("train", "per_model", "per_task", "per_method"):
        data[name] = _underscored(data.get(name) or {}, nested=name != "train")
    data["lr_grid"] = {m: _underscored(g) for m, g in (data.get("lr_grid") or {}).items()}
    bench = BenchConfig(**data)
    bench.validate()
    return bench


def _underscored(mapping: dict[str, Any], nested: bool = False) -> dict[str, Any]:
    if nested:
        return {k: _underscored(v or {}) for k, v in mapping.items()}
    return {str(k).replace("-", "_"): v for k, v in mapping.items()}


@dataclass(frozen=True)
class Cell:
    model: str
    task: str
    method: str
    seed: int
    lrs: tuple[tuple[str, float], ...]

    @property
    def name(self) -> str:
        lr_tag = "-".join(f"{k.replace('_', '')}{v:g}" for k, v in self.lrs) or "default"
        return f"{slug(self.model)}/{self.task}/{self.method}/{lr_tag}-seed{self.seed}"


def slug(text: str) -> str:
    """A model name or path as one directory name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text.rstrip("/")).strip("_") or "model"


def lr_points(bench: BenchConfig, method: str) -> list[tuple[tuple[str, float], ...]]:
    """Every point of the method's learning-rate grid (one empty point: the train defaults)."""
    grid = bench.lr_grid.get(method, {})
    keys = [k for k in LR_FIELDS if k in grid]
    return [tuple(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def cell_config(bench: BenchConfig, cell: Cell, root: Path) -> TrainConfig:
    values = {**bench.train, **bench.per_model.get(cell.model, {}), **bench.per_task.get(cell.task, {}),
              **bench.per_method.get(cell.method, {}), **dict(cell.lrs)}
    return TrainConfig(**{**values, "model": cell.model, "task": cell.task, "method": cell.method, "seed": cell.seed,
                          "output_dir": str(root / "cells" / cell.name), "progress": False,
                          "plot": False})  # the bench draws its own figures


def cell_result(bench: BenchConfig, cell: Cell, root: Path) -> dict[str, Any] | None:
    path = root / "cells" / cell.name / "eval.json"
    return json.loads(path.read_text()) if path.exists() else None


def grid_scores(bench: BenchConfig, root: Path, model: str, task: str,
                method: str) -> list[tuple[tuple[tuple[str, float], ...], float | None]]:
    """Every point of the method's learning-rate grid with its final dev accuracy at the selection
    seed (None where that cell has not finished)."""
    scores = []
    for lrs in lr_points(bench, method):
        result = cell_result(bench, Cell(model, task, method, bench.seeds[0], lrs), root)
        scores.append((lrs, result and result["dev_accuracy_after"]))
    return scores


def best_point(bench: BenchConfig, root: Path, model: str, task: str, method: str) -> tuple[tuple[str, float], ...] | None:
    """The grid point with the best final dev accuracy at the selection seed (None until all ran)."""
    return chosen(grid_scores(bench, root, model, task, method))


def chosen(scores: list[tuple[tuple[tuple[str, float], ...], float | None]]) -> tuple[tuple[str, float], ...] | None:
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


def run_cell(bench: BenchConfig, cell: Cell, root: Path) -> None:
    """Train one cell (in a fresh process unless ``isolate`` is off), continuing a cell that was
    killed from its last checkpoint; its log goes to the cell's ``log.txt``. Unless ``keep_models``,
    the finished cell's model and checkpoints are deleted (the metrics are what a bench reports)."""
    from hybridft.run.checkpoint import DIRNAME, checkpoints

    config = cell_config(bench, cell, root)
    out = Path(config.output_dir)  # type: ignore[arg-type]
    resume = bool(checkpoints(out)) if out.is_dir() else False
    out.mkdir(parents=True, exist_ok=True)
    (out / "cell.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    with open(out / "log.txt", "a" if resume else "w", encoding="utf-8") as log:
        if bench.isolate:
            how = ["--resume", str(out)] if resume else ["--overwrite"]
            command = [sys.executable, "-m", "hybridft", "train", "--config", str(out / "cell.yaml"), *how]
            failed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode != 0
        else:
            failed = not _train_here(config, log, resume)
    if failed:
        tail = (out / "log.txt").read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"cell {cell.name} failed: {tail[0]} (log: {out / 'log.txt'})")
    if not bench.keep_models:
        for name in (DIRNAME, "model", "adapter", "merged"):
            shutil.rmtree(out / name, ignore_errors=True)


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """While the bench runs, SIGTERM raises SystemExit (status 143) instead of ending the process
    on the spot, so ``subprocess.run`` kills the running cell's process on the way out rather than
    leaving it training, orphaned, into the cell's directory. (Ctrl-C reaches both already.)"""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def exit_(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _train_here(config: TrainConfig, log: Any, resume: bool) -> bool:
    """Train in this process, printing into ``log``; False (with the error logged) if it raised."""
    import contextlib
    import traceback

    from hybridft.run.train import train

    with contextlib.redirect_stdout(log):
        try:
            train(config, overwrite=not resume, resume=resume)
        except Exception as error:  # noqa: BLE001 - reported to the caller through the log, never swallowed
            traceback.print_exc(file=log)
            print(f"{type(error).__name__}: {error}", file=log)
            return False
    return True


def check_same_bench(bench: BenchConfig, root: Path) -> None:
    """A bench directory holds one grid. It may be extended (more models, tasks, methods, learning
    rates, or seeds after the same selection seed): every finished cell keeps its settings, so it
    stays valid. Any other change is refused. The directory's ``bench.json`` records the grid."""
    saved_path = root / "bench.json"
    current = json.loads(json.dumps(dataclasses.asdict(bench) | {"output_dir": None}))
    if saved_path.exists():
        saved = json.loads(saved_path.read_text())
        defaults = json.loads(json.dumps(dataclasses.asdict(BenchConfig("", (), ()))))  # a field newer than the file
        differing = [k for k in current if not _extends(k, saved.get(k, defaults[k]), current[k])]
        if differing:
            raise ValueError(f"{root} holds a bench with a different {differing[0]} (a grid may only gain models, "
                             "tasks, methods, learning rates or later seeds); use another --output-dir")
    root.mkdir(parents=True, exist_ok=True)
    saved_path.write_text(json.dumps(current, indent=2))


def _extends(key: str, old: Any, new: Any) -> bool:
    """Whether ``new`` is ``old`` or an extension of it that leaves every old cell as it was."""
    if key in ("models", "tasks", "methods", "seeds"):
        return set(old) <= set(new) and (key != "seeds" or old[0] == new[0])  # seeds[0] chooses the learning rates
    if key == "lr_grid":
        return all(m in new and set(grid) == set(new[m]) and all(set(v) <= set(new[m][k]) for k, v in grid.items())
                   for m, grid in old.items())
    return old == new


def run_bench(bench: BenchConfig, *, progress: bool = True) -> Path:
    """Run every unfinished cell, rewriting the summary and plots after each; the bench directory."""
    from hybridft.study.report import write_report

    root = Path(bench.output_dir)
    check_same_bench(bench, root)
    with sigterm_as_exit():
        drawn = time.perf_counter()
        # finished cells count as done from the start, so the ETA is the rate of cells run now
        bar = tqdm(total=count(bench), initial=finished(bench, root), desc="bench", unit="cell", disable=not progress, dynamic_ncols=True)
        for cell in cells(bench, root):
            if cell_result(bench, cell, root) is not None:
                continue
            bar.set_postfix_str(cell.name, refresh=True)
            start = time.perf_counter()
            run_cell(bench, cell, root)
            redraw = time.perf_counter() - drawn > PLOT_EVERY_SECONDS
            write_report(bench, root, plots=redraw)
            drawn = time.perf_counter() if redraw else drawn
            accuracy = cell_result(bench, cell, root)["dev_accuracy_after"]  # type: ignore[index]
            bar.write(f"{cell.name}: {accuracy:.4f} dev accuracy ({time.perf_counter() - start:.0f} s)")
            bar.update()
        bar.close()
    write_report(bench, root)
    return root
