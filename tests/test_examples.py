"""The examples run as they are (on a tiny model), and the README shows them verbatim."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture
def tiny_example_env(monkeypatch, tmp_path, tiny_bert_dir):
    monkeypatch.setenv("MODEL", str(tiny_bert_dir))
    monkeypatch.setenv("STEPS", "4")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def body(path: Path) -> str:
    """An example's code without its module docstring."""
    source = path.read_text()
    assert source.startswith('"""')
    return source.split('"""', 2)[2].strip()


def test_plain_loop_example_trains_the_base_and_the_adapter(tiny_example_env, tiny_bert_dir, capsys):
    from transformers import AutoModel

    result = runpy.run_path(str(EXAMPLES / "plain_loop.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "step 0: loss" in printed and "dev accuracy:" in printed
    assert result["optimizer"].num_steps == 4
    original = AutoModel.from_pretrained(tiny_bert_dir).state_dict()["encoder.layer.0.attention.self.query.weight"]
    assert not torch.equal(result["groups"].zo["bert.encoder.layer.0.attention.self.query.weight"], original)


def test_trainer_example_trains_evaluates_and_saves_checkpoints(tiny_example_env):
    from hybridft.run import export

    result = runpy.run_path(str(EXAMPLES / "trainer.py"), run_name="__main__")
    trainer = result["trainer"]
    assert trainer.state.global_step == 4
    assert [e["step"] for e in trainer.state.log_history if "eval_accuracy" in e] == [2, 4]
    out = tiny_example_env / "runs" / "trainer-example"
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4"}
    assert (out / "checkpoint-2" / "model" / "model.safetensors").exists()
    assert export.load(out) is not None


def test_readme_shows_the_examples_verbatim():
    readme = (ROOT / "README.md").read_text()
    for name in ("trainer.py", "plain_loop.py"):
        assert body(EXAMPLES / name) in readme, f"README.md's copy of examples/{name} is out of date"
