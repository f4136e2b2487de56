"""End to end: the CLI trains a tiny model, writes its outputs, and they load back in plain transformers + peft."""

from __future__ import annotations

import json

import pytest
import torch

from hybridft.run import export
from hybridft.cli import main
from hybridft.run.config import TrainConfig, load_yaml
from hybridft.data.formulations import formulation
from hybridft.data.tasks import load_task, subsample
from hybridft.run.train import train

TINY = ["--train-size", "64", "--dev-size", "32", "--batch-size", "8", "--steps", "3", "--no-progress"]


def assert_refused(args: list[str], capsys: pytest.CaptureFixture[str], message: str, code: int = 2) -> None:
    """``hybridft ARGS`` exits with ``code`` and one line on stderr that contains ``message``."""
    assert main(args) == code
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_cli_trains_and_writes_every_output(tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_bert_dir), "--output-dir", str(out), "--eval-every", "2", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "dev accuracy before training" in printed and "dev accuracy after 3 steps" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "hybrid" and config["resolved"]["steps"] == 3
    assert config["resolved"]["zo_parameters"] > config["resolved"]["fo_parameters"] > 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert {"step", "epoch", "loss", "zo_lr", "fo_lr", "projected_grad", "seconds"} <= set(lines[0])
    assert ["dev_accuracy" in r for r in lines] == [False, True, False]  # every 2 steps; the last is eval.json's
    evaluation = json.loads((out / "eval.json").read_text())
    assert {"dev_accuracy_before", "dev_accuracy_after"} <= set(evaluation)
    assert 0 <= lines[1]["dev_accuracy"] <= 1 and evaluation["peak_memory_mib"] > 0
    assert (out / "model" / "model.safetensors").exists() and (out / "adapter" / "adapter_model.safetensors").exists()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    assert (out / "loss.png").stat().st_size > 0


@pytest.mark.parametrize("method", ["hybrid", "zo-full"])
def test_saved_model_reloads_with_same_predictions_and_keeps_zo_updates(tiny_bert_dir, tmp_path, method):
    config = TrainConfig(model=str(tiny_bert_dir), method=method, train_size=64, dev_size=32, batch_size=8, steps=3,
                         zo_lr=1e-3, progress=False, output_dir=str(tmp_path / method))
    result = train(config)
    reloaded = export.load(result.output_dir)
    task = load_task("rotten_tomatoes")
    batch = formulation(task, "encoder").encode(result.tokenizer, subsample(task.dev, 32, 0), device=torch.device("cpu"))
    batch.pop("labels")
    result.model.eval()
    with torch.no_grad():
        assert torch.allclose(result.model(**batch).logits, reloaded(**batch).logits, atol=1e-6)
    # the base weights that ZO changed were saved, not the checkpoint's originals
    from transformers import AutoModel

    original = AutoModel.from_pretrained(tiny_bert_dir).state_dict()["encoder.layer.0.attention.self.query.weight"]
    saved = reloaded.state_dict()
    key = next(k for k in saved if k.endswith("encoder.layer.0.attention.self.query.base_layer.weight")
               or k.endswith("encoder.layer.0.attention.self.query.weight"))
    assert not torch.equal(saved[key], original)


def test_same_seed_gives_bitwise_identical_runs(tiny_bert_dir, tmp_path):
    def run(seed, name):
        config = TrainConfig(model=str(tiny_bert_dir), train_size=64, dev_size=16, batch_size=8, steps=3, seed=seed,
                             zo_lr=1e-3, progress=False, output_dir=str(tmp_path / name))
        return {k: v.clone() for k, v in train(config).model.state_dict().items()}

    a, b, c = run(0, "a"), run(0, "b"), run(1, "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k in c)


def test_yaml_config_and_flags_override_it(tiny_bert_dir, tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"model: {tiny_bert_dir}\nmethod: fo-lora\nsteps: 5\nfo-lr: 0.2\n")
    out = tmp_path / "yaml-run"
    assert main(["train", "--config", str(yaml_file), "--steps", "2", "--output-dir", str(out), *TINY[:6], "--no-progress"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["method"], config["steps"], config["fo_lr"]) == ("fo-lora", 2, 0.2)


@pytest.mark.parametrize("flags,message", [
    (["--zo-lr", "0"], "--zo-lr must be positive"),
    (["--eps", "-1"], "--eps must be positive"),
    (["--task", "nonsense"], "unknown task"),
    (["--model", "/nonexistent/model"], "cannot load model"),
    (["--batch-size", "1000"], "batch size 1000"),
    (["--target-modules", "no_such_module"], "peft could not wrap"),
    (["--fo-lr", "-0.001"], "--fo-lr must be positive"),
    (["--method", "nonsense"], "invalid choice: 'nonsense'"),
    (["--steps", "many"], "invalid int value: 'many'"),
    (["--train-size", "0"], "--train-size must be at least 1"),
    (["--dev-size", "0"], "--dev-size must be at least 1"),
    (["--model", "no-such-org/no-such-model"], "cannot load model 'no-such-org/no-such-model'"),
    (["--config", "/nonexistent/run.yaml"], "No such file or directory"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_bert_dir, tmp_path, capsys, flags, message):
    out = tmp_path / "bad"
    assert_refused(["train", "--model", str(tiny_bert_dir), "--output-dir", str(out), *TINY, *flags], capsys, message)
    assert not out.exists()


@pytest.mark.parametrize("text,message", [
    ("lora-r: [1,", "is not valid YAML"),
    ("- lora-r\n- 3\n", "expected a mapping of config fields"),
    ("lora-rank: 3\n", "unknown config field(s) lora_rank"),
    ("lora-r: many\n", "lora_r must be int, got 'many'"),
    ("zo-lr: fast\n", "zo_lr must be float, got 'fast'"),
    ("method: nonsense\n", "--method must be one of"),
])
def test_malformed_config_file_is_one_line_exit_2_and_writes_nothing(tiny_bert_dir, tmp_path, capsys, text, message):
    yaml_file, out = tmp_path / "run.yaml", tmp_path / "bad"
    yaml_file.write_text(text)
    assert_refused(["train", "--config", str(yaml_file), "--model", str(tiny_bert_dir), "--output-dir", str(out), *TINY],
                   capsys, message)
    assert not out.exists()


def test_yaml_exponent_floats_are_floats(tmp_path):
    """PyYAML reads 1e-3 (no dot) as a string; a float field takes it as the number."""
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("zo-lr: 1e-3\nfo_lr: 2E-4\n")
    assert load_yaml(yaml_file) == {"zo_lr": 1e-3, "fo_lr": 2e-4}


def test_output_dir_that_is_a_file_is_refused_and_left_alone(tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "a-file"
    out.write_text("keep me")
    assert_refused(["train", "--model", str(tiny_bert_dir), "--output-dir", str(out), *TINY], capsys, "is not a directory")
    assert out.read_text() == "keep me"


def test_remote_code_runs_only_with_the_flag(tiny_bert_dir, tmp_path, capsys):
    model = tmp_path / "custom"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "my_custom_bert", "auto_map": {
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForSequenceClassification": "modeling_custom.CustomModel"}}))
    (model / "configuration_custom.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    out = tmp_path / "bad"
    assert_refused(["train", "--model", str(model), "--output-dir", str(out), *TINY], capsys, "pass --trust-remote-code")
    assert not (tmp_path / "ran").exists() and not out.exists()


def test_max_length_beyond_the_context_truncates_with_one_warning(tiny_bert_dir, tmp_path, capsys):
    """IMDB reviews run to thousands of tokens; the tiny model has 128 positions."""
    out = tmp_path / "long"
    args = ["train", "--model", str(tiny_bert_dir), "--task", "imdb", "--max-length", "4096", "--output-dir", str(out),
            "--train-size", "16", "--dev-size", "8", "--batch-size", "8", "--steps", "1", "--no-progress"]
    with pytest.warns(UserWarning, match="exceeds the model's context of 128 tokens") as caught:
        assert main(args) == 0
    assert len([w for w in caught if "context" in str(w.message)]) == 1
    assert json.loads((out / "config.json").read_text())["resolved"]["max_length"] == 128


def test_existing_run_is_not_overwritten_without_flag(tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_bert_dir), "--output-dir", str(out), *TINY]
    assert main(args) == 0
    before = (out / "metrics.jsonl").read_bytes()
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_bytes() == before
    assert main([*args, "--overwrite"]) == 0


def test_every_config_field_is_in_exactly_one_help_section(capsys):
    """A new TrainConfig field must be given a section of ``train --help`` (cli.FLAG_GROUPS)."""
    import dataclasses
    from collections import Counter

    from hybridft.cli import FLAG_GROUPS

    counts = Counter(name for names in FLAG_GROUPS.values() for name in names)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(counts) == fields, f"no section: {fields - set(counts)}; not a field: {set(counts) - fields}"
    assert [name for name, n in counts.items() if n > 1] == []
    assert main(["train", "--help"]) == 0
    printed = capsys.readouterr().out
    assert all(f"\n{title}:\n" in printed for title in FLAG_GROUPS), printed
