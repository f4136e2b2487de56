"""Every task on every model kind, end to end through the loaders, templates, formulations and one
training step: tiny Llama, OPT and GPT-2 (candidate scoring) and BERT (classification, multiple
choice and span heads), built from configs, offline."""

from __future__ import annotations

import pytest
import torch

from hybridft.run.config import TrainConfig
from hybridft.data.formulations import MultipleChoice, SequenceClassification
from hybridft.data.scoring import CandidateScoring
from hybridft.run.train import build, train_step
from shared_data import DATA, needs_data

TASKS = ["rotten_tomatoes", "sst2", "wsc", "winogrande_xs"]


def small(model: str, task: str, **changes) -> TrainConfig:
    values = dict(model=model, task=task, data_dir=str(DATA), train_size=8, dev_size=4, test_size=4, batch_size=4,
                  eval_batch_size=8, steps=1, zo_lr=0.1, eps=0.05, fo_lr=1e-2, threads=1, progress=False)
    return TrainConfig(**(values | changes))


@needs_data
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "bert"])
def test_every_task_trains_one_step_on_every_model_kind(family, task, tiny_causal_dirs, tiny_bert_dir):
    model = str(tiny_bert_dir if family == "bert" else tiny_causal_dirs[family])
    run = build(small(model, task))
    expected = {"bert": MultipleChoice if task.startswith("winogrande") else SequenceClassification}.get(family, CandidateScoring)
    assert type(run.formulation) is expected
    fo_before = {k: p.detach().clone() for k, p in run.groups.fo.items()}
    zo_before = {k: p.detach().clone() for k, p in run.groups.zo.items()}
    record = train_step(run, 0, next(iter(run.sampler)))
    assert torch.isfinite(torch.tensor(record["loss"])) and record["projected_grad"] is not None
    assert any(not torch.equal(p, fo_before[k]) for k, p in run.groups.fo.items()), "the adapter did not move"
    assert any(not torch.equal(p, zo_before[k]) for k, p in run.groups.zo.items()), "the base did not move"
    assert all(p.grad is None for p in run.groups.zo.values())
    assert 0.0 <= run.dev_accuracy() <= 1.0
    assert 0.0 <= run.test_accuracy() <= 1.0


@needs_data
def test_encoder_heads_are_trained_with_the_adapter(tiny_bert_dir):
    for task, head in (("sst2", "classifier"), ("winogrande_xs", "classifier")):
        run = build(small(str(tiny_bert_dir), task))
        assert any(head in name for name in run.groups.fo) and not any(head in name for name in run.groups.zo)


@needs_data
def test_causal_lm_has_no_new_head_and_its_adapter_is_lora_only(tiny_causal_dirs):
    run = build(small(str(tiny_causal_dirs["llama"]), "sst2"))
    assert run.groups.fo and all("lora_" in name for name in run.groups.fo)
