"""hybridft eval (zero-shot) and training on a user's task file, through the command line."""

from __future__ import annotations

import json

import pytest

from hybridft.cli import main
from hybridft.run.config import TrainConfig
from hybridft.run.train import build
from shared_data import DATA, needs_data
from test_tasks import classification_task

SMALL = ["--dev-size", "8", "--test-size", "8", "--threads", "1"]


@needs_data
@pytest.mark.parametrize("family,task", [("llama", "wsc"), ("bert", "sst2"), ("bert", "winogrande_xs")])
def test_zero_shot_equals_where_training_starts(family, task, tiny_causal_dirs, tiny_bert_dir, capsys):
    model = str(tiny_bert_dir if family == "bert" else tiny_causal_dirs[family])
    assert main(["eval", "--model", model, "--task", task, "--data-dir", str(DATA), *SMALL]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"zero-shot accuracy of {model} on {task}") and "dev " in line and "(8 examples), test " in line
    run = build(TrainConfig(model=model, task=task, data_dir=str(DATA), dev_size=8, test_size=8, batch_size=4, threads=1))
    assert f"dev {run.dev_accuracy():.4f} (8 examples)" in line and f"test {run.test_accuracy():.4f} (8 examples)" in line


def test_a_user_task_file_trains_a_causal_lm_from_the_command_line(tiny_causal_dirs, tmp_path, capsys):
    task = classification_task(tmp_path)
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_causal_dirs["gpt2"]), "--task", str(task), "--batch-size", "4", "--steps", "2",
            "--no-progress", "--threads", "1", "--output-dir", str(out)]
    assert main(args) == 0
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["dev_size"] == 2 and evaluation["test_accuracy_after"] is None
    assert json.loads((out / "config.json").read_text())["resolved"]["formulation"] == "CandidateScoring"


@pytest.mark.parametrize("flags,message", [
    (["--task", "nonsense"], "unknown task 'nonsense'"),
    (["--task", "sst2", "--data-dir", "/nonexistent"], "/nonexistent: data directory not found"),
])
def test_bad_eval_input_is_one_line_and_exit_2(tiny_bert_dir, capsys, flags, message):
    assert main(["eval", "--model", str(tiny_bert_dir), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_a_trained_causal_lm_reloads_with_the_same_scores(tiny_causal_dirs, tmp_path):
    import torch

    from hybridft.run import export
    from hybridft.run.train import train

    config = TrainConfig(model=str(tiny_causal_dirs["llama"]), task=str(classification_task(tmp_path)), batch_size=4,
                         steps=2, zo_lr=0.1, eps=0.05, threads=1, progress=False, output_dir=str(tmp_path / "run"))
    result = train(config)
    run = build(config)
    batch = run.batch(list(range(4)))
    result.model.eval()
    with torch.no_grad():
        assert torch.allclose(run.formulation.scores(result.model, batch),
                              run.formulation.scores(export.load(result.output_dir), batch), atol=1e-5)
