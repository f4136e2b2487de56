"""PNG plots from saved metrics: one training run (``loss.png``) or a bench (curves per model x
task, and a bar chart of final accuracy). ``hybridft plot RUN_DIR`` redraws either."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hybridft.study.grid import BenchConfig, group_runs, saved_bench, slug
from hybridft.study.metrics import curve, mean_curve, read_jsonl
from hybridft.study.report import write_report


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    values = np.asarray(values, dtype=float)
    sums = np.cumsum(np.insert(values, 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)


def plot_run(run_dir: str | Path) -> Path:
    """``RUN_DIR/loss.png``: training loss (raw and smoothed) and dev accuracy against steps."""
    run_dir = Path(run_dir)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    if not metrics:
        raise ValueError(f"{run_dir}/metrics.jsonl has no steps to plot")
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = [r["step"] for r in metrics]
    loss = [r["loss"] for r in metrics]
    left.plot(steps, loss, alpha=0.3, color="C0", label="loss")
    left.plot(steps, smooth(loss, max(1, len(loss) // 20)), color="C0", label="smoothed")
    left.set(xlabel="step", ylabel="training loss", title="training loss")
    left.legend()
    if (run_dir / "eval.json").exists():
        points = curve(run_dir)
        right.plot([p[0] for p in points], [p[2] for p in points], marker="o", color="C1")
    right.set(xlabel="step", ylabel="dev accuracy", title="dev accuracy")
    fig.tight_layout()
    path = run_dir / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mean_curves(dirs: list[Path]) -> dict[str, np.ndarray]:
    """Seed-averaged curves of runs with the same config: loss and dev accuracy vs step and seconds."""
    metrics = [read_jsonl(d / "metrics.jsonl") for d in dirs]
    length = min(len(m) for m in metrics)
    loss = np.mean([[r["loss"] for r in m[:length]] for m in metrics], axis=0)
    seconds = np.mean([[r["seconds"] for r in m[:length]] for m in metrics], axis=0)
    points = mean_curve([curve(d) for d in dirs])
    return {
        "step": np.arange(1, length + 1), "seconds": seconds, "loss": smooth(loss, max(1, length // 20)),
        "eval_step": np.array([p[0] for p in points]),
        "eval_seconds": np.array([p[1] for p in points]),
        "accuracy": np.array([p[2] for p in points]),
    }


LINESTYLES = ("-", "--", "-.", ":")


def plot_group(title: str, runs: dict[str, list[Path]], path: Path) -> None:
    """Dev accuracy and training loss of every method, against steps and against seconds."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for i, (method, dirs) in enumerate(runs.items()):
        c = _mean_curves(dirs)
        style = {"color": f"C{i}", "label": f"{method} ({len(dirs)} seed{'s' if len(dirs) > 1 else ''})",
                 "linestyle": LINESTYLES[i % len(LINESTYLES)]}  # a dashed curve on an equal solid one shows both
        axes[0, 0].plot(c["eval_step"], c["accuracy"], marker=".", **style)
        axes[0, 1].plot(c["eval_seconds"], c["accuracy"], marker=".", **style)
        axes[1, 0].plot(c["step"], c["loss"], **style)
        axes[1, 1].plot(c["seconds"], c["loss"], **style)
    for ax, (x, y) in zip(axes.flat, [("step", "dev accuracy"), ("training seconds", "dev accuracy"),
                                      ("step", "training loss (smoothed)"), ("training seconds", "training loss (smoothed)")]):
        ax.set(xlabel=x, ylabel=y)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def group_label(rows: list[dict[str, Any]], model: str, task: str) -> str:
    """A bar group's tick label; a task measured on another split than test (no test set) says so."""
    splits = sorted({r["split"] for r in rows if (r["model"], r["task"]) == (model, task)})
    return f"{slug(model)}\n{task}" + ("" if splits == ["test"] else f" ({'/'.join(splits)})")


def plot_bars(rows: list[dict[str, Any]], path: Path) -> None:
    """Final accuracy per method with std error bars, one group of bars per model x task."""
    plt = _pyplot()
    groups = list(dict.fromkeys((r["model"], r["task"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * max(1, len(methods)) / 2), 4.5))
    for i, method in enumerate(methods):
        found = {(r["model"], r["task"]): r for r in rows if r["method"] == method}
        xs = [g + i * width for g, key in enumerate(groups) if key in found]
        ys = [found[key]["accuracy"] for key in groups if key in found]
        errors = [found[key]["accuracy_std"] for key in groups if key in found]
        ax.bar(xs, ys, width, yerr=errors, capsize=3, label=method, color=f"C{i}")
    ax.set_xticks([g + width * (len(methods) - 1) / 2 for g in range(len(groups))],
                  [group_label(rows, m, t) for m, t in groups])
    ax.set(ylabel="final accuracy (mean ± std over seeds)\non the test split unless marked")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bench(bench: BenchConfig, root: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """``root/plots/``: one curve figure per model x task and ``accuracy.png`` (of ``rows``, the
    report's); the files written."""
    out = root / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for model in bench.models:
        for task in bench.tasks:
            runs = {m: group_runs(bench, root, model, task, m) for m in bench.methods}
            runs = {m: r for m, r in runs.items() if r}
            if runs:
                path = out / f"{slug(model)}-{task}.png"
                plot_group(f"{model} on {task}", runs, path)
                written.append(path)
    if rows:
        plot_bars(rows, out / "accuracy.png")
        written.append(out / "accuracy.png")
    return written


def plot(run_dir: str | Path) -> list[Path]:
    """Redraw the plots of a bench directory (``bench.json``; its report is rewritten first) or of
    one training run."""
    root = Path(run_dir)
    if (root / "bench.json").exists():
        bench = saved_bench(root)
        plot_bench(bench, root, write_report(bench, root))
        return sorted((root / "plots").glob("*.png"))
    if (root / "metrics.jsonl").exists():
        return [plot_run(root)]
    raise ValueError(f"{root} is neither a bench directory (bench.json) nor a training run (metrics.jsonl)")
