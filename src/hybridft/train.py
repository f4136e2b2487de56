"""The training loop, top to bottom: build a run (data, model, method, optimizer), then steps,
evaluation and save."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hybridft import evaluate, export
from hybridft.config import TrainConfig
from hybridft.methods import USES_ADAPTER, Groups, assign, build_optimizer, lora_config, wrap
from hybridft.models import load_classifier
from hybridft.optim import HybridOptimizer
from hybridft.sampler import ReshufflingSampler
from hybridft.schedules import scheduler
from hybridft.tasks import Example, load_task, subsample


@dataclass(frozen=True)
class Result:
    output_dir: Path
    dev_accuracy_before: float
    dev_accuracy_after: float
    final_loss: float
    model: torch.nn.Module
    tokenizer: Any


@dataclass
class Run:
    """Everything a training run is made of, built from its config by :func:`build`."""

    config: TrainConfig
    train_set: list[Example]
    dev_set: list[Example]
    sampler: ReshufflingSampler
    model: torch.nn.Module
    tokenizer: Any
    groups: Groups
    optimizer: HybridOptimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    steps: int
    device: torch.device

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        examples = [self.train_set[i] for i in indices]
        return evaluate.encode(self.tokenizer, examples, max_length=self.config.max_length, device=self.device)

    def dev_accuracy(self) -> float:
        return evaluate.accuracy(self.model, self.tokenizer, self.dev_set, max_length=self.config.max_length,
                                 batch_size=self.config.eval_batch_size, device=self.device)


def total_steps(config: TrainConfig, n_train: int) -> int:
    """--steps, or --epochs worth of mini-batches when epochs are given."""
    if config.epochs is None:
        return config.steps
    return max(1, math.ceil(config.epochs * math.ceil(n_train / config.batch_size)))


def names(comma_separated: str | None) -> list[str]:
    """``"a, b,"`` -> ``["a", "b"]``: module names given as one flag value."""
    return [n.strip() for n in (comma_separated or "").split(",") if n.strip()]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prepare_output_dir(config: TrainConfig, overwrite: bool) -> Path:
    """The run directory; refuses one that already holds a run unless ``overwrite``."""
    if config.output_dir is None:
        return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.method}-{config.task}"
    out = Path(config.output_dir)
    if (out / "config.json").exists() and not overwrite:
        raise ValueError(f"{out} already holds a run; choose another --output-dir or pass --overwrite")
    return out


def build_model(config: TrainConfig, num_labels: int) -> tuple[torch.nn.Module, Any]:
    """The model (wrapped with the LoRA adapter when the method uses one) and its tokenizer."""
    loaded = load_classifier(config.model, num_labels, trust_remote_code=config.trust_remote_code)
    if not USES_ADAPTER[config.method]:
        return loaded.model, loaded.tokenizer
    targets: list[str] | str | None = config.target_modules
    if targets and targets != "all-linear":
        targets = names(targets)
    heads = loaded.head_modules + names(config.modules_to_save)
    peft_config = lora_config(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                              target_modules=targets, head_modules=heads)
    return wrap(loaded.model, peft_config), loaded.tokenizer


def build(config: TrainConfig) -> Run:
    """Data, model, parameter groups, optimizer and schedules of ``config``; nothing is written."""
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = pick_device(config.device)
    torch.manual_seed(config.seed)  # head initialisation and dropout; ZO directions never use it

    task = load_task(config.task, seed=config.seed)
    train_set = subsample(task.train, config.train_size, config.seed)
    dev_set = subsample(task.dev, config.dev_size, config.seed)
    sampler = ReshufflingSampler(len(train_set), config.batch_size, seed=config.seed,
                                 replacement=config.sampler == "replacement")
    model, tokenizer = build_model(config, task.num_labels)
    groups = assign(config.method, model)
    model.to(device)

    steps = total_steps(config, len(train_set))
    if config.lr == "auto":  # zo-lr, fo-lr and eps from the measured smoothness (docs/theory.md)
        from hybridft.theory.auto import resolve

        resolved = resolve(config, model, groups, tokenizer, train_set, device, steps)
        config = resolved.config
        print(resolved.message)
    optimizer = build_optimizer(
        model, groups, zo_lr=config.zo_lr, fo_lr=config.fo_lr, eps=config.eps, seed=config.seed,
        fo_optimizer=config.fo_optimizer, fo_momentum=config.fo_momentum,
        zo_weight_decay=config.zo_weight_decay, fo_weight_decay=config.fo_weight_decay,
        num_directions=config.num_directions, one_sided=config.one_sided, distribution=config.distribution,
    )
    schedule_names = [config.zo_schedule] + [config.fo_schedule] * (len(optimizer.param_groups) - 1)
    lr_scheduler = scheduler(optimizer, schedule_names, total_steps=steps, warmup_steps=config.warmup_steps)
    return Run(config=config, train_set=train_set, dev_set=dev_set, sampler=sampler, model=model,
               tokenizer=tokenizer, groups=groups, optimizer=optimizer, lr_scheduler=lr_scheduler,
               steps=steps, device=device)


def loss_closure(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 batch: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    """The closure ``HybridOptimizer.step`` calls: the batch loss, with backward only when grad is
    enabled (the FO evaluation). ZO evaluations run in eval mode, so +eps and -eps see the same
    function (no dropout noise in the difference)."""

    def closure() -> torch.Tensor:
        model.train(torch.is_grad_enabled())
        optimizer.zero_grad()
        value = evaluate.loss(model, batch)
        if torch.is_grad_enabled():
            value.backward()
        return value.detach()

    return closure


def train_step(run: Run, step: int, indices: list[int]) -> dict[str, Any]:
    """One optimizer step and one scheduler step on the mini-batch ``indices``; its metrics."""
    lrs = {g["name"]: g["lr"] for g in run.optimizer.param_groups}
    loss = float(run.optimizer.step(loss_closure(run.model, run.optimizer, run.batch(indices))))
    run.lr_scheduler.step()
    update = run.optimizer.last_update
    return {
        "step": step + 1, "epoch": run.sampler.epoch + run.sampler.position / len(run.sampler), "loss": loss,
        "zo_lr": lrs["zo"] if run.groups.zo else None, "fo_lr": lrs.get("fo"),
        "projected_grad": (sum(update.projected_grads) / len(update.projected_grads)) if update else None,
    }


def train(config: TrainConfig, *, overwrite: bool = False) -> Result:
    """Fine-tune ``config.model`` on ``config.task`` with ``config.method``; write the run to disk."""
    config.validate()
    out = prepare_output_dir(config, overwrite)
    run = build(config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(describe(run), indent=2))
    before = run.dev_accuracy()
    print(f"dev accuracy before training: {before:.4f} ({len(run.dev_set)} examples)")

    start, loss = time.perf_counter(), float("nan")
    bar = tqdm(total=run.steps, desc=f"{config.method} {config.task}", disable=not config.progress, dynamic_ncols=True)
    with open(out / "metrics.jsonl", "w", encoding="utf-8") as metrics:
        for step, indices in zip(range(run.steps), run.sampler):
            record = train_step(run, step, indices)
            record["seconds"] = time.perf_counter() - start
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            loss = record["loss"]
            bar.set_postfix(loss=f"{loss:.4f}", zo_lr=f"{record['zo_lr'] or 0:.1e}",
                            fo_lr=f"{record['fo_lr'] or 0:.1e}", refresh=False)
            bar.update()
    bar.close()

    after = run.dev_accuracy()
    print(f"dev accuracy after {run.steps} steps: {after:.4f}")
    result = {"dev_accuracy_before": before, "dev_accuracy_after": after, "dev_size": len(run.dev_set),
              "steps": run.steps, "final_loss": loss, "train_seconds": time.perf_counter() - start}
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    export.save(run.model, run.tokenizer, out, merged=config.save_merged)
    print(f"saved to {out}")
    return Result(output_dir=out, dev_accuracy_before=before, dev_accuracy_after=after, final_loss=loss,
                  model=run.model, tokenizer=run.tokenizer)


def describe(run: Run) -> dict[str, Any]:
    """The resolved config plus what it resolved to (sizes, step count, trained parameters)."""
    groups = run.groups
    return {
        **run.config.to_dict(),
        "resolved": {
            "steps": run.steps, "train_examples": len(run.train_set), "dev_examples": len(run.dev_set),
            "zo_parameters": sum(p.numel() for p in groups.zo.values()),
            "fo_parameters": sum(p.numel() for p in groups.fo.values()),
            "frozen_parameters": sum(p.numel() for p in groups.frozen.values()),
            "torch": torch.__version__,
        },
    }
