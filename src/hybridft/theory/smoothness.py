"""Measure the hybrid smoothness of a model and task: pairs at the starting point (several
mini-batches, which also give the gradient variance) and along the run's own training trajectory.

Blocks: theta = the method's ZO group (hybrid: the base weights), phi = its FO group (hybrid:
adapter + head). Every measured item is a (point, mini-batch); along the trajectory the batch is
the one the next training step uses, so the pairs lie on the path training takes.
Cost: (start_batches + points) * (1 + 2 * len(kinds)) + variance_batches - start_batches
forward+backward passes over all weights,
points * every training steps, 2 * len(eps_grid) * eps_directions forwards, and with the radius
scan 4 * 5 more forward+backward passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hybridft.engine.sampler import ReshufflingSampler
from hybridft.theory.config import SmoothnessConfig, floats
from hybridft.theory.eps import eps_scan
from hybridft.theory.estimates import Data
from hybridft.theory.pairs import Blocks, Pair, Tensors, block_grads, dot, measure_point
from hybridft.run.train import Run, train_step

RADII = (1e-3, 1e-2, 1e-1, 1.0)
LossFn = Callable[[], torch.Tensor]


@dataclass
class Measurement:
    data: Data
    losses: list[float] = field(default_factory=list)  # per item
    steps: list[int] = field(default_factory=list)  # training steps taken before each item
    eps_scan: list[dict[str, float]] = field(default_factory=list)
    radius_scan: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def gram(grads: Sequence[Tensors]) -> torch.Tensor:
    """Gram_ij = <g_i, g_j> of a block's gradients on k batches: shape (k, k), float64."""
    k = len(grads)
    out = torch.zeros(k, k, dtype=torch.float64)
    for i in range(k):
        for j in range(i, k):
            out[i, j] = out[j, i] = dot(grads[i], grads[j])
    return out


def radius_scan(model: nn.Module, blocks: Blocks, loss_fn: LossFn, *, seed: int) -> list[dict[str, Any]]:
    """Ratios along the same gradient and random directions at radii 1e-3 .. 1: how far the local
    constants hold. Cost: 4 * (1 + 2 * 2) forward+backward passes."""
    rows = []
    for radius in RADII:
        _, _, pairs = measure_point(model, blocks, loss_fn, item=0, kinds=("gradient", "random"), radius=radius,
                                    generator=torch.Generator().manual_seed(seed), power={})
        rows += [{"radius": radius, "moved": p.moved, "kind": p.kind, **{f"ratio_{b}": r for b, r in p.ratio.items()}}
                 for p in pairs]
    return rows


def measure_start(
    model: nn.Module, blocks: Blocks, loss_fns: Sequence[LossFn], *, pairs_on: int, kinds: Sequence[str],
    radius: float, generator: torch.Generator, power: dict[str, Tensors], n: int, batch_size: int,
    loss_floor: float = 0.0, first_item: int = 0,
) -> tuple[Data, list[float], dict[str, Tensors]]:
    """Exact gradients on k batches at the current point (their Gram matrices give the variance),
    with pairs on the first ``pairs_on`` of them. ``loss_floor`` is a lower bound of the loss (0 for
    cross-entropy): the loss gap is the mean start loss minus it.
    Items are numbered from ``first_item``. Returns the data, the ``pairs_on`` losses, and the first
    batch's gradients."""
    pairs: list[Pair] = []
    losses: list[float] = []
    grads: dict[str, list[Tensors]] = {b: [] for b in blocks}
    for item, loss_fn in enumerate(loss_fns):
        if item < pairs_on:
            loss, g, new = measure_point(model, blocks, loss_fn, item=first_item + item, kinds=kinds, radius=radius,
                                         generator=generator, power=power)
            pairs += new
        else:
            loss, g = block_grads(model, blocks, loss_fn)
        losses.append(loss)
        for b in blocks:
            grads[b].append(g[b])
    dims = {b: sum(p.numel() for p in ps) for b, ps in blocks.items()}
    data = Data(pairs=pairs, gram={b: gram(grads[b]) for b in blocks if dims[b]}, dims=dims, n=n,
                batch_size=batch_size, loss_gap=sum(losses) / len(losses) - loss_floor)
    return data, losses[:pairs_on], {b: grads[b][0] for b in blocks}


def run_blocks(run: Run) -> dict[str, list[nn.Parameter]]:
    return {"theta": list(run.groups.zo.values()), "phi": list(run.groups.fo.values())}


def batch_loss(run: Run, indices: list[int]) -> LossFn:
    """The run's task loss (its formulation's) on the mini-batch ``indices``."""
    batch = run.batch(indices)
    return lambda: run.formulation.loss(run.model, batch)


def start_loss_fns(run: Run, k: int) -> list[LossFn]:
    """k distinct mini-batches of the run's size, from a permutation other than training's."""
    sampler = ReshufflingSampler(len(run.train_set), run.config.batch_size, seed=run.config.seed + 1)
    batches = sampler.epoch_batches(0)
    if len(batches) < k:
        raise ValueError(f"the training set has {len(batches)} batches, fewer than --start-batches {k}")
    return [batch_loss(run, indices) for indices in batches[:k]]


def measure(run: Run, settings: SmoothnessConfig, *, trajectory: bool = True) -> Measurement:
    """The measurement of the module docstring; the run's model is trained along the way
    (``points * every`` steps) when ``trajectory``."""
    settings.validate()
    start = time.perf_counter()
    blocks = run_blocks(run)
    kinds, seed = settings.kind_list(), run.config.seed
    generator = torch.Generator().manual_seed(seed)
    power: dict[str, Tensors] = {}
    points = settings.points if trajectory else 0
    bar = tqdm(total=1 + points, desc="smoothness", disable=not run.config.progress)
    loss_fns = start_loss_fns(run, settings.variance_batches)
    data, losses, first = measure_start(run.model, blocks, loss_fns, pairs_on=settings.start_batches, kinds=kinds,
                                        radius=settings.radius, generator=generator, power=power,
                                        n=len(run.train_set), batch_size=run.config.batch_size)
    bar.update()
    out = Measurement(data=data, losses=losses, steps=[0] * len(losses))
    if blocks["theta"]:
        out.eps_scan = eps_scan(run.model, run.groups.zo, first["theta"], loss_fns[0], eps_grid=floats(settings.eps_grid),
                                directions=settings.eps_directions, seed=seed)
    if settings.radius_scan:
        out.radius_scan = radius_scan(run.model, blocks, loss_fns[0], seed=seed)
    batches = iter(run.sampler)
    for step in range(points * settings.every + 1):
        indices = next(batches)
        if step and step % settings.every == 0:
            loss, _, pairs = measure_point(run.model, blocks, batch_loss(run, indices), item=data.items, kinds=kinds,
                                           radius=settings.radius, generator=generator, power=power)
            data.pairs.extend(pairs)
            out.losses.append(loss)
            out.steps.append(step)
            bar.update()
        if step < points * settings.every:
            train_step(run, step, indices)
    bar.close()
    out.seconds = time.perf_counter() - start
    return out


def to_dict(m: Measurement) -> dict[str, Any]:
    """A JSON-ready record of the raw measurement (pairs, Gram matrices, scans)."""
    return {
        "dims": m.data.dims, "n": m.data.n, "batch_size": m.data.batch_size, "loss_gap": m.data.loss_gap,
        "seconds": m.seconds,
        "losses": m.losses, "steps": m.steps, "eps_scan": m.eps_scan, "radius_scan": m.radius_scan,
        "gram": {b: g.tolist() for b, g in m.data.gram.items()},
        "pairs": [vars(p) for p in m.data.pairs],
    }


def from_dict(record: Mapping[str, Any]) -> Data:
    """The Data of a saved measurement (``to_dict``), to estimate or advise again without measuring."""
    pairs = [Pair(**p) for p in record["pairs"]]
    return Data(pairs=pairs, gram={b: torch.tensor(g, dtype=torch.float64) for b, g in record["gram"].items()},
                dims=dict(record["dims"]), n=int(record["n"]), batch_size=int(record["batch_size"]),
                loss_gap=float(record["loss_gap"]))
