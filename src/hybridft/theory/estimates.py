"""From measured pairs and start-point gradients to smoothness constants, advice, and their
bootstrap confidence intervals.

For every (measured block B, moved block C, direction kind K, or all kinds pooled) the pairs give
the plain Lipschitz estimate max ratio and the (L0, L1) envelope (``envelope.fit_envelope``);
the constant the advice uses is the envelope at the largest measured gradient norm G_B.
The gradient variance comes from k mini-batches at the starting point through their Gram
matrix Gram_ij = <g_i, g_j> (so a resample needs no gradient vectors):

    v_b = k/(k-1) (mean_i Gram_ii - mean_ij Gram_ij),   ||grad f||^2 ~ mean_ij Gram_ij - v_b / k,
    sigma^2 = v_b b (n-1) / (n-b).

Bootstrap: the measured items (point, batch) and the start batches are resampled with
replacement, everything is recomputed, and the percentile interval is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hybridft.theory.advice import BLOCKS, Advice, Constants, advise
from hybridft.theory.envelope import Envelope, Interval, bootstrap, fit_envelope
from hybridft.theory.pairs import Pair

ALL = "all"


@dataclass(frozen=True)
class Data:
    """Everything measured: pairs, the start batches' Gram matrices, sizes."""

    pairs: list[Pair]
    gram: dict[str, torch.Tensor]  # block -> (k, k) Gram matrix of the start batches' gradients
    dims: dict[str, int]  # block -> number of weights
    n: int  # training examples
    batch_size: int
    loss_gap: float  # f(x_0) - inf f, or an upper bound of it (the start loss when the loss is >= 0)

    @property
    def items(self) -> int:
        return 1 + max(p.item for p in self.pairs) if self.pairs else 0


@dataclass(frozen=True)
class Fit:
    measured: str
    moved: str
    kind: str
    lipschitz: Interval
    l0: Interval
    l1: Interval
    at_max_grad: Interval  # l0 + l1 * G_measured: the constant used by the advice
    pairs: int

    def to_dict(self) -> dict[str, Any]:
        return {"measured": self.measured, "moved": self.moved, "kind": self.kind, "pairs": self.pairs,
                **{k: getattr(self, k).to_dict() for k in ("lipschitz", "l0", "l1", "at_max_grad")}}


@dataclass(frozen=True)
class Estimates:
    fits: list[Fit]
    constants: Constants
    advice: Advice
    intervals: dict[str, Interval] = field(default_factory=dict)  # advice and variance, by name


def subsets(data: Data) -> list[tuple[str, str, str]]:
    """(measured, moved, kind) for every measured combination, kinds pooled as ``all`` too."""
    kinds = sorted({p.kind for p in data.pairs})
    moved = [b for b in BLOCKS if data.dims.get(b)]
    return [(b, c, k) for b in moved for c in moved for k in [*kinds, ALL]]


def _points(pairs: Sequence[Pair], items: torch.Tensor, measured: str, moved: str, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    by_item: dict[int, list[tuple[float, float]]] = {}
    for p in pairs:
        if p.moved == moved and (kind == ALL or p.kind == kind) and measured in p.ratio:
            by_item.setdefault(p.item, []).append((p.grad_norm[measured], p.ratio[measured]))
    rows = [row for i in items.tolist() for row in by_item.get(i, [])]
    if not rows:
        return torch.zeros(0), torch.zeros(0)
    values = torch.tensor(rows, dtype=torch.float64)
    return values[:, 0], values[:, 1]


def _variance(gram: torch.Tensor, batches: torch.Tensor, *, n: int, b: int) -> tuple[float, float]:
    """(||grad f||^2, per-example variance sigma^2) from the start batches ``batches``."""
    g = gram[batches][:, batches].double()
    k = g.shape[0]
    mean_sq = float(torch.diagonal(g).mean())
    centre_sq = float(g.mean())
    v = k / (k - 1) * max(mean_sq - centre_sq, 0.0) if k > 1 else 0.0
    sigma_sq = v * b * (n - 1) / (n - b) if n > b else 0.0
    return centre_sq - v / k, sigma_sq


Envelopes = dict[tuple[str, str, str], Envelope]


def envelopes(data: Data, items: torch.Tensor) -> tuple[Envelopes, dict[tuple[str, str, str], float]]:
    """The (L0, L1) envelope and the plain Lipschitz estimate (max ratio) of every subset."""
    fitted, largest = {}, {}
    for measured, moved, kind in subsets(data):
        g, r = _points(data.pairs, items, measured, moved, kind)
        if g.numel():
            fitted[measured, moved, kind] = fit_envelope(g, r)
            largest[measured, moved, kind] = float(r.max())
    return fitted, largest


def constants_at(fitted: Envelopes, grad_norm: dict[str, float], *, dims: dict[str, int], grad_sq: dict[str, float],
                 variance: dict[str, float], loss_gap: float) -> Constants:
    """The Constants with every envelope evaluated at the block gradient norms ``grad_norm``."""

    def lam(measured: str, moved: str, kind: str = ALL) -> float:
        env = fitted.get((measured, moved, kind))
        return env(grad_norm[measured]) if env is not None else 0.0

    return Constants(
        zo_dim=dims.get("theta", 0), fo_dim=dims.get("phi", 0),
        theta_theta=lam("theta", "theta"), theta_theta_random=lam("theta", "theta", "random"),
        phi_theta=lam("phi", "theta"), phi_theta_random=lam("phi", "theta", "random"),
        phi_phi=lam("phi", "phi"), theta_phi=lam("theta", "phi"),
        l1=max((env.l1 for key, env in fitted.items() if key[2] == ALL), default=0.0),
        grad_sq=grad_sq, variance=variance, loss_gap=loss_gap,
    )


def variances(data: Data, batches: torch.Tensor) -> tuple[dict[str, float], dict[str, float]]:
    """(||grad_B f||^2, sigma_B^2) for each block, from the start batches ``batches``."""
    out = {b: _variance(data.gram[b], batches, n=data.n, b=data.batch_size) if b in data.gram else (0.0, 0.0)
           for b in BLOCKS}
    return {b: v[0] for b, v in out.items()}, {b: v[1] for b, v in out.items()}


def statistics(data: Data, items: torch.Tensor, batches: torch.Tensor) -> tuple[list[tuple[float, float, float, float]], Constants]:
    """For each subset: (max ratio, l0, l1, value at the largest measured gradient norm); and the
    Constants there (the conservative choice for a whole run)."""
    drawn = set(items.tolist())
    grad_max = {b: max((p.grad_norm[b] for p in data.pairs if p.item in drawn), default=0.0) for b in BLOCKS}
    fitted, largest = envelopes(data, items)
    rows = [(largest[s], fitted[s].l0, fitted[s].l1, fitted[s](grad_max[s[0]])) if s in fitted else (float("nan"),) * 4
            for s in subsets(data)]
    grad_sq, variance = variances(data, batches)
    return rows, constants_at(fitted, grad_max, dims=data.dims, grad_sq=grad_sq, variance=variance,
                              loss_gap=data.loss_gap)


ADVICE_FIELDS = ("zo_lr", "fo_lr", "zo_lr_max", "fo_lr_max", "zo_lr_epoch", "fo_lr_epoch", "zo_lr_worst_case")


def _numbers(data: Data, items: torch.Tensor, batches: torch.Tensor, steps: int) -> list[float]:
    rows, constants = statistics(data, items, batches)
    advice = advise(constants, batch_size=data.batch_size, n=data.n, steps=steps)
    flat = [x for row in rows for x in row]
    flat += [getattr(advice, f) or float("nan") for f in ADVICE_FIELDS]
    flat += [constants.grad_sq[b] for b in BLOCKS] + [constants.variance[b] for b in BLOCKS]
    return flat


def estimate(data: Data, *, steps: int, resamples: int, generator: torch.Generator, level: float = 0.95) -> Estimates:
    """Fits, constants and the advice for a run of ``steps`` steps, with bootstrap intervals."""
    if not data.pairs:
        raise ValueError("no pairs were measured")
    k = next(iter(data.gram.values())).shape[0] if data.gram else 1
    cis = bootstrap(lambda items, batches: _numbers(data, items, batches, steps), [data.items, k],
                    resamples=resamples, generator=generator, level=level)
    items = torch.arange(data.items)
    fits = [Fit(measured=b, moved=c, kind=kind, lipschitz=cis[4 * i], l0=cis[4 * i + 1], l1=cis[4 * i + 2],
                at_max_grad=cis[4 * i + 3], pairs=len(_points(data.pairs, items, b, c, kind)[0]))
            for i, (b, c, kind) in enumerate(subsets(data))]
    names = [*ADVICE_FIELDS, *(f"grad_sq_{b}" for b in BLOCKS), *(f"variance_{b}" for b in BLOCKS)]
    _, constants = statistics(data, items, torch.arange(k))
    return Estimates(fits=fits, constants=constants, advice=advise(constants, batch_size=data.batch_size, n=data.n, steps=steps),
                     intervals=dict(zip(names, cis[4 * len(fits):])))
