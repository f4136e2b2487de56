"""Evaluations run in eval mode and leave the model in the mode they found it in, also when they raise."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from hybridft.data.evaluate import accuracy
from hybridft.data.tasks import Example
from hybridft.engine.modes import evaluating


class Broken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dropout = nn.Dropout(0.5)
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.dropout.training)
        raise RuntimeError("out of memory")


class Formulation:
    """encode/predict as in hybridft.data.formulations, over a model that takes a tensor."""

    def encode(self, tokenizer: Any, examples: list[Example], *, device: torch.device) -> dict[str, torch.Tensor]:
        return {"x": torch.zeros(len(examples)), "labels": torch.tensor([e.label for e in examples])}

    def predict(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["x"])


@pytest.mark.parametrize("training", [True, False])
def test_evaluating_restores_the_mode_when_the_body_raises(training):
    model = Broken().train(training)
    with pytest.raises(RuntimeError), evaluating(model):
        assert not model.training and not model.dropout.training
        model(torch.zeros(1))
    assert model.training == model.dropout.training == training


def test_accuracy_restores_train_mode_when_the_forward_raises():
    model = Broken().train()
    with pytest.raises(RuntimeError, match="out of memory"):
        accuracy(model, Formulation(), None, [Example("a", 0), Example("b", 1)],  # type: ignore[arg-type]
                 batch_size=2, device=torch.device("cpu"))
    assert model.seen == [False]  # the forward ran in eval mode
    assert model.training and model.dropout.training
