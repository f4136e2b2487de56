"""The smoothness measurement on a (tiny) transformers model: it leaves the model as it found it,
its ZO check uses the optimizer's own directions, `hybridft smoothness` writes its outputs, and
`hybridft train --lr auto` trains with the advice."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from hybridft.cli import main
from hybridft.run.config import TrainConfig
from hybridft.theory.config import SmoothnessConfig
from hybridft.theory.eps import eps_scan
from hybridft.theory.pairs import block_grads
from hybridft.theory.smoothness import batch_loss, measure, run_blocks
from hybridft.run.train import build

TINY = ["--train-size", "64", "--dev-size", "16", "--batch-size", "8", "--no-progress", "--threads", "1"]
QUICK = ["--start-batches", "2", "--variance-batches", "3", "--points", "1", "--every", "1",
         "--bootstrap", "20", "--eps-directions", "1", "--eps-grid", "1e-3,1e-2"]


def tiny_run(model_dir, **changes) -> object:
    config = TrainConfig(model=str(model_dir), train_size=64, dev_size=16, batch_size=8, progress=False, threads=1,
                         **changes)
    return build(config)


@pytest.fixture(scope="module")
def measured(tiny_bert_dir, tmp_path_factory):
    """One `hybridft smoothness` run: (its output directory, what it printed)."""
    out = tmp_path_factory.mktemp("theory") / "smooth"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["smoothness", "--model", str(tiny_bert_dir), "--output-dir", str(out), *TINY, *QUICK]) == 0
    return out, printed.getvalue()


def test_measurement_restores_every_weight_and_never_writes_grad(tiny_bert_dir):
    run = tiny_run(tiny_bert_dir)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    settings = SmoothnessConfig(start_batches=2, variance_batches=3, eps_directions=1, eps_grid="1e-3")
    m = measure(run, settings, trajectory=False)
    assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())
    assert all(not p.requires_grad and p.grad is None for p in run.groups.zo.values())
    assert {p.kind for p in m.data.pairs} == {"gradient", "random", "power"}
    assert all(p.ratio["theta"] > 0 and p.ratio["phi"] > 0 for p in m.data.pairs)
    assert m.data.gram["theta"].shape == (3, 3) and m.data.loss_gap > 0


def test_eps_scan_compares_the_engine_estimate_with_the_exact_projection(tiny_bert_dir):
    """With the optimizer's own z, the two-sided estimate at a moderate eps is within a few percent
    of z . grad; a mismatched z would be off by about 100%."""
    run = tiny_run(tiny_bert_dir)
    loss_fn = batch_loss(run, list(range(8)))
    _, grads = block_grads(run.model, run_blocks(run), loss_fn)
    scan = eps_scan(run.model, run.groups.zo, grads["theta"], loss_fn, eps_grid=[1e-3, 1.0], directions=3, seed=0)
    assert scan[0]["error"] < 0.05 and scan[1]["error"] > scan[0]["error"], scan


def test_cli_smoothness_writes_estimates_with_intervals_and_a_plot(measured, tiny_bert_dir, capsys):
    out, printed = measured
    assert "advice zo_lr" in printed and "advice fo_lr" in printed and "advice eps" in printed
    record = json.loads((out / "smoothness.json").read_text())
    fit = next(f for f in record["fits"] if (f["measured"], f["moved"], f["kind"]) == ("theta", "theta", "all"))
    assert fit["lipschitz"]["low"] <= fit["lipschitz"]["value"] <= fit["lipschitz"]["high"]
    assert record["advice"]["zo_lr"] > 0 and record["advice"]["fo_lr"] > 0
    assert (out / "ratios.png").stat().st_size > 10_000
    assert main(["smoothness", "--model", str(tiny_bert_dir), "--output-dir", str(out), *TINY, *QUICK]) == 2
    assert "already holds a measurement" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--kinds", "power"], "--kinds must include gradient and random"),
    (["--variance-batches", "1"], "--variance-batches must be at least 2"),
    (["--lr", "auto"], "drop --lr"),
])
def test_cli_smoothness_bad_input_is_one_line_and_writes_nothing(tiny_bert_dir, tmp_path, capsys, flags, message):
    out = tmp_path / "bad"
    assert main(["smoothness", "--model", str(tiny_bert_dir), "--output-dir", str(out), *TINY, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_lr_auto_trains_with_the_advice_and_reuses_a_measurement(measured, tiny_bert_dir, tmp_path, capsys):
    run_dir = tmp_path / "auto"
    args = ["train", "--model", str(tiny_bert_dir), *TINY, "--steps", "2", "--lr", "auto", "--fo-optimizer", "sgd"]
    assert main([*args, "--output-dir", str(run_dir)]) == 0
    assert "--lr auto (measured in" in capsys.readouterr().out
    config = json.loads((run_dir / "config.json").read_text())
    defaults = TrainConfig()
    assert config["lr"] is None and config["zo_lr"] > 0 and config["fo_lr"] > 0  # resolved: resume reuses them
    assert (config["zo_lr"], config["fo_lr"]) != (defaults.zo_lr, defaults.fo_lr)

    measurement = measured[0] / "smoothness.json"
    assert main([*args, "--output-dir", str(tmp_path / "reuse"), "--smoothness", str(measurement),
                 "--fo-optimizer", "adamw"]) == 0
    printed = capsys.readouterr().out
    assert str(measurement) in printed and "kept: the advice" in printed
    reused = json.loads((tmp_path / "reuse" / "config.json").read_text())
    assert reused["fo_lr"] == defaults.fo_lr and reused["zo_lr"] != defaults.zo_lr
    other = tmp_path / "other"  # a measurement of other blocks: one line, nothing written
    assert main([*args, "--output-dir", str(other), "--smoothness", str(measurement), "--method", "fo-lora"]) == 2
    assert "another model, adapter or method" in capsys.readouterr().err and not other.exists()
