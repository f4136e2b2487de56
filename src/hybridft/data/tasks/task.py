"""A task's data: labelled examples, the task that holds their splits, and seeded subsets."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from hybridft.data.tasks.template import Template

DEV_FRACTION = 0.1


@dataclass(frozen=True)
class Example:
    """One labelled example. ``text`` is the main input; ``options`` are the choices of a
    multiple-choice example (empty for classification); ``fields`` are the other named values a
    template may use (WSC's spans, WinoGrande's sentence halves, a user file's columns)."""

    text: str
    label: int
    options: tuple[str, ...] = ()
    fields: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    name: str
    label_names: tuple[str, ...]  # classification: one per class; multiple choice: one per option
    train: list[Example]
    dev: list[Example]
    template: Template = field(default_factory=Template)
    test: list[Example] = field(default_factory=list)
    multiple_choice: bool = False
    max_length: int = 128  # tokens per input when --max-length is not given

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def subsample(examples: list[Example], size: int | None, seed: int) -> list[Example]:
    """A seeded random subset of ``size`` examples (all of them when size is None or larger)."""
    if size is None or size >= len(examples):
        return list(examples)
    return random.Random(seed).sample(examples, size)


def holdout(examples: list[Example], seed: int, fraction: float = DEV_FRACTION) -> tuple[list[Example], list[Example]]:
    """A seeded shuffle of ``examples`` cut into (train, dev): dev is the first ``fraction``."""
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    n_dev = round(len(shuffled) * fraction)
    return shuffled[n_dev:], shuffled[:n_dev]
