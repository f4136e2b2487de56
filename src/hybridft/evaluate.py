"""Accuracy of a model on examples, through its task formulation (classification head, option
scores or candidate log-likelihoods: see formulations.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hybridft.formulations import Formulation
from hybridft.tasks import Example


@torch.no_grad()
def accuracy(model: nn.Module, formulation: Formulation, tokenizer: Any, examples: Sequence[Example], *,
             batch_size: int, device: torch.device) -> float:
    """Fraction of ``examples`` whose predicted class or option is the label (eval mode, no grad).
    Cost: one forward per batch of ``batch_size`` examples (times C candidates for a causal LM)."""
    if not examples:
        raise ValueError("accuracy of an empty set of examples")
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(examples), batch_size):
        batch = formulation.encode(tokenizer, examples[i : i + batch_size], device=device)
        correct += int((formulation.predict(model, batch) == batch["labels"]).sum())
    model.train(was_training)
    return correct / len(examples)
