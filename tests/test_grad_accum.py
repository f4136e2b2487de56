"""--grad-accum K: one hybrid step on the union of K micro-batches of --batch-size examples, equal
to a step with --batch-size K x B (HybridTrainer's semantics); resume and replay stay exact."""

from __future__ import annotations

import json

import pytest
import torch

from hybridft.run import checkpoint
from hybridft.run.closure import micro_batches
from hybridft.run.config import TrainConfig
from hybridft.run.train import build, train_step
from tests.test_cli import assert_refused
from tests.test_resume import assert_bitwise_equal, kill_after, metrics_without_time, run_to_end

pytestmark = pytest.mark.usefixtures("one_thread")


def trained(model, **changes) -> tuple[dict[str, torch.Tensor], list[float], list[list[int]], dict[str, torch.Tensor]]:
    """(weights after, losses, the examples of each step, weights before) of a 4-step run on 20
    examples: steps of 8, 8, 4 (the end of the epoch) and 8 examples."""
    settings = dict(model=str(model), train_size=20, dev_size=4, test_size=4, steps=4, zo_lr=1e-3, fo_lr=1e-2,
                    threads=1, progress=False)
    run = build(TrainConfig(**(settings | changes)))
    start = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    losses, steps = [], []
    for step, indices in zip(range(run.steps), run.sampler):
        steps.append(indices)
        losses.append(train_step(run, step, indices)["loss"])
    return {k: v.detach().clone() for k, v in run.model.state_dict().items()}, losses, steps, start


def varied_task(tmp_path) -> str:
    """A task file whose label words differ in length, so micro-batches hold different numbers of
    continuation tokens (the terms a causal LM's loss averages)."""
    rows = "review,sentiment\n" + "".join(f"a witty film {i},pos\nfar too long {i},neg\n" for i in range(12))
    (tmp_path / "train.csv").write_text(rows)
    (tmp_path / "task.yaml").write_text("train: train.csv\ntext: review\nlabel: sentiment\n"
                                        "label_words: {neg: dull, pos: a gorgeous and witty film}\ntemplate: '{review} It was'\n")
    return str(tmp_path / "task.yaml")


@pytest.mark.parametrize("case", ["bert-hybrid", "bert-fused", "bert-zo-lora", "llama-tokens"])
def test_accumulated_steps_equal_steps_on_the_union_batch(case, tiny_bert_no_dropout_dir, tiny_causal_dirs, tmp_path):
    # No dropout: the union batch and its micro-batches then compute the same function; equal up to
    # padding and summation order (measured: at most 2.6e-6 on BERT, 1.2e-5 on Llama, through Adam's
    # normalisation); weighing micro-batches by examples instead of tokens would differ by 2.4e-2 on Llama.
    if case == "llama-tokens":
        model, flags = tiny_causal_dirs["llama"], dict(task=varied_task(tmp_path), target_modules="q_proj,v_proj")
    else:
        model = tiny_bert_no_dropout_dir
        flags = dict(target_modules="query,value", **{"bert-fused": {"fused": True},
                                                      "bert-zo-lora": {"method": "zo-lora"}}.get(case, {}))
    union, union_losses, union_steps, start = trained(model, batch_size=8, **flags)
    for k, b in ((2, 4), (4, 2)):
        weights, losses, steps, _ = trained(model, batch_size=b, grad_accum=k, **flags)
        assert steps == union_steps and [len(s) for s in steps] == [8, 8, 4, 8]  # the sampler draws K x B per step
        assert losses == pytest.approx(union_losses, rel=1e-5)
        for name in union:
            torch.testing.assert_close(weights[name], union[name], atol=3e-5, rtol=0, msg=f"{name}, K={k}")
    moved = max((union[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3  # far above the tolerance


def test_micro_batches_cut_a_step_into_at_most_k_even_slices():
    assert micro_batches(list(range(8)), 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert micro_batches(list(range(4)), 4) == [[0], [1], [2], [3]]
    assert micro_batches(list(range(5)), 2) == [[0, 1, 2], [3, 4]]  # the end of an epoch
    assert micro_batches([7], 4) == [[7]]


FLAGS = ["--train-size", "40", "--dev-size", "8", "--batch-size", "4", "--grad-accum", "2", "--steps", "8",
         "--zo-lr", "1e-3", "--checkpoint-every", "2", "--threads", "1", "--no-progress"]


def test_a_killed_accumulating_run_resumes_to_the_uninterrupted_run_and_replays(tiny_bert_dir, tmp_path, capsys):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_to_end(["train", "--model", str(tiny_bert_dir), "--output-dir", str(reference), *FLAGS])
    assert json.loads((reference / "config.json").read_text())["grad_accum"] == 2
    kill_after(["train", "--model", str(tiny_bert_dir), "--output-dir", str(killed), *FLAGS], killed, 5)
    assert checkpoint.checkpoints(killed)  # killed after a checkpoint, maybe with steps logged after it
    run_to_end(["train", "--resume", str(killed), "--threads", "1", "--no-progress"])
    for part in ("model/model.safetensors", "adapter/adapter_model.safetensors"):
        assert_bitwise_equal(reference / part, killed / part)
    assert (reference / "zo_updates.jsonl").read_bytes() == (killed / "zo_updates.jsonl").read_bytes()
    assert metrics_without_time(reference) == metrics_without_time(killed)

    run_to_end(["replay", str(reference)])
    assert_bitwise_equal(reference / "model" / "model.safetensors", reference / "replayed" / "model" / "model.safetensors")
    assert_refused(["train", "--resume", str(killed), "--grad-accum", "4"], capsys,
                   "--grad-accum 4: the run was started with 2")


@pytest.mark.parametrize("flags,message", [
    (["--grad-accum", "0"], "--grad-accum must be at least 1, got 0"),
    (["--grad-accum", "2", "--embedding-rows"], "--embedding-rows needs --grad-accum 1"),
    (["--grad-accum", "2", "--lr", "auto"], "--lr auto measures and advises for steps of one --batch-size batch"),
])
def test_bad_grad_accum_is_one_line(flags, message, tiny_bert_dir, tmp_path, capsys):
    assert_refused(["train", "--model", str(tiny_bert_dir), "--output-dir", str(tmp_path / "run"), "--no-progress",
                    *flags], capsys, message)
