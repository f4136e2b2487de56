"""Step sizes (zo-lr, fo-lr) from hybrid smoothness constants; the derivation is in docs/theory.md.

Blocks: theta (the ZO group, dimension d) and phi (the FO group). One step on batch S:
theta <- theta - alpha p z, p the two-sided estimate of z . grad_theta f_S, z ~ N(0, I_d);
phi <- phi - beta grad_phi f_S. Lambda_BC bounds how fast block B's gradient changes when block
C moves (generalized smoothness: L0_BC + L1_BC G_B at the largest measured gradient norm G_B);
Lambda^z is the same measured along random directions, where the zero-mean part of a ZO step
moves. With v_B(b) = sigma_B^2 (n - b) / (b (n - 1)) the batch-gradient variance:

    kappa_t = Lambda_tt + (d + 1) Lambda^z_tt            (ZO: mean part + d-dimensional noise part)
    kappa_p = Lambda_pp
    chi     = Lambda_pt + sqrt(d + 1) Lambda^z_pt         (phi's gradient moved by the ZO step)
    rho     = 1 + chi / sqrt(kappa_t kappa_p)             (coupling, split evenly by Young's inequality)

For alpha <= 1 / (rho kappa_t) and beta <= 1 / (rho kappa_p), every step satisfies

    E f(x+) <= f(x) - alpha/2 ||grad_t f||^2 - beta/2 ||grad_p f||^2 + rho/2 (alpha^2 kappa_t v_t + beta^2 kappa_p v_p)

and over K steps, with Delta = f(x_0) - inf f, the average of alpha ||grad_t f||^2 + beta ||grad_p f||^2
is at most 2 Delta / K + rho (alpha^2 kappa_t v_t + beta^2 kappa_p v_p). Minimising each block's
share gives the advice for a run of K steps:

    alpha = min(1 / (rho kappa_t), sqrt(Delta / (K rho kappa_t v_t)))     (same for beta)

so min ||grad f||^2 = O(1 / sqrt(K)), i.e. O(1/eps^4) steps (and epochs) for ||grad f|| <= eps.
Reshuffling's epoch analysis further bounds the drift from the epoch's start point: with m = ceil(n/b)
steps per epoch it asks rho beta m Lambda_pp <= 1/4 and rho alpha (m Lambda_tt + sqrt(m (d+1)) Lambda^z_tt) <= 1/4
(the ZO drift is m mean steps plus a random walk of m steps along random directions);
(L0, L1) smoothness holds only within ||step|| <= 1 / L1. With Lambda^z = Lambda (no directional
measurement) kappa_t = (d + 2) Lambda_tt, the classical ZO-SGD constant.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

BLOCKS = ("theta", "phi")


@dataclass(frozen=True)
class Constants:
    """What the advice needs, for blocks theta (ZO, dimension ``zo_dim``) and phi (FO, ``fo_dim``).

    A block a method does not have (fo-lora: no theta; zo-full: no phi) has dimension 0 and its
    constants are ignored. Gradient norms and variances are of the full-data loss."""

    zo_dim: int
    fo_dim: int
    theta_theta: float  # Lambda_tt: any direction
    theta_theta_random: float  # Lambda^z_tt: random directions
    phi_theta: float  # Lambda_pt: phi's gradient when theta moves
    phi_theta_random: float  # Lambda^z_pt
    phi_phi: float  # Lambda_pp
    theta_phi: float  # Lambda_tp (reported; the theta-first split does not need it)
    l1: float  # the largest L1: (L0, L1) smoothness holds within a radius 1 / l1
    grad_sq: dict[str, float]  # ||grad_B f||^2
    variance: dict[str, float]  # sigma_B^2: per-example gradient variance
    loss_gap: float  # Delta = f(x_0) - inf f (an upper bound: the loss when inf f >= 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Advice:
    """``zo_lr``/``fo_lr``: the step sizes for a run of ``steps`` steps (what ``--lr auto`` uses);
    ``*_max``: the largest steps the per-step condition allows; ``*_epoch``: with the reshuffling
    epoch condition too; ``zo_lr_worst_case``: the classical direction-blind ZO bound.
    None where the block is absent."""

    zo_lr: float | None
    fo_lr: float | None
    zo_lr_max: float | None
    fo_lr_max: float | None
    zo_lr_epoch: float | None
    fo_lr_epoch: float | None
    zo_lr_worst_case: float | None
    kappa: dict[str, float]
    coupling: float  # rho
    steps: int
    steps_per_epoch: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def batch_variance(sigma_sq: float, *, batch_size: int, n: int) -> float:
    """E||grad f_S - grad f||^2 for a uniform batch of ``batch_size`` of ``n`` examples drawn
    without replacement, from the per-example variance sigma^2: sigma^2 (n - b) / (b (n - 1))."""
    if n <= 1:
        return 0.0
    return sigma_sq * (n - batch_size) / (batch_size * (n - 1))


def _step(kappa: float, *, gap: float, steps: int, variance: float, l1: float, step_norm: float) -> tuple[float, float]:
    """(step size for ``steps`` steps, largest allowed step) of one block, kappa already scaled by rho;
    both kept inside the (L0, L1) radius: lr * step_norm <= 1 / l1."""
    largest = 1.0 / kappa
    if l1 > 0 and step_norm > 0:
        largest = min(largest, 1.0 / (l1 * step_norm))
    horizon = math.sqrt(gap / (steps * kappa * variance)) if variance > 0 and gap > 0 and steps > 0 else math.inf
    return min(largest, horizon), largest


def advise(c: Constants, *, batch_size: int, n: int, steps: int, directions: int = 1) -> Advice:
    """The step sizes of the module docstring for ``steps`` steps (0: no horizon, the largest stable
    steps) of batch ``batch_size`` out of ``n``.
    With q = ``directions`` ZO directions averaged per step, the noise part shrinks: (d + 1) -> (d + 1) / q."""
    d, m = c.zo_dim, math.ceil(n / batch_size)
    spread = (d + 1) / directions
    kappa_t = c.theta_theta + spread * c.theta_theta_random if d else 0.0
    kappa_p = c.phi_phi if c.fo_dim else 0.0
    chi = c.phi_theta + math.sqrt(spread) * c.phi_theta_random
    rho = 1.0 + chi / math.sqrt(kappa_t * kappa_p) if kappa_t > 0 and kappa_p > 0 else 1.0
    v = {b: batch_variance(c.variance[b], batch_size=batch_size, n=n) for b in BLOCKS}
    gamma = {b: math.sqrt(max(c.grad_sq[b], 0.0) + v[b]) for b in BLOCKS}  # root mean squared batch gradient
    zo = fo = None
    if d:
        zo = _step(rho * kappa_t, gap=c.loss_gap, steps=steps, variance=v["theta"], l1=c.l1,
                   step_norm=math.sqrt(d + 2) * gamma["theta"])
    if c.fo_dim:
        fo = _step(rho * kappa_p, gap=c.loss_gap, steps=steps, variance=v["phi"], l1=c.l1, step_norm=gamma["phi"])
    return Advice(
        zo_lr=zo[0] if zo else None, fo_lr=fo[0] if fo else None,
        zo_lr_max=zo[1] if zo else None, fo_lr_max=fo[1] if fo else None,
        zo_lr_epoch=min(zo[0], 1.0 / (4 * rho * (m * c.theta_theta + math.sqrt(m * spread) * c.theta_theta_random)))
        if zo else None,
        fo_lr_epoch=min(fo[0], 1.0 / (4 * m * rho * kappa_p)) if fo else None,
        zo_lr_worst_case=1.0 / ((d + 2) * c.theta_theta) if d and c.theta_theta > 0 else None,
        kappa={"theta": kappa_t, "phi": kappa_p}, coupling=rho, steps=steps, steps_per_epoch=m,
    )
