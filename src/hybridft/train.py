"""The training loop, top to bottom: build a run (data, model, method, optimizer), then steps,
evaluation and save."""

from __future__ import annotations

import contextlib
import json
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hybridft import distributed, evaluate, export, plots
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
    data_parallel: distributed.DataParallel | None = None  # None: a single process

    @property
    def world(self) -> distributed.World:
        return self.data_parallel.world if self.data_parallel else distributed.World()

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        examples = [self.train_set[i] for i in indices]
        return evaluate.encode(self.tokenizer, examples, max_length=self.config.max_length, device=self.device)

    def dev_accuracy(self) -> float:
        """Accuracy on the dev set; with several ranks each evaluates its slice."""
        examples = self.dev_set[self.world.rank :: self.world.size]
        accuracy = evaluate.accuracy(self.model, self.tokenizer, examples, max_length=self.config.max_length,
                                     batch_size=self.config.eval_batch_size, device=self.device) if examples else 0.0
        return self.data_parallel.mean(accuracy, len(examples)) if self.data_parallel else accuracy


def total_steps(config: TrainConfig, n_train: int, ranks: int = 1) -> int:
    """--steps, or --epochs worth of mini-batches (of ``ranks`` x --batch-size) when epochs are given."""
    if config.epochs is None:
        return config.steps
    return max(1, math.ceil(config.epochs * math.ceil(n_train / (config.batch_size * ranks))))


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
    world, device = distributed.init(pick_device(config.device))
    torch.manual_seed(config.seed)  # head initialisation and dropout; ZO directions never use it

    task = load_task(config.task, seed=config.seed)
    train_set = subsample(task.train, config.train_size, config.seed)
    dev_set = subsample(task.dev, config.dev_size, config.seed)
    sampler = distributed.shard_sampler(len(train_set), config.batch_size, world, seed=config.seed,
                                        replacement=config.sampler == "replacement")
    model, tokenizer = build_model(config, task.num_labels)
    groups = assign(config.method, model)
    model.to(device)

    steps = total_steps(config, len(train_set), world.size)
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
               steps=steps, device=device, data_parallel=distributed.data_parallel(world, device, model, groups.fo))


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
    """One optimizer step and one scheduler step on the mini-batch ``indices`` (this rank's slice
    of it, with several ranks); its metrics."""
    lrs = {g["name"]: g["lr"] for g in run.optimizer.param_groups}
    parallel = run.data_parallel
    sent, waited = (dict(parallel.sent), parallel.seconds) if parallel else ({}, 0.0)
    reduce = parallel.reducer(len(indices)) if parallel else None
    loss = float(run.optimizer.step(loss_closure(run.model, run.optimizer, run.batch(indices)), reduce=reduce))
    run.lr_scheduler.step()
    update = run.optimizer.last_update
    return {
        "step": step + 1, "epoch": run.sampler.epoch + run.sampler.position / len(run.sampler), "loss": loss,
        "zo_lr": lrs["zo"] if run.groups.zo else None, "fo_lr": lrs.get("fo"),
        "projected_grad": (sum(update.projected_grads) / len(update.projected_grads)) if update else None,
        **{f"sent_bytes_{part}": parallel.sent[part] - sent[part] for part in sent if parallel},
        **({"allreduce_seconds": parallel.seconds - waited} if parallel else {}),
    }


def train(config: TrainConfig, *, overwrite: bool = False) -> Result:
    """Fine-tune ``config.model`` on ``config.task`` with ``config.method``; write the run to disk."""
    config.validate()
    out = prepare_output_dir(config, overwrite)
    run = build(config)
    main = run.world.main  # only rank 0 prints and writes
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(describe(run), indent=2))
    before = run.dev_accuracy()
    say = print if main else lambda *_: None
    say(f"dev accuracy before training: {before:.4f} ({len(run.dev_set)} examples)")

    start, eval_seconds, loss = time.perf_counter(), 0.0, float("nan")
    bar = tqdm(total=run.steps, desc=f"{config.method} {config.task}", disable=not (config.progress and main),
               dynamic_ncols=True)
    with open(out / "metrics.jsonl", "w", encoding="utf-8") if main else contextlib.nullcontext() as metrics:
        for step, indices in zip(range(run.steps), run.sampler):
            record = train_step(run, step, indices)
            if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < run.steps:
                tick = time.perf_counter()
                record["dev_accuracy"] = run.dev_accuracy()
                eval_seconds += time.perf_counter() - tick
            record["seconds"] = time.perf_counter() - start - eval_seconds  # training time only
            if metrics:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            loss = record["loss"]
            bar.set_postfix(loss=f"{loss:.4f}", zo_lr=f"{record['zo_lr'] or 0:.1e}",
                            fo_lr=f"{record['fo_lr'] or 0:.1e}", refresh=False)
            bar.update()
    bar.close()

    after = run.dev_accuracy()
    if run.data_parallel:
        run.data_parallel.check_identical(run.model)
    say(f"dev accuracy after {run.steps} steps: {after:.4f}")
    result = {"dev_accuracy_before": before, "dev_accuracy_after": after, "dev_size": len(run.dev_set),
              "steps": run.steps, "final_loss": loss, "train_seconds": time.perf_counter() - start - eval_seconds,
              "peak_memory_mib": peak_memory_mib(run.device), "ranks": run.world.size}
    if main:
        (out / "eval.json").write_text(json.dumps(result, indent=2))
        export.save(run.model, run.tokenizer, out, merged=config.save_merged)
        print(f"saved to {out}")
        if config.plot:
            print(f"plot: {plots.plot_run(out)}")
    return Result(output_dir=out, dev_accuracy_before=before, dev_accuracy_after=after, final_loss=loss,
                  model=run.model, tokenizer=run.tokenizer)


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: CUDA max allocated, or on CPU the process's peak RSS (model load included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
            "torch": torch.__version__, "ranks": run.world.size,
            **({"ddp_full_finetuning_bytes_per_step": distributed.ddp_bytes([*groups.zo.values(), *groups.fo.values()])}
               if run.data_parallel else {}),
        },
    }
