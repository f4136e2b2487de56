"""Fit the (L0, L1) smoothness envelope to measured ratios, with bootstrap confidence intervals.

A pair of nearby points (x, y) gives one ratio r = ||grad_B f(y) - grad_B f(x)|| / ||y_C - x_C||
at the gradient norm g = ||grad_B f(x)||. Generalized smoothness says r <= L0 + L1 g for every
pair; the estimate is the tightest such line over the measured pairs:

    minimise  L0 + L1 * mean(g)   subject to  L0 + L1 g_i >= r_i  for all i,   L0, L1 >= 0.

A linear programme in two unknowns: its optimum is a line through two vertices of the upper
convex hull of the points, the horizontal line at max r (L1 = 0), or a line through the origin
(L0 = 0). Pure functions over tensors; nothing is stored.

An envelope of samples is a lower bound on the true supremum (an unsampled pair may lie above
it); the bootstrap interval says how much the estimate depends on which pairs were drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Envelope:
    """ratio <= l0 + l1 * grad_norm."""

    l0: float
    l1: float

    def __call__(self, grad_norm: float) -> float:
        return self.l0 + self.l1 * grad_norm


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap percentile interval."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def _upper_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Vertices of the upper convex hull, left to right (Andrew's monotone chain)."""
    highest: dict[float, float] = {}
    for x, y in points:  # of points with equal x only the highest can be on the upper hull
        highest[x] = max(y, highest.get(x, y))
    hull: list[tuple[float, float]] = []
    for p in sorted(highest.items()):
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:  # not a right turn
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def fit_envelope(grad_norms: torch.Tensor, ratios: torch.Tensor) -> Envelope:
    """The tightest line l0 + l1 g (l0, l1 >= 0) above every point (g_i, r_i); see the module
    docstring. Shapes: (n,) and (n,), n >= 1. Cost: O(n log n + h^2 n) for h hull vertices."""
    g = grad_norms.double()
    r = ratios.double()
    if g.numel() == 0:
        raise ValueError("no measured pairs to fit")
    mean_g = float(g.mean())
    candidates = [(float(r.max()), 0.0)]
    positive = g > 0
    if positive.any():
        candidates.append((0.0, float((r[positive] / g[positive]).max())))
    hull = _upper_hull(list(zip(g.tolist(), r.tolist())))
    for i in range(len(hull)):
        for j in range(i + 1, len(hull)):
            (g1, r1), (g2, r2) = hull[i], hull[j]
            slope = (r2 - r1) / (g2 - g1)
            candidates.append((r1 - slope * g1, slope))
    tolerance = 1e-9 * float(r.abs().max()) + 1e-300
    best: tuple[float, float] | None = None
    for l0, l1 in candidates:
        feasible = l0 >= 0 and l1 >= 0 and bool((l0 + l1 * g >= r - tolerance).all())
        if feasible and (best is None or l0 + l1 * mean_g < best[0] + best[1] * mean_g):
            best = (l0, l1)
    assert best is not None  # the horizontal line at max r is always feasible
    return Envelope(l0=max(best[0], 0.0), l1=max(best[1], 0.0))


def bootstrap(
    statistic: Callable[..., Sequence[float]],
    sizes: Sequence[int],
    *,
    resamples: int,
    generator: torch.Generator,
    level: float = 0.95,
) -> list[Interval]:
    """Percentile intervals of ``statistic(*indices)`` (a sequence of numbers; NaN where undefined)
    when every index tensor resamples ``range(size)`` with replacement, ``resamples`` times. The
    point value is the statistic on the original indices."""
    point = list(statistic(*(torch.arange(size) for size in sizes)))
    if resamples < 1:
        return [Interval(v, v, v) for v in point]
    draws = torch.tensor(
        [list(statistic(*(torch.randint(size, (size,), generator=generator) for size in sizes))) for _ in range(resamples)],
        dtype=torch.float64,
    ).reshape(resamples, len(point))
    tail = (1.0 - level) / 2.0
    low = torch.nanquantile(draws, tail, dim=0).tolist()
    high = torch.nanquantile(draws, 1.0 - tail, dim=0).tolist()
    return [Interval(v, lo, hi) for v, lo, hi in zip(point, low, high)]
