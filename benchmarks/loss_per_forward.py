"""Train loss against forward passes for the ZO-only cells of a bench (issue 19's "ZO alone").

    .venv/bin/python benchmarks/loss_per_forward.py benchmarks/results/zo-alone [--reference zo-plain] [--window 50]

For each finished cell: its forwards per step from its config (two-sided SPSA: 2 q; one-sided:
q + 1; FZOO: q + 1), its logged train loss per step (the step's ZO loss: the mean of the perturbed
losses, or L(theta) for one-sided rules and FZOO) smoothed by a trailing mean of ``--window``
steps, and against the reference method:
- the reference's decrease, mean of the first window minus mean of the last, and its noise (the
  standard error of that difference from the two windows' spreads), so that a decrease can be
  read against the loss's own step-to-step scatter;
- each method's decrease, and the forward passes it needs until its smoothed loss first reaches
  the reference's final smoothed loss (after one full window; – if it never does), with the
  ratio to the reference's own.
Draws ``plots/loss_per_forward.png`` in the bench directory.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

from hybridft.study.metrics import read_jsonl
from hybridft.study.plots import _pyplot, smooth


def forwards_per_step(config: dict[str, Any]) -> int:
    q = int(config.get("num_directions", 1))
    if config.get("zo_estimator") == "fzoo" or config.get("one_sided"):
        return q + 1
    return 2 * q


def cell(run_dir: Path, window: int) -> dict[str, Any]:
    config = json.loads((run_dir / "config.json").read_text())
    losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    first, last = losses[:window], losses[-window:]
    noise = math.sqrt(statistics.variance(first) / len(first) + statistics.variance(last) / len(last))
    return {"forwards": forwards_per_step(config), "smoothed": smooth(losses, window), "steps": len(losses),
            "decrease": statistics.fmean(first) - statistics.fmean(last), "noise": noise}


def forwards_to(row: dict[str, Any], target: float, window: int) -> int | None:
    step = next((i + 1 for i, v in enumerate(row["smoothed"]) if i + 1 >= window and v <= target), None)
    return None if step is None else step * row["forwards"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_dir", type=Path)
    parser.add_argument("--reference", default="zo-plain")
    parser.add_argument("--window", type=int, default=50)
    args = parser.parse_args()
    rows = {d.parent.name + "/" + d.name: cell(d, args.window)
            for d in sorted(args.bench_dir.glob("cells/*/*/*/*")) if (d / "eval.json").exists()}
    ref = next((r for name, r in rows.items() if name.startswith(args.reference + "/")), None)
    if ref is None:
        raise SystemExit(f"loss_per_forward.py: error: no finished {args.reference} cell under {args.bench_dir}/cells")
    target = float(ref["smoothed"][-1])
    print(f"reference {args.reference}: decrease {ref['decrease']:.4f} over {ref['steps']} steps, noise (s.e.) "
          f"{ref['noise']:.4f} ({ref['decrease'] / ref['noise']:.1f} s.e.); final smoothed loss {target:.4f}\n")
    print("| cell | fwd/step | steps | decrease | s.e. | fwd to reference's final loss | ratio |")
    print("|---|---|---|---|---|---|---|")
    ref_fwd = forwards_to(ref, target, args.window)
    figure, axis = _pyplot().subplots(figsize=(7, 4))
    for name, row in rows.items():
        fwd = forwards_to(row, target, args.window)
        ratio = "–" if fwd is None or not ref_fwd else f"{fwd / ref_fwd:.2f}"
        print(f"| {name} | {row['forwards']} | {row['steps']} | {row['decrease']:.4f} | {row['noise']:.4f} "
              f"| {fwd if fwd is not None else '–'} | {ratio} |")
        axis.plot([(i + 1) * row["forwards"] for i in range(row["steps"])], row["smoothed"], label=name)
    axis.set(xlabel="forward passes", ylabel=f"train loss (trailing mean of {args.window} steps)")
    axis.legend()
    out = args.bench_dir / "plots" / "loss_per_forward.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120, bbox_inches="tight")
    print(f"\nplot: {out}")


if __name__ == "__main__":
    main()
