"""Divergence guard: a non-finite loss, projected gradient or FO gradient never reaches the
weights; a run stops after max_bad_steps such steps in a row, with its last good checkpoint intact."""

from __future__ import annotations

import math

import pytest
import torch

from hybridft.run import checkpoint
from hybridft.data.formulations import SequenceClassification, head_loss
from hybridft.cli import main
from hybridft.run.config import TrainConfig
from hybridft.run.train import TrainingDiverged, build, train
from tests.test_optim import closure_for, hybrid_setup, weights

pytestmark = pytest.mark.usefixtures("one_thread")


def poisoned(closure, *, on_call=None, grad_only=False):
    """``closure`` whose loss is NaN on call number ``on_call`` (1-based), or, with ``grad_only``,
    whose FO backward produces NaN gradients while the returned loss stays finite."""
    calls = [0]

    def wrapped():
        calls[0] += 1
        if grad_only and torch.is_grad_enabled():
            loss = closure()
            for p in (p for g in wrapped.opt.fo_optimizer.param_groups for p in g["params"] if p.grad is not None):
                p.grad.fill_(math.nan)
            return loss
        loss = closure()
        return loss * math.nan if calls[0] == on_call else loss

    return wrapped


@pytest.mark.parametrize("method,case", [("hybrid", "zo-loss"), ("hybrid", "fo-loss"), ("hybrid", "fo-grad"),
                                         ("zo-full", "zo-loss")])
def test_bad_step_is_skipped_and_weights_are_bitwise_unchanged(batch, method, case):
    model, _, opt, _ = hybrid_setup(method, fo_optimizer="adamw")
    clean = closure_for(model, opt, batch)
    closure = {"zo-loss": lambda: poisoned(clean, on_call=1), "fo-loss": lambda: poisoned(clean, on_call=3),
               "fo-grad": lambda: poisoned(clean, grad_only=True)}[case]()
    closure.opt = opt
    before = weights(model)
    opt.step(closure)
    assert opt.skipped and opt.skipped_steps == 1 and opt.last_update is None and opt.num_steps == 1
    after = weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    if opt.fo_optimizer is not None:
        assert not opt.fo_optimizer.state  # AdamW never stepped: no moments from a NaN gradient
        assert all(p.grad is None for g in opt.fo_optimizer.param_groups for p in g["params"])
    opt.step(clean)  # the next good step goes through
    assert not opt.skipped and opt.skipped_steps == 1 and (opt.last_update is not None) == (method != "fo-lora")
    assert opt.state_dict()["skipped_steps"] == 1


def test_run_stops_after_consecutive_bad_steps_keeping_the_last_good_checkpoint(tiny_bert_dir, tmp_path, monkeypatch):
    """Losses turn NaN from step 5 on (3 loss evaluations per hybrid step); checkpoints every 2 steps."""
    calls = [0]
    original = head_loss

    def loss(model, batch):
        calls[0] += 1
        value = original(model, batch)
        return value * math.nan if calls[0] > 4 * 3 else value

    monkeypatch.setattr(SequenceClassification, "loss", staticmethod(loss))
    out = tmp_path / "run"
    config = TrainConfig(model=str(tiny_bert_dir), train_size=40, dev_size=8, batch_size=8, steps=10, checkpoint_every=2,
                         max_bad_steps=3, progress=False, output_dir=str(out))
    with pytest.raises(TrainingDiverged, match=r"3 consecutive steps \(up to step 7\).*step-00000004"):
        train(config)
    assert [p.name for p in checkpoint.checkpoints(out)] == ["step-00000002", "step-00000004"]  # none during the bad steps
    assert not (out / "eval.json").exists() and not (out / "model").exists()
    run = build(config)
    state = checkpoint.load(run, checkpoint.checkpoints(out)[-1])
    assert state["step"] == 4 and run.optimizer.num_steps == 4
    assert all(bool(torch.isfinite(p).all()) for p in run.model.parameters())


def test_cli_divergence_is_one_line_exit_1(tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_bert_dir), "--output-dir", str(out), "--train-size", "40", "--dev-size", "8",
            "--batch-size", "8", "--steps", "10", "--zo-lr", "1e12", "--max-bad-steps", "2", "--no-progress"]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "step 2: non-finite loss or gradient; step skipped" in captured.out  # on the progress stream
    err = captured.err.strip()
    assert err.endswith("Lower the learning rates.") and len(err.splitlines()) == 1, err
