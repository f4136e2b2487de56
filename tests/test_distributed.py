"""Data parallelism: 2 ranks (torchrun, gloo) with batch b end where 1 process with batch 2b ends."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hybridft.run.config import TrainConfig
from hybridft.run.distributed import World, shard_sampler
from hybridft.run.train import train

FILES = ("model/model.safetensors", "adapter/adapter_model.safetensors")


def torchrun_command(ranks: int, args: list[str]) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            "-m", "hybridft", "train", *args], env


def torchrun(ranks: int, args: list[str]) -> subprocess.CompletedProcess:
    command, env = torchrun_command(ranks, args)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_bert_fp64_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A dropout-free tiny BERT stored in float64 (loaded as float64): the two runs then differ
    only by float64 rounding, not by float32 noise amplified by 1/(2 eps) in the ZO estimate."""
    from transformers import BertModel

    from conftest import tiny_bert_config

    path = tmp_path_factory.mktemp("tiny-bert-fp64")
    torch.manual_seed(0)
    BertModel(tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).double().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_shard_sampler_gives_each_rank_a_strided_slice_of_the_global_batch():
    full = list(itertools.islice(iter(shard_sampler(37, 8, World(), seed=3, replacement=False)), 12))
    ranks = [list(itertools.islice(iter(shard_sampler(37, 4, World(r, 2), seed=3, replacement=False)), 12)) for r in (0, 1)]
    for whole, a, b in zip(full, *ranks, strict=True):
        assert a == whole[0::2] and b == whole[1::2]


@pytest.mark.parametrize("n,message", [(7, "more than the number of examples"), (25, "fewer than the 4 ranks")])
def test_shard_sampler_refuses_batches_some_rank_gets_no_example_of(n, message):
    with pytest.raises(ValueError, match=message):
        shard_sampler(n, 2, World(0, 4), seed=0, replacement=False)


def test_two_ranks_with_batch_b_end_as_one_process_with_batch_2b(tiny_bert_fp64_dir, tmp_path):
    # 37 examples in global batches of 8: the 5th batch has 5 (3 + 2 per rank), so the
    # example-weighted means are exercised; 6 steps cross into the second epoch.
    common = dict(model=str(tiny_bert_fp64_dir), dtype="float64", train_size=37, dev_size=24, steps=6, zo_lr=1e-3,
                  eval_every=3, threads=1, progress=False, plot=False)
    single = train(TrainConfig(**common, batch_size=8, output_dir=str(tmp_path / "one")))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in common.items() if not isinstance(v, bool)]
    done = torchrun(2, [*flags, "--batch-size=4", f"--output-dir={tmp_path / 'two'}", "--no-progress", "--no-plot"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("dev accuracy after 6 steps") == 1  # rank 0 alone prints

    for name in FILES:
        one, two = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
        assert one.keys() == two.keys()
        for key in one:
            assert one[key].dtype == torch.float64
            assert (one[key] - two[key]).norm() <= 1e-9 * one[key].norm() + 1e-12, key
    one_eval, two_eval = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("one", "two"))
    assert two_eval["ranks"] == 2 and two_eval["dev_accuracy_after"] == one_eval["dev_accuracy_after"]

    config = json.loads((tmp_path / "two" / "config.json").read_text())["resolved"]
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    singles = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))  # one writer
    assert [r.get("dev_accuracy") for r in records] == [r.get("dev_accuracy") for r in singles]
    # per step: the FO gradients (float64) and q = 1 projected gradient, nothing of the base
    assert {r["sent_bytes_fo"] for r in records} == {8 * config["fo_parameters"]}
    assert {r["sent_bytes_zo"] for r in records} == {8}
    trained = config["zo_parameters"] + config["fo_parameters"]
    assert config["ddp_full_finetuning_bytes_per_step"] == 8 * trained


@pytest.mark.parametrize(("method", "fo_lr"), [("lomo", 0.05), ("adalomo", 1e-3)])
def test_fused_method_on_two_ranks_with_batch_b_ends_as_one_process_with_batch_2b(tiny_bert_fp64_dir, tmp_path,
                                                                                   method, fo_lr):
    # every weight is updated inside backward: its gradient is averaged across ranks in its hook
    # (adalomo's factored second moments then see the same mean gradient on every rank)
    common = dict(model=str(tiny_bert_fp64_dir), method=method, fo_lr=fo_lr, dtype="float64", train_size=37,
                  dev_size=24, steps=6, eval_every=3, checkpoint_every=3, threads=1, progress=False, plot=False)
    train(TrainConfig(**common, batch_size=8, output_dir=str(tmp_path / "one")))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in common.items() if not isinstance(v, bool)]
    done = torchrun(2, [*flags, "--batch-size=4", f"--output-dir={tmp_path / 'two'}", "--no-progress", "--no-plot"])
    assert done.returncode == 0, done.stderr[-3000:]

    one, two = (load_file(tmp_path / d / "model/model.safetensors") for d in ("one", "two"))
    assert one.keys() == two.keys()
    for key in one:
        assert (one[key] - two[key]).norm() <= 1e-9 * one[key].norm() + 1e-12, key
    halfway, end = (load_file(tmp_path / "two" / f"checkpoints/step-{n:08d}/model.safetensors") for n in (3, 6))
    assert min(float((end[k] - halfway[k]).abs().max()) for k in end if "encoder" in k) > 0  # every layer trained
    config = json.loads((tmp_path / "two" / "config.json").read_text())["resolved"]
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert {r["sent_bytes_fo"] for r in records} == {8 * config["fo_parameters"]}  # every gradient, float64


def test_step_all_reduce_weights_by_examples_rng_states_are_gathered_and_differing_weights_caught(tmp_path):
    import torch.multiprocessing as mp

    import distributed_worker

    mp.spawn(distributed_worker.run, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank, result in enumerate(torch.load(tmp_path / f"{r}.pt") for r in (0, 1)):
        assert result["rng_ok"] == [r == rank for r in (0, 1)]  # every rank's own RNG state, in rank order
        assert torch.allclose(result["grad"], torch.full((2, 3), (3 * 1 + 1 * 2) / 4))  # (3 g_0 + 1 g_1) / 4
        assert result["scalars"].dtype == torch.float64
        assert torch.allclose(result["scalars"], torch.tensor([(3 * 10 + 20) / 4, 1 / 4], dtype=torch.float64))
        assert result["sent"] == {"fo": 6 * 4, "zo": 4, "scalars": 8}
        assert result["same"] == "same"
        assert "2 parameters differ across ranks (first: weight)" in result["different"]
        # lomo's sync: each gradient averaged 3:1 in its hook, before the update (lr 1 from 0)
        weight, agreed, sent = result["fused"]
        assert agreed and torch.equal(weight, torch.full((2, 3), -(3 * 1 + 1 * 2) / 4))
        assert sent == {"fo": 6 * 4, "zo": 0, "scalars": 2 * 8}
        weight, agreed, _ = result["fused_one_nan"]  # rank 1's loss is NaN: neither rank back-propagates
        assert not agreed and torch.equal(weight, torch.zeros(2, 3))


def start_torchrun(ranks: int, args: list[str]) -> subprocess.Popen:
    command, env = torchrun_command(ranks, args)
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: the kill takes its ranks too


@pytest.mark.slow
def test_two_rank_run_killed_and_resumed_ends_bitwise_as_an_uninterrupted_one(tiny_bert_dir, tmp_path, capsys):
    import signal
    import time

    from hybridft.cli import main

    # dropout on: each rank's RNG state differs, and the checkpoint must restore each one
    flags = ["--model", str(tiny_bert_dir), "--train-size", "40", "--dev-size", "8", "--batch-size", "4", "--steps", "8",
             "--zo-lr", "1e-3", "--checkpoint-every", "2", "--threads", "1", "--no-progress", "--no-plot"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert torchrun(2, [*flags, "--output-dir", str(whole)]).returncode == 0

    process = start_torchrun(2, [*flags, "--output-dir", str(killed)])
    metrics, deadline = killed / "metrics.jsonl", time.monotonic() + 300
    while (not metrics.exists() or metrics.read_bytes().count(b"\n") < 5) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()[-3000:]
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "eval.json").exists()

    assert main(["train", "--resume", str(killed)]) == 2  # one process cannot continue a 2-rank run
    assert "written by a run on 2 rank(s); resume it on 2, not 1" in capsys.readouterr().err
    done = torchrun(2, ["--resume", str(killed), "--no-progress"])
    assert done.returncode == 0, done.stderr[-3000:]

    for name in (*FILES, "zo_updates.jsonl"):
        assert (whole / name).read_bytes() == (killed / name).read_bytes(), name
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, 9))
