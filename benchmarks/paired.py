"""Paired differences between every pair of methods of a finished bench, by seed.

    .venv/bin/python benchmarks/paired.py benchmarks/results/confirm-fzoo [--against fo-none-2e-3,fo-none]

Reads the bench's ``results.json`` (``hybridft bench`` writes it) and prints, per (model, task),
for each method against each reference named by ``--against`` (default: every method): the
accuracy difference on each seed both ran (same seed: same data split, sampler and
initialisation), their mean and the 95% t-interval of that mean, and the training-seconds ratio.
The accuracies are the ones ``results.md`` reports (test split where the task has one).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from hybridft.study.report import interval95


def difference(row: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any] | None:
    """``row`` minus ``ref`` on the seeds both ran; None if they share none."""
    seeds = sorted(set(row["per_seed"]) & set(ref["per_seed"]), key=int)
    if not seeds:
        return None
    diffs = [row["per_seed"][s] - ref["per_seed"][s] for s in seeds]
    return {"seeds": seeds, "diffs": diffs, "mean": statistics.fmean(diffs), "ci": interval95(diffs),
            "seconds": row["train_seconds"] / ref["train_seconds"] if ref["train_seconds"] else None}


def table(rows: list[dict[str, Any]], against: list[str]) -> list[str]:
    lines = ["| method | against | seeds | per-seed difference | mean | 95% interval | seconds ratio |",
             "|---|---|---|---|---|---|---|"]
    by_method = {r["method"]: r for r in rows}
    for name in against:
        ref = by_method.get(name)
        if ref is None:
            raise SystemExit(f"paired.py: error: no method {name!r} in results.json ({', '.join(by_method)})")
        for row in rows:
            d = None if row is ref else difference(row, ref)
            if d is None:
                continue
            ci = "–" if d["ci"] is None else f"[{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"
            per_seed = ", ".join(f"{x:+.4f}" for x in d["diffs"])
            ratio = "–" if d["seconds"] is None else f"{d['seconds']:.2f}x"
            lines.append(f"| {row['method']} | {name} | {','.join(map(str, d['seeds']))} | {per_seed} "
                         f"| {d['mean']:+.4f} | {ci} | {ratio} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_dir", type=Path)
    parser.add_argument("--against", default="", help="comma-separated reference methods (default: all)")
    args = parser.parse_args()
    path = args.bench_dir / "results.json"
    if not path.exists():
        raise SystemExit(f"paired.py: error: {path} not found; run hybridft bench first")
    results = json.loads(path.read_text())
    for key in sorted({(r["model"], r["task"]) for r in results}):
        rows = [r for r in results if (r["model"], r["task"]) == key]
        against = [a for a in args.against.split(",") if a] or [r["method"] for r in rows]
        split = rows[0]["split"]
        print(f"\n{key[0]} x {key[1]} ({split} accuracy, paired by seed)\n")
        print("\n".join(table(rows, against)))


if __name__ == "__main__":
    main()
