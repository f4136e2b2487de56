"""Checkpoints that a crash cannot half-write, and exact resume from them.

A checkpoint is a directory ``checkpoints/step-NNNNNNNN/`` holding

  model.safetensors   every tensor of the model's state dict (base weights ZO changed, adapter, head)
  state.safetensors   the tensors of the optimizer state (e.g. AdamW's moments) and the RNG states
  state.json          everything else: optimizer scalars, scheduler, sampler position, the sizes
                      the run's logs had at this step, and loop values (dev accuracy before, ...)

It is written under a temporary name, every file and the directory are fsync'ed, and only
then is it renamed into place (a rename is atomic): a checkpoint directory either exists
whole or not at all (a write that fails midway removes its temporary directory). The last
``keep`` are kept; an older one is renamed to a temporary name before it is deleted. Nothing is
unpickled: tensors come from safetensors, the rest from JSON.

Resume = build the run from its config, then :func:`load` the latest checkpoint into it:
weights, optimizer, scheduler, sampler and RNG states are restored bit for bit, and the logs
are cut back to the sizes they had at that step, so the steps after it (which a SIGKILL may
have logged) are run and logged again, identically.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from hybridft.engine.rng import rng_state, set_rng_state

from hybridft.engine.sampler import ReshufflingSampler
from hybridft.run.config import TrainConfig


class Ranks(Protocol):
    """This process's place among the data-parallel ranks (``hybridft.run.distributed.World``)."""

    @property
    def rank(self) -> int: ...

    @property
    def size(self) -> int: ...


class RunState(Protocol):
    """What a checkpoint saves and restores of a run (``hybridft.run.train.Run`` is one): the
    weights, the optimizer, scheduler and sampler states, and how many ranks run it."""

    @property
    def model(self) -> torch.nn.Module: ...

    @property
    def optimizer(self) -> torch.optim.Optimizer: ...

    @property
    def lr_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler: ...

    @property
    def sampler(self) -> ReshufflingSampler: ...

    @property
    def world(self) -> Ranks: ...


DIRNAME = "checkpoints"
_TENSOR = "__tensor__"

# Fields a resumed run may change: they do not change what the steps compute. Any other field
# (model, task, method, seed, batch size, learning rates, steps, ...) must stay as it was.
RUNTIME_FIELDS = ("threads", "device", "progress", "output_dir", "eval_batch_size", "save_merged",
                  "checkpoint_every", "keep_checkpoints", "max_bad_steps", "plot", "eval_every")


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsync and rename."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a half-written temporary (a full disk) is never read; removed if possible
            tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def split_tensors(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """``obj`` with every tensor replaced by a reference into ``tensors`` (filled here), so the
    rest is JSON. Tuples come back as lists (optimizers accept either)."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().contiguous().cpu()
        return {_TENSOR: prefix}
    if isinstance(obj, dict):
        return {str(k): split_tensors(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [split_tensors(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    return obj


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`. Integer-like dict keys (optimizer state is keyed by
    parameter index) become ints again."""
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        return {(int(k) if k.isdigit() else k): join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def step_dir(out: Path, step: int) -> Path:
    return Path(out) / DIRNAME / f"step-{step:08d}"


def checkpoints(out: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (temporary directories are not listed)."""
    root = Path(out) / DIRNAME
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def save(run: RunState, out: Path, step: int, *, logs: dict[str, int], extra: dict[str, Any], keep: int,
         rng: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint of ``run`` after ``step`` steps; keep the newest ``keep``.

    ``logs`` maps a log file name to its size in bytes at this step (flushed and fsync'ed by the
    caller); ``extra`` holds JSON values of the loop; ``rng`` replaces this process's RNG states
    (data parallelism: ``{"ranks": [the states of rank 0, 1, ...]}``). Refuses non-finite weights, so a
    checkpoint is always one a run can continue from.
    Cost: one write of the model and optimizer state, one pass over the weights.
    """
    bad = [n for n, t in run.model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise FloatingPointError(f"the weights are not finite after step {step} (e.g. {bad[0]}); no checkpoint written")
    tensors: dict[str, torch.Tensor] = {}
    state = {
        "step": step,
        "optimizer": split_tensors(run.optimizer.state_dict(), tensors, "optimizer"),
        "lr_scheduler": split_tensors(run.lr_scheduler.state_dict(), tensors, "lr_scheduler"),
        "sampler": run.sampler.state_dict(),
        "rng": split_tensors(rng if rng is not None else rng_state(), tensors, "rng"),
        "logs": logs,
        "extra": extra,
    }
    def write(tmp: Path) -> None:
        save_model(run.model, str(tmp / "model.safetensors"))
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")

    final = step_dir(out, step)
    publish(final, write)
    for old in checkpoints(out)[:-keep]:
        remove(old)
    return final


def publish(final: Path, write: Callable[[Path], None]) -> None:
    """Create the directory ``final`` atomically: ``write`` fills a temporary sibling, whose files
    and itself are fsync'ed, then renamed to ``final``. A failure midway (a full disk, a second
    stop signal) removes the temporary directory and leaves everything else as it was. Creates
    ``final``'s parent if missing, not the run directory: one removed mid-run is an error."""
    final.parent.mkdir(exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        if final.exists():
            remove(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(final.parent)


def remove(path: Path) -> None:
    """Delete a checkpoint directory, renamed to a temporary name first, so that a crash midway
    never leaves a partial ``step-N/`` (resume removes temporaries)."""
    doomed = path.with_name(f".tmp-removed-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    shutil.rmtree(doomed)


def load(run: RunState, path: Path) -> dict[str, Any]:
    """Restore ``run`` (built from the same config) to checkpoint ``path``; returns its state
    (``step``, ``logs``, ``extra``). A damaged checkpoint is a one-line ValueError naming it."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        tensors = load_file(str(path / "state.safetensors"))
        missing, unexpected = load_model(run.model, str(path / "model.safetensors"), strict=False)
    except (OSError, ValueError, SafetensorError) as error:
        raise ValueError(f"cannot load checkpoint {path} ({str(error).splitlines()[0]}); delete it to resume from the one before") from error
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit the model (e.g. {(missing or unexpected)[0]})")
    rng = join_tensors(state["rng"], tensors)
    ranks = len(rng["ranks"]) if "ranks" in rng else 1
    if ranks != run.world.size:
        raise ValueError(f"checkpoint {path} was written by a run on {ranks} rank(s); resume it on {ranks}, not {run.world.size}")
    run.optimizer.load_state_dict(join_tensors(state["optimizer"], tensors))
    run.lr_scheduler.load_state_dict(join_tensors(state["lr_scheduler"], tensors))
    run.sampler.load_state_dict(state["sampler"])
    set_rng_state(rng["ranks"][run.world.rank] if "ranks" in rng else rng)
    return state


def remove_temporaries(out: Path) -> None:
    """Delete checkpoint directories a crash left half-written."""
    root = Path(out) / DIRNAME
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


class Logs:
    """Append-only line logs of a run directory, opened for appending; ``sync`` makes them
    durable and returns the sizes a checkpoint records."""

    def __init__(self, out: Path, names: tuple[str, ...]) -> None:
        self.files = {name: open(Path(out) / name, "a", encoding="utf-8") for name in names}

    def append(self, name: str, line: str) -> None:
        self.files[name].write(line + "\n")
        self.files[name].flush()

    def sync(self) -> dict[str, int]:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
        return {name: f.tell() for name, f in self.files.items()}

    def __enter__(self) -> Logs:
        return self

    def __exit__(self, *_: object) -> None:
        for f in self.files.values():
            f.close()


def resume(run: RunState, out: Path, logs: tuple[str, ...], *, write: bool = True) -> dict[str, Any]:
    """Load the latest checkpoint of ``out`` into ``run`` (none: ``run`` stays at step 0) and cut
    ``logs`` back to their sizes then. Returns the checkpoint's state (``step``, ``extra``, ...).
    ``write=False`` (data-parallel ranks other than 0) only loads."""
    if write:
        remove_temporaries(out)
    saved = checkpoints(out)
    state = load(run, saved[-1]) if saved else {"step": 0, "logs": {}, "extra": {}}
    if write:
        truncate_logs(out, state["logs"], logs)
    return state


def truncate_logs(out: Path, sizes: dict[str, int], names: tuple[str, ...]) -> None:
    """Cut each log back to its size at the checkpoint (0 for a log it does not list): lines a
    killed run wrote after its last checkpoint are dropped, since those steps run again."""
    for name in names:
        path = Path(out) / name
        size = sizes.get(name, 0)
        if not path.exists():
            if size:
                raise ValueError(f"{path} is missing, but the checkpoint says it held {size} bytes")
            continue
        if path.stat().st_size < size:
            raise ValueError(f"{path} is shorter ({path.stat().st_size} bytes) than at the checkpoint ({size} bytes)")
        with open(path, "r+b") as f:
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())


def run_config(out: Path) -> TrainConfig:
    """The config a run directory was started with (its ``config.json``)."""
    path = Path(out) / "config.json"
    if not path.is_file():
        raise ValueError(f"{out} holds no run (no config.json)")
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
        fields.pop("resolved", None)
        return TrainConfig(**fields)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path} is not a hybridft run config ({str(error).splitlines()[0]})") from error


def resume_config(out: Path, overrides: dict[str, Any]) -> TrainConfig:
    """The config of the run in ``out`` with ``overrides`` applied; refuses (naming the field)
    any override outside ``RUNTIME_FIELDS`` that differs from the run's value."""
    saved = run_config(out)
    for name, value in overrides.items():
        if name not in RUNTIME_FIELDS and value != getattr(saved, name):
            raise ValueError(f"cannot resume {out} with --{name.replace('_', '-')} {value}: the run was started with "
                             f"{getattr(saved, name)}, and a resumed run keeps its config "
                             f"(only {', '.join('--' + f.replace('_', '-') for f in RUNTIME_FIELDS)} may change)")
    return saved.replace(**{**overrides, "output_dir": str(out)})
