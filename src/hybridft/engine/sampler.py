"""Mini-batch index samplers whose position is part of their state, so resume is exact.

``ReshufflingSampler`` (the default, the sampler the analysis is about): each epoch draws a
fresh permutation of range(n) from a generator seeded by (seed, epoch) and walks it in
mini-batches without replacement; every example is visited exactly once per epoch (the
last batch may be smaller). With ``replacement=True`` each batch is instead drawn i.i.d.
with replacement (seeded by (seed, epoch, batch)), for comparison.

``num_shards``/``shard`` split every batch across data-parallel ranks: all ranks compute
the same permutation and take disjoint slices of each batch.

``EpochSampler`` yields the same order one index at a time, for loops whose DataLoader does
the batching (HF Trainer, accelerate).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from hybridft.engine.zo import step_seed


class ReshufflingSampler(torch.utils.data.Sampler[list[int]]):
    """Yields lists of example indices, one list per optimizer step, forever (epoch after epoch)."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int = 0,
        replacement: bool = False,
        num_shards: int = 1,
        shard: int = 0,
    ) -> None:
        if n < 1:
            raise ValueError("the training set is empty")
        if batch_size < 1 or batch_size > n:
            raise ValueError(f"batch size {batch_size} must be between 1 and the number of examples ({n})")
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} is not in range({num_shards})")
        self.n, self.batch_size, self.seed, self.replacement = n, batch_size, seed, replacement
        self.num_shards, self.shard = num_shards, shard
        self.epoch = 0
        self.position = 0  # batches of the current epoch already handed out

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def _generator(self, *parts: int) -> torch.Generator:
        generator = torch.Generator()
        seed = self.seed
        for part in parts:
            seed = step_seed(seed, part)
        generator.manual_seed(seed & ((1 << 63) - 1))
        return generator

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of one epoch (unsharded)."""
        if self.replacement:
            return [
                torch.randint(self.n, (self.batch_size,), generator=self._generator(epoch, b)).tolist()
                for b in range(self.batches_per_epoch)
            ]
        order = torch.randperm(self.n, generator=self._generator(epoch)).tolist()
        return [order[i : i + self.batch_size] for i in range(0, self.n, self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            batches = self.epoch_batches(self.epoch)
            while self.position < len(batches):
                batch = batches[self.position]
                self.position += 1
                yield batch[self.shard :: self.num_shards]
            self.epoch += 1
            self.position = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "replacement": self.replacement, "n": self.n, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for field in ("seed", "replacement", "n", "batch_size"):
            if state[field] != getattr(self, field):
                raise ValueError(f"sampler state was saved with {field}={state[field]!r}, not {getattr(self, field)!r}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class EpochSampler(torch.utils.data.Sampler[int]):
    """ReshufflingSampler's permutation of epoch ``epoch``, one index at a time.

    A DataLoader that batches it (any batch size, ``drop_last=False``) yields exactly the
    batches ReshufflingSampler(n, batch size, seed=seed) yields in that epoch. The loop sets the
    epoch with ``set_epoch``, as for ``DistributedSampler``; the HF Trainer and accelerate do.
    """

    def __init__(self, n: int, *, seed: int = 0) -> None:
        self.order = ReshufflingSampler(n, n, seed=seed)  # one batch per epoch: the permutation
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        yield from self.order.epoch_batches(self.epoch)[0]

    def __len__(self) -> int:
        return self.order.n
