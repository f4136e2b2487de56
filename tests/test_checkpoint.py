"""Checkpoint files: tensors and JSON round-trip exactly; half-written checkpoints are never
loaded; a damaged one is a one-line error that names it and changes nothing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hybridft.run import checkpoint
from tests.test_cli import assert_refused
from tests.test_optim import closure_for, hybrid_setup

pytestmark = pytest.mark.usefixtures("one_thread")


def test_optimizer_and_scheduler_state_round_trip_through_safetensors_and_json(batch, tmp_path):
    model, _, opt, sched = hybrid_setup(fo_optimizer="adamw")
    for _ in range(2):
        opt.step(closure_for(model, opt, batch))
        sched.step()
    tensors: dict[str, torch.Tensor] = {}
    text = json.dumps(checkpoint.split_tensors({"opt": opt.state_dict(), "sched": sched.state_dict()}, tensors))
    save_file(tensors, str(tmp_path / "t.safetensors"))
    back = checkpoint.join_tensors(json.loads(text), load_file(str(tmp_path / "t.safetensors")))
    state = opt.state_dict()["fo"]["state"]
    assert back["opt"]["fo"]["state"].keys() == state.keys()  # parameter indices are ints again
    for i, moments in state.items():
        for k, v in moments.items():
            assert torch.equal(back["opt"]["fo"]["state"][i][k], v), (i, k)
    assert back["sched"] == {k: list(v) if isinstance(v, tuple) else v for k, v in sched.state_dict().items()}
    assert back["opt"]["zo_group"] == opt.state_dict()["zo_group"]


@pytest.fixture
def run_dir(tiny_bert_dir, tmp_path):
    """A finished 3-step run with a checkpoint after every step (the last 2 kept)."""
    from hybridft.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_bert_dir), "--output-dir", str(out), "--train-size", "16", "--dev-size", "8",
                 "--batch-size", "8", "--steps", "3", "--checkpoint-every", "1", "--no-progress"]) == 0
    return out


def test_half_written_checkpoint_is_never_loaded_and_is_cleaned_up(run_dir):
    half = run_dir / "checkpoints" / ".tmp-step-00000009"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 10)
    assert [p.name for p in checkpoint.checkpoints(run_dir)] == ["step-00000002", "step-00000003"]
    checkpoint.remove_temporaries(run_dir)
    assert not half.exists()


def test_damaged_checkpoint_is_a_one_line_error_naming_it(run_dir, capsys):
    damaged = run_dir / "checkpoints" / "step-00000003" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    logs = {name: (run_dir / name).read_bytes() for name in ("metrics.jsonl", "zo_updates.jsonl")}
    assert_refused(["train", "--resume", str(run_dir)], capsys, f"cannot load checkpoint {damaged.parent}")
    for name, content in logs.items():
        assert (run_dir / name).read_bytes() == content  # nothing was cut back or rewritten


def test_logs_shorter_than_the_checkpoint_says_are_refused(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="shorter"):
        checkpoint.truncate_logs(tmp_path, {"metrics.jsonl": 100}, ("metrics.jsonl",))
    checkpoint.truncate_logs(tmp_path, {"metrics.jsonl": 1}, ("metrics.jsonl",))
    assert (tmp_path / "metrics.jsonl").read_text() == "{"
