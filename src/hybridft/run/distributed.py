"""Data-parallel glue on torch.distributed: a run launched by ``torchrun`` (or ``accelerate
launch``) trains on R ranks, each with its own slice of every mini-batch.

What crosses the wire per step is one all-reduce of one flat buffer:

    [ n_r * grad_phi L_r  (the FO gradients, |phi| values) | n_r * g_r,1..q | n_r * L_r | n_r ]

summed over ranks r and divided by N = sum_r n_r (n_r: examples of rank r's slice). Every
rank then holds the gradient and the projected gradients of the loss on the whole batch,

    g_i = [L(theta + eps z_i; B) - L(theta - eps z_i; B)] / (2 eps),  L(.; B) = sum_r n_r/N L(.; B_r),

because g_i is linear in the losses. z_i is regenerated from the step seed on every rank, so
every rank applies the same update theta <- theta - lr/q sum_i g_i z_i to the same theta:
the base weights stay bitwise identical without any of them, or their gradient, being
sent. Bytes per step: 4 |phi| + 4 (q + 2) in fp32, against 4 |theta| + 4 |phi| for DDP full
fine-tuning (payload per rank; a ring all-reduce sends 2 (R-1)/R times the payload).

lomo and adalomo update each weight inside backward (``engine/fused.py``), before a step-end
all-reduce could average its gradient: there each gradient is averaged in its own hook
(``DataParallel.in_backward``), after the ranks agreed that every loss is finite. Bytes per
step: 4 |theta| (float32), DDP's, in one all-reduce per parameter.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hybridft.engine.sampler import ReshufflingSampler

Reduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel ranks."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints and writes."""
        return self.rank == 0


def world() -> World:
    """The current world: the process group's if one is initialised, else torchrun's
    environment (RANK, WORLD_SIZE, LOCAL_RANK), else a single process."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), local)
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), local)


def init(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA) when there is more
    than one rank; on CUDA each rank takes the GPU of its LOCAL_RANK. Returns the world and the
    device this rank computes on. A single process is left alone."""
    here = world()
    if here.size == 1:
        return here, device
    if device.type == "cuda":
        device = torch.device("cuda", here.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world(), device


def shutdown(*, together: bool = True) -> None:
    """Leave the process group, if this process is in one. ``together``: first wait at a barrier
    until every rank is leaving (after a run that ended normally), so that no rank tears its gloo
    connections down while a peer still uses them: a rank that exited first was seen to abort at
    exit ("terminate called without an active exception"). After a failure there is no barrier: a
    peer may be gone, and waiting for it would hang."""
    if dist.is_available() and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


@dataclass
class DataParallel:
    """The communication of one data-parallel run: the step's all-reduce, and checks.

    ``sent`` counts the payload bytes this rank put into step all-reduces, by part: "fo" (adapter
    and head gradients), "zo" (projected gradients), "scalars" (loss and example count);
    ``seconds`` the time spent in them (waiting for the slowest rank included).
    """

    world: World
    device: torch.device
    fo_params: list[nn.Parameter]
    sent: dict[str, int] = field(default_factory=lambda: {"fo": 0, "zo": 0, "scalars": 0})
    seconds: float = 0.0

    def reducer(self, examples: int) -> Reduce:
        """The ``reduce`` of one ``HybridOptimizer.step`` on ``examples`` local examples.

        Called with this rank's step scalars (the q projected gradients, then the loss), it
        returns their example-weighted means over all ranks and, in the same all-reduce,
        replaces each FO gradient by its example-weighted mean (the gradient of the whole
        batch's mean loss). Cost: one all-reduce of |phi| + q + 2 values.
        """

        def reduce(scalars: torch.Tensor) -> torch.Tensor:
            grads = [p.grad for p in self.fo_params if p.grad is not None]
            dtype = torch.float32 if not grads else torch.promote_types(torch.float32, grads[0].dtype)
            weight = torch.tensor([1.0], dtype=dtype, device=self.device)
            parts = [g.reshape(-1).to(dtype) for g in grads] + [scalars.to(self.device, dtype), weight]
            buffer = torch.cat(parts).mul_(examples)
            start = time.perf_counter()
            dist.all_reduce(buffer)
            total = buffer[-1].item()  # N = sum of n_r; .item() also waits for an asynchronous (nccl) all-reduce
            self.seconds += time.perf_counter() - start
            buffer.div_(total)
            offset = 0
            for g in grads:
                g.copy_(buffer[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            size = buffer.element_size()
            self.sent["fo"] += offset * size
            self.sent["zo"] += (scalars.numel() - 1) * size
            self.sent["scalars"] += 2 * size
            return buffer[offset:-1].to(scalars.device, scalars.dtype)

        return reduce

    def in_backward(self, examples: int) -> InBackward:
        """The ``sync`` of one step of an optimizer that updates inside backward (lomo, adalomo;
        ``fused._Fused.sync``) on ``examples`` local examples: the ranks first agree whether the
        loss is finite everywhere (and learn N), then each gradient is replaced, in its hook, by
        its example-weighted mean over ranks. Cost: one all-reduce of 2 values, then one per
        parameter, |theta| values per step in all (what DDP sends for full fine-tuning)."""
        return InBackward(self, examples)

    def mean(self, value: float, weight: float) -> float:
        """The ``weight``-weighted mean of ``value`` over ranks (e.g. accuracy over dev slices)."""
        buffer = torch.tensor([value * weight, weight], dtype=torch.float64, device=self.device)
        dist.all_reduce(buffer)
        return float(buffer[0] / buffer[1])

    def largest(self, value: int) -> int:
        """The largest ``value`` over ranks (e.g. a stop signal only some ranks received). Collective."""
        buffer = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(buffer, op=dist.ReduceOp.MAX)
        return int(buffer.item())

    def rng_states(self) -> dict[str, Any]:
        """The global RNG states of every rank, ``{"ranks": [rank 0's, rank 1's, ...]}``, for a
        checkpoint: dropout draws a different number of values on each rank (slices differ in
        padding), so their states differ and exact resume needs each one. Collective."""
        from hybridft.engine.rng import rng_state

        states: list[Any] = [None] * self.world.size
        dist.all_gather_object(states, rng_state())
        return {"ranks": states}

    def check_identical(self, module: nn.Module) -> None:
        """Raise RuntimeError unless every parameter of ``module`` is bitwise the same on every
        rank. Cost: one hash pass over the weights (copied to CPU), one all-reduce of 2 x
        (number of tensors) integers."""
        names, digests = zip(*((n, _digest(p)) for n, p in module.named_parameters()), strict=True)
        local = torch.tensor(digests, dtype=torch.int64, device=self.device)
        high, low = local.clone(), -local
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MAX)
        differ = [n for n, h, lo in zip(names, high.tolist(), low.tolist(), strict=True) if h != -lo]
        if differ:
            raise RuntimeError(f"{len(differ)} parameters differ across ranks (first: {differ[0]}); "
                               "every rank must load the same model with the same seed")


@dataclass
class InBackward:
    """One step's gradient sync for a fused optimizer (``DataParallel.in_backward``); the bytes
    and seconds it spends are counted in its ``parallel``'s ``sent`` ("fo", "scalars") and ``seconds``.
    A gradient's all-reduce is timed without waiting for the device (a sync per parameter would
    stall backward), so on CUDA, where nccl returns before the data has moved, its seconds count
    only the launch; gloo on CPU returns when it is done."""

    parallel: DataParallel
    examples: int
    total: float | None = None  # N, the examples of all ranks, once the ranks agreed

    def agree(self, finite: bool) -> bool:
        """Whether the loss is finite on every rank; learns N. Collective."""
        buffer = torch.tensor([float(self.examples), 0.0 if finite else 1.0], dtype=torch.float64,
                              device=self.parallel.device)
        start = time.perf_counter()
        dist.all_reduce(buffer)
        self.total, bad = buffer.tolist()
        self.parallel.seconds += time.perf_counter() - start
        self.parallel.sent["scalars"] += 2 * buffer.element_size()
        return bad == 0

    def __call__(self, grad: torch.Tensor) -> None:
        """``grad`` <- sum_r n_r grad_r / N, in place (in at least float32). Collective."""
        if self.total is None:
            raise RuntimeError("the ranks must agree on the loss (agree) before any gradient is reduced")
        dtype = torch.promote_types(torch.float32, grad.dtype)
        buffer = grad.to(dtype).mul_(self.examples)  # grad itself in float32/64, else a float32 copy
        start = time.perf_counter()
        dist.all_reduce(buffer)
        self.parallel.seconds += time.perf_counter() - start
        buffer.div_(self.total)
        self.parallel.sent["fo"] += buffer.numel() * buffer.element_size()
        if buffer is not grad:
            grad.copy_(buffer)


def _digest(tensor: torch.Tensor) -> int:
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return int.from_bytes(hashlib.blake2b(data.tobytes(), digest_size=7).digest(), "little")


def ddp_bytes(params: Iterable[nn.Parameter]) -> int:
    """What DDP all-reduces per step to train ``params`` first-order: each one's gradient (for
    the comparison, the ZO and FO sets of a run: every weight the run trains)."""
    return sum(p.numel() * p.element_size() for p in params)


def data_parallel(world: World, device: torch.device, model: nn.Module,
                  fo_params: Mapping[str, nn.Parameter]) -> DataParallel | None:
    """The run's communication when there are several ranks (None for one), after checking
    that every rank starts from the same weights."""
    if world.size == 1:
        return None
    parallel = DataParallel(world, device, list(fo_params.values()))
    parallel.check_identical(model)
    return parallel


def shard_sampler(n: int, batch_size: int, world: World, *, seed: int, replacement: bool) -> ReshufflingSampler:
    """Rank ``world.rank``'s view of the sampler of mini-batches of ``world.size`` x ``batch_size``:
    every rank draws the same permutation and takes the strided slice batch[rank::size], so R
    ranks with batch b see together exactly the batches of one process with batch R b."""
    total = batch_size * world.size
    if world.size > 1 and total > n:
        raise ValueError(f"batch size {world.size} ranks x {batch_size} is more than the number of examples ({n})")
    if world.size > 1 and not replacement and 0 < n % total < world.size:
        raise ValueError(f"the last mini-batch of each epoch ({n} examples in batches of {world.size} x {batch_size}) "
                         f"has {n % total} examples, fewer than the {world.size} ranks; change --train-size or --batch-size")
    return ReshufflingSampler(n, total, seed=seed, replacement=replacement, num_shards=world.size, shard=world.rank)
