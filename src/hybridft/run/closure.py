"""The closure ``HybridOptimizer.step`` calls: the step's loss on one batch, or, with gradient
accumulation (``--grad-accum K``), on the union of K micro-batches.

Accumulation: the sampler draws K x --batch-size examples per step (the union U), which are cut
into K micro-batches U_1..U_K, each encoded (padded) on its own. Every evaluation of the closure,
the ZO ones at theta +- eps z as well as the FO one, computes the union's mean loss

    L_U = sum_k (m_k / m) l_k      l_k: micro-batch k's mean loss over its m_k terms (examples;
                                   for candidate scoring, continuation tokens), m = sum_k m_k

so the step is one hybrid step on U, as one batch of K x --batch-size examples makes it (up to
padding and summation order): one ZO direction for the whole window and L_U in its projected
gradient, grad L_U for the FO part, the same semantics as ``HybridTrainer``'s accumulation. The
FO evaluation back-propagates each term as it is computed, so gradients accumulate in ``.grad``
while one micro-batch's activations are held.
Cost per step: the passes of a step on U (K times as many, each over 1/K of the examples);
activation memory of one micro-batch.

An optimizer that updates inside backward (``updates_in_backward``: lomo's ``FusedSGD``) is never
given a non-finite loss to back-propagate (``backward_``), since no guard could undo its update:
the step's loss then says the step is skipped, and nothing was applied; on several ranks the
ranks decide together (``may_backward``). Cost: one device sync per backward. Other optimizers
back-propagate it (their step guard skips it; data-parallel ranks must all reduce the same
gradients).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from hybridft.data.formulations import Formulation, head_loss

Batch = dict[str, torch.Tensor]


def loss_closure(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch,
                 loss: Callable[[torch.nn.Module, Batch], torch.Tensor] = head_loss,
                 *, fused: bool = False) -> Callable[[], torch.Tensor]:
    """The closure ``HybridOptimizer.step`` calls: the batch ``loss`` (the formulation's), with
    backward only when grad is enabled (the FO evaluation). ZO evaluations run in eval mode, so
    +eps and -eps see the same function (no dropout noise in the difference); ``fused``: the FO
    pass is one of them, so all run in train mode (the optimizer replays the RNG so that dropout
    masks agree)."""

    def closure() -> torch.Tensor:
        model.train(torch.is_grad_enabled() or fused)
        optimizer.zero_grad()
        value = loss(model, batch)
        backward_(value, optimizer)
        return value.detach()

    return closure


def backward_(value: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    """``value.backward()`` when grad is enabled, unless ``optimizer`` updates inside backward
    and ``value`` is not finite (with several ranks: on any rank; module docstring)."""
    if not torch.is_grad_enabled():
        return
    if getattr(optimizer, "updates_in_backward", False) and not optimizer.may_backward(value):  # type: ignore[attr-defined]
        return
    value.backward()


def micro_batches(indices: list[int], k: int) -> list[list[int]]:
    """``indices`` cut into at most ``k`` consecutive slices of ceil(len / k) (the last may be smaller)."""
    size = max(1, math.ceil(len(indices) / k))
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def union_closure(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Sequence[Batch],
                  formulation: Formulation, *, fused: bool = False) -> Callable[[], torch.Tensor]:
    """:func:`loss_closure` on the union of the micro-batches ``batches``: L_U (module docstring),
    and with grad enabled grad L_U in ``.grad``, one micro-batch's backward at a time."""
    counts = [formulation.items(batch) for batch in batches]
    weights = [count / sum(counts) for count in counts]

    def closure() -> torch.Tensor:
        model.train(torch.is_grad_enabled() or fused)
        optimizer.zero_grad()
        values = []
        for batch, weight in zip(batches, weights):
            value = formulation.loss(model, batch) * weight
            backward_(value, optimizer)
            values.append(value.detach())
        return torch.stack(values).sum()

    return closure


def step_closure(model: torch.nn.Module, optimizer: torch.optim.Optimizer, formulation: Formulation,
                 encode: Callable[[list[int]], Batch], indices: list[int], *, grad_accum: int = 1,
                 fused: bool = False) -> Callable[[], torch.Tensor]:
    """The closure of a step on the examples ``indices`` (``encode`` makes a batch of some):
    one batch, or ``grad_accum`` micro-batches of them."""
    chunks = micro_batches(indices, grad_accum)
    if len(chunks) == 1:
        return loss_closure(model, optimizer, encode(indices), formulation.loss, fused=fused)
    return union_closure(model, optimizer, [encode(chunk) for chunk in chunks], formulation, fused=fused)
