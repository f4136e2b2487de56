"""How a task is posed to a model: (task kind x model kind) -> the model's head, how a batch is
encoded, the loss and the prediction. The training loop and the evaluation only call
``encode``, ``loss`` and ``predict``, so they never branch on the model or the task.

| model kind | task kind       | head (transformers auto class)       | loss                               | prediction                  |
|------------|-----------------|--------------------------------------|------------------------------------|-----------------------------|
| encoder    | classification  | AutoModelForSequenceClassification   | cross-entropy of the head's logits | argmax logit                |
| encoder    | multiple choice | AutoModelForMultipleChoice           | cross-entropy over the options     | argmax option score         |
| causal     | either          | AutoModelForCausalLM                 | cross-entropy of the correct       | argmax candidate            |
|            |                 |                                      | candidate's tokens                 | log-likelihood (scoring.py) |

A batch is a dict of tensors on the device; ``batch["labels"]`` (B,) holds the index of each
example's correct class or option.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from hybridft.data.tasks import Example, Task
from hybridft.data.tasks.template import Template

Batch = dict[str, torch.Tensor]
KINDS = ("causal", "encoder")


class Formulation(Protocol):
    head: str  # the transformers auto class the model is loaded with
    num_labels: int | None  # size of a new classification head (None: no new head)
    max_length: int  # tokens per input

    def encode(self, tokenizer: Any, examples: Sequence[Example], *, device: torch.device) -> Batch: ...

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...

    def predict(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...

    def items(self, batch: Batch) -> int: ...  # the terms ``loss`` averages (gradient accumulation weighs by them)


def head_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's own mean cross-entropy of ``batch["labels"]``: one forward."""
    return model(**batch).loss


def example_count(batch: Batch) -> int:
    """The examples of ``batch``: the terms a head's mean cross-entropy averages."""
    return int(batch["labels"].shape[0])


def head_prediction(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The class (or option) with the largest logit: one forward without the labels."""
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1)


def _tokenize(tokenizer: Any, inputs: list[tuple[str, str | None]], max_length: int) -> Batch:
    texts = [text for text, _ in inputs]
    pairs = [pair for _, pair in inputs] if inputs[0][1] is not None else None
    return dict(tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


@dataclass(frozen=True)
class SequenceClassification:
    """An encoder with a ``num_labels`` classification head over the template's encoder input."""

    template: Template
    max_length: int
    num_labels: int
    head: str = "AutoModelForSequenceClassification"

    def encode(self, tokenizer: Any, examples: Sequence[Example], *, device: torch.device) -> Batch:
        """Tokenized (B, L) inputs padded to the longest, cut at ``max_length`` tokens."""
        batch = _tokenize(tokenizer, [self.template.encoder_inputs(e)[0] for e in examples], self.max_length)
        batch["labels"] = torch.tensor([e.label for e in examples])
        return {k: v.to(device) for k, v in batch.items()}

    loss = staticmethod(head_loss)
    predict = staticmethod(head_prediction)
    items = staticmethod(example_count)


@dataclass(frozen=True)
class MultipleChoice:
    """An encoder scoring each (example, option) input with one shared head; softmax over options."""

    template: Template
    max_length: int
    num_labels: int | None = None
    head: str = "AutoModelForMultipleChoice"

    def encode(self, tokenizer: Any, examples: Sequence[Example], *, device: torch.device) -> Batch:
        """(B, C, L) inputs: C options per example, each filled into the encoder template."""
        inputs = [self.template.encoder_inputs(e) for e in examples]
        n_options = len(inputs[0])
        if any(len(i) != n_options for i in inputs):
            raise ValueError("every example of a multiple-choice task needs the same number of options")
        flat = _tokenize(tokenizer, [pair for options in inputs for pair in options], self.max_length)
        batch = {k: v.view(len(examples), n_options, -1) for k, v in flat.items()}
        batch["labels"] = torch.tensor([e.label for e in examples])
        return {k: v.to(device) for k, v in batch.items()}

    loss = staticmethod(head_loss)
    predict = staticmethod(head_prediction)
    items = staticmethod(example_count)


def formulation(task: Task, kind: str, *, max_length: int | None = None, score: str = "mean") -> Formulation:
    """The formulation of ``task`` for a model of ``kind`` (causal or encoder); ``max_length``
    defaults to the task's; ``score`` (sum or mean) ranks a causal LM's candidates."""
    from hybridft.data.scoring import CandidateScoring

    length = max_length or task.max_length
    if kind == "causal":
        return CandidateScoring(task.template, length, length_normalized=score == "mean")
    if kind != "encoder":
        raise ValueError(f"unknown model kind {kind!r}; choose from {', '.join(KINDS)}")
    if task.multiple_choice:
        return MultipleChoice(task.template, length)
    return SequenceClassification(task.template, length, task.num_labels)
