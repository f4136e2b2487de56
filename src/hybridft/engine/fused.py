"""FusedSGD: SGD applied inside the backward pass, one parameter at a time (LOMO: Lv et al. 2023,
"Full Parameter Fine-tuning for Large Language Models with Limited Resources").

For each parameter p, as soon as autograd has accumulated its whole gradient g = dL/dp
(``Tensor.register_post_accumulate_grad_hook``, which fires once per backward, after every use
of p, tied weights included):

    g <- clamp(g, -c, c)           only with ``clip_value`` c (LOMO's clipping by value)
    p <- p - lr (g + wd p)         torch.optim.SGD without momentum, the same ops
    p.grad <- None                 freed before autograd makes the next parameter's gradient

``lr``, ``weight_decay`` and ``clip_value`` are read from p's param group when the hook runs, so
any torch LR scheduler changes them and a composing optimizer (``HybridOptimizer``) may share
the groups by reference.

Cost per step: one forward + one backward (the closure's); the update is one pass over each
weight, inside backward instead of after it. No second backward.
Memory: weights + activations + the gradients autograd holds in flight (a parameter's gradient
lives only until its hook ran: about one parameter's gradient at a time); no optimizer state.
Against SGD after backward that is |theta| gradient values fewer, against AdamW 3 |theta| fewer.

What updating inside backward rules out, and what is done instead:

- clipping by global norm: the norm needs every gradient before the first update. LOMO pays a
  second backward for it (the first only computes the norm; cost: one more backward per step);
  here only clipping by value is offered (``clip_value``: elementwise, one clamp per gradient,
  no extra pass). The ``hybridft`` CLI clips no method's gradients.
- gradient accumulation: the update of micro-batch 1 would happen before micro-batch 2's
  gradient is added; ``hybridft train`` refuses ``--grad-accum`` > 1 for ``lomo``.
- the divergence guard: an update cannot be undone after backward, so a non-finite loss must
  never be back-propagated: ``updates_in_backward`` tells a closure so (the run's closures then
  skip backward for one, and ``HybridOptimizer`` reports the step skipped: nothing applied). A finite loss whose gradient overflows inside
  backward is applied (checking each gradient would cost one device sync per parameter): the
  next losses are then non-finite, those steps are skipped, and a run stops after
  ``--max-bad-steps`` with its last checkpoint intact (a checkpoint refuses non-finite weights).
- data parallelism: every gradient would need its own all-reduce inside its hook; not done,
  ``hybridft train`` refuses ``lomo`` on several ranks.
- a weight saved for backward by an op that does not differentiate it (a detached use) would be
  read after its update; autograd's version counter turns that into an error, never a silent one.

``step(closure)`` runs the closure, whose backward applies the update, and counts steps;
``zero_grad`` is harmless (the gradients are already None); ``state_dict`` holds the groups and
the step count (there is no other state).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

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


class FusedSGD(torch.optim.Optimizer):
    """SGD on ``params``, each parameter updated by its own hook as soon as its gradient is
    complete during backward, its ``.grad`` then freed (module docstring)."""

    updates_in_backward = True  # a closure must not back-propagate a non-finite loss (hybridft.run.closure)

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], *, lr: float,
                 weight_decay: float = 0.0, clip_value: float | None = None) -> None:
        if lr < 0:
            raise ValueError(f"lr must be 0 or more, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be 0 or more, got {weight_decay}")
        if clip_value is not None and clip_value <= 0:
            raise ValueError(f"clip_value must be positive (or None: no clipping), got {clip_value}")
        self._group_of: dict[torch.Tensor, int] = {}
        self._hooks: list[RemovableHandle] = []
        self.num_steps = 0
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "clip_value": clip_value})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, plus a post-accumulate-grad hook on each new parameter (it must be a leaf
        that requires grad: only those get a gradient to apply)."""
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        for p in self.param_groups[index]["params"]:
            if not (p.is_leaf and p.requires_grad):
                raise ValueError("FusedSGD updates parameters in backward: each must be a leaf with requires_grad=True")
            self._group_of[p] = index
            self._hooks.append(p.register_post_accumulate_grad_hook(self._update_))

    @torch.no_grad()
    def _update_(self, p: torch.Tensor) -> None:
        """The hook: apply p's complete gradient with its group's current values, then free it.
        The group is looked up by index, so groups replaced by ``load_state_dict`` are the ones read."""
        grad, p.grad = p.grad, None
        if grad is None:
            return
        group = self.param_groups[self._group_of[p]]
        sgd_(p, grad, lr=group["lr"], weight_decay=group["weight_decay"], clip_value=group["clip_value"])

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
        """torch's (the groups; ``state`` is empty) and the step count."""
        return {**super().state_dict(), "num_steps": self.num_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.num_steps = int(state_dict.pop("num_steps", 0))
        super().load_state_dict(state_dict)
