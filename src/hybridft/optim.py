"""HybridOptimizer: a ZO rule for one parameter set composed with any torch optimizer for another.

One ``step(closure)`` on a mini-batch B, with a step seed s derived from (seed, step):

    for i in 1..q:                          # no grad: two forwards, z_i regenerated from s_i
        g_i = [L(theta + eps z_i) - L(theta - eps z_i)] / (2 eps)
    loss   = closure()                      # grad enabled: backward fills .grad of the FO set
    theta <- theta (1 - lr_zo wd_zo) - lr_zo / q * sum_i g_i z_i
    fo_optimizer.step()                      # phi <- phi - lr_fo * grad_phi L (SGD by default)

Both gradients are taken at the same point (theta, phi). The closure follows torch's LBFGS
contract: it recomputes the loss on the current batch and calls ``backward()`` only when
``torch.is_grad_enabled()`` (the ZO evaluations run under ``no_grad``).

Divergence guard: if any ZO loss or projected gradient, the FO loss or an FO gradient is not
finite, the step applies nothing (theta is already restored exactly after the perturbed
forwards, phi is untouched), ``last_update`` is None, ``skipped`` is True and
``skipped_steps`` counts it; the step counter still advances, so the next step draws a new z.

Cost per step: one forward+backward if there is an FO set, plus 2q forwards (q+1 one-sided)
if there is a ZO set. Memory: the ZO set holds
no gradient and no optimizer state; a perturbed forward holds one module's weights extra.

``param_groups[0]`` is the ZO group; the FO optimizer's groups follow, shared by reference,
so any ``torch.optim.lr_scheduler`` schedules both (``LambdaLR`` with one lambda per group
gives each its own schedule).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from hybridft.perturb import perturbed
from hybridft.zo import DISTRIBUTIONS, Distribution, ZOUpdate, parameter_key, projected_grad, step_seed, update_

Closure = Callable[[], torch.Tensor]


class HybridOptimizer(torch.optim.Optimizer):
    """ZO on ``zo_params`` (canonical name -> parameter) + ``fo_optimizer`` on its own parameters.

    Either part may be empty: no ``zo_params`` gives plain first-order training, no
    ``fo_optimizer`` gives MeZO; so every method runs through the same step.
    """

    def __init__(
        self,
        module: nn.Module,
        zo_params: Mapping[str, nn.Parameter],
        fo_optimizer: torch.optim.Optimizer | None = None,
        *,
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        num_directions: int = 1,
        one_sided: bool = False,
        distribution: Distribution = "gaussian",
        seed: int = 0,
    ) -> None:
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if num_directions < 1:
            raise ValueError(f"num_directions must be >= 1, got {num_directions}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown ZO distribution {distribution!r}; choose from {DISTRIBUTIONS}")
        if any(p.requires_grad for p in zo_params.values()):
            raise ValueError("ZO parameters must have requires_grad=False: they never get a .grad")
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, num_directions=num_directions,
                        one_sided=one_sided, distribution=distribution)
        super().__init__([{"params": list(zo_params.values()), "name": "zo"}], defaults)
        self.module = module
        self.fo_optimizer = fo_optimizer
        self.seed = seed
        self.num_steps = 0
        self.keys = {p: parameter_key(name) for name, p in zo_params.items()}
        self.last_update: ZOUpdate | None = None
        self.skipped = False  # whether the last step was skipped by the divergence guard
        self.skipped_steps = 0
        if fo_optimizer is not None:
            for group in fo_optimizer.param_groups:
                group.setdefault("name", "fo")
                self.param_groups.append(group)

    @property
    def zo_group(self) -> dict[str, Any]:
        return self.param_groups[0]

    def _loss(self, closure: Closure, seed: int | None = None, scale: float = 0.0) -> float:
        group = self.zo_group
        with torch.no_grad():
            if seed is None:
                return float(closure())
            with perturbed(self.module, self.keys, seed=seed, scale=scale, distribution=group["distribution"]):
                return float(closure())

    def _zo_estimate(self, closure: Closure) -> tuple[ZOUpdate, float]:
        group = self.zo_group
        eps, q = group["eps"], group["num_directions"]
        # One-sided evaluates L(theta) under no_grad too, so that all ZO losses see the same
        # mode (the FO loss may include dropout).
        loss_at_theta = self._loss(closure) if group["one_sided"] else None
        seeds, grads, losses = [], [], []
        for i in range(q):
            s = step_seed(self.seed, self.num_steps, i)
            loss_plus = self._loss(closure, s, eps)
            loss_minus = loss_at_theta if group["one_sided"] else self._loss(closure, s, -eps)
            seeds.append(s)
            grads.append(projected_grad(loss_plus, loss_minus, eps, one_sided=group["one_sided"]))
            losses += [loss_plus, loss_minus]
        update = ZOUpdate(step=self.num_steps, seeds=tuple(seeds), projected_grads=tuple(grads),
                          lr=group["lr"], weight_decay=group["weight_decay"], distribution=group["distribution"])
        return update, sum(losses) / len(losses)

    def step(self, closure: Closure | None = None) -> torch.Tensor:  # type: ignore[override]
        """One hybrid step on the closure's batch; returns the loss at (theta, phi)
        (for a ZO-only step, the mean of the perturbed losses)."""
        if closure is None:
            raise ValueError("HybridOptimizer.step needs a closure that recomputes the loss")
        loss: torch.Tensor | None = None
        update: ZOUpdate | None = None
        if self.keys:
            update, mean_loss = self._zo_estimate(closure)
            loss = torch.tensor(mean_loss)
        if self.fo_optimizer is not None:
            # After the ZO evaluations, so that no closure call can zero these gradients.
            with torch.enable_grad():
                loss = closure()
        assert loss is not None
        self.skipped = not self._finite(update, loss)
        if self.skipped:
            update = None
            self.skipped_steps += 1
            self.zero_grad()
        if update is not None:
            for p, key in self.keys.items():
                update_(p, key=key, update=update)
        if self.fo_optimizer is not None and not self.skipped:
            self.fo_optimizer.step()
        self.last_update = update
        self.num_steps += 1
        return loss

    def _finite(self, update: ZOUpdate | None, loss: torch.Tensor) -> bool:
        """Whether the step may touch the weights: the projected gradients (hence the ZO losses),
        the loss and every FO gradient are finite. Cost: one pass over the FO gradients, one sync."""
        if update is not None and not all(math.isfinite(g) for g in update.projected_grads):
            return False
        if not bool(torch.isfinite(loss).all()):
            return False
        if self.fo_optimizer is None:
            return True
        grads = [p.grad for group in self.fo_optimizer.param_groups for p in group["params"] if p.grad is not None]
        return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.fo_optimizer is not None:
            self.fo_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: step count, seed, ZO hyperparameters
        (including the scheduled lr), and the FO optimizer's own state."""
        zo = {k: v for k, v in self.zo_group.items() if k != "params"}
        return {
            "num_steps": self.num_steps,
            "seed": self.seed,
            "skipped_steps": self.skipped_steps,
            "zo_group": zo,
            "fo": self.fo_optimizer.state_dict() if self.fo_optimizer is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if (state_dict["fo"] is None) != (self.fo_optimizer is None):
            raise ValueError("state_dict and optimizer disagree on whether there is an FO part")
        self.num_steps = int(state_dict["num_steps"])
        self.seed = int(state_dict["seed"])
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.zo_group.update(state_dict["zo_group"])
        if self.fo_optimizer is not None:
            self.fo_optimizer.load_state_dict(state_dict["fo"])
            # load_state_dict replaces the FO groups' dicts; share the new ones again.
            self.param_groups[1:] = self.fo_optimizer.param_groups
