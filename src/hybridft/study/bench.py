"""``hybridft bench``: a grid of models x tasks x methods x seeds, one ``hybridft train`` run per cell.

For each (model, task, method) the learning rates are chosen on the dev split: every point of
the method's grid runs with the selection seed, the best final dev accuracy wins, and the other
seeds run at that point. Each cell is a fresh process (so its peak memory is its own) writing an
ordinary run directory; a cell whose ``eval.json`` exists is finished and never re-run, so a
killed bench resumes where it stopped (a cell killed mid-run continues from its last checkpoint).
After every cell the summary and plots are rewritten. The bench directory is locked while a bench
runs in it (:mod:`hybridft.run.lock`). SIGTERM, SIGINT or SIGUSR1 is passed to the running cell,
which stops at a checkpoint (:mod:`hybridft.run.stop`); the bench stops after it, with the cell's
exit code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from hybridft.run import lock, stop
from hybridft.run.checkpoint import DIRNAME, checkpoints
from hybridft.run.config import TrainConfig
from hybridft.run.train import ResolveLr, train
from hybridft.study.grid import BenchConfig, Cell, cell_config, cell_result, cells, count, finished
from hybridft.study.plots import plot_bench
from hybridft.study.report import write_report

PLOT_EVERY_SECONDS = 120  # results are rewritten after every cell, plots at most this often (and at the end)


@dataclass
class Running:
    """The cell process the bench waits on, if any: a stop signal the bench receives is passed to it."""

    process: subprocess.Popen[bytes] | None = None

    def send(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)


def run_cell(bench: BenchConfig, cell: Cell, root: Path, *, resolve_lr: ResolveLr | None = None,
             running: Running | None = None) -> None:
    """Train one cell (in a fresh process unless ``isolate`` is off), continuing a cell that was
    killed from its last checkpoint; its log goes to the cell's ``log.txt``. Unless ``keep_models``,
    the finished cell's model and checkpoints are deleted (the metrics are what a bench reports).
    ``resolve_lr``: for ``lr: auto`` in this process (a fresh process is ``hybridft train``, which has it).
    ``running`` is told the cell's process. A cell stopped by a signal raises :class:`~hybridft.run.stop.Stopped`."""
    config = cell_config(bench, cell, root)
    out = Path(config.output_dir)  # type: ignore[arg-type]
    resume = bool(checkpoints(out)) if out.is_dir() else False
    out.mkdir(parents=True, exist_ok=True)
    (out / "cell.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    with open(out / "log.txt", "a" if resume else "w", encoding="utf-8") as log:
        if bench.isolate:
            how = ["--resume", str(out)] if resume else ["--overwrite"]
            command = [sys.executable, "-m", "hybridft", "train", "--config", str(out / "cell.yaml"), *how]
            code = _train_process(command, log, running or Running())
        else:
            code = _train_here(config, log, resume, resolve_lr)
    signum = stop.signal_of(code)
    if signum:
        raise stop.Stopped(f"cell {cell.name} stopped by {stop.name(signum)}", signum)
    if code:
        tail = (out / "log.txt").read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"cell {cell.name} failed: {tail[0]} (log: {out / 'log.txt'})")
    if not bench.keep_models:
        for name in (DIRNAME, "model", "adapter", "merged"):
            shutil.rmtree(out / name, ignore_errors=True)


def _train_process(command: list[str], log: Any, running: Running) -> int:
    """Run ``command`` (a cell's ``hybridft train``) in a session of its own, so that a Ctrl-C in
    the terminal reaches the bench alone, which passes it on once (twice would stop the cell at
    once); its exit status. A bench leaving at once (a second signal) takes the cell with it."""
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    running.process = process
    try:
        return process.wait()
    finally:
        running.process = None
        if process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)  # it got the second signal too: it stops at once
            process.kill()
            process.wait()


def _train_here(config: TrainConfig, log: Any, resume: bool, resolve_lr: ResolveLr | None) -> int:
    """Train in this process, printing into ``log``; its exit status as ``hybridft train``'s:
    0, 128 + the signal that stopped it, or 1 (with the error logged) if it raised."""
    with contextlib.redirect_stdout(log):
        try:
            train(config, overwrite=not resume, resume=resume, resolve_lr=resolve_lr)
        except stop.Stopped as stopped:
            print(stopped, file=log)
            return stopped.exit_code
        except Exception as error:  # noqa: BLE001 - reported to the caller through the log, never swallowed
            traceback.print_exc(file=log)
            print(f"{type(error).__name__}: {error}", file=log)
            return 1
    return 0


def check_same_bench(bench: BenchConfig, root: Path) -> None:
    """A bench directory holds one grid. It may be extended (more models, tasks, methods, learning
    rates, or seeds after the same selection seed) and its ``reference`` changed: every finished
    cell keeps its settings, so it stays valid; the grid and settings of a method not yet among its
    methods have no cells, so they may change too, and so may ``keep_models``. Any other change is
    refused (``isolate`` too: peak memory means something else in and out of process). The directory's
    ``bench.json`` records the grid."""
    saved_path = root / "bench.json"
    current = json.loads(json.dumps(dataclasses.asdict(bench) | {"output_dir": None}))
    if saved_path.exists():
        saved = json.loads(saved_path.read_text())
        defaults = json.loads(json.dumps(dataclasses.asdict(BenchConfig("", (), ()))))  # a field newer than the file
        old = {k: saved.get(k, defaults[k]) for k in current}
        new, ran = dict(current), _methods_with_cells(old)
        for key in ("lr_grid", "per_method", "variants"):  # what only methods without cells read is not compared
            old[key], new[key] = ({m: v for m, v in side[key].items() if m in ran} for side in (old, new))
        differing = [k for k in current if not _extends(k, old[k], new[k])]
        if "isolate" in differing:  # on CPU a cell's peak memory is its process's peak RSS
            raise ValueError(f"{root} holds a bench with isolate {old['isolate']}: cells run in the bench's own "
                             "process report a peak memory that includes earlier cells', so a bench cannot mix "
                             "the two; use another --output-dir")
        if differing:
            raise ValueError(f"{root} holds a bench with a different {differing[0]} (a grid may only gain models, "
                             "tasks, methods, learning rates or later seeds); use another --output-dir")
    root.mkdir(parents=True, exist_ok=True)
    saved_path.write_text(json.dumps(current, indent=2))


def _methods_with_cells(saved: dict[str, Any]) -> set[str]:
    """The method names whose grid and settings a saved bench's cells may have read: its methods
    and, for its variants, the methods they run."""
    methods = set(saved["methods"])
    return methods | {v["method"] for name, v in saved["variants"].items() if name in methods}


def _extends(key: str, old: Any, new: Any) -> bool:
    """Whether ``new`` is ``old`` or an extension of it that leaves every old cell as it was."""
    if key in ("reference", "keep_models"):  # the report's paired column, what later cells leave on disk: no result
        return True
    if key in ("models", "tasks", "methods", "seeds"):
        return set(old) <= set(new) and (key != "seeds" or old[0] == new[0])  # seeds[0] chooses the learning rates
    if key == "variants":  # variants may be added; one that cells ran with keeps its settings
        return all(new.get(name) == values for name, values in old.items())
    if key == "lr_grid":
        return all(m in new and set(grid) == set(new[m]) and all(set(v) <= set(new[m][k]) for k, v in grid.items())
                   for m, grid in old.items())
    return old == new


def run_bench(bench: BenchConfig, *, progress: bool = True, resolve_lr: ResolveLr | None = None) -> Path:
    """Run every unfinished cell, rewriting the summary and plots after each; the bench directory,
    locked meanwhile. A stop signal is passed to the running cell, and the bench stops after it
    with :class:`~hybridft.run.stop.Stopped`. ``resolve_lr``: see :func:`run_cell`."""
    root, running = Path(bench.output_dir), Running()
    again = "run the same hybridft bench command to continue"
    with lock.held(root), stop.requested(forward=running.send) as request:
        check_same_bench(bench, root)
        drawn = time.perf_counter()
        # finished cells count as done from the start, so the ETA is the rate of cells run now
        bar = tqdm(total=count(bench), initial=finished(bench, root), desc="bench", unit="cell", disable=not progress, dynamic_ncols=True)
        for cell in cells(bench, root):
            if cell_result(bench, cell, root) is not None:
                continue
            if request.signum:
                raise stop.Stopped(f"bench stopped by {stop.name(request.signum)} before cell {cell.name}; {again}",
                                   request.signum)
            bar.set_postfix_str(cell.name, refresh=True)
            start = time.perf_counter()
            try:
                run_cell(bench, cell, root, resolve_lr=resolve_lr, running=running)
            except stop.Stopped as stopped:
                raise stop.Stopped(f"bench stopped: {stopped} at its last checkpoint; {again}", stopped.signum) from None
            rows = write_report(bench, root)
            if time.perf_counter() - drawn > PLOT_EVERY_SECONDS:
                plot_bench(bench, root, rows)
                drawn = time.perf_counter()
            accuracy = cell_result(bench, cell, root)["dev_accuracy_after"]  # type: ignore[index]
            bar.write(f"{cell.name}: {accuracy:.4f} dev accuracy ({time.perf_counter() - start:.0f} s)")
            bar.update()
        bar.close()
        plot_bench(bench, root, write_report(bench, root))
    return root
