"""HybridOptimizer: a ZO rule for one parameter set composed with any torch optimizer for another.

One ``step(closure)`` on a mini-batch B, with a step seed s derived from (seed, step):

    for i in 1..q:                          # no grad: two forwards, z_i regenerated from s_i
        g_i = [L(theta + eps z_i) - L(theta - eps z_i)] / (2 eps)
    loss   = closure()                      # grad enabled: backward fills .grad of the FO set
    theta <- theta (1 - lr_zo wd_zo) - lr_zo / q * sum_i g_i z_i
    fo_optimizer.step()                      # phi <- phi - lr_fo * grad_phi L (SGD by default)

Both gradients are taken at the same point (theta, phi). The closure follows torch's LBFGS
contract: it recomputes the loss on the current batch and calls ``backward()`` only when
``torch.is_grad_enabled()`` (the ZO evaluations run under ``no_grad``). Every evaluation of a
step starts from the same global RNG state (common random numbers, so dropout masks agree);
after the step the RNG is where the FO pass (or the first evaluation) left it.

Cost per step: one forward+backward if there is an FO set, plus 2q forwards (q+1 one-sided)
if there is a ZO set, and 3 passes of z generation over the ZO set (+eps, -eps, update).
Memory: the ZO set holds no gradient and no optimizer state; a perturbed forward holds one
module's weights extra (batch rows only for an embedding).

``fused=True`` (needs an FO part) makes the FO pass one of the ZO evaluations:
two-sided, the FO forward+backward runs at theta + eps z_1 and one no-grad forward at
theta - eps z_1 completes g_1 (1 fwd+bwd + 1 fwd); one-sided, g_i = [L(theta + eps z_i) -
L_FO] / eps reuses the FO loss at theta. The adapter gradient is then taken at theta + eps z_1
(two-sided): an O(eps) bias, see docs/step_cost.md. The closure must compute the same
function with and without grad (same train/eval mode; checked). ``z_cache=True`` generates z
once per step (memory: one copy of the ZO weights); ``embedding_rows=True`` restricts the
input embedding's z to the batch's rows (``directions.py``); ``z_dtype="param"`` draws z in the
weights' dtype; ``threads`` generates z for whole-model passes in parallel (same z).
``rounding`` stores ZO updates into bf16/fp16 weights by stochastic rounding (default: unbiased,
replayable) or to nearest (MeZO's, which loses updates under half a weight's spacing); float32
weights take them exactly either way.

``param_groups[0]`` is the ZO group; the FO optimizer's groups follow, shared by reference,
so any ``torch.optim.lr_scheduler`` schedules both (``LambdaLR`` with one lambda per group
gives each its own schedule).

Divergence guard: if any ZO loss or projected gradient, the FO loss or an FO gradient is not
finite, the step applies nothing (theta is already restored exactly after the perturbed
forwards, phi is untouched), ``last_update`` is None, ``skipped`` is True and
``skipped_steps`` counts it; the step counter still advances, so the next step draws a new z.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from hybridft.engine.directions import Directions, input_embedding_key, parallel_map
from hybridft.engine.perturb import perturbed
from hybridft.engine.zo import (DISTRIBUTIONS, HALF_PRECISION, ROUNDINGS, Z_DTYPES, Distribution, Rounding, ZDtype, ZOUpdate,
                         parameter_key, projected_grad, step_seed, update_)

Closure = Callable[[], torch.Tensor]
RngState = tuple[torch.Tensor, list[torch.Tensor]]


def warn_low_precision(zo_params: Iterable[torch.Tensor], lr: float, rounding: Rounding) -> None:
    """Warn when ZO weights are bf16/fp16 and updates round to nearest, which drops the update
    -lr g z_j of a weight w_j wherever it is under half the spacing of w_j's dtype at w_j (about
    2^-9 |w_j| in bfloat16, 2^-12 |w_j| in float16): at MeZO's learning rates that is most weights
    (README, "Low precision", has measured fractions). Stochastic rounding keeps them on average."""
    params = list(zo_params)
    low = [p for p in params if p.dtype in HALF_PRECISION]
    if not low or lr == 0 or rounding != "nearest":
        return
    dtypes = "/".join(sorted({str(p.dtype).removeprefix("torch.") for p in low}))
    counted = sum(p.numel() for p in low), sum(p.numel() for p in params)
    warnings.warn(f"{counted[0]:,} of the {counted[1]:,} ZO weights are {dtypes}, rounded to nearest: an update "
                  f"changes a weight only where lr*|g*z| exceeds half its spacing (~2^-9 of its size in bfloat16, "
                  f"~2^-12 in float16), so at zo-lr {lr:g} most ZO updates may be lost; use stochastic rounding "
                  f"(--zo-rounding stochastic) or float32 weights", stacklevel=3)


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
        fused: bool = False,
        z_cache: bool = False,
        z_dtype: ZDtype = "float32",
        embedding_rows: bool = False,
        threads: int = 1,
        rounding: Rounding = "stochastic",
    ) -> None:
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if num_directions < 1:
            raise ValueError(f"num_directions must be >= 1, got {num_directions}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown ZO distribution {distribution!r}; choose from {DISTRIBUTIONS}")
        if z_dtype not in Z_DTYPES:
            raise ValueError(f"unknown z dtype {z_dtype!r}; choose from {Z_DTYPES}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"unknown rounding {rounding!r}; choose from {ROUNDINGS}")
        if fused and fo_optimizer is None:
            raise ValueError("the fused estimator needs an FO part (its forward+backward is a ZO evaluation)")
        if any(p.requires_grad for p in zo_params.values()):
            raise ValueError("ZO parameters must have requires_grad=False: they never get a .grad")
        warn_low_precision(zo_params.values(), lr, rounding)
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, num_directions=num_directions,
                        one_sided=one_sided, distribution=distribution, fused=fused, z_cache=z_cache,
                        z_dtype=z_dtype, embedding_rows=embedding_rows, rounding=rounding)
        super().__init__([{"params": list(zo_params.values()), "name": "zo"}], defaults)
        self.module = module
        self.fo_optimizer = fo_optimizer
        self.seed = seed
        self.threads = threads
        self.num_steps = 0
        self.keys = {p: parameter_key(name) for name, p in zo_params.items()}
        self.row_keys = frozenset([input_embedding_key(module, self.keys)]) if embedding_rows else frozenset()
        self.cuda_devices = sorted({p.device.index or 0 for p in module.parameters() if p.is_cuda})
        self.last_update: ZOUpdate | None = None
        self.last_cache_bytes = 0
        self.skipped = False  # whether the last step was skipped by the divergence guard
        self.skipped_steps = 0
        if fo_optimizer is not None:
            for group in fo_optimizer.param_groups:
                group.setdefault("name", "fo")
                self.param_groups.append(group)

    @property
    def zo_group(self) -> dict[str, Any]:
        return self.param_groups[0]

    def _rng(self) -> RngState:
        return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in self.cuda_devices]

    def _set_rng(self, state: RngState) -> None:
        torch.set_rng_state(state[0])
        for device, cuda_state in zip(self.cuda_devices, state[1]):
            torch.cuda.set_rng_state(cuda_state, device)

    def _evaluate(self, closure: Closure, directions: Directions | None = None, scale: float = 0.0,
                  *, grad: bool = False) -> torch.Tensor:
        """The closure at theta + scale z (theta without directions), from the step's RNG state;
        with ``grad``, its backward too (the FO pass)."""
        self._set_rng(self._rng_start)
        context = nullcontext() if directions is None else perturbed(
            self.module, self.keys, scale=scale, directions=directions, for_backward=grad)
        with torch.set_grad_enabled(grad), context:
            loss = closure()
        self._modes.add(self.module.training)
        if grad or self._rng_end is None:
            self._rng_end = self._rng()
        return loss.detach()

    def _directions(self) -> list[Directions]:
        group, rows = self.zo_group, {}
        directions = [Directions(step_seed(self.seed, self.num_steps, i), distribution=group["distribution"],
                                 dtype=group["z_dtype"], row_keys=self.row_keys, rows=rows, cache=group["z_cache"])
                      for i in range(group["num_directions"])]
        if group["z_cache"]:
            for d in directions:
                d.fill_cache(self.keys, self.threads)
        return directions

    def _zo_estimate(self, closure: Closure, directions: list[Directions]) -> tuple[list[float], torch.Tensor]:
        """The projected gradients g_i, and the step's loss.

        Evaluation points: L(theta) (one-sided, under no_grad too, so that all ZO losses see the
        same mode), then L(theta +- eps z_i). Fused, one of them is the FO pass (with grad):
        L(theta + eps z_1) two-sided, L(theta) one-sided. It runs last, because every closure
        call zeroes the gradients before its forward."""
        group = self.zo_group
        eps, one_sided, fused = group["eps"], group["one_sided"], group["fused"]
        points: dict[object, tuple[Directions | None, float]] = {"theta": (None, 0.0)} if one_sided else {}
        for i, d in enumerate(directions):
            points[i, 1] = (d, eps)
            if not one_sided:
                points[i, -1] = (d, -eps)
        fo_point = ("theta" if one_sided else (0, 1)) if fused else None
        losses = {name: float(self._evaluate(closure, *at)) for name, at in points.items() if name != fo_point}
        if fo_point is not None:
            losses[fo_point] = float(self._evaluate(closure, *points[fo_point], grad=True))
        pairs = [(losses[i, 1], losses["theta" if one_sided else (i, -1)]) for i in range(len(directions))]
        grads = [projected_grad(plus, minus, eps, one_sided=one_sided) for plus, minus in pairs]
        if fused:  # the loss at theta: the FO pass's (one-sided), or up to O(eps^2) the mean of L(theta +- eps z_1)
            return grads, torch.tensor(losses["theta"] if one_sided else sum(pairs[0]) / 2)
        return grads, torch.tensor(sum(sum(pair) for pair in pairs) / (2 * len(pairs)))

    def _update_(self, grads: list[float], directions: list[Directions]) -> ZOUpdate:
        group = self.zo_group
        update = ZOUpdate(step=self.num_steps, seeds=tuple(d.seed for d in directions), projected_grads=tuple(grads),
                          lr=group["lr"], weight_decay=group["weight_decay"], distribution=group["distribution"],
                          z_dtype=group["z_dtype"], rows=directions[0].logged_rows(), rounding=group["rounding"])

        def one(item: tuple[nn.Parameter, int]) -> None:
            p, key = item
            cached = group["z_cache"]
            update_(p, key=key, update=update, z_of=(lambda i: directions[i].z(p, key)) if cached else None)

        parallel_map(one, self.keys.items(), self.threads)
        return update

    def step(self, closure: Closure | None = None, *,  # type: ignore[override]
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """One hybrid step on the closure's batch; returns the loss at (theta, phi)
        (for a ZO-only step, the mean of the perturbed losses).

        ``reduce`` (data parallelism, see ``distributed.py``) is called once, after every
        evaluation and before any update, with this process's step scalars as a float64 tensor
        [g_1, .., g_q, loss] (no g without a ZO set) and returns their values over all ranks;
        it may average the FO gradients in the same collective."""
        if closure is None:
            raise ValueError("HybridOptimizer.step needs a closure that recomputes the loss")
        self._rng_start, self._rng_end, self._modes = self._rng(), None, set()
        loss: torch.Tensor | None = None
        grads, directions = None, []
        if self.keys:
            directions = self._directions()
            grads, loss = self._zo_estimate(closure, directions)
            if len(self._modes) > 1:
                raise ValueError("the closure ran the ZO evaluations of one step in different train/eval modes; "
                                 "the fused estimator needs one mode for its FO pass and its no-grad forwards")
        if self.fo_optimizer is not None and not (self.keys and self.zo_group["fused"]):
            # After the ZO evaluations, so that no closure call can zero these gradients.
            loss = self._evaluate(closure, grad=True)
        assert loss is not None
        if reduce is not None:
            grads, loss = self._reduced(grads, loss, reduce)
        self.skipped = not self._finite(grads, loss)
        if self.skipped:
            self.skipped_steps += 1
            self.zero_grad()
        self.last_update = self._update_(grads, directions) if grads is not None and not self.skipped else None
        self.last_cache_bytes = sum(d.cache_bytes() for d in directions)
        if self.fo_optimizer is not None and not self.skipped:
            self.fo_optimizer.step()
        if self._rng_end is not None:
            self._set_rng(self._rng_end)
        self.num_steps += 1
        return loss

    @staticmethod
    def _reduced(grads: list[float] | None, loss: torch.Tensor,
                 reduce: Callable[[torch.Tensor], torch.Tensor]) -> tuple[list[float] | None, torch.Tensor]:
        *reduced, mean_loss = reduce(torch.tensor([*(grads or ()), float(loss)], dtype=torch.float64)).tolist()
        return (reduced if grads is not None else None), torch.tensor(mean_loss, dtype=loss.dtype)

    def _finite(self, grads: list[float] | None, loss: torch.Tensor) -> bool:
        """Whether the step may touch the weights: the projected gradients (hence the ZO losses),
        the loss and every FO gradient are finite. Cost: one pass over the FO gradients, one sync."""
        if grads is not None and not all(math.isfinite(g) for g in grads):
            return False
        if not bool(torch.isfinite(loss).all()):
            return False
        if self.fo_optimizer is None:
            return True
        fo_grads = [p.grad for group in self.fo_optimizer.param_groups for p in group["params"] if p.grad is not None]
        return not fo_grads or bool(torch.stack([torch.isfinite(g).all() for g in fo_grads]).all())

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
        if bool(state_dict["zo_group"].get("embedding_rows", False)) != bool(self.row_keys):
            raise ValueError("state_dict and optimizer disagree on embedding_rows (set it when building the optimizer)")
        self.num_steps = int(state_dict["num_steps"])
        self.seed = int(state_dict["seed"])
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.zo_group.update(state_dict["zo_group"])
        if self.fo_optimizer is not None:
            self.fo_optimizer.load_state_dict(state_dict["fo"])
            # load_state_dict replaces the FO groups' dicts; share the new ones again.
            self.param_groups[1:] = self.fo_optimizer.param_groups
