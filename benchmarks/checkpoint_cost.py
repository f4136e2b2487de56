"""Size and write/load time of one checkpoint, and bytes per step of the ZO replay log.

    python benchmarks/checkpoint_cost.py [--model minilm] [--method hybrid] [--threads 1]

Builds the default run for the model and method, takes 2 steps (so that AdamW has moments),
then writes 3 checkpoints (median time; each is fsync'ed and renamed, see checkpoint.py) and
loads the last one back.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from hybridft.run import checkpoint, zo_log
from hybridft.run.config import TrainConfig
from hybridft.run.train import build, train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--method", default="hybrid")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    run = build(TrainConfig(model=args.model, method=args.method, threads=args.threads, progress=False))
    for step, indices in zip(range(2), run.sampler):
        train_step(run, step, indices)
    with tempfile.TemporaryDirectory() as tmp:
        times = []
        for step in range(1, 4):
            start = time.perf_counter()
            path = checkpoint.save(run, Path(tmp), step, logs={}, extra={}, keep=2)
            times.append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in path.iterdir())
        start = time.perf_counter()
        checkpoint.load(run, path)
        load = time.perf_counter() - start
    weights = sum(t.numel() * t.element_size() for t in run.model.state_dict().values())
    log_line = len(zo_log.to_json(run.optimizer.last_update)) + 1 if run.optimizer.last_update else 0
    print(f"{args.model} {args.method}: checkpoint {size / 2**20:.1f} MiB (state dict {weights / 2**20:.1f} MiB), "
          f"write {statistics.median(times):.2f} s (median of 3), load {load:.2f} s; replay log {log_line} bytes/step")


if __name__ == "__main__":
    main()
