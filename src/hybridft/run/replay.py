"""Replay: a run's ZO-trained weights rebuilt from its initial weights and its ZO log
(:mod:`hybridft.run.zo_log`, one line per applied update). Since z is regenerated from
(seed, parameter name),

    theta_T = replay(theta_0, log)

rebuilds the ZO group bit for bit (same ops in the same order and dtype; the log's floats
round-trip exactly). For a hybrid run the ZO group is the base model; the adapter and head are
first-order and are taken from the run's saved ``adapter/``. For ``zo-full`` and ``zo-lora``
the log alone rebuilds everything that was trained.
Cost of a replay: len(log) passes of direction generation over the ZO group, no forward.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from hybridft.engine.rules import replay_
from hybridft.run import disk, export, lock
from hybridft.run.checkpoint import run_config
from hybridft.run.config import TrainConfig
from hybridft.run.train import build
from hybridft.run.zo_log import LOG, read


def rebuild(run_dir: str | Path, output_dir: str | Path | None = None) -> Path:
    """Rebuild a finished run's model from its initial weights (its config's ``model``, head
    initialised by its seed), its ZO log and, for hybrid, its saved adapter; save it in the
    layout of :mod:`hybridft.run.export` under ``output_dir`` (default ``RUN_DIR/replayed``),
    which is locked meanwhile (:mod:`hybridft.run.lock`)."""
    run_dir = Path(run_dir)
    config = run_config(run_dir)
    out = Path(output_dir) if output_dir is not None else run_dir / "replayed"
    if (out / "model").exists():
        raise ValueError(f"{out} already holds a model; choose another --output-dir")
    if not (run_dir / LOG).exists():
        raise ValueError(f"{run_dir} has no {LOG} (a run from before the log)")
    with lock.held(out):
        return replay_into(run_dir, config, out)


def replay_into(run_dir: Path, config: TrainConfig, out: Path) -> Path:
    """:func:`rebuild`'s work, with ``out`` locked."""
    if (out / "model").exists():  # again, locked: another replay may have written it meanwhile
        raise ValueError(f"{out} already holds a model; choose another --output-dir")
    updates = read(run_dir / LOG)
    run = build(config.replace(progress=False))
    if not run.groups.zo:
        raise ValueError(f"method {config.method!r} makes no ZO updates; there is nothing to replay")
    if run.groups.fo:
        load_adapter(run.model, run_dir / "adapter")
    replay_(run.groups.zo.items(), updates)
    try:
        with disk.writing("the model", out, again=f"hybridft replay {run_dir} --output-dir {out}"):
            export.save(run.model, run.tokenizer, out)
    except disk.WriteFailed:
        for name in ("model", "adapter"):  # half written (it did not exist before): the next replay writes it whole
            shutil.rmtree(out / name, ignore_errors=True)
        raise
    print(f"replayed {len(updates)} ZO updates of {run_dir}; saved to {out}")
    return out


def load_adapter(model: Any, adapter_dir: Path) -> None:
    """Load a saved peft adapter's weights (adapter + head) into ``model`` in place."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = adapter_dir / "adapter_model.safetensors"
    if not path.exists():
        raise ValueError(f"{path} is missing: the first-order part of the run (adapter and head) is needed")
    result = set_peft_model_state_dict(model, load_file(str(path)))
    # prompt learning: peft loads "prompt_embeddings" into the prompt encoder itself, after
    # reporting it unexpected by the model's load_state_dict
    prompt_keys = {"prompt_embeddings"} if getattr(model, "prompt_encoder", None) is not None else set()
    unexpected = [key for key in result.unexpected_keys if key not in prompt_keys]
    if unexpected:
        raise ValueError(f"{path} does not fit the model (e.g. {unexpected[0]})")
