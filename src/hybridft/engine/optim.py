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

The ZO step is a composition of four small objects, each checked when it is made:
- ``estimator`` (``estimators.py``): where the closure is evaluated and how the projected
  gradients come out of it: ``TwoSided`` (default), ``OneSided``, and ``FusedTwoSided`` /
  ``FusedOneSided``, whose FO pass is one of the ZO evaluations (one forward less; needs an FO
  part; the closure must then compute the same function with and without grad, checked);
- ``directions`` (``directions.DirectionSampler``): z's distribution (Gaussian, Rademacher),
  its dtype, the z-cache, batch rows of the input embedding, threads;
- ``rule`` (``rules.py``): the update, ``ZOSGD(weight_decay=...)``;
- ``storage`` (``storage.py``): how updates are stored into bf16/fp16 weights:
  ``StochasticRounding()`` (default; unbiased, replayable) or ``NearestRounding()`` (MeZO's).

``param_groups[0]`` is the ZO group; the FO optimizer's groups follow, shared by reference,
so any ``torch.optim.lr_scheduler`` schedules both (``LambdaLR`` with one lambda per group
gives each its own schedule).

Divergence guard: if any ZO loss or projected gradient, the FO loss or an FO gradient is not
finite, the step applies nothing (theta is already restored exactly after the perturbed
forwards, phi is untouched), ``last_update`` is None, ``skipped`` is True and
``skipped_steps`` counts it; the step counter still advances, so the next step draws a new z.
An FO rule that updates inside backward (``fused.FusedSGD``, lomo) has already applied its
update when the step sees the loss: ``updates_in_backward`` tells the closure not to
back-propagate a non-finite loss, which keeps the guard exact for it (a finite loss whose
gradient overflows in backward is applied: see ``fused.py``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from hybridft.engine.directions import DirectionSampler, Directions
from hybridft.engine.estimators import Estimator, TwoSided
from hybridft.engine.fused import GradientSync
from hybridft.engine.perturb import perturbed
from hybridft.engine.rng import parameter_key, rng_state, set_rng_state
from hybridft.engine.rules import UpdateRule, ZOSGD
from hybridft.engine.storage import HALF_PRECISION, StochasticRounding, StorageRule
from hybridft.engine.zo import Rounding, ZOUpdate

Closure = Callable[[], torch.Tensor]


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
    ``fo_optimizer`` gives MeZO; so every method runs through the same step. ``lr`` is the ZO
    group's learning rate (``param_groups[0]["lr"]``, which schedulers change).
    """

    def __init__(
        self,
        module: nn.Module,
        zo_params: Mapping[str, nn.Parameter],
        fo_optimizer: torch.optim.Optimizer | None = None,
        *,
        lr: float = 1e-6,
        seed: int = 0,
        estimator: Estimator = TwoSided(),
        directions: DirectionSampler = DirectionSampler(),
        rule: UpdateRule = ZOSGD(),
        storage: StorageRule = StochasticRounding(),
    ) -> None:
        if estimator.fused and fo_optimizer is None:
            raise ValueError("the fused estimator needs an FO part (its forward+backward is a ZO evaluation)")
        if any(p.requires_grad for p in zo_params.values()):
            raise ValueError("ZO parameters must have requires_grad=False: they never get a .grad")
        warn_low_precision(zo_params.values(), lr, storage.name)
        super().__init__([{"params": list(zo_params.values()), "name": "zo"}], {"lr": lr})
        self.module = module
        self.fo_optimizer = fo_optimizer
        self.seed = seed
        self.estimator, self.directions, self.rule, self.storage = estimator, directions, rule, storage
        self.num_steps = 0
        self.keys = {p: parameter_key(name) for name, p in zo_params.items()}
        self.names = {parameter_key(name): name for name in zo_params}
        self.row_keys = directions.row_keys(module, self.keys)
        self.cuda_devices = sorted({p.device.index or 0 for p in module.parameters() if p.is_cuda})
        self.last_update: ZOUpdate | None = None
        self.last_cache_bytes = 0
        self.skipped = False  # whether the last step was skipped by the divergence guard
        self.skipped_steps = 0
        if fo_optimizer is not None:
            for group in fo_optimizer.param_groups:
                group.setdefault("name", "fo")
                self.param_groups.append(group)

    def settings(self) -> dict[str, Any]:
        """The ZO step's hyperparameters (lr aside), as flat values: kept in ``state_dict`` so that
        a checkpoint is never loaded into an optimizer composed differently."""
        e = self.estimator
        return {"estimator": type(e).__name__, "eps": e.eps, "num_directions": e.num_directions,
                "one_sided": e.one_sided, "fused": e.fused, **self.directions.settings(),
                "weight_decay": self.rule.weight_decay, "rounding": self.storage.name}

    def _active(self, directions: list[Directions]) -> dict[nn.Parameter, int]:
        """The ZO parameters this step perturbs and updates (a layer subset, or all)."""
        active = directions[0].active if directions else None
        return self.keys if active is None else {p: k for p, k in self.keys.items() if k in active}

    @property
    def updates_in_backward(self) -> bool:
        """Whether the FO rule applies its update inside backward (``fused.FusedSGD``): then the
        closure must not back-propagate a non-finite loss, since this step could not undo it."""
        return bool(getattr(self.fo_optimizer, "updates_in_backward", False))

    def may_backward(self, loss: torch.Tensor) -> bool:
        """Whether the closure may back-propagate ``loss``: the fused FO rule's answer
        (``fused._Fused.may_backward``), else always (this step's guard skips a non-finite one)."""
        return self.fo_optimizer.may_backward(loss) if self.updates_in_backward else True  # type: ignore[union-attr]

    @property
    def zo_group(self) -> dict[str, Any]:
        return self.param_groups[0]

    def _evaluate(self, closure: Closure, directions: Directions | None = None, scale: float = 0.0,
                  *, grad: bool = False) -> torch.Tensor:
        """The closure at theta + scale z (theta without directions), from the step's RNG state;
        with ``grad``, its backward too (the FO pass)."""
        set_rng_state(self._rng_start, self.cuda_devices)
        context = nullcontext() if directions is None else perturbed(
            self.module, self._active([directions]), scale=scale, directions=directions, for_backward=grad)
        with torch.set_grad_enabled(grad), context:
            loss = closure()
        self._modes.add(self.module.training)
        if grad or self._rng_end is None:
            self._rng_end = rng_state(self.cuda_devices)
        return loss.detach()

    def _update_(self, grads: list[float], directions: list[Directions]) -> ZOUpdate:
        update = self.rule.log(step=self.num_steps, seeds=tuple(d.seed for d in directions),
                               projected_grads=tuple(grads), lr=self.zo_group["lr"], rounding=self.storage.name,
                               **self.directions.log_fields(directions))
        cached = self.directions.cache

        def one(item: tuple[nn.Parameter, int]) -> None:
            p, key = item
            self.rule.apply_(p, key=key, update=update, storage=self.storage,
                             z_of=(lambda i: directions[i].z(p, key)) if cached else None)

        self.directions.map(one, self._active(directions).items())
        return update

    def step(self, closure: Closure | None = None, *,  # type: ignore[override]
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
             sync: GradientSync | None = None) -> torch.Tensor:
        """One hybrid step on the closure's batch; returns the loss at (theta, phi)
        (for a ZO-only step, the mean of the perturbed losses).

        ``reduce`` (data parallelism, see ``distributed.py``) is called once, after every
        evaluation and before any update, with this process's step scalars as a float64 tensor
        [g_1, .., g_q, loss] (no g without a ZO set) and returns their values over all ranks;
        it may average the FO gradients in the same collective. ``sync`` (data parallelism with
        an FO rule that updates inside backward) is that rule's ``sync`` for this step only
        (``fused._Fused.sync``: it averages each gradient over ranks in its hook)."""
        if closure is None:
            raise ValueError("HybridOptimizer.step needs a closure that recomputes the loss")
        if sync is None:
            return self._step(closure, reduce)
        if not self.updates_in_backward:
            rule = ("none (ZO only)" if self.fo_optimizer is None
                    else type(self.fo_optimizer).__name__)
            raise ValueError("sync is for an FO rule that updates inside backward (lomo, adalomo); "
                             f"this step's FO rule is {rule}: pass reduce instead")
        fused: Any = self.fo_optimizer
        fused.sync = sync
        try:
            return self._step(closure, reduce)
        finally:
            fused.sync = None

    def _step(self, closure: Closure, reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        self._rng_start, self._rng_end, self._modes = rng_state(self.cuda_devices), None, set()
        loss: torch.Tensor | None = None
        grads, directions = None, []
        if self.keys:
            directions = self.directions.step(self.seed, self.num_steps, self.estimator.num_directions, self.keys,
                                              self.row_keys, self.names)
            grads, zo_loss = self.estimator.estimate(
                lambda d, scale, grad=False: float(self._evaluate(closure, d, scale, grad=grad)), directions)
            loss = torch.tensor(zo_loss)
            if len(self._modes) > 1:
                raise ValueError("the closure ran the ZO evaluations of one step in different train/eval modes; "
                                 "the fused estimator needs one mode for its FO pass and its no-grad forwards")
        if self.fo_optimizer is not None and not (self.keys and self.estimator.fused):
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
            set_rng_state(self._rng_end, self.cuda_devices)
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
        """Everything needed to continue exactly: step count, seed, the ZO group (its scheduled lr)
        with the step's settings, and the FO optimizer's own state."""
        zo = {k: v for k, v in self.zo_group.items() if k != "params"}
        return {
            "num_steps": self.num_steps,
            "seed": self.seed,
            "skipped_steps": self.skipped_steps,
            "zo_group": {**zo, **self.settings()},
            "fo": self.fo_optimizer.state_dict() if self.fo_optimizer is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict``; one composed with other ZO settings is refused in one line.
        (Those written before the step was composed of objects hold the same flat settings.)"""
        if (state_dict["fo"] is None) != (self.fo_optimizer is None):
            raise ValueError("state_dict and optimizer disagree on whether there is an FO part")
        saved, settings = state_dict["zo_group"], self.settings()
        differ = [f"{k} {saved[k]!r} there, {v!r} here" for k, v in settings.items()
                  if k in saved and saved[k] != v and not (k == "embedding_rows" and bool(saved[k]) == v)]
        if differ:
            raise ValueError(f"state_dict and optimizer disagree on the ZO step: {'; '.join(differ)}")
        self.num_steps = int(state_dict["num_steps"])
        self.seed = int(state_dict["seed"])
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.zo_group.update({k: v for k, v in saved.items() if k not in settings})
        if self.fo_optimizer is not None:
            self.fo_optimizer.load_state_dict(state_dict["fo"])
            # load_state_dict replaces the FO groups' dicts; share the new ones again.
            self.param_groups[1:] = self.fo_optimizer.param_groups
