"""What one ZO update does to a real model's weights stored in bf16/fp16, by rounding mode.

A ZO step adds -lr * g * z_j to every weight w_j. Stored in bfloat16 or float16 and rounded to
nearest (MeZO's way), w_j changes only where that exceeds half the dtype's spacing at w_j.
Stochastic rounding (hybridft's default) keeps the update on average. This applies one update
(Gaussian z, the values of lr * |g| given) with ``hybridft.engine.rules.update_`` to every weight of the
model in each dtype and prints: the fraction of weights left bitwise unchanged, and the share of
the exact update kept along it, <stored change, exact change> / |exact change|^2 (1 = all of it).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/low_precision.py --model minilm
"""

from __future__ import annotations

import argparse

import torch

from hybridft.data.models import resolve
from hybridft.engine.rules import update_
from hybridft.engine.zo import ZOUpdate, parameter_key

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def one_update(weights: dict[str, torch.Tensor], step: float, dtype: torch.dtype, rounding: str) -> tuple[float, float]:
    """(fraction unchanged, share kept) of one update of size ``step`` to ``weights`` stored in ``dtype``."""
    update = ZOUpdate(step=0, seeds=(1234,), projected_grads=(1.0,), lr=step, weight_decay=0.0, rounding=rounding)  # type: ignore[arg-type]
    same = total = 0
    along = squared = 0.0
    for name, w in weights.items():
        start = w.to(dtype, copy=True)
        stored, exact = start.clone(), start.double()
        update_(stored, key=parameter_key(name), update=update)
        update_(exact, key=parameter_key(name), update=update)  # float64: the update as it should be
        change = exact - start.double()
        same += int((stored == start).sum())
        total += w.numel()
        along += float(((stored.double() - start.double()) * change).sum())
        squared += float((change * change).sum())
    return same / total, along / squared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="packaged name, hub id or directory")
    parser.add_argument("--steps", default="5e-6,5e-5,5e-4", help="values of lr * |g|, comma-separated")
    args = parser.parse_args()
    from transformers import AutoModel

    model = AutoModel.from_pretrained(resolve(args.model), dtype="float32")
    weights = {name: p.detach() for name, p in model.named_parameters()}
    print(f"{args.model}: {sum(w.numel() for w in weights.values()):,} weights, one ZO update")
    print("| lr·\\|g\\| | dtype | unchanged, nearest | kept, nearest | unchanged, stochastic | kept, stochastic |")
    print("|---|---|---|---|---|---|")
    for step in (float(s) for s in args.steps.split(",")):
        for dtype in DTYPES:
            cells = [f"{v:.4f}" for rounding in ("nearest", "stochastic") for v in one_update(weights, step, dtype, rounding)]
            print(f"| {step:g} | {str(dtype).removeprefix('torch.')} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
