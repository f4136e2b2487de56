"""The run configuration: one frozen dataclass whose fields (with their help text) are the CLI
flags, and which a YAML file may set. It is read at the edges (CLI, builders) only."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METHODS = ("hybrid", "fo-lora", "fo-full", "zo-full", "zo-lora")
SCHEDULES = ("constant", "linear", "cosine")


def _f(default: Any, help: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run."""

    model: str = _f("minilm", "HF hub id, local directory, or packaged name (minilm)")
    task: str = _f("rotten_tomatoes", "task name (rotten_tomatoes, imdb)")
    method: str = _f("hybrid", "what is trained and how", choices=METHODS)
    steps: int = _f(100, "optimizer steps (ignored when --epochs is set)")
    epochs: float | None = _f(None, "train for this many passes over the training set instead of --steps")
    batch_size: int = _f(16, "examples per step")
    zo_lr: float = _f(1e-6, "learning rate of the ZO group (base weights; adapter for zo-lora)")
    fo_lr: float = _f(5e-3, "learning rate of the FO group (adapter + head; all weights for fo-full)")
    eps: float = _f(1e-3, "ZO perturbation scale")
    seed: int = _f(0, "seed of the data split, sampler, ZO directions and initialisation")
    lora_r: int = _f(8, "LoRA rank")
    lora_alpha: int = _f(16, "LoRA alpha")
    lora_dropout: float = _f(0.0, "LoRA dropout")
    target_modules: str | None = _f(None, "comma-separated module names for LoRA, or all-linear (default: peft's per-architecture choice)")
    modules_to_save: str | None = _f(None, "comma-separated modules trained in full with the adapter, besides the new task head (e.g. pooler)")
    fo_optimizer: str = _f("adamw", "optimizer of the FO group (sgd: plain SGD as in the analysis)", choices=("sgd", "adamw"))
    fo_momentum: float = _f(0.0, "SGD momentum of the FO group (0: plain SGD, as in the analysis)")
    zo_weight_decay: float = _f(0.0, "weight decay of the ZO group")
    fo_weight_decay: float = _f(0.0, "weight decay of the FO group")
    zo_schedule: str = _f("constant", "learning-rate schedule of the ZO group", choices=SCHEDULES)
    fo_schedule: str = _f("linear", "learning-rate schedule of the FO group", choices=SCHEDULES)
    warmup_steps: int = _f(0, "linear warmup steps for both groups")
    num_directions: int = _f(1, "ZO directions averaged per step (q)")
    one_sided: bool = _f(False, "one-sided ZO estimate (L(theta+eps z) - L(theta)) / eps")
    distribution: str = _f("gaussian", "distribution of the ZO direction z", choices=("gaussian", "rademacher"))
    fused: bool = _f(False, "fused estimator: the FO forward+backward is a ZO evaluation (at theta+eps z; at theta with --one-sided), one forward less per step (docs/step_cost.md)")
    z_cache: bool = _f(False, "generate z once per step and keep it for the step (memory: one copy of the ZO weights)")
    z_dtype: str = _f("float32", "draw z in float32 (then cast) or in the weights' own dtype", choices=("float32", "param"))
    embedding_rows: bool = _f(False, "perturb and update only the input-embedding rows of the batch's tokens (untied embeddings; docs/step_cost.md)")
    zo_threads: int = _f(1, "threads generating z in parallel across parameters (update and z-cache passes; same z)")
    sampler: str = _f("reshuffle", "mini-batch sampling", choices=("reshuffle", "replacement"))
    max_length: int = _f(64, "tokens per example (longer inputs are truncated)")
    train_size: int | None = _f(None, "subsample the training split to this many examples")
    dev_size: int | None = _f(1000, "subsample the dev split to this many examples")
    eval_batch_size: int = _f(64, "examples per evaluation forward")
    threads: int | None = _f(None, "torch CPU threads (default: torch's choice)")
    device: str = _f("auto", "cpu, cuda, or auto")
    output_dir: str | None = _f(None, "where to write the run (default: runs/<time>-<method>)")
    save_merged: bool = _f(False, "also save the model with the adapter merged in (plain transformers load)")
    trust_remote_code: bool = _f(False, "allow model code from the hub to run")
    progress: bool = _f(True, "show a progress bar")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise ValueError with a one-line message on a value no run can use."""
        for name in ("zo_lr", "fo_lr", "eps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("steps", "batch_size", "lora_r", "num_directions", "max_length", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.zo_threads < 1:
            raise ValueError(f"--zo-threads must be at least 1, got {self.zo_threads}")
        if self.fused and self.method != "hybrid":
            raise ValueError(f"--fused needs a method with both a ZO and an FO part (hybrid), not {self.method}")
        if (self.z_cache or self.embedding_rows) and self.method in ("fo-lora", "fo-full"):
            raise ValueError(f"--z-cache and --embedding-rows need a method with a ZO part, not {self.method}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"--epochs must be positive, got {self.epochs}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}; got {getattr(self, f.name)!r}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of config fields (dashes or underscores); unknown keys are an error."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config fields")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown config field(s) {', '.join(unknown)}")
    return values
