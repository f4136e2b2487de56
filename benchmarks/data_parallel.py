"""Step time and bytes sent per step, 1 process against R ranks (torchrun, gloo on CPU).

    python benchmarks/data_parallel.py [--model minilm] [--method hybrid] [--batch 8] [--ranks 2] [--steps 8]

Runs `hybridft train` three times with --threads 1 per process: 1 process at batch R b, R ranks
at batch b (the same global batch, so the same updates), and R ranks at batch R b (R times the
examples per step); then fo-full on R ranks at batch b, which is what DDP full fine-tuning
sends. Reports the median step time (steps 2..n, from
metrics.jsonl), the median time in the step's all-reduce (waiting for the slower rank
included), examples per second, and the payload bytes each rank put into the step's
all-reduce by part, against what DDP full fine-tuning would all-reduce (every gradient).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(model: str, method: str, ranks: int, batch: int, steps: int, out: Path) -> dict:
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={ranks}"]
    command = [*launcher, "-m", "hybridft", "train", "--model", model, "--method", method, "--batch-size", str(batch),
               "--steps", str(steps), "--dev-size", "32", "--threads", "1", "--no-progress", "--no-plot",
               "--output-dir", str(out)]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    resolved = json.loads((out / "config.json").read_text())["resolved"]
    seconds = [b["seconds"] - a["seconds"] for a, b in zip(records, records[1:])]
    step = statistics.median(seconds)
    allreduce = statistics.median(r.get("allreduce_seconds", 0.0) for r in records[1:])
    return {"ranks": ranks, "batch": batch, "step_s": step, "allreduce_s": allreduce, "examples_per_s": ranks * batch / step,
            **{part: records[-1].get(f"sent_bytes_{part}", 0) for part in ("fo", "zo", "scalars")},
            "ddp": resolved.get("ddp_full_finetuning_bytes_per_step")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--method", default="hybrid")
    parser.add_argument("--batch", type=int, default=8, help="per-rank batch b")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    R, b = args.ranks, args.batch
    print("| method | ranks | batch per rank | step s | all-reduce s | examples/s | FO bytes | ZO bytes | loss+count bytes | DDP full FT bytes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        cells = [(args.method, 1, R * b), (args.method, R, b), (args.method, R, R * b), ("fo-full", R, b)]
        for i, (method, ranks, batch) in enumerate(cells):
            r = run(args.model, method, ranks, batch, args.steps, Path(tmp) / str(i))
            ddp = f"{r['ddp']:,}" if r["ddp"] else "-"
            print(f"| {method} | {r['ranks']} | {r['batch']} | {r['step_s']:.3f} | {r['allreduce_s']:.4f} | {r['examples_per_s']:.1f} | {r['fo']:,} | "
                  f"{r['zo']:,} | {r['scalars']:,} | {ddp} |", flush=True)


if __name__ == "__main__":
    main()
