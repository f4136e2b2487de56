"""Faults: a CLI run killed with SIGKILL at random steps (and once while writing a checkpoint)
and resumed ends bitwise equal to an uninterrupted run (weights, ZO log, metrics); replaying
the ZO log rebuilds the trained weights.

Each run is the CLI in a forked child process (no second import of torch), with one thread,
so that every run computes with the same kernels.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hybridft.run import checkpoint
from hybridft.cli import main
from tests.test_cli import assert_refused

STEPS = 12
FLAGS = ["--train-size", "40", "--dev-size", "8", "--batch-size", "8", "--steps", str(STEPS), "--zo-lr", "1e-3",
         "--checkpoint-every", "2", "--keep-checkpoints", "2", "--threads", "1", "--no-progress"]


def _cli(args: list[str]) -> None:
    os._exit(main(args))


def _cli_dying_mid_checkpoint(args: list[str]) -> None:
    """The CLI, SIGKILLed by itself while its next checkpoint is half written (model file only)."""
    def save_model(*a: object, **k: object) -> None:
        original(*a, **k)
        os.kill(os.getpid(), signal.SIGKILL)

    original, checkpoint.save_model = checkpoint.save_model, save_model
    os._exit(main(args))


def start(args: list[str], target=_cli) -> multiprocessing.Process:
    process = multiprocessing.get_context("fork").Process(target=target, args=(args,))
    process.start()
    return process


def run_to_end(args: list[str]) -> None:
    process = start(args)
    process.join(timeout=300)
    assert process.exitcode == 0, (args, process.exitcode)


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def kill_after(args: list[str], out: Path, steps: int) -> int:
    """Start the CLI and SIGKILL it as soon as ``steps`` steps are logged; the steps logged then."""
    process = start(args)
    deadline = time.monotonic() + 300
    while logged_steps(out) < steps and process.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.join()
    assert process.exitcode == -signal.SIGKILL, "the run ended before it could be killed"
    return logged_steps(out)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_bitwise_equal(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k].view(-1).view(torch.uint8), tb[k].view(-1).view(torch.uint8)), k


def metrics_without_time(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_at_random_steps_then_resume_is_bitwise_equal_to_uninterrupted(tiny_bert_dir, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_to_end(["train", "--model", str(tiny_bert_dir), "--output-dir", str(reference), *FLAGS])

    rng = random.Random(5)
    kill_points = sorted(rng.sample(range(1, STEPS), 3))
    between_checkpoints = 0
    for i, steps in enumerate(kill_points):
        args = ["train", "--resume", str(killed), "--threads", "1"] if i else \
               ["train", "--model", str(tiny_bert_dir), "--output-dir", str(killed), *FLAGS]
        logged = kill_after(args, killed, steps)
        assert (killed / ".lock").exists()  # left by the killed run; its lock died with it, so --resume runs
        saved = checkpoint.checkpoints(killed)
        between_checkpoints += logged > (int(saved[-1].name.split("-")[1]) if saved else 0)
    assert between_checkpoints, "no kill left steps logged after the last checkpoint"
    before = checkpoint.checkpoints(killed)
    dying = start(["train", "--resume", str(killed), "--threads", "1"], target=_cli_dying_mid_checkpoint)
    dying.join(timeout=300)
    assert dying.exitcode == -signal.SIGKILL and list((killed / "checkpoints").glob(".tmp-*"))
    assert checkpoint.checkpoints(killed) == before  # the half-written one is not a checkpoint
    run_to_end(["train", "--resume", str(killed), "--threads", "1", "--no-progress"])

    assert_bitwise_equal(reference / "model" / "model.safetensors", killed / "model" / "model.safetensors")
    assert_bitwise_equal(reference / "adapter" / "adapter_model.safetensors", killed / "adapter" / "adapter_model.safetensors")
    assert (reference / "zo_updates.jsonl").read_bytes() == (killed / "zo_updates.jsonl").read_bytes()
    assert metrics_without_time(reference) == metrics_without_time(killed)
    assert [r["step"] for r in metrics_without_time(killed)] == list(range(1, STEPS + 1))
    assert len(checkpoint.checkpoints(killed)) == 2
    assert not list((killed / "checkpoints").glob(".tmp-*")) and not (killed / ".lock").exists()

    # the ZO log + the saved adapter rebuild the trained model bit for bit
    run_to_end(["replay", str(reference)])
    assert_bitwise_equal(reference / "model" / "model.safetensors", reference / "replayed" / "model" / "model.safetensors")
    assert_bitwise_equal(reference / "adapter" / "adapter_model.safetensors",
                         reference / "replayed" / "adapter" / "adapter_model.safetensors")
    assert len((reference / "zo_updates.jsonl").read_text().splitlines()) == STEPS


def test_replay_rebuilds_a_zo_full_run_from_the_log_alone(tiny_bert_dir, tmp_path):
    out = tmp_path / "zo-full"
    run_to_end(["train", "--model", str(tiny_bert_dir), "--output-dir", str(out), "--method", "zo-full",
                *FLAGS[:6], "--steps", "4", "--zo-lr", "1e-2", "--threads", "1", "--no-progress"])
    run_to_end(["replay", str(out), "--output-dir", str(tmp_path / "rebuilt")])
    assert_bitwise_equal(out / "model" / "model.safetensors", tmp_path / "rebuilt" / "model" / "model.safetensors")
    initial = tensors(tiny_bert_dir / "model.safetensors")
    trained = tensors(out / "model" / "model.safetensors")
    assert any(not torch.equal(initial[k], trained["bert." + k]) for k in initial if "bert." + k in trained)


@pytest.mark.parametrize("flags,message", [
    (["--seed", "1"], "--seed 1: the run was started with 0"),
    (["--batch-size", "4"], "--batch-size 4: the run was started with 8"),
    (["--method", "zo-full"], "--method zo-full"),
    (["--model", "other"], "--model other"),
])
def test_resume_refuses_a_changed_trajectory_field(tiny_bert_dir, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    out.mkdir()
    config = {"model": str(tiny_bert_dir), "batch_size": 8, "seed": 0, "output_dir": str(out)}
    checkpoint.write_atomically(out / "config.json", json.dumps(config))
    assert_refused(["train", "--resume", str(out), *flags], capsys, message)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_replay_refuses_a_run_without_zo_updates_or_without_a_run(tiny_bert_dir, tmp_path, capsys, one_thread):
    out = tmp_path / "fo-lora"
    out.mkdir()
    checkpoint.write_atomically(out / "config.json", json.dumps({"model": str(tiny_bert_dir), "method": "fo-lora"}))
    (out / "zo_updates.jsonl").touch()
    assert_refused(["replay", str(out)], capsys, "method 'fo-lora' makes no ZO updates")
    assert_refused(["replay", str(tmp_path / "nothing")], capsys, "holds no run")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "zo_updates.jsonl"]


def test_resume_needs_a_run(tmp_path, capsys):
    assert_refused(["train", "--resume", str(tmp_path / "nothing")], capsys, "holds no run")
    assert not (tmp_path / "nothing").exists()


def subprocess_cli(args: list[str]):
    """The installed entry point's code path, ``python -m hybridft``, in a fresh interpreter."""
    import subprocess
    import sys

    import hybridft

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(hybridft.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "hybridft", *args], env=env, stdout=subprocess.DEVNULL)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["hybrid", "zo-full"])
def test_sigkill_at_random_times_in_fresh_interpreters(tiny_bert_dir, tmp_path, method):
    """Five kills at random moments (mid-step or mid-checkpoint: one is written every step)."""
    flags = [*FLAGS, "--method", method, "--steps", "20", "--checkpoint-every", "1"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert subprocess_cli(["train", "--model", str(tiny_bert_dir), "--output-dir", str(reference), *flags]).wait() == 0
    rng, kills, mid_write = random.Random(7), 0, 0
    args = ["train", "--model", str(tiny_bert_dir), "--output-dir", str(killed), *flags]
    while kills < 5:
        process = subprocess_cli(args)
        floor = logged_steps(killed)
        while logged_steps(killed) <= floor and process.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.5))
        if process.poll() is not None:
            break  # finished before the kill
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
        kills += 1
        mid_write += bool(list((killed / "checkpoints").glob(".tmp-*")))
        args = ["train", "--resume", str(killed), "--threads", "1", "--no-progress"]
    assert kills >= 3, "the run finished before most kills"
    print(f"{method}: {kills} kills, {mid_write} of them while a checkpoint was being written")
    if not (killed / "eval.json").exists():
        assert subprocess_cli(args).wait() == 0
    assert_bitwise_equal(reference / "model" / "model.safetensors", killed / "model" / "model.safetensors")
    assert (reference / "zo_updates.jsonl").read_bytes() == (killed / "zo_updates.jsonl").read_bytes()
    assert metrics_without_time(reference) == metrics_without_time(killed)
