"""Batches for a sequence classifier, the loss, and dev accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hybridft.tasks import Example


def encode(tokenizer: object, examples: Sequence[Example], *, max_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Tokenize a batch, padded to its longest example, truncated to ``max_length`` tokens."""
    batch = tokenizer(  # type: ignore[operator]
        [e.text for e in examples], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    batch["labels"] = torch.tensor([e.label for e in examples])
    return {k: v.to(device) for k, v in batch.items()}


def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the batch's labels: one forward."""
    return model(**batch).loss


@torch.no_grad()
def accuracy(
    model: nn.Module, tokenizer: object, examples: Sequence[Example], *, max_length: int, batch_size: int, device: torch.device
) -> float:
    """Fraction of ``examples`` whose argmax logit is the label (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(examples), batch_size):
        batch = encode(tokenizer, examples[i : i + batch_size], max_length=max_length, device=device)
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return correct / len(examples)
