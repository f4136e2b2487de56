"""Run the methods on a synthetic problem with the advised step sizes and record ||grad f|| per epoch.

Methods (all through the real engine: ``HybridOptimizer`` and ``ReshufflingSampler``):

| method             | ZO rule on      | FO rule (SGD) on | sampler            |
|--------------------|-----------------|------------------|--------------------|
| hybrid             | theta           | phi              | reshuffling        |
| hybrid-replacement | theta           | phi              | with replacement   |
| zo-only            | theta and phi   | -                | reshuffling        |
| fo-only            | -               | theta and phi    | reshuffling        |

Step sizes come from the toolkit itself: pairs on a few batches, the gradient variance and the
eps scan are measured at the start, one more batch's pairs and the variance at the start of
every epoch; at epoch t every group uses the advice at x_t (the envelopes refitted and evaluated at the current
gradient norm: the generalized-smoothness step) for a run of (t + 1) m steps, which is constant
while the largest stable step binds and then decays as 1 / sqrt(t): the schedule the rate
statement is about.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from hybridft.engine.estimators import TwoSided
from hybridft.engine.optim import HybridOptimizer
from hybridft.engine.sampler import ReshufflingSampler
from hybridft.theory.advice import Advice, advise, batch_variance
from hybridft.theory.config import SmoothnessConfig, floats
from hybridft.theory.eps import advise_eps, eps_scan
from hybridft.theory.estimates import Data, Envelopes, constants_at, envelopes, variances
from hybridft.theory.problems import ExpSmooth, Problem
from hybridft.theory.pairs import Tensors, measure_point
from hybridft.theory.smoothness import measure_start

METHODS = ("hybrid", "hybrid-replacement", "zo-only", "fo-only")
# few, cheap directions: synthetic problems are small, and three start batches give the variance
SETTINGS = SmoothnessConfig(start_batches=3, variance_batches=8, kinds="gradient,random,power",
                            eps_grid="1e-7,1e-6,1e-5,1e-4,1e-3", eps_directions=3)


@dataclass
class Curve:
    method: str
    grad_norms: list[float] = field(default_factory=list)  # ||grad f|| at the end of each epoch
    start: float = 0.0  # ||grad f|| at the start
    lrs: dict[str, float] = field(default_factory=dict)  # first epoch's step sizes
    eps: float | None = None

    def min_so_far(self) -> list[float]:
        best, out = math.inf, []
        for g in self.grad_norms:
            best = min(best, g)
            out.append(best)
        return out


def blocks(problem: Problem, method: str) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """(ZO parameters, FO parameters) of ``method``, with requires_grad set to match."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    theta, phi = problem.blocks()
    zo, fo = {"zo-only": (theta | phi, {}), "fo-only": ({}, theta | phi)}.get(method, (theta, phi))
    for p in zo.values():
        p.requires_grad_(False)
    for p in fo.values():
        p.requires_grad_(True)
    return zo, fo


@dataclass
class Start:
    """The measurement so far: pairs (the start batches', then one batch per epoch along the run)
    with their envelopes, the variance at the latest point, the start's loss gap, and eps."""

    data: Data
    variance: dict[str, float]
    eps: float | None
    power: dict[str, Tensors]
    generator: torch.Generator
    fitted: Envelopes = field(default_factory=dict)


def measure(problem: Problem, zo: dict[str, nn.Parameter], fo: dict[str, nn.Parameter], *, batch_size: int, seed: int,
            epoch: int = 0, start: Start | None = None, settings: SmoothnessConfig = SETTINGS) -> Start:
    """Pairs and gradient variance at the current point, as ``--lr auto`` measures a model (and the
    eps scan at the start). Along the run (``start`` given) one batch's pairs are added to the
    earlier ones and the envelopes refitted: the changing gradient norm separates L0 from L1."""
    batches = ReshufflingSampler(problem.n, batch_size, seed=seed + 1).epoch_batches(epoch)[: settings.variance_batches]
    fns = [lambda b=b: problem(b) for b in batches]
    generator, power = (start.generator, start.power) if start else (torch.Generator().manual_seed(seed), {})
    data, _, first = measure_start(problem, {"theta": list(zo.values()), "phi": list(fo.values())}, fns,
                                   pairs_on=1 if start else settings.start_batches, kinds=settings.kind_list(),
                                   radius=settings.radius, generator=generator, power=power, n=problem.n,
                                   batch_size=batch_size, loss_floor=problem.lower_bound(),
                                   first_item=start.data.items if start else 0)
    _, variance = variances(data, torch.arange(len(batches)))
    if start is None:
        eps = advise_eps(eps_scan(problem, zo, first["theta"], fns[0], eps_grid=floats(settings.eps_grid),
                                  directions=settings.eps_directions, seed=seed)) if zo else None
        start = Start(data=data, variance=variance, eps=eps, power=power, generator=generator)
    else:
        start.data.pairs.extend(data.pairs)
        start.variance = variance
    start.fitted, _ = envelopes(start.data, torch.arange(start.data.items))
    return start


def advice_at(start: Start, grad_sq: dict[str, float], *, batch_size: int, n: int, steps: int) -> Advice:
    """The advice at a point with block gradients ``grad_sq`` (||grad_B f||^2): generalized smoothness
    evaluated at the root-mean-square batch-gradient norm there, sqrt(||grad_B f||^2 + v_B(b))."""
    rms = {b: math.sqrt(grad_sq[b] + batch_variance(start.variance[b], batch_size=batch_size, n=n)) for b in grad_sq}
    constants = constants_at(start.fitted, rms, dims=start.data.dims, grad_sq=grad_sq, variance=start.variance,
                             loss_gap=start.data.loss_gap)
    return advise(constants, batch_size=batch_size, n=n, steps=steps)


def _set_lrs(optimizer: HybridOptimizer, advice: Advice) -> None:
    optimizer.param_groups[0]["lr"] = advice.zo_lr or 0.0
    for group in optimizer.param_groups[1:]:
        group["lr"] = advice.fo_lr or 0.0


def _block_grad_sq(problem: Problem, zo: dict[str, nn.Parameter]) -> dict[str, float]:
    by_name = problem.grad_sq()
    return {"theta": sum(v for k, v in by_name.items() if k in zo), "phi": sum(v for k, v in by_name.items() if k not in zo)}


SCHEDULES = ("anytime", "constant")


def run(make: Callable[[], Problem], method: str, *, epochs: int, batch_size: int, seed: int = 0,
        schedule: str = "anytime") -> Curve:
    """``epochs`` epochs of ``method`` on a fresh ``make()``; ||grad f|| after each epoch.

    ``anytime``: at the start of epoch t the measurement is extended at x_t and the step sizes
    are the advice at x_t for a run of (t + 1) m steps. ``constant``: the largest stable steps
    advised at the start, throughout (the setting where samplers differ in their noise floor)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    problem = make()
    zo, fo = blocks(problem, method)
    start = measure(problem, zo, fo, batch_size=batch_size, seed=seed)
    sgd = torch.optim.SGD(list(fo.values()), lr=0.0) if fo else None
    optimizer = HybridOptimizer(problem, zo, sgd, lr=0.0, seed=seed, estimator=TwoSided(eps=start.eps or 1e-3))
    sampler = ReshufflingSampler(problem.n, batch_size, seed=seed, replacement=method == "hybrid-replacement")
    m, batches = len(sampler), iter(sampler)
    grad_sq = _block_grad_sq(problem, zo)
    curve = Curve(method=method, start=math.sqrt(sum(grad_sq.values())), eps=start.eps)
    for epoch in range(epochs):
        if schedule == "anytime" or epoch == 0:
            if epoch:
                measure(problem, zo, fo, batch_size=batch_size, seed=seed, epoch=epoch, start=start)
            advice = advice_at(start, grad_sq, batch_size=batch_size, n=problem.n,
                               steps=(epoch + 1) * m if schedule == "anytime" else 0)
            _set_lrs(optimizer, advice)
            curve.lrs = curve.lrs or {"zo": advice.zo_lr or 0.0, "fo": advice.fo_lr or 0.0}
        for _ in range(m):
            indices = next(batches)

            def closure() -> torch.Tensor:
                optimizer.zero_grad()
                loss = problem(indices)
                if torch.is_grad_enabled():
                    loss.backward()
                return loss.detach()

            optimizer.step(closure)
        grad_sq = _block_grad_sq(problem, zo)
        curve.grad_norms.append(math.sqrt(sum(grad_sq.values())))
    return curve


def exp_smooth_envelopes(theta_l0l1: tuple[float, float], phi_l0l1: tuple[float, float], *,
                         points: int = 9) -> Envelopes:
    """The estimator on a one-dimensional ``ExpSmooth`` example, where h'' = L0 + L1 |h'| exactly:
    pairs along the gradient at ``points`` positions, each block's envelope should be (L0, L1)."""
    problem = ExpSmooth(d_theta=1, d_phi=1, n=1, theta_l0l1=theta_l0l1, phi_l0l1=phi_l0l1, spread=0.0)
    zo, fo = blocks(problem, "hybrid")
    pairs = []
    for item, x in enumerate(torch.linspace(-1.5, 1.5, points).tolist()):
        with torch.no_grad():
            problem.theta.fill_(x)
            problem.phi.fill_(-0.7 * x)
        pairs += measure_point(problem, {"theta": list(zo.values()), "phi": list(fo.values())}, lambda: problem([0]),
                               item=item, kinds=("gradient",), radius=1e-5, generator=torch.Generator(), power={})[2]
    data = Data(pairs=pairs, gram={}, dims={"theta": 1, "phi": 1}, n=1, batch_size=1, loss_gap=0.0)
    return envelopes(data, torch.arange(data.items))[0]


def slope(values: list[float], *, start_fraction: float = 0.5) -> float:
    """The least-squares slope of log(value) against log(epoch) over the last part of a curve."""
    first = max(1, int(len(values) * start_fraction))
    xs = torch.log(torch.arange(first, len(values) + 1, dtype=torch.float64))
    ys = torch.log(torch.tensor(values[first - 1 :], dtype=torch.float64))
    xc = xs - xs.mean()
    return float((xc * (ys - ys.mean())).sum() / (xc**2).sum())
