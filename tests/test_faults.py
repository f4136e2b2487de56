"""Faults around a run: a second run into the same directory is refused while the first holds its
lock (a lock dies with its process, SIGKILL included); SIGTERM stops a run at a checkpoint, and a
resume from it is bitwise equal to an uninterrupted run (a second signal mid-checkpoint stops at
once, the previous checkpoint intact); a write that fails (a full disk, the directory removed) is
one line naming the last complete checkpoint, which a resume continues from.

Runs that are compared bit for bit are the CLI in forked children, as in test_resume.py.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hybridft.cli import main
from hybridft.run import checkpoint, disk, lock, stop
from tests.test_resume import FLAGS, STEPS, assert_bitwise_equal, logged_steps, metrics_without_time, run_to_end, start


def _cli_to(args: list[str], stderr: str) -> None:
    """The CLI with its stderr in the file ``stderr`` (sys.stderr is pytest's capture otherwise)."""
    sys.stderr = open(stderr, "w", buffering=1)  # noqa: SIM115 - the child ends with os._exit
    os.dup2(sys.stderr.fileno(), 2)
    code = main(args)
    sys.stderr.flush()
    os._exit(code)


def _cli_slow_steps(args: list[str], stderr: str) -> None:
    """The CLI, 0.3 s slower per step (same arithmetic): a run that holds its lock for longer than
    the grace a second run gives a holder that may be exiting (lock.GRACE_SECONDS)."""
    from hybridft.run import train

    def train_step(*a: object, **k: object) -> dict:
        time.sleep(0.3)
        return original(*a, **k)

    original, train.train_step = train.train_step, train_step
    _cli_to(args, stderr)


def _cli_signalled_twice_mid_checkpoint(args: list[str], stderr: str) -> None:
    """The CLI, sent SIGTERM twice while it writes its next checkpoint (after the model file)."""
    def save_file(*a: object, **k: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # the first is handled (a stop is requested) before the second arrives
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
        original(*a, **k)

    original, checkpoint.save_file = checkpoint.save_file, save_file
    _cli_to(args, stderr)


def run_cli(args: list[str], stderr: Path, target=_cli_to):
    process = start(args, target=lambda a: target(a, str(stderr)))
    return process


@pytest.fixture(scope="module")
def reference(tiny_bert_dir, tmp_path_factory) -> Path:
    """An uninterrupted run with test_resume.py's flags."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    run_to_end(["train", "--model", str(tiny_bert_dir), "--output-dir", str(out), *FLAGS])
    return out


def assert_same_run(reference: Path, out: Path) -> None:
    assert_bitwise_equal(reference / "model" / "model.safetensors", out / "model" / "model.safetensors")
    assert_bitwise_equal(reference / "adapter" / "adapter_model.safetensors", out / "adapter" / "adapter_model.safetensors")
    assert (reference / "zo_updates.jsonl").read_bytes() == (out / "zo_updates.jsonl").read_bytes()
    assert metrics_without_time(reference) == metrics_without_time(out)
    assert [r["step"] for r in metrics_without_time(out)] == list(range(1, STEPS + 1))


def test_two_concurrent_runs_into_one_directory_one_trains_and_the_other_is_refused(tiny_bert_dir, tmp_path, reference):
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_bert_dir), "--output-dir", str(out), *FLAGS]
    runs = [run_cli(args, tmp_path / f"stderr-{i}", _cli_slow_steps) for i in range(2)]
    for process in runs:
        process.join(timeout=300)
    assert sorted(p.exitcode for p in runs) == [0, 2]
    winner, loser = sorted(range(2), key=lambda i: runs[i].exitcode)
    refused = (tmp_path / f"stderr-{loser}").read_text().splitlines()
    assert refused == [f"hybridft: error: {out} is in use by another run (pid {runs[winner].pid} on host "
                       f"{socket.gethostname()}); wait for it or choose another --output-dir"]
    assert_same_run(reference, out)  # each step logged once, the weights those of one uninterrupted run
    assert not (out / lock.NAME).exists()


def test_a_lock_left_by_a_sigkilled_process_blocks_nothing(tmp_path):
    out = tmp_path / "run"
    code = f"from hybridft.run import lock\nwith lock.held({str(out)!r}):\n    print('locked', flush=True)\n    input()"
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(lock.InUse, match=f"in use by another run \\(pid {holder.pid} on host "):
            with lock.held(out):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs
        holder.wait()
    assert (out / lock.NAME).exists()  # the stale file stays, its lock does not
    with lock.held(out):
        assert f"pid {os.getpid()} " in (out / lock.NAME).read_text()
    assert not (out / lock.NAME).exists() and out.is_dir()


def test_sigterm_at_a_random_step_stops_at_a_checkpoint_and_resume_is_bitwise_equal(tiny_bert_dir, tmp_path, reference):
    out = tmp_path / "run"
    steps = random.Random(3).randrange(1, STEPS - 4)
    process = run_cli(["train", "--model", str(tiny_bert_dir), "--output-dir", str(out), *FLAGS], tmp_path / "stderr")
    while logged_steps(out) < steps and process.is_alive():
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGTERM)
    process.join(timeout=300)
    assert process.exitcode == 128 + signal.SIGTERM
    stopped = logged_steps(out)
    assert (tmp_path / "stderr").read_text().splitlines() == \
        [f"stopped at step {stopped} by SIGTERM; resume with hybridft train --resume {out}"]
    assert checkpoint.checkpoints(out)[-1] == checkpoint.step_dir(out, stopped) and stopped < STEPS

    # a second SIGTERM while the next checkpoint is written: out at once, the previous one intact
    before = checkpoint.checkpoints(out)
    twice = run_cli(["train", "--resume", str(out), "--threads", "1"], tmp_path / "stderr", _cli_signalled_twice_mid_checkpoint)
    twice.join(timeout=300)
    assert twice.exitcode == 128 + signal.SIGTERM
    assert "stopped at step" not in (tmp_path / "stderr").read_text()
    assert checkpoint.checkpoints(out) == before and not list((out / "checkpoints").glob(".tmp-*"))

    run_to_end(["train", "--resume", str(out), "--threads", "1", "--no-progress"])
    assert_same_run(reference, out)


def test_stop_signals_are_recorded_then_a_second_exits_and_the_handlers_are_restored():
    previous = {s: signal.getsignal(s) for s in stop.SIGNALS}
    forwarded = []
    with pytest.raises(SystemExit) as exit_:
        with stop.requested(forward=forwarded.append) as request:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert request.signum == signal.SIGUSR1
            os.kill(os.getpid(), signal.SIGINT)
    assert exit_.value.code == 128 + signal.SIGINT == 130
    assert forwarded == [signal.SIGUSR1, signal.SIGINT]
    assert {s: signal.getsignal(s) for s in stop.SIGNALS} == previous
    assert stop.signal_of(-signal.SIGTERM) == stop.signal_of(143) == signal.SIGTERM and stop.signal_of(1) is None


def _failing_save_file(calls: list[int], fail_at: int):
    original = checkpoint.save_file

    def save_file(*a: object, **k: object) -> None:
        calls.append(1)
        if len(calls) == fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(*a, **k)

    return save_file


def test_a_checkpoint_write_that_fails_with_enospc_is_one_line_and_the_run_resumes(tiny_bert_dir, tmp_path, capsys,
                                                                                   monkeypatch, one_thread):
    out = tmp_path / "run"
    monkeypatch.setattr(checkpoint, "save_file", _failing_save_file([], fail_at=2))
    flags = [*FLAGS, "--steps", "6"]
    assert main(["train", "--model", str(tiny_bert_dir), "--output-dir", str(out), *flags]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"hybridft: error: cannot write checkpoint step 4 to {out} (No space left on device); the last "
                   f"complete checkpoint is {out}/checkpoints/step-00000002: free space and run hybridft train --resume {out}")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]  # the half-written one is gone
    monkeypatch.undo()
    assert main(["train", "--resume", str(out), "--threads", "1", "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert [r["step"] for r in metrics_without_time(out)] == list(range(1, 7))
    assert not (out / lock.NAME).exists()


def test_an_output_directory_removed_mid_run_is_one_line_and_not_recreated(tiny_bert_dir, tmp_path, capsys, monkeypatch,
                                                                           one_thread):
    out = tmp_path / "run"
    original = checkpoint.save_model

    def save_model(*a: object, **k: object) -> None:
        import shutil

        shutil.rmtree(out)
        original(*a, **k)  # safetensors' own error (SafetensorError), wrapping the OS's

    monkeypatch.setattr(checkpoint, "save_model", save_model)
    assert main(["train", "--model", str(tiny_bert_dir), "--output-dir", str(out), *FLAGS]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"hybridft: error: cannot write checkpoint step 2 to {out} (No such file or directory); {out} holds "
                   "no run to resume: fix that and start the run again")
    assert not out.exists()


def test_the_reason_is_the_os_error_inside_a_safetensors_error(tmp_path):
    try:
        save_file({"a": torch.zeros(2)}, str(tmp_path / "missing" / "x.safetensors"))
    except Exception as error:  # noqa: BLE001 - safetensors' own exception class
        assert disk.error_number(error) == errno.ENOENT
    else:
        pytest.fail("safetensors wrote into a missing directory")
    assert disk.error_number(RuntimeError('IoError(Os { code: 28, kind: StorageFull, message: "..." })')) == 28
