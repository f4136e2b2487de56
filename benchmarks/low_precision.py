"""How many weights one ZO update leaves unchanged when the weights are bf16/fp16.

A ZO step adds -lr * g * z_j to every weight w_j. Stored in bfloat16 or float16, w_j changes only
where that exceeds half the dtype's spacing at w_j; the rest of the update is rounded away. This
applies one such update (Gaussian z, the values of lr * |g| given) to a real model's weights in
each dtype and prints the fraction of weights left bitwise unchanged (float32 for reference).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/low_precision.py --model minilm
"""

from __future__ import annotations

import argparse

import torch

from hybridft.models import resolve
from hybridft.zo import direction

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unchanged_fraction(weights: list[torch.Tensor], step: float, dtype: torch.dtype) -> float:
    """Fraction of ``weights`` (stored in ``dtype``) that ``w - step * z`` leaves as they were."""
    same = total = 0
    for key, w in enumerate(weights):
        stored = w.to(dtype)
        z = direction(w, seed=0, key=key)
        same += int((stored.float().sub(z, alpha=step).to(dtype) == stored).sum())
        total += w.numel()
    return same / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="packaged name, hub id or directory")
    parser.add_argument("--steps", default="5e-6,5e-5,5e-4", help="values of lr * |g|, comma-separated")
    args = parser.parse_args()
    from transformers import AutoModel

    model = AutoModel.from_pretrained(resolve(args.model), dtype="float32")
    weights = [p.detach() for p in model.parameters()]
    print(f"{args.model}: {sum(w.numel() for w in weights):,} weights; fraction unchanged by one ZO update")
    print("| lr * abs(g) | " + " | ".join(str(d).removeprefix("torch.") for d in DTYPES) + " |")
    print("|---|" + "---|" * len(DTYPES))
    for step in (float(s) for s in args.steps.split(",")):
        print(f"| {step:g} | " + " | ".join(f"{unchanged_fraction(weights, step, d):.4f}" for d in DTYPES) + " |")


if __name__ == "__main__":
    main()
