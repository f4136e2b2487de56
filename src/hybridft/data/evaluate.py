"""Accuracy of a model on examples, through its task formulation (classification head, option
scores or candidate log-likelihoods: see formulations.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hybridft.data.formulations import Formulation
from hybridft.data.tasks import Example
from hybridft.engine.modes import evaluating


@torch.no_grad()
def accuracy(model: nn.Module, formulation: Formulation, tokenizer: Any, examples: Sequence[Example], *,
             batch_size: int, device: torch.device) -> float:
    """Fraction of ``examples`` whose predicted class or option is the label (eval mode, no grad).
    Cost: one forward per batch of ``batch_size`` examples (times C candidates for a causal LM
    whose candidates are not single label words). Batches are cut from the examples sorted by
    length, so each is padded to about its own examples' length."""
    if not examples:
        raise ValueError("accuracy of an empty set of examples")
    correct = 0
    ordered = sorted(examples, key=text_length)
    with evaluating(model):
        for i in range(0, len(ordered), batch_size):
            batch = formulation.encode(tokenizer, ordered[i : i + batch_size], device=device)
            correct += int((formulation.predict(model, batch) == batch["labels"]).sum())
    return correct / len(examples)


def text_length(example: Example) -> int:
    """Characters of an example's text, fields and options: the sort key of evaluation batches."""
    return len(example.text) + sum(len(str(v)) for v in example.fields.values()) + sum(len(o) for o in example.options)
