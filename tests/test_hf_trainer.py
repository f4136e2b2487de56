"""HybridTrainer: the same run as the CLI, gradient accumulation as one big batch, exact resume
after a kill, saved base weights, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hybridft.run import export
from hybridft.run.config import TrainConfig
from hybridft.integrations.hf_trainer import HybridTrainer, HybridTrainingArguments
from hybridft.run.train import train
from tests.conftest import tiny_bert
from tests.trainer_runs import KillAt, trainer

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: tiny models on one thread


def tiny_config(model_dir: Path, **changes) -> TrainConfig:
    settings = dict(model=str(model_dir), train_size=48, dev_size=16, batch_size=8, steps=8, seed=3, zo_lr=1e-3,
                    fo_lr=1e-2, target_modules="query,value", lora_r=4, progress=False)
    return TrainConfig(**{**settings, **changes})


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tolerance) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if tolerance:
            torch.testing.assert_close(a[k], b[k], **tolerance, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


def cli_run(config: TrainConfig, out: Path) -> dict[str, torch.Tensor]:
    return weights(train(config.replace(output_dir=str(out))).model)


@pytest.mark.parametrize("method", ["hybrid", "zo-full"])
def test_trainer_and_cli_give_bitwise_the_same_weights(tiny_bert_no_dropout_dir, tmp_path, method):
    # Constant schedules: transformers' linear formula differs from the CLI's in the last bit.
    config = tiny_config(tiny_bert_no_dropout_dir, method=method, fo_schedule="constant", fo_optimizer="adamw")
    run = trainer(config, tmp_path / "trainer", logging_steps=4)
    start = weights(run.model)
    run.train()
    ours = weights(run.model)
    assert_same_weights(cli_run(config, tmp_path / "cli"), ours)
    assert any(not torch.equal(start[k], ours[k]) for k in start if "encoder.layer.0" in k)  # ZO moved the base
    logs = [entry for entry in run.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [4, 8]
    assert all({"zo_learning_rate", "projected_grad", "learning_rate"} <= set(entry) for entry in logs)
    assert logs[0]["zo_learning_rate"] == 1e-3 and logs[0]["learning_rate"] == (1e-2 if method == "hybrid" else 1e-3)


@pytest.mark.parametrize("rule", [dict(zo_directions="low-rank", zo_rank=1, zo_v_every=2),
                                  dict(zo_directions="layer-subset", zo_layer_fraction=0.5),
                                  dict(zo_directions="magnitude-mask", zo_mask_fraction=0.5),
                                  dict(zo_estimator="fzoo", num_directions=3, distribution="rademacher")])
def test_trainer_takes_the_zo_rules_and_matches_the_cli(tiny_bert_no_dropout_dir, tmp_path, rule):
    config = tiny_config(tiny_bert_no_dropout_dir, fo_schedule="constant", fo_optimizer="adamw", steps=4, **rule)
    run = trainer(config, tmp_path / "trainer")
    start = weights(run.model)
    run.train()
    ours = weights(run.model)
    assert_same_weights(cli_run(config, tmp_path / "cli"), ours)
    assert any(not torch.equal(start[k], ours[k]) for k in start if "encoder.layer" in k)


def test_gradient_accumulation_is_one_step_on_the_union_batch(tiny_bert_no_dropout_dir, tmp_path):
    # 2 micro-batches of 4 per step == the CLI's batches of 8 (same examples per step); equal up to
    # padding and summation order. Default schedules: linear for the adapter, constant for the base.
    config = tiny_config(tiny_bert_no_dropout_dir, steps=6)
    run = trainer(config.replace(batch_size=4), tmp_path / "trainer", gradient_accumulation_steps=2)
    start = weights(run.model)
    run.train()
    ours, cli = weights(run.model), cli_run(config, tmp_path / "cli")
    assert not run.model_accepts_loss_kwargs  # BERT's head ignores num_items_in_batch: found and handled
    # fp32 summation order: measured 2.2e-6 on the Rotten Tomatoes split of 2026-12-04 (4.6e-7 on the one before)
    assert_same_weights(cli, ours, atol=1e-5, rtol=0)
    moved = max((ours[k] - start[k]).abs().max().item() for k in start)
    assert moved > 100 * 1e-5  # the tolerance is far below what training changed


def test_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(tiny_bert_dir, tmp_path):
    # With dropout (global RNG) and AdamW state; the checkpoint falls in the second epoch (4 steps per epoch).
    config = tiny_config(tiny_bert_dir, train_size=32, steps=8, fo_optimizer="adamw")
    reference = trainer(config, tmp_path / "reference")
    reference.train()

    pid = os.fork()  # a real process, killed for real; forked so that it need not import torch again
    if pid == 0:
        try:
            run = trainer(config, tmp_path / "run", save_strategy="steps", save_steps=5)
            run.add_callback(KillAt(6))
            run.train()
        finally:
            os._exit(1)  # never reached when the kill works; never return into pytest
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    assert (tmp_path / "run" / "checkpoint-5" / "model" / "model.safetensors").exists()
    assert not (tmp_path / "run" / "checkpoint-6").exists()

    resumed = trainer(config, tmp_path / "run", save_strategy="steps", save_steps=5)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 8
    assert_same_weights(weights(reference.model), weights(resumed.model))

    shutil.rmtree(tmp_path / "run" / "checkpoint-5" / "model")  # an adapter-only checkpoint cannot resume ZO
    with pytest.raises(ValueError, match="base weights ZO trained"):
        trainer(config, tmp_path / "again").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-5"))


def test_save_model_keeps_the_zo_updated_base_and_reloads(tiny_bert_no_dropout_dir, tokenizer, tmp_path):
    run = trainer(tiny_config(tiny_bert_no_dropout_dir, steps=3), tmp_path / "out")
    run.train()
    run.save_model()
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").exists() and (out / "model" / "model.safetensors").exists()
    reloaded = export.load(out)
    batch = tokenizer(["a gorgeous, witty film", "dull and far too long"], padding=True, return_tensors="pt")
    run.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(run.model(**batch).logits, reloaded(**batch).logits, atol=1e-6, rtol=0)
    from transformers import AutoModel

    original = AutoModel.from_pretrained(tiny_bert_no_dropout_dir).state_dict()["encoder.layer.0.attention.self.query.weight"]
    saved = export.base_state(reloaded)["bert.encoder.layer.0.attention.self.query.weight"]
    assert not torch.equal(saved, original)


def test_load_best_model_at_end_restores_the_best_checkpoints_base_weights(tiny_bert_no_dropout_dir, tmp_path):
    runs: list[HybridTrainer] = []
    run = trainer(tiny_config(tiny_bert_no_dropout_dir, steps=3), tmp_path / "out", eval_size=8,
                  compute_metrics=lambda _: {"earliness": -runs[0].state.global_step},  # best: the first checkpoint
                  eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                  load_best_model_at_end=True, metric_for_best_model="earliness", greater_is_better=True)
    runs.append(run)
    run.train()
    assert Path(run.state.best_model_checkpoint).name == "checkpoint-1"
    key = "bert.encoder.layer.0.attention.self.query.weight"
    base = export.base_state(run.model)[key]
    first, last = (load_file(tmp_path / "out" / f"checkpoint-{s}" / "model" / "model.safetensors")[key] for s in (1, 3))
    assert torch.equal(base, first) and not torch.equal(base, last)


@pytest.mark.parametrize("changes,message", [
    ({"zo_eps": 0.0}, "zo_eps must be positive"),
    ({"zo_learning_rate": -1.0}, "zo_learning_rate must be positive"),
    ({"method": "nonsense"}, "method must be one of"),
    ({"method": "lomo"}, "method lomo updates each weight inside backward"),
    ({"zo_distribution": "uniform"}, "zo_distribution must be one of"),
    ({"zo_num_directions": 0}, "zo_num_directions must be at least 1"),
    ({"zo_directions": "sparse"}, "zo_directions must be one of"),
    ({"zo_directions": "low-rank", "zo_rank": 0}, "zo_rank must be at least 1"),
    ({"zo_directions": "layer-subset", "zo_layer_fraction": 1.5}, r"zo_layer_fraction must be in \(0, 1\]"),
    ({"zo_directions": "magnitude-mask", "zo_mask_fraction": 0.0}, r"zo_mask_fraction must be in \(0, 1\]"),
    ({"zo_estimator": "fzoo"}, "zo_num_directions must be at least 2"),
    ({"zo_estimator": "adam"}, "zo_estimator must be one of"),
])
def test_bad_hybrid_arguments_are_one_line_errors(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message) as error:
        HybridTrainingArguments(output_dir=str(tmp_path / "out"), **changes)
    assert len(str(error.value).splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_trainer_refuses_plain_arguments_and_a_model_without_adapter(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(ValueError, match="HybridTrainingArguments"):
        HybridTrainer(model=tiny_bert(), args=TrainingArguments(output_dir=str(tmp_path / "a")))
    with pytest.raises(ValueError, match="needs an adapter"):
        HybridTrainer(model=tiny_bert(), args=HybridTrainingArguments(output_dir=str(tmp_path / "b")))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow  # two fresh processes importing torch and transformers: about a minute on 2 busy cores
def test_two_processes_under_accelerate_launch_match_one_process_on_the_whole_batch(tiny_bert_no_dropout_dir, tmp_path):
    # Each step: 2 processes x 4 examples (gloo DDP for the adapter, an all-reduced ZO loss for the
    # base) against the CLI's single process on the same 8 examples.
    config = tiny_config(tiny_bert_no_dropout_dir, steps=6)
    (tmp_path / "config.json").write_text(json.dumps(config.replace(batch_size=4).to_dict()))
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "-m", "tests.accelerate_run", str(tmp_path / "config.json"), str(tmp_path / "run")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "world.json").read_text()) == {"world_size": 2, "global_step": 6}
    distributed = load_file(tmp_path / "run" / "weights.safetensors")
    assert_same_weights(cli_run(config, tmp_path / "cli"), distributed, atol=2e-6, rtol=0)  # measured: 4.6e-7
