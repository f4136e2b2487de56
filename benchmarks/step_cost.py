"""Step cost of every method against the plain passes it needs, on MiniLM at batch 16 x 64 tokens.

    python benchmarks/step_cost.py [--model minilm] [--batch 16] [--tokens 64] [--steps 5] [--threads 2]

For each method, in a fresh subprocess (so that peak memory is per method): the median time
of a plain forward (no grad), a plain forward+backward (LoRA for adapter methods, all weights
for fo-full), and one optimizer step; the step's ratio to the sum of the plain passes it
needs (hybrid: fwd+bwd + 2 fwd; fo-*: fwd+bwd; zo-*: 2 fwd); and peak memory (CUDA: max
allocated; CPU: peak RSS of the process, whose model load is common to all methods).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

NEEDS = {"hybrid": ("fwdbwd", 1, "fwd", 2), "fo-lora": ("fwdbwd", 1, "fwd", 0), "fo-full": ("fwdbwd", 1, "fwd", 0),
         "zo-full": ("fwdbwd", 0, "fwd", 2), "zo-lora": ("fwdbwd", 0, "fwd", 2)}


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(method: str, args: argparse.Namespace) -> dict[str, float]:
    from transformers.utils import logging as hf_logging

    from hybridft.methods import USES_ADAPTER, assign, build_optimizer, lora_config, wrap
    from hybridft.models import load_classifier

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    loaded = load_classifier(args.model, 2)
    model = loaded.model
    if USES_ADAPTER[method]:
        model = wrap(model, lora_config(r=8, alpha=16, dropout=0.0, target_modules=None, head_modules=loaded.head_modules))
    groups = assign(method, model)
    model.to(device).eval()  # no dropout: every pass computes the same function
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch, args.tokens), generator=g)
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
             "labels": torch.randint(2, (args.batch,), generator=g).to(device)}
    optimizer = build_optimizer(model, groups, zo_lr=1e-7, fo_lr=1e-4, eps=1e-3, seed=0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def fwd() -> None:
        with torch.no_grad():
            model(**batch)
        sync()

    def fwdbwd() -> None:
        optimizer.zero_grad()
        model(**batch).loss.backward()
        sync()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = model(**batch).loss
        if torch.is_grad_enabled():
            loss.backward()
        return loss.detach()

    def step() -> None:
        optimizer.step(closure)
        sync()

    rss_before = peak_memory_mib(device)
    t_step = timed(step, args.steps)
    peak = peak_memory_mib(device)
    t_fwd = timed(fwd, args.steps)
    t_fwdbwd = timed(fwdbwd, args.steps) if groups.fo else float("nan")
    return {"fwd": t_fwd, "fwdbwd": t_fwdbwd, "step": t_step, "peak_mib": peak, "peak_before_steps_mib": rss_before,
            "zo_params": sum(p.numel() for p in groups.zo.values()), "fo_params": sum(p.numel() for p in groups.fo.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", default="fo-lora,hybrid,zo-full,zo-lora,fo-full")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    rows = {}
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--one", method, *sys.argv[1:]]
        rows[method] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    print(f"model={args.model} batch={args.batch}x{args.tokens} threads={args.threads} device={args.device} torch={torch.__version__}")
    print("| method | ZO params | FO params | fwd s | fwd+bwd s | step s | passes needed | step / passes | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method, r in rows.items():
        a, na, b, nb = NEEDS[method]
        passes = (na * r[a] if na else 0.0) + (nb * r[b] if nb else 0.0)
        needed = " + ".join(p for p in (f"{na} fwd+bwd" if na else "", f"{nb} fwd" if nb else "") if p)
        print(f"| {method} | {r['zo_params']:,} | {r['fo_params']:,} | {r['fwd']:.3f} | {r['fwdbwd']:.3f} | {r['step']:.3f} "
              f"| {needed} | {r['step'] / passes:.2f} | {r['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
