"""Step cost of every method and step mode against the plain passes it needs, at batch 16 x 64 tokens.

    python benchmarks/step_cost.py [--model minilm|smollm2] [--batch 16] [--tokens 64] [--steps 5] [--threads 2]
                                   [--rows fo-lora,hybrid,...] [--generation]

For each row (a method and a step mode), in a fresh subprocess (so that peak memory is per
row): the peak memory of the steps (CUDA: max allocated; CPU: peak RSS of the process, whose
model load is common to all rows), then ``--steps`` rounds of one plain forward (no grad), one
plain forward+backward (LoRA for adapter methods, all weights for fo-full, lomo and adalomo) and one
optimizer step, interleaved so that a change of machine load hits all three alike; the medians;
and the step's ratio to the plain passes it needs (hybrid: fwd+bwd + 2 fwd, fused: fwd+bwd +
1 fwd, fo-*, lomo and adalomo: fwd+bwd, zo-*: 2 fwd). The FO rule is plain SGD (fo-full holds every
gradient after backward), AdamW in the ``adamw`` rows (two moments per trained weight); lomo's
is SGD fused into backward (``FusedSGD``: no full set of gradients), adalomo's AdaLomo fused into
it (``FusedAdaLomo``), so their plain fwd+bwd applies their update too: the update cannot be
separated from it.
``--generation`` instead times one pass of z generation over the model's weights for each
distribution, draw dtype and thread count.

``smollm2`` is a LlamaForSequenceClassification with SmolLM2-135M's shape, built from its config
with random weights (no checkpoint is available offline; step cost does not depend on values).
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

# name -> (method, TrainConfig ZO flags (and the FO rule, plain SGD unless fo_optimizer is named),
#          fwd+bwd passes needed, fwd passes needed)
ROWS = {
    "fo-lora": ("fo-lora", {}, 1, 0),
    "hybrid": ("hybrid", {}, 1, 2),
    "hybrid fused": ("hybrid", {"fused": True}, 1, 1),
    "hybrid fused one-sided": ("hybrid", {"fused": True, "one_sided": True}, 1, 1),
    "hybrid z-cache": ("hybrid", {"z_cache": True}, 1, 2),
    "hybrid embedding-rows": ("hybrid", {"embedding_rows": True}, 1, 2),
    "hybrid rademacher": ("hybrid", {"distribution": "rademacher"}, 1, 2),
    "hybrid zo-threads 2": ("hybrid", {"threads": 2}, 1, 2),
    "hybrid fused+cache": ("hybrid", {"fused": True, "z_cache": True, "threads": 2}, 1, 1),
    "hybrid fused+rows+cache": ("hybrid", {"fused": True, "embedding_rows": True, "z_cache": True, "threads": 2}, 1, 1),
    "hybrid fused+rows+rademacher": ("hybrid", {"fused": True, "embedding_rows": True, "distribution": "rademacher"}, 1, 1),
    "zo-full": ("zo-full", {}, 0, 2),
    "zo-full z-cache": ("zo-full", {"z_cache": True, "threads": 2}, 0, 2),
    "zo-full embedding-rows": ("zo-full", {"embedding_rows": True}, 0, 2),
    "zo-full rows+cache+rademacher": ("zo-full", {"embedding_rows": True, "z_cache": True, "threads": 2,
                                                  "distribution": "rademacher"}, 0, 2),
    "zo-full low-rank r2": ("zo-full", {"zo_directions": "low-rank", "zo_rank": 2}, 0, 2),
    "zo-full low-rank r2+rows": ("zo-full", {"zo_directions": "low-rank", "zo_rank": 2, "embedding_rows": True}, 0, 2),
    "zo-full low-rank r2+rows+cache": ("zo-full", {"zo_directions": "low-rank", "zo_rank": 2, "embedding_rows": True,
                                                   "z_cache": True, "threads": 2}, 0, 2),
    "zo-full layer-subset 0.25": ("zo-full", {"zo_directions": "layer-subset", "zo_layer_fraction": 0.25}, 0, 2),
    "zo-full layer-subset 0.25+rows+cache": ("zo-full", {"zo_directions": "layer-subset", "zo_layer_fraction": 0.25,
                                                          "embedding_rows": True, "z_cache": True, "threads": 2}, 0, 2),
    "zo-full magnitude-mask 0.25": ("zo-full", {"zo_directions": "magnitude-mask", "zo_mask_fraction": 0.25}, 0, 2),
    "zo-full fzoo q4": ("zo-full", {"zo_estimator": "fzoo", "num_directions": 4, "distribution": "rademacher"}, 0, 5),
    "hybrid fused low-rank r2+rows": ("hybrid", {"fused": True, "zo_directions": "low-rank", "zo_rank": 2,
                                                  "embedding_rows": True}, 1, 1),
    "hybrid fused layer-subset 0.25": ("hybrid", {"fused": True, "zo_directions": "layer-subset",
                                                   "zo_layer_fraction": 0.25}, 1, 1),
    "zo-lora": ("zo-lora", {}, 0, 2),
    "fo-full": ("fo-full", {}, 1, 0),
    "lomo": ("lomo", {}, 1, 0),
    "adalomo": ("adalomo", {}, 1, 0),
    "fo-lora adamw": ("fo-lora", {"fo_optimizer": "adamw"}, 1, 0),
    "fo-full adamw": ("fo-full", {"fo_optimizer": "adamw"}, 1, 0),
}
DEFAULT_ROWS = ",".join(ROWS)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def smollm2_shaped() -> torch.nn.Module:
    """SmolLM2-135M's architecture (30 layers, 576 wide, 49,152-token vocabulary), random weights."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, num_labels=2, pad_token_id=0)
    return LlamaForSequenceClassification(config)


def load(name: str, method: str) -> torch.nn.Module:
    from hybridft.engine.adapters import lora_config, wrap
    from hybridft.engine.methods import USES_ADAPTER
    from hybridft.data.models import load_classifier

    if name == "smollm2":
        model, heads = smollm2_shaped(), ["score"]
    else:
        loaded = load_classifier(name, 2)
        model, heads = loaded.model, loaded.head_modules
    if USES_ADAPTER[method]:
        model = wrap(model, lora_config(r=8, alpha=16, dropout=0.0, target_modules=None, head_modules=heads))
    return model


def measure(row: str, args: argparse.Namespace) -> dict[str, float]:
    from transformers.utils import logging as hf_logging

    from hybridft.engine.methods import FUSED_FO, assign, build_optimizer, fo_optimizer
    from hybridft.run.config import TrainConfig

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    method, modes, _, _ = ROWS[row]
    device = torch.device(args.device)
    model = load(args.model, method)
    groups = assign(method, model)
    model.to(device).eval()  # no dropout: every pass computes the same function
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch, args.tokens), generator=g)
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
             "labels": torch.randint(2, (args.batch,), generator=g).to(device)}
    flags = {("zo_threads" if k == "threads" else k): v for k, v in modes.items()}  # the CLI's names
    fo = functools.partial(fo_optimizer, FUSED_FO.get(method, flags.pop("fo_optimizer", "sgd")), lr=1e-4)
    optimizer = build_optimizer(model, groups, zo_lr=1e-7, seed=0, fo=fo,
                                **TrainConfig(eps=1e-3, **flags).zo_step())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def fwd() -> None:
        with torch.no_grad():
            model(**batch)

    def fwdbwd() -> None:
        optimizer.zero_grad()
        model(**batch).loss.backward()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = model(**batch).loss
        if torch.is_grad_enabled():
            loss.backward()
        return loss.detach()

    def step() -> None:
        optimizer.step(closure)

    passes = {"fwd": fwd, "step": step} | ({"fwdbwd": fwdbwd} if groups.fo else {})
    step()  # warm-up
    step()
    sync()
    peak = peak_memory_mib(device)  # the steps' peak, before any plain pass ran
    times: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(args.steps):
        for name, fn in passes.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    result = {name: statistics.median(ts) for name, ts in times.items()}
    return result | {"peak_mib": peak, "cache_mib": optimizer.last_cache_bytes / 2**20,
                     "zo_params": sum(p.numel() for p in groups.zo.values()),
                     "fo_params": sum(p.numel() for p in groups.fo.values())}


def generation(args: argparse.Namespace) -> None:
    """Seconds for one pass of z generation over the model's weights, per option."""
    from hybridft.engine.directions import parallel_map
    from hybridft.engine.zo import direction, parameter_key

    model = load(args.model, "zo-full")
    named = [(parameter_key(n), p.detach()) for n, p in model.named_parameters()]
    print(f"z generation over {sum(p.numel() for _, p in named):,} weights, model={args.model}, "
          f"torch threads={args.threads}")
    print("| weights | distribution | drawn in | gen threads | seconds per pass |")
    print("|---|---|---|---|---|")
    torch.set_num_threads(args.threads)
    for weights_dtype in (torch.float32, torch.bfloat16):
        likes = [(k, torch.empty_like(p, dtype=weights_dtype)) for k, p in named]
        for distribution in ("gaussian", "rademacher"):
            for dtype in ("float32", "param"):
                for threads in (1, 2):
                    if weights_dtype == torch.float32 and dtype == "param":
                        continue  # the same draw as float32

                    def one_pass() -> None:
                        parallel_map(lambda kp: direction(kp[1], seed=1, key=kp[0], distribution=distribution,
                                                          dtype=dtype), likes, threads)

                    one_pass()
                    times = []
                    for _ in range(args.steps):
                        start = time.perf_counter()
                        one_pass()
                        times.append(time.perf_counter() - start)
                    print(f"| {str(weights_dtype).replace('torch.', '')} | {distribution} | "
                          f"{'weights dtype' if dtype == 'param' else 'float32'} | {threads} | "
                          f"{statistics.median(times):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", help="minilm (packaged checkpoint) or smollm2 (its shape)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated, from: {DEFAULT_ROWS}")
    parser.add_argument("--generation", action="store_true", help="time z generation per option instead")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generation:
        generation(args)
        return
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    print(f"model={args.model} batch={args.batch}x{args.tokens} threads={args.threads} device={args.device} "
          f"torch={torch.__version__}")
    print("| method / mode | ZO params | FO params | fwd s | fwd+bwd s | step s | passes needed | step / passes "
          "| peak MiB | z-cache MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in args.rows.split(","):
        cmd = [sys.executable, __file__, "--one", row, *sys.argv[1:]]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        _, _, n_fwdbwd, n_fwd = ROWS[row]
        passes = n_fwdbwd * r.get("fwdbwd", 0.0) + n_fwd * r["fwd"]
        needed = " + ".join(p for p in (f"{n_fwdbwd} fwd+bwd" if n_fwdbwd else "", f"{n_fwd} fwd" if n_fwd else "") if p)
        fwdbwd = f"{r['fwdbwd']:.3f}" if "fwdbwd" in r else "–"  # ZO-only rows need no backward
        print(f"| {row} | {r['zo_params']:,} | {r['fo_params']:,} | {r['fwd']:.3f} | {fwdbwd} "
              f"| {r['step']:.3f} | {needed} | {r['step'] / passes:.2f} | {r['peak_mib']:.0f} | {r['cache_mib']:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
