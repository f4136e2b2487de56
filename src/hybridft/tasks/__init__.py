"""Tasks: labelled examples split into train and dev, looked up by name."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    text: str
    label: int


@dataclass(frozen=True)
class Task:
    name: str
    label_names: tuple[str, ...]
    train: list[Example]
    dev: list[Example]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def subsample(examples: list[Example], size: int | None, seed: int) -> list[Example]:
    """A seeded random subset of ``size`` examples (all of them when size is None or larger)."""
    if size is None or size >= len(examples):
        return list(examples)
    return random.Random(seed).sample(examples, size)


def load_task(name: str, *, seed: int = 0) -> Task:
    """The task ``name``, with a train/dev split seeded by ``seed`` where the source has none."""
    from hybridft.tasks import movie_reviews

    loaders: dict[str, Callable[[int], Task]] = {
        "rotten_tomatoes": lambda s: movie_reviews.load("rotten_tomatoes", seed=s),
        "imdb": lambda s: movie_reviews.load("imdb", seed=s),
    }
    if name not in loaders:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(loaders)}")
    task = loaders[name](seed)
    for split in ("train", "dev"):
        if not getattr(task, split):
            raise ValueError(f"task {name!r} has an empty {split} split")
    return task
