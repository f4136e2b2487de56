"""Optimizers applied inside the backward pass, one parameter at a time (LOMO: Lv et al. 2023,
"Full Parameter Fine-tuning for Large Language Models with Limited Resources"; AdaLomo: Lv et al.
2023, "AdaLomo: Low-memory Optimization with Adaptive Learning Rate").

For each parameter p, as soon as autograd has accumulated its whole gradient g = dL/dp
(``Tensor.register_post_accumulate_grad_hook``, which fires once per backward, after every use
of p, tied weights included), the hook applies the rule and frees the gradient:

``FusedSGD`` (lomo)::

    g <- clamp(g, -c, c)           only with ``clip_value`` c (LOMO's clipping by value)
    p <- p - lr (g + wd p)         torch.optim.SGD without momentum, the same ops
    p.grad <- None                 freed before autograd makes the next parameter's gradient

``FusedAdaLomo`` (adalomo): Adafactor without a first moment, with its relative step (the
"grouped update normalization" of AdaLomo), at t = the parameter's step count::

    g <- clamp(g, -c, c)           only with ``clip_value`` c
    b <- 1 - t^decay_rate          decay_rate -0.8: b = 0 at t = 1, so the first estimate is g^2
    p a matrix (or more dims):     factored second moment, rows and columns of the last two dims
        R <- b R + (1 - b) mean_cols(g^2 + eps1),  C <- b C + (1 - b) mean_rows(g^2 + eps1)
        u <- g / sqrt(R C^T / mean(R))
    otherwise:                     V <- b V + (1 - b) (g^2 + eps1),  u <- g / sqrt(V)
    u <- u / max(1, RMS(u) / clip_threshold)
    s <- lr max(eps2, RMS(p))      the step is relative to the weight's own scale
    p <- p - s wd p - s u          transformers.optimization.Adafactor's order and values
    p.grad <- None

So its state is R and C per matrix (rows + columns values, not rows x columns) and V per vector:
a few percent of a LoRA adapter's AdamW state, against AdamW's two moments per weight. The RMS and
max are tensor ops (no device synchronisation per parameter).

``lr``, ``weight_decay``, ``clip_value`` (and AdaLomo's constants) are read from p's param group
when the hook runs, so any torch LR scheduler changes them and a composing optimizer
(``HybridOptimizer``) may share the groups by reference.

Cost per step: one forward + one backward (the closure's); the update is one pass over each
weight (AdaLomo: a few), inside backward instead of after it. No second backward.
Memory: weights + activations + the gradients autograd holds in flight (a parameter's gradient
lives only until its hook ran: about one parameter's gradient at a time) + the state above.
Against SGD after backward that is |theta| gradient values fewer, against AdamW 3 |theta| fewer.

What updating inside backward rules out, and what is done instead:

- clipping by global norm: the norm needs every gradient before the first update. LOMO pays a
  second backward for it (the first only computes the norm; cost: one more backward per step);
  here only clipping by value is offered (``clip_value``: elementwise, one clamp per gradient,
  no extra pass). The ``hybridft`` CLI clips no method's gradients. (AdaLomo's authors found
  its update normalization makes global clipping unnecessary.)
- gradient accumulation: the update of micro-batch 1 would happen before micro-batch 2's
  gradient is added; ``hybridft train`` refuses ``--grad-accum`` > 1 for ``lomo`` and ``adalomo``.
- the divergence guard: an update cannot be undone after backward, so a non-finite loss must
  never be back-propagated: ``updates_in_backward`` tells a closure so (the run's closures then
  skip backward for one, and ``HybridOptimizer`` reports the step skipped: nothing applied). A finite loss whose gradient overflows inside
  backward is applied (checking each gradient would cost one device sync per parameter): the
  next losses are then non-finite, those steps are skipped, and a run stops after
  ``--max-bad-steps`` with its last checkpoint intact (a checkpoint refuses non-finite weights).
- data parallelism: each gradient is averaged across ranks inside its own hook, before it is
  applied (``sync``: one all-reduce per parameter, |theta| values per step in all, as DDP sends;
  ``hybridft.run.distributed.DataParallel.in_backward``, given for one step by
  ``HybridOptimizer.step(closure, sync=...)``), so every rank applies the same update
  to the same weights. Whether the loss may be back-propagated is then decided by all ranks
  together (``may_backward``: one all-reduce of two numbers), or a rank that skips backward
  would leave the others waiting in a hook.
- a weight saved for backward by an op that does not differentiate it (a detached use) would be
  read after its update; autograd's version counter turns that into an error, never a silent one.

``step(closure)`` runs the closure, whose backward applies the update, and counts steps;
``zero_grad`` is harmless (the gradients are already None); ``state_dict`` holds the groups, the
step count and (AdaLomo) each parameter's step count and second-moment factors, kept in float32
whatever the parameter's dtype, so a resumed run continues bitwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
from torch.utils.hooks import RemovableHandle


def sgd_(p: torch.Tensor, grad: torch.Tensor, *, lr: float, weight_decay: float = 0.0,
         clip_value: float | None = None) -> None:
    """p <- p - lr (clamp(grad, -c, c) + weight_decay p), in place; ``grad`` is overwritten
    (it is freed next). The ops of torch.optim.SGD without momentum, so the values agree."""
    if clip_value is not None:
        grad.clamp_(-clip_value, clip_value)
    if weight_decay:
        grad.add_(p, alpha=weight_decay)
    p.add_(grad, alpha=-lr)


class GradientSync(Protocol):
    """How a fused optimizer's ranks agree within one step (data parallelism; ``DataParallel.in_backward``)."""

    def agree(self, finite: bool) -> bool:
        """Whether every rank's loss is finite (collective: every rank calls it once per backward)."""

    def __call__(self, grad: torch.Tensor) -> None:
        """Replace this rank's ``grad`` by the gradient of the whole batch, in place (collective)."""


class _Fused(torch.optim.Optimizer):
    """The machinery of an optimizer applied in backward: one post-accumulate-grad hook per
    parameter calls ``_apply_(p, grad, group)`` with p's complete gradient, which is then freed."""

    updates_in_backward = True  # a closure must not back-propagate a non-finite loss (hybridft.run.closure)

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], defaults: dict[str, Any]) -> None:
        if defaults["lr"] < 0:
            raise ValueError(f"lr must be 0 or more, got {defaults['lr']}")
        if defaults["weight_decay"] < 0:
            raise ValueError(f"weight_decay must be 0 or more, got {defaults['weight_decay']}")
        if defaults["clip_value"] is not None and defaults["clip_value"] <= 0:
            raise ValueError(f"clip_value must be positive (or None: no clipping), got {defaults['clip_value']}")
        self._group_of: dict[torch.Tensor, int] = {}
        self._hooks: list[RemovableHandle] = []
        self.num_steps = 0
        self.sync: GradientSync | None = None  # several ranks: set for each step (module docstring)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, plus a post-accumulate-grad hook on each new parameter (it must be a leaf
        that requires grad: only those get a gradient to apply)."""
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        for p in self.param_groups[index]["params"]:
            if not (p.is_leaf and p.requires_grad):
                raise ValueError(f"{type(self).__name__} updates parameters in backward: each must be a leaf "
                                 "with requires_grad=True")
            self._group_of[p] = index
            self._hooks.append(p.register_post_accumulate_grad_hook(self._update_))

    @torch.no_grad()
    def _update_(self, p: torch.Tensor) -> None:
        """The hook: apply p's complete gradient with its group's current values, then free it.
        The group is looked up by index, so groups replaced by ``load_state_dict`` are the ones read."""
        grad, p.grad = p.grad, None
        if grad is None:
            return
        if self.sync is not None:
            self.sync(grad)
        self._apply_(p, grad, self.param_groups[self._group_of[p]])

    def may_backward(self, loss: torch.Tensor) -> bool:
        """Whether a closure may back-propagate ``loss``, whose backward applies the update: only a
        finite one, and with ``sync`` only if every rank's is finite (all ranks back-propagate or
        none does). Cost: one device sync; with ``sync`` one all-reduce of two numbers."""
        finite = bool(torch.isfinite(loss).all())
        return self.sync.agree(finite) if self.sync is not None else finite

    def _apply_(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run ``closure`` if given (its backward applies the update) and count the step; the
        update of a backward already run has already happened. Returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.num_steps += 1
        return loss

    def remove_hooks(self) -> None:
        """Detach the optimizer from its parameters: later backwards leave ``.grad`` as torch does."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def state_dict(self) -> dict[str, Any]:
        """torch's (the groups and any per-parameter state) and the step count."""
        return {**super().state_dict(), "num_steps": self.num_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, except that per-parameter state keeps the dtype it was saved in (torch casts
        floating state to the parameter's dtype, which would round float32 factors of a bf16
        weight) and the step count is restored."""
        state_dict = dict(state_dict)
        self.num_steps = int(state_dict.pop("num_steps", 0))
        saved = state_dict.get("state", {})
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, values in saved.items():
            p = params[int(index)]
            self.state[p] = {k: v.to(device=p.device, copy=True) if torch.is_tensor(v) else v for k, v in values.items()}


class FusedSGD(_Fused):
    """SGD on ``params``, each parameter updated by its own hook as soon as its gradient is
    complete during backward, its ``.grad`` then freed (module docstring). No state."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], *, lr: float,
                 weight_decay: float = 0.0, clip_value: float | None = None) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "clip_value": clip_value})

    def _apply_(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        sgd_(p, grad, lr=group["lr"], weight_decay=group["weight_decay"], clip_value=group["clip_value"])


class FusedAdaLomo(_Fused):
    """AdaLomo on ``params``: Adafactor without a first moment, with its relative step, applied
    to each parameter by its hook during backward (module docstring). ``eps``: (eps1, added to
    g^2; eps2, the smallest weight RMS the step is relative to)."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], *, lr: float,
                 weight_decay: float = 0.0, clip_value: float | None = None,
                 eps: tuple[float, float] = (1e-30, 1e-3), clip_threshold: float = 1.0,
                 decay_rate: float = -0.8) -> None:
        if len(eps) != 2 or min(eps) < 0:
            raise ValueError(f"eps must be two values of 0 or more (added to g^2, smallest weight RMS), got {eps}")
        if clip_threshold <= 0:
            raise ValueError(f"clip_threshold must be positive, got {clip_threshold}")
        if decay_rate >= 0:
            raise ValueError(f"decay_rate must be negative (1 - t^decay_rate grows to 1), got {decay_rate}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "clip_value": clip_value,
                                  "eps": tuple(eps), "clip_threshold": clip_threshold, "decay_rate": decay_rate})

    def _apply_(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        adalomo_(p, grad, self.state[p], lr=group["lr"], weight_decay=group["weight_decay"],
                 clip_value=group["clip_value"], eps=group["eps"], clip_threshold=group["clip_threshold"],
                 decay_rate=group["decay_rate"])


def rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square of ``x``'s entries, as a 0-dim tensor (no host synchronisation)."""
    return x.norm(2) / math.sqrt(x.numel())


_SQUARE_CHUNK = 1 << 20  # elements of g^2 made at a time by _factored_square_means (4 MiB in float32)


def _factored_square_means(g: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g^2 + eps).mean(-1)`` and ``.mean(-2)`` of a float32 ``g`` with two or more dims, built
    from slices of at most ``_SQUARE_CHUNK`` squared entries: g^2 as a whole would be a temporary
    the size of the weight (108 MiB for SmolLM2-135M's embedding), on top of its gradient."""
    rows = g.shape[-2]
    per = max(1, _SQUARE_CHUNK // max(1, g[..., :1, :].numel()))
    row_sq = g.new_empty(g.shape[:-1])
    col_sum = g.new_zeros(g.shape[:-2] + g.shape[-1:])
    for start in range(0, rows, per):
        part = g[..., start:start + per, :].square().add_(eps)
        row_sq[..., start:start + per] = part.mean(dim=-1)
        col_sum.add_(part.sum(dim=-2))
    return row_sq, col_sum.div_(rows)


def adalomo_(p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], *, lr: float,
             weight_decay: float = 0.0, clip_value: float | None = None,
             eps: tuple[float, float] = (1e-30, 1e-3), clip_threshold: float = 1.0,
             decay_rate: float = -0.8) -> None:
    """One AdaLomo update of ``p`` in place from its complete gradient (module docstring);
    ``state`` (the parameter's: ``step``, and ``row``/``col`` or ``sq`` in float32) is created on
    the first call and advanced. ``grad`` is overwritten (it is freed next)."""
    if clip_value is not None:
        grad.clamp_(-clip_value, clip_value)
    g = grad.float()
    state["step"] = step = state.get("step", 0) + 1
    keep = 1.0 - step ** decay_rate
    if g.dim() >= 2:
        if "row" not in state:
            state["row"], state["col"] = g.new_zeros(g.shape[:-1]), g.new_zeros(g.shape[:-2] + g.shape[-1:])
        row, col = state["row"], state["col"]
        row_sq, col_sq = _factored_square_means(g, eps[0])
        row.mul_(keep).add_(row_sq, alpha=1.0 - keep)
        col.mul_(keep).add_(col_sq, alpha=1.0 - keep)
        update = g.mul_((row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)).mul_(col.rsqrt().unsqueeze(-2))
    else:
        if "sq" not in state:
            state["sq"] = torch.zeros_like(g)
        v = state["sq"]
        v.mul_(keep).addcmul_(g, g, value=1.0 - keep).add_((1.0 - keep) * eps[0])
        update = g.mul_(v.rsqrt())
    update.div_((rms(update) / clip_threshold).clamp_(min=1.0))
    weights = p.float() if p.dtype != torch.float32 else p
    scaled = rms(weights).clamp_(min=eps[1]).mul_(lr)
    if weight_decay:
        weights.mul_(1.0 - scaled * weight_decay)  # p - s wd p, without a weight-sized temporary
    weights.sub_(update.mul_(scaled))
    if weights is not p:
        p.copy_(weights)
