"""Evaluate a model at theta + scale * z with theta restored exactly, one layer at a time.

MeZO perturbs every weight in place (+eps z, -2 eps z, +eps z) and relies on the arithmetic
to cancel; in floating point it does not, and in fp16/bf16 the weights drift until the loss
collapses. Here each module's ZO parameters are perturbed in place just before that
module's forward and copied back just after it, so after the pass theta is bitwise what it
was, in every dtype. Extra memory: a copy of one module's parameters at a time; for a plain
``nn.Embedding`` only the rows its input reads are perturbed and copied (the forward reads
nothing else), so the largest module of a small model costs a few rows, not a copy.

``for_backward=True`` makes a backward through the block see the perturbed weights too:
autograd's saved copies of a perturbed weight are packed as a reference and rebuilt as
theta + scale * z when the backward unpacks them (saved-tensor hooks). theta itself is still
restored after each module's forward, so no copy of the model is held; the cost is one more
generation of z (or a cache read) for each weight the backward needs (not the embedding's).

The same holds if the forward raises: anything still perturbed is restored on exit.
Tied parameters (one tensor owned by several modules) are perturbed by each owner with the
same z, since z depends only on (seed, parameter key).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from hybridft.engine.directions import Directions, reads_rows_only
from hybridft.engine.zo import Distribution


PARAMETER_CONTAINERS = (nn.ParameterDict, nn.ParameterList)


def owners(module: nn.Module, keys: Mapping[nn.Parameter, int]) -> dict[nn.Module, list[nn.Parameter]]:
    """The modules whose forward reads ``keys``' parameters, and which ones: the module holding a
    parameter, or the module holding its parameter container (``nn.ParameterDict``, e.g. peft's
    IA3 vectors), since a container's own forward never runs."""
    owned: dict[nn.Module, list[nn.Parameter]] = {}
    for sub in module.modules():
        if isinstance(sub, PARAMETER_CONTAINERS):
            continue
        holders = [sub, *(child for child in sub.children() if isinstance(child, PARAMETER_CONTAINERS))]
        params = [p for holder in holders for p in holder._parameters.values() if p is not None and p in keys]
        if params:
            owned[sub] = params
    return owned


@torch.no_grad()
def perturb_into_(
    target: torch.Tensor, param: nn.Parameter, *, key: int, directions: Directions, scale: float,
    rows: torch.Tensor | None = None,
) -> None:
    """target <- param + scale * z, in place (``target`` is ``param`` itself or a copy of it).
    With ``rows``, only those rows of ``target`` change (z restricted to them)."""
    if rows is None:
        target.add_(directions.z(param, key), alpha=scale)
    else:
        target.index_copy_(0, rows, target[rows].add_(directions.z_rows(param, key, rows), alpha=scale))


@dataclass(frozen=True)
class _SavedWeight:
    """What autograd keeps of a perturbed weight under ``for_backward``: how to rebuild it."""

    param: nn.Parameter
    rows: torch.Tensor | None
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


@contextmanager
def perturbed(
    module: nn.Module,
    keys: Mapping[nn.Parameter, int],
    *,
    scale: float,
    seed: int | None = None,
    distribution: Distribution = "gaussian",
    directions: Directions | None = None,
    for_backward: bool = False,
) -> Iterator[None]:
    """Inside the block, every forward of ``module`` sees theta + scale * z for the parameters
    in ``keys`` (parameter -> key); outside it, theta is untouched. z is ``directions``, or
    ``Directions(seed, distribution=distribution)``. Without ``for_backward``, meant for
    no-grad forwards (see the module docstring)."""
    if directions is None:
        if seed is None:
            raise ValueError("perturbed needs a seed or directions")
        directions = Directions(seed, distribution=distribution)
    saved: dict[nn.Parameter, tuple[torch.Tensor | None, torch.Tensor]] = {}

    def before(sub: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        batch_rows = _rows_read(sub, args, kwargs)
        for p in owned[sub]:
            if p not in saved:
                rows = batch_rows if p is getattr(sub, "weight", None) else None
                saved[p] = (rows, p[rows] if rows is not None else p.detach().clone())
                perturb_into_(p, p, key=keys[p], directions=directions, scale=scale, rows=rows)

    def after(sub: nn.Module, _args: object, _output: object) -> None:
        restore(owned[sub])

    @torch.no_grad()
    def restore(params: list[nn.Parameter]) -> None:
        for p in params:
            rows, original = saved.pop(p, (None, None))
            if original is None:
                continue
            if rows is None:
                p.copy_(original)
            else:
                p.index_copy_(0, rows, original)

    owned = owners(module, keys)
    with ExitStack() as stack:
        if for_backward:
            stack.enter_context(_rebuilt_in_backward(owned, saved, keys, directions, scale))
        handles = []
        try:
            for sub in owned:
                handles.append(sub.register_forward_pre_hook(before, with_kwargs=True))
                handles.append(sub.register_forward_hook(after, always_call=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
            restore(list(saved))


def _rows_read(sub: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> torch.Tensor | None:
    """The sorted distinct rows a plain embedding's forward is about to read, else None."""
    if not reads_rows_only(sub):
        return None
    ids = args[0] if args else kwargs.get("input")
    return torch.unique(ids) if isinstance(ids, torch.Tensor) else None


def _rebuilt_in_backward(
    owned: Mapping[nn.Module, list[nn.Parameter]],
    saved: Mapping[nn.Parameter, tuple[torch.Tensor | None, torch.Tensor]],
    keys: Mapping[nn.Parameter, int],
    directions: Directions,
    scale: float,
) -> torch.autograd.graph.saved_tensors_hooks:
    """Saved-tensor hooks: a tensor autograd saves that views a currently perturbed weight is
    kept as a ``_SavedWeight`` and rebuilt (param + scale * z, then the same view) on unpack."""
    by_storage = {p.untyped_storage().data_ptr(): p for params in owned.values() for p in params}

    def pack(t: torch.Tensor) -> object:
        if t.layout != torch.strided:
            return t
        p = by_storage.get(t.untyped_storage().data_ptr())
        if p is None or p not in saved:
            return t
        return _SavedWeight(p, saved[p][0], t.size(), t.stride(), t.storage_offset() - p.storage_offset())

    def unpack(packed: object) -> torch.Tensor:
        if not isinstance(packed, _SavedWeight):
            return packed  # type: ignore[return-value]
        p = packed.param
        rebuilt = p.detach().clone(memory_format=torch.preserve_format)
        perturb_into_(rebuilt, p, key=keys[p], directions=directions, scale=scale, rows=packed.rows)
        return rebuilt.as_strided(packed.size, packed.stride, packed.offset)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
