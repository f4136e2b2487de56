"""A bench directory's summary: ``results.json`` and ``results.md``, from the cells' files.

Per (model, task, method), over the seeds run at the learning rates chosen on dev: final
accuracy (test split when the task has one, else dev) mean +- std; steps-to-target (the first
evaluated step at which dev accuracy reaches fo-lora's mean final dev accuracy) and its ratio
to fo-lora's; training seconds; peak memory; the parameters each rule trains; how far the ZO
rule moved its weights (root-mean-square per weight, from the runs' ZO logs). With a
``reference`` method, each other method's accuracy minus the reference's, paired by seed (same
seed: same data split, sampler and initialisation), per seed and with a 95% t-interval.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from hybridft.run import zo_log
from hybridft.study.grid import BenchConfig, grid_scores, group_runs, slug
from hybridft.study.metrics import curve, mean_curve


def steps_to(points: list[tuple[int, float, float]], target: float | None, start: float | None = None) -> int | None:
    """The first evaluated step whose accuracy reaches ``target``; None if none does, or if the
    target is not above ``start`` (then there was nothing to reach: the reference learned nothing)."""
    if target is None or (start is not None and target <= start):
        return None
    return next((step for step, _, accuracy in points if accuracy >= target), None)


def zo_move(run_dir: Path) -> float | None:
    """RMS change of a run's ZO-trained weights (``zo_log.rms_move`` of its log); None without
    ZO updates or for batch-row directions."""
    log = run_dir / zo_log.LOG
    updates = zo_log.read(log) if log.exists() else []
    return zo_log.rms_move(updates) if updates else None


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal 1.96).
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def interval95(values: list[float]) -> tuple[float, float] | None:
    """The 95% t-interval of the mean of ``values`` (None under two values)."""
    if len(values) < 2:
        return None
    mean, half = statistics.fmean(values), statistics.stdev(values) / len(values) ** 0.5
    t = T95[len(values) - 2] if len(values) - 1 <= len(T95) else 1.96
    return mean - t * half, mean + t * half


def paired(rows: list[dict[str, Any]], reference: str) -> None:
    """Add to each row of one (model, task) group its accuracy minus ``reference``'s on the seeds both ran."""
    ref = next((r for r in rows if r["method"] == reference), None)
    for row in rows:
        seeds = sorted(set(row["per_seed"]) & set(ref["per_seed"])) if ref and row is not ref else []
        diffs = [row["per_seed"][s] - ref["per_seed"][s] for s in seeds]  # type: ignore[index]
        row["paired"] = {"against": reference, "seeds": seeds, "differences": diffs,
                         "mean": statistics.fmean(diffs), "interval95": interval95(diffs)} if diffs else None


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(bench: BenchConfig, root: Path) -> list[dict[str, Any]]:
    """One row per (model, task, method) with at least one finished seed at its chosen point."""
    rows = []
    for model in bench.models:
        for task in bench.tasks:
            runs = {m: group_runs(bench, root, model, task, m) for m in bench.methods}
            group = summarize_group(bench, root, model, task, {m: r for m, r in runs.items() if r})
            if bench.reference:
                paired(group, bench.reference)
            rows += [row | {"grid": [{**dict(lrs), "dev_accuracy": accuracy}
                                     for lrs, accuracy in grid_scores(bench, root, model, task, row["method"])]}
                     for row in group]
    return rows


def summarize_group(bench: BenchConfig, root: Path, model: str, task: str, runs: dict[str, list[Path]]) -> list[dict[str, Any]]:
    if not runs:
        return []
    evals = {m: [json.loads((d / "eval.json").read_text()) for d in dirs] for m, dirs in runs.items()}
    split = "test" if all(e.get("test_accuracy_after") is not None for es in evals.values() for e in es) else "dev"
    target = statistics.fmean(e["dev_accuracy_after"] for e in evals["fo-lora"]) if "fo-lora" in evals else None
    start = statistics.fmean(e["dev_accuracy_before"] for es in evals.values() for e in es)
    rows = []
    for method, dirs in runs.items():
        resolved = json.loads((dirs[0] / "config.json").read_text())
        curves = [curve(d) for d in dirs]
        hits = [s for s in (steps_to(c, target, start) for c in curves) if s is not None]
        accuracy, accuracy_std = mean_std([e[f"{split}_accuracy_after"] for e in evals[method]])
        seeds = [json.loads((d / "config.json").read_text())["seed"] for d in dirs]
        rows.append({
            "model": model, "task": task, "method": method, "seeds": len(dirs), "split": split,
            "learning_rates": {k: resolved[k] for k in ("zo_lr", "fo_lr")},
            "accuracy": accuracy, "accuracy_std": accuracy_std,
            "per_seed": {seed: e[f"{split}_accuracy_after"] for seed, e in zip(seeds, evals[method])},
            "dev_accuracy": statistics.fmean(e["dev_accuracy_after"] for e in evals[method]),
            "target": target, "start": start, "steps_to_target": steps_to(mean_curve(curves), target, start),
            "reached_target": f"{len(hits)}/{len(dirs)}",
            "train_seconds": statistics.fmean(e["train_seconds"] for e in evals[method]),
            "peak_memory_mib": statistics.fmean(e["peak_memory_mib"] for e in evals[method]),
            "zo_parameters": resolved["resolved"]["zo_parameters"], "fo_parameters": resolved["resolved"]["fo_parameters"],
            "zo_rms_move": _mean_or_none([zo_move(d) for d in dirs]),
            "steps": resolved["resolved"]["steps"],
        })
    reference = next((r["steps_to_target"] for r in rows if r["method"] == "fo-lora"), None)
    for row in rows:
        ratio_ok = reference and row["steps_to_target"] is not None
        row["steps_ratio"] = row["steps_to_target"] / reference if ratio_ok else None
    return rows


def _mean_or_none(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else statistics.fmean(values)  # type: ignore[arg-type]


def markdown(rows: list[dict[str, Any]]) -> str:
    def number(value: float | None, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    lines = ["# Bench results", "",
             "Accuracy: mean ± std over seeds at the learning rates chosen on dev (split named per row). "
             "Steps to target: first evaluated step at which the seed-mean dev accuracy reaches fo-lora's mean final "
             "dev accuracy (– if it never does, or if that target is not above the mean starting dev accuracy: then "
             "fo-lora learned nothing to reach); ratio: against fo-lora's; reached: seeds whose own curve reaches it. "
             "Seconds: training only. Memory: peak (CPU RSS or CUDA allocated). ZO move: root-mean-square change of "
             "a ZO-trained weight over the run, from its ZO log (weight decay not included; – without ZO updates or "
             "with batch-row directions).", "",
             "| model | task | method | lrs (zo / fo) | accuracy | split | seeds | steps to target | ratio | reached | seconds | peak MiB | ZO params | FO params | ZO move |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        zo = f"{r['learning_rates']['zo_lr']:g}" if r["zo_parameters"] else "–"
        fo = f"{r['learning_rates']['fo_lr']:g}" if r["fo_parameters"] else "–"
        lines.append(
            f"| {slug(r['model'])} | {r['task']} | {r['method']} | {zo} / {fo} "
            f"| {r['accuracy']:.4f} ± {r['accuracy_std']:.4f} | {r['split']} | {r['seeds']} "
            f"| {number(r['steps_to_target'], '.0f')} | {number(r['steps_ratio'], '.2f')} | {r['reached_target']} "
            f"| {r['train_seconds']:.0f} | {r['peak_memory_mib']:.0f} | {r['zo_parameters']:,} | {r['fo_parameters']:,} "
            f"| {number(r['zo_rms_move'], '.2e')} |")
    with_pairs = [r for r in rows if r.get("paired")]
    if with_pairs:
        against = with_pairs[0]["paired"]["against"]
        lines += ["", f"Paired by seed against {against}: accuracy minus {against}'s on the same seed (same data "
                  "split, sampler and initialisation), per seed, mean and 95% t-interval of the mean.", "",
                  "| model | task | method | per seed | mean | 95% interval |", "|---|---|---|---|---|---|"]
        for r in with_pairs:
            p = r["paired"]
            per_seed = ", ".join(f"{s}: {d:+.4f}" for s, d in zip(p["seeds"], p["differences"]))
            ci = p["interval95"]
            ci_text = "–" if ci is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"
            lines.append(f"| {slug(r['model'])} | {r['task']} | {r['method']} | {per_seed} | {p['mean']:+.4f} | {ci_text} |")
    lines += ["", "Learning-rate grids: final dev accuracy of each point at the selection seed (chosen point in bold). "
              "At the edge: the chosen rates that are their grid's smallest or largest value (ties go to the first "
              "point); a better rate may lie beyond, so extend the grid there before ranking the method.", "",
              "| model | task | method | points | at the edge |", "|---|---|---|---|---|"]
    for r in rows:
        if r.get("grid"):
            lines.append(f"| {slug(r['model'])} | {r['task']} | {r['method']} | {grid_text(r)} | {grid_edge(r) or '–'} |")
    return "\n".join(lines) + "\n"


def grid_text(row: dict[str, Any]) -> str:
    """``zo-lr 1e-06: 0.81, **zo-lr 1e-05: 0.83**``: each point of ``row``'s grid and its dev accuracy."""
    cells = []
    for point in row["grid"]:
        lrs = ", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in point.items() if k != "dev_accuracy")
        accuracy = "–" if point["dev_accuracy"] is None else f"{point['dev_accuracy']:.4f}"
        chosen = all(row["learning_rates"].get(k) == v for k, v in point.items() if k != "dev_accuracy")
        text = f"{lrs or 'defaults'}: {accuracy}"
        cells.append(f"**{text}**" if chosen else text)
    return ", ".join(cells)


def grid_edge(row: dict[str, Any]) -> str:
    """``zo-lr smallest, fo-lr largest``: the chosen learning rates of ``row`` that are the smallest
    or largest value of their grid (rates with one value in the grid are not a choice: skipped)."""
    edges = []
    for key, chosen in row["learning_rates"].items():
        values = sorted({point[key] for point in row["grid"] if key in point})
        if len(values) > 1 and chosen in (values[0], values[-1]):
            edges.append(f"{key.replace('_', '-')} {'smallest' if chosen == values[0] else 'largest'}")
    return ", ".join(edges)


def write_report(bench: BenchConfig, root: Path) -> list[dict[str, Any]]:
    """Rewrite results.json and results.md of ``root`` from what has finished; their rows (which
    ``hybridft.study.plots.plot_bench`` draws)."""
    rows = summarize(bench, root)
    (root / "results.json").write_text(json.dumps(rows, indent=2))
    (root / "results.md").write_text(markdown(rows))
    return rows
