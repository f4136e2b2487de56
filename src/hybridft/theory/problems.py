"""Synthetic finite-sum problems f = mean_i f_i over a ZO block theta and an FO block phi, with
known (or analytically bounded) block smoothness constants.

Each problem is an ``nn.Module`` whose ``forward(indices)`` is the mean loss of those examples,
so the real engine (``HybridOptimizer``, ``ReshufflingSampler``) runs on it unchanged.
All tensors are float64, so floating point does not set the floor of the runs.

- ``CoupledQuadratic``: f_i(x) = 1/2 x^T A x - b_i^T x, x = (theta, phi), A = Q diag(lambda) Q^T
  with a random rotation Q (so the blocks are coupled) and eigenvalues from 1 down to
  1/condition. L_BC = ||A_BC||_2 exactly, L1 = 0; along random directions the ratio is about
  ||A_BC||_F / sqrt(d_C).
- ``LowRankLogistic``: softmax regression with weights W = theta + B A, theta (classes x features)
  the base weights, (B, A) a rank-r adapter (B initialised to zero, as LoRA does), plus weight
  decay. L_tt <= lambda_max(X^T X / n) / 2 + wd (the softmax Hessian is <= I/2); the adapter's
  constant is bounded point-wise by L_W (||A||^2 + ||B||^2) + ||grad_W f|| + wd.
- ``ExpSmooth``: f_i = sum_j h_t(theta_j - c_ij) + sum_k h_p(phi_k - e_ik) with
  h(x) = L0 / L1^2 (exp(L1 |x|) - 1 - L1 |x|), whose second derivative is exactly
  L0 + L1 |h'(x)|: (L0, L1)-smooth with known constants per block, not L-smooth for any L.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hybridft.theory.pairs import block_grads

Indices = Sequence[int] | torch.Tensor


class Problem(nn.Module):
    """A finite sum over ``n`` examples; parameters named in ``zo_names`` form theta, the rest phi."""

    n: int
    zo_names: tuple[str, ...]

    def blocks(self) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
        """(theta, phi) as name -> parameter."""
        params = dict(self.named_parameters())
        return ({k: v for k, v in params.items() if k in self.zo_names},
                {k: v for k, v in params.items() if k not in self.zo_names})

    def grad_sq(self) -> dict[str, float]:
        """||grad_p f||^2 of the full-data loss for every parameter name p (exact)."""
        _, grads = block_grads(self, {name: [p] for name, p in self.named_parameters()}, lambda: self(torch.arange(self.n)))
        return {name: float((g[0] ** 2).sum()) for name, g in grads.items()}

    def grad_norm(self) -> float:
        """||grad f|| over both blocks."""
        return math.sqrt(sum(self.grad_sq().values()))

    def known(self) -> dict[str, Any]:
        """The analytic constants (see the module docstring)."""
        raise NotImplementedError

    def lower_bound(self) -> float:
        """A lower bound of f (its infimum where known): the losses here are >= 0 unless overridden."""
        return 0.0


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class CoupledQuadratic(Problem):
    def __init__(self, *, d_theta: int = 40, d_phi: int = 10, n: int = 64, condition: float = 100.0,
                 noise: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        g = _generator(seed)
        dim = d_theta + d_phi
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        eigenvalues = torch.logspace(0, -math.log10(condition), dim, dtype=torch.float64)
        shifts = noise * torch.randn(n, dim, generator=g, dtype=torch.float64)
        self.register_buffer("a", q @ torch.diag(eigenvalues) @ q.T)
        self.register_buffer("b", torch.randn(dim, generator=g, dtype=torch.float64) + shifts - shifts.mean(0))
        self.theta = nn.Parameter(torch.zeros(d_theta, dtype=torch.float64))
        self.phi = nn.Parameter(torch.zeros(d_phi, dtype=torch.float64))
        self.n, self.zo_names, self.d_theta = n, ("theta",), d_theta

    def forward(self, indices: Indices) -> torch.Tensor:
        x = torch.cat([self.theta, self.phi])
        return 0.5 * x @ self.a @ x - (self.b[torch.as_tensor(indices)] @ x).mean()

    def lower_bound(self) -> float:
        """inf f = -1/2 b^T A^-1 b with b the mean of the b_i (exact)."""
        b = self.b.mean(0)
        return float(-0.5 * b @ torch.linalg.solve(self.a, b))

    def known(self) -> dict[str, Any]:
        t = self.d_theta
        blocks = {"theta": slice(0, t), "phi": slice(t, None)}
        out: dict[str, Any] = {"l1": 0.0}
        for measured, rows in blocks.items():
            for moved, cols in blocks.items():
                block = self.a[rows, cols]
                out[f"{measured}_{moved}"] = float(torch.linalg.matrix_norm(block, ord=2))
                out[f"{measured}_{moved}_random"] = float(torch.linalg.matrix_norm(block) / math.sqrt(block.shape[1]))
        return out


class LowRankLogistic(Problem):
    def __init__(self, *, features: int = 10, classes: int = 3, rank: int = 2, n: int = 128,
                 weight_decay: float = 1e-2, seed: int = 0) -> None:
        super().__init__()
        g = _generator(seed)
        x = torch.randn(n, features, generator=g, dtype=torch.float64)
        teacher = torch.randn(classes, features, generator=g, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(torch.rand(n, classes, generator=g, dtype=torch.float64)))
        self.register_buffer("x", x)
        self.register_buffer("y", (x @ teacher.T + gumbel).argmax(1))
        self.theta = nn.Parameter(torch.zeros(classes, features, dtype=torch.float64))
        self.lora_b = nn.Parameter(torch.zeros(classes, rank, dtype=torch.float64))
        self.lora_a = nn.Parameter(0.5 * torch.randn(rank, features, generator=g, dtype=torch.float64))
        self.n, self.zo_names, self.weight_decay = n, ("theta",), weight_decay

    def forward(self, indices: Indices) -> torch.Tensor:
        i = torch.as_tensor(indices)
        logits = self.x[i] @ (self.theta + self.lora_b @ self.lora_a).T
        decay = sum((p**2).sum() for p in self.parameters())
        return nn.functional.cross_entropy(logits, self.y[i]) + 0.5 * self.weight_decay * decay

    def known(self) -> dict[str, Any]:
        l_w = float(torch.linalg.eigvalsh(self.x.T @ self.x / self.n).max()) / 2
        a, b = self.lora_a.detach(), self.lora_b.detach()
        adapter = l_w * float(torch.linalg.matrix_norm(a, ord=2) ** 2 + torch.linalg.matrix_norm(b, ord=2) ** 2)
        return {"theta_theta": l_w + self.weight_decay, "weights_smoothness": l_w,
                "phi_phi_bound_here": f"{adapter + self.weight_decay:.4g} + ||grad_W f||"}


def exp_smooth(x: torch.Tensor, l0: float, l1: float) -> torch.Tensor:
    """h(x) = L0 / L1^2 (exp(L1 |x|) - 1 - L1 |x|): h'' = L0 + L1 |h'| exactly; convex, min 0 at 0."""
    u = l1 * x.abs()
    return l0 / l1**2 * (torch.expm1(u) - u)


class ExpSmooth(Problem):
    def __init__(self, *, d_theta: int = 10, d_phi: int = 5, n: int = 32, theta_l0l1: tuple[float, float] = (1.0, 2.0),
                 phi_l0l1: tuple[float, float] = (0.5, 1.0), spread: float = 0.5, start: float = 2.0, seed: int = 0) -> None:
        super().__init__()
        g = _generator(seed)
        self.register_buffer("c", spread * torch.randn(n, d_theta, generator=g, dtype=torch.float64))
        self.register_buffer("e", spread * torch.randn(n, d_phi, generator=g, dtype=torch.float64))
        self.theta = nn.Parameter(torch.full((d_theta,), start, dtype=torch.float64))
        self.phi = nn.Parameter(torch.full((d_phi,), start, dtype=torch.float64))
        self.n, self.zo_names = n, ("theta",)
        self.theta_l0l1, self.phi_l0l1 = theta_l0l1, phi_l0l1

    def forward(self, indices: Indices) -> torch.Tensor:
        i = torch.as_tensor(indices)
        per_example = (exp_smooth(self.theta - self.c[i], *self.theta_l0l1).sum(1)
                       + exp_smooth(self.phi - self.e[i], *self.phi_l0l1).sum(1))
        return per_example.mean()

    def known(self) -> dict[str, Any]:
        """Per example: ||H_BB|| = max_j h''_j = L0 + L1 max_j |h'_j| <= L0 + L1 ||grad_B f_i||
        (equality in one dimension); no coupling."""
        return {"theta_l0": self.theta_l0l1[0], "theta_l1": self.theta_l0l1[1],
                "phi_l0": self.phi_l0l1[0], "phi_l1": self.phi_l0l1[1], "cross": 0.0}
