"""Evaluate a model at theta + scale * z with theta restored exactly, one layer at a time.

MeZO perturbs every weight in place (+eps z, -2 eps z, +eps z) and relies on the arithmetic
to cancel; in floating point it does not, and in fp16/bf16 the weights drift until the loss
collapses. Here each module's ZO parameters are perturbed in place just before that
module's forward and copied back just after it, so after the pass theta is bitwise what it
was, in every dtype. Extra memory: a copy of one module's parameters at a time.

The same holds if the forward raises: anything still perturbed is restored on exit.
Tied parameters (one tensor owned by several modules) are perturbed by each owner with the
same z, since z depends only on (seed, parameter key).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from hybridft.zo import Distribution, perturb_


def owners(module: nn.Module, keys: Mapping[nn.Parameter, int]) -> dict[nn.Module, list[nn.Parameter]]:
    """The modules that directly own at least one of ``keys``' parameters, and which ones."""
    owned: dict[nn.Module, list[nn.Parameter]] = {}
    for sub in module.modules():
        params = [p for p in sub._parameters.values() if p is not None and p in keys]
        if params:
            owned[sub] = params
    return owned


@contextmanager
def perturbed(
    module: nn.Module,
    keys: Mapping[nn.Parameter, int],
    *,
    seed: int,
    scale: float,
    distribution: Distribution = "gaussian",
) -> Iterator[None]:
    """Inside the block, every forward of ``module`` sees theta + scale * z(seed) for the
    parameters in ``keys`` (parameter -> key); outside it, theta is untouched.

    Meant for no-grad forwards: the weight is restored in place right after its module ran,
    which autograd would reject if it had saved that weight for a backward.
    """
    saved: dict[nn.Parameter, torch.Tensor] = {}

    def before(sub: nn.Module, _args: object) -> None:
        for p in owned[sub]:
            if p not in saved:
                saved[p] = p.detach().clone()
                perturb_(p, seed=seed, key=keys[p], scale=scale, distribution=distribution)

    def after(sub: nn.Module, _args: object, _output: object) -> None:
        restore(owned[sub])

    @torch.no_grad()
    def restore(params: list[nn.Parameter]) -> None:
        for p in params:
            original = saved.pop(p, None)
            if original is not None:
                p.copy_(original)

    owned = owners(module, keys)
    handles = []
    try:
        for sub in owned:
            handles.append(sub.register_forward_pre_hook(before))
            handles.append(sub.register_forward_hook(after, always_call=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        restore(list(saved))
