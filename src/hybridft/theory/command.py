"""`hybridft smoothness`: measure, estimate with confidence intervals, advise, print, save.

Writes ``smoothness.json`` (config, raw pairs, fits, constants, advice, eps scan) and
``ratios.png`` to ``--output-dir``; nothing is written before the inputs are checked.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from hybridft.run.config import TrainConfig
from hybridft.theory import plots
from hybridft.theory.config import SmoothnessConfig
from hybridft.theory.envelope import Interval
from hybridft.theory.eps import advise_eps
from hybridft.theory.estimates import Estimates, estimate
from hybridft.theory.smoothness import Measurement, measure, to_dict
from hybridft.run.train import build, total_steps



def _ci(x: Interval) -> str:
    return f"{x.value:.3g} [{x.low:.3g}, {x.high:.3g}]"


def report(est: Estimates, m: Measurement, eps: float | None) -> str:
    """A plain-text table of the fits and the advice, with 95% bootstrap intervals."""
    lines = ["block gradient <- moved block, directions: plain L = max ratio; L0, L1; value at max ||grad||  (95% CI)"]
    for f in est.fits:
        lines.append(f"  {f.measured:>5} <- {f.moved:<5} {f.kind:<8} L {_ci(f.lipschitz):<28} L0 {_ci(f.l0):<28} "
                     f"L1 {_ci(f.l1):<28} at max {_ci(f.at_max_grad)}  ({f.pairs} pairs)")
    c, a, ci = est.constants, est.advice, est.intervals
    lines.append(f"dims: theta {c.zo_dim:,}, phi {c.fo_dim:,}; batch {m.data.batch_size} of n={m.data.n} "
                 f"({a.steps_per_epoch} steps/epoch); kappa theta {a.kappa['theta']:.3g}, phi {a.kappa['phi']:.3g}, "
                 f"coupling rho {a.coupling:.3g}; loss gap {c.loss_gap:.3g}; advice for {a.steps} steps")
    for name in ("grad_sq_theta", "grad_sq_phi", "variance_theta", "variance_phi"):
        lines.append(f"{name:<24} {_ci(ci[name])}")
    for name in ("zo_lr", "fo_lr", "zo_lr_max", "fo_lr_max", "zo_lr_epoch", "fo_lr_epoch", "zo_lr_worst_case"):
        if getattr(a, name) is not None:
            lines.append(f"advice {name:<17} {_ci(ci[name])}")
    if eps is not None:
        scan = ", ".join(f"{row['eps']:g}: {row['error']:.2g}" for row in m.eps_scan)
        lines.append(f"advice eps               {eps:g}   (median relative error of the ZO estimate by eps: {scan})")
    lines.append(f"measured in {m.seconds:.0f} s")
    return "\n".join(lines)


def output_dir(config: TrainConfig, overwrite: bool) -> Path:
    out = Path(config.output_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-smoothness-{config.task}")
    if (out / "smoothness.json").exists() and not overwrite:
        raise ValueError(f"{out} already holds a measurement; choose another --output-dir or pass --overwrite")
    return out


def smoothness(config: TrainConfig, settings: SmoothnessConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Measure along ``config``'s training trajectory, estimate, advise; write and print the result."""
    config.validate()
    settings.validate()
    if config.lr is not None:
        raise ValueError("hybridft smoothness measures the step sizes' inputs itself; drop --lr")
    out = output_dir(config, overwrite)
    run = build(config)
    m = measure(run, settings)
    est = estimate(m.data, steps=total_steps(config, len(run.train_set)), resamples=settings.bootstrap,
                   generator=torch.Generator().manual_seed(config.seed))
    eps = advise_eps(m.eps_scan) if m.eps_scan else None
    record = {
        "config": config.to_dict(), "settings": dataclasses.asdict(settings), "measurement": to_dict(m),
        "fits": [f.to_dict() for f in est.fits], "constants": est.constants.to_dict(),
        "advice": {**est.advice.to_dict(), "eps": eps}, "intervals": {k: v.to_dict() for k, v in est.intervals.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "smoothness.json").write_text(json.dumps(record, indent=1))
    plots.ratios(m.data.pairs, est.fits, out / "ratios.png",
                 title=f"{config.model} / {config.task}, {config.method}: nearby pairs along {len(m.steps)} items")
    print(report(est, m, eps))
    print(f"saved to {out}")
    return record
