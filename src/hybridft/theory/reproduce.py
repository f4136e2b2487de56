"""Everything in docs/theory.md, in one command:

    python -m hybridft.theory.reproduce [--out docs/theory] [--skip-model] [--skip-train]

1. the estimator against known constants (coupled quadratic, exp (L0, L1)-smooth);
2. the four methods on the three synthetic problems with the advised step sizes: min-so-far
   ||grad f|| per epoch on log-log axes next to O(T^-1/4) (rate-*.png);
3. reshuffling against with-replacement sampling on the quadratic over 10 instances;
4. ``hybridft smoothness`` on the packaged MiniLM + LoRA, Rotten Tomatoes, default run (minilm/);
5. ``hybridft train --lr auto --fo-optimizer sgd`` on the same, 60 steps, 500 dev examples,
   to set against the plain-SGD learning-rate sweep in BENCHMARKS.md.

One thread throughout (the machine is shared). Results: ``results.json`` and the PNGs under
``--out``; a summary is printed. Steps 4 and 5 take minutes; 1 to 3 about one.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hybridft.run.config import TrainConfig
from hybridft.theory import plots
from hybridft.theory.config import SmoothnessConfig
from hybridft.theory.estimates import envelopes
from hybridft.theory.problems import CoupledQuadratic, ExpSmooth, LowRankLogistic, Problem
from hybridft.theory.smoothness import measure_start
from hybridft.theory.verify import METHODS, blocks, exp_smooth_envelopes, run, slope

PROBLEMS: dict[str, tuple[functools.partial[Problem], int, int]] = {  # name: (problem, batch size, epochs)
    "quadratic": (functools.partial(CoupledQuadratic, d_theta=40, d_phi=10, n=64, condition=100.0), 8, 100),
    "logistic": (functools.partial(LowRankLogistic), 16, 100),
    "exp-smooth": (functools.partial(ExpSmooth), 4, 100),
}


def estimator_check() -> dict[str, Any]:
    """Measured against exact constants: quadratic blocks (power iteration over 12 pairs) and the
    exp problem's (L0, L1)."""
    problem = CoupledQuadratic(d_theta=40, d_phi=10, n=64, condition=100.0)
    zo, fo = blocks(problem, "hybrid")
    fns = [lambda b=b: problem(b) for b in (list(range(i, i + 8)) for i in range(0, 64, 8))] * 2
    data, _, _ = measure_start(problem, {"theta": list(zo.values()), "phi": list(fo.values())}, fns, pairs_on=16,
                               kinds=("gradient", "random", "power"), radius=1e-3,
                               generator=torch.Generator().manual_seed(0), power={}, n=64, batch_size=8)
    _, largest = envelopes(data, torch.arange(data.items))
    known = problem.known()
    quadratic = {f"{b}<-{c}": {"exact": known[f"{b}_{c}"], "measured_all": largest[b, c, "all"],
                               "exact_random_rms": known[f"{b}_{c}_random"], "measured_random_max": largest[b, c, "random"]}
                 for b in ("theta", "phi") for c in ("theta", "phi")}
    fitted = exp_smooth_envelopes((1.0, 2.0), (0.5, 3.0))
    exp = {b: {"exact": list(l0l1), "measured": [fitted[b, b, "gradient"].l0, fitted[b, b, "gradient"].l1]}
           for b, l0l1 in (("theta", (1.0, 2.0)), ("phi", (0.5, 3.0)))}
    return {"quadratic": quadratic, "exp_smooth": exp}


def synthetic(out: Path) -> dict[str, Any]:
    """The four methods on each problem (seed 0); a rate plot per problem."""
    results: dict[str, Any] = {}
    for name, (make, batch_size, epochs) in PROBLEMS.items():
        curves = {method: run(make, method, epochs=epochs, batch_size=batch_size) for method in METHODS}
        plots.rates({m: c.grad_norms for m, c in curves.items()}, out / f"rate-{name}.png",
                    title=f"{name}: batch {batch_size}, advised steps (anytime)")
        results[name] = {m: {"start": c.start, "min": c.min_so_far()[-1], "last": c.grad_norms[-1],
                             "slope_second_half": slope(c.min_so_far()), "first_lrs": c.lrs, "eps": c.eps}
                         for m, c in curves.items()}
        print(f"{name}: " + ", ".join(f"{m} {r['start']:.3g} -> {r['min']:.3g} (slope {r['slope_second_half']:.2f})"
                                      for m, r in results[name].items()))
    return results


def samplers(seeds: int = 10, epochs: int = 20) -> dict[str, Any]:
    """Reshuffling vs with-replacement at the advised constant steps, quadratic with a noisy FO block."""
    ratios = []
    for seed in range(seeds):
        make = functools.partial(CoupledQuadratic, d_theta=4, d_phi=16, n=16, condition=10.0, noise=3.0, seed=seed)
        tails = [sum(c.grad_norms[-5:]) / 5 for c in (run(make, m, epochs=epochs, batch_size=4, seed=seed, schedule="constant")
                                                     for m in ("hybrid", "hybrid-replacement"))]
        ratios.append(tails[0] / tails[1])
    summary = {"ratios": ratios, "mean": statistics.mean(ratios), "reshuffling_lower_in": sum(r < 1 for r in ratios),
               "seeds": seeds, "epochs": epochs}
    print(f"reshuffling / with-replacement, last 5 epochs' ||grad f||: mean {summary['mean']:.3f}, "
          f"lower in {summary['reshuffling_lower_in']} of {seeds}")
    return summary


def minilm(out: Path) -> dict[str, Any]:
    from hybridft.theory.command import smoothness

    config = TrainConfig(threads=1, progress=False, output_dir=str(out / "minilm"))
    return smoothness(config, SmoothnessConfig(radius_scan=True), overwrite=True)


def lr_auto() -> dict[str, Any]:
    from hybridft.run.train import train
    from hybridft.theory.auto import resolve_lr

    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(threads=1, progress=False, lr="auto", fo_optimizer="sgd", steps=60, dev_size=500,
                             output_dir=str(Path(tmp) / "run"))
        result = train(config, resolve_lr=resolve_lr)
        resolved = json.loads((result.output_dir / "config.json").read_text())
    return {"zo_lr": resolved["zo_lr"], "fo_lr": resolved["fo_lr"], "eps": resolved["eps"],
            "dev_accuracy_before": result.dev_accuracy_before, "dev_accuracy_after": result.dev_accuracy_after}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybridft.theory.reproduce", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/theory", help="where the PNGs and results.json go")
    parser.add_argument("--skip-model", action="store_true", help="skip the MiniLM measurement (step 4)")
    parser.add_argument("--skip-train", action="store_true", help="skip the --lr auto training run (step 5)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {"torch": torch.__version__, "estimator": estimator_check()}
    print(json.dumps(results["estimator"], indent=1))
    results["synthetic"] = synthetic(out)
    results["samplers"] = samplers()
    if not args.skip_model:
        record = minilm(out)
        results["minilm"] = {k: record[k] for k in ("advice", "constants", "intervals")}
    if not args.skip_train:
        results["lr_auto"] = lr_auto()
        print(f"--lr auto, SGD, 60 steps: {results['lr_auto']}")
    results["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'results.json'} in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
