"""The training loop, top to bottom: build a run (data, model, method, optimizer), then steps,
evaluation and save."""

from __future__ import annotations

import json
import dataclasses
import math
import resource
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hybridft.data import evaluate
from hybridft.run import checkpoint, disk, distributed, export, lock, stop
from hybridft.run.closure import step_closure
from hybridft.run.output import LOGS, check_output_dir, log, open_logs, prepare_output_dir
from hybridft.run.config import TrainConfig
from hybridft.data.formulations import Formulation, formulation
from hybridft.engine.adapters import wrap
from hybridft.engine.methods import USES_ADAPTER, Groups, assign, build_optimizer
from hybridft.data.models import context_length, load, model_kind, resolve
from hybridft.engine.optim import HybridOptimizer
from hybridft.engine.sampler import ReshufflingSampler
from hybridft.engine.schedules import scheduler
from hybridft.data.tasks import Example, Task, load_task, subsample


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient (the last checkpoint is intact)."""


@dataclass(frozen=True)
class Result:
    output_dir: Path
    dev_accuracy_before: float
    dev_accuracy_after: float
    final_loss: float
    model: torch.nn.Module
    tokenizer: Any
    test_accuracy_after: float | None = None


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
    formulation: Formulation
    test_set: list[Example]
    data_parallel: distributed.DataParallel | None = None  # None: a single process

    @property
    def world(self) -> distributed.World:
        return self.data_parallel.world if self.data_parallel else distributed.World()

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        examples = [self.train_set[i] for i in indices]
        return self.formulation.encode(self.tokenizer, examples, device=self.device)

    def accuracy(self, examples: list[Example]) -> float:
        """Accuracy on ``examples``; with several ranks each evaluates its slice, weighted by size."""
        mine = examples[self.world.rank :: self.world.size]
        value = evaluate.accuracy(self.model, self.formulation, self.tokenizer, mine,
                                  batch_size=self.config.eval_batch_size, device=self.device) if mine else 0.0
        return self.data_parallel.mean(value, len(mine)) if self.data_parallel else value

    def dev_accuracy(self) -> float:
        return self.accuracy(self.dev_set)

    def test_accuracy(self) -> float | None:
        """Accuracy on the task's test split (the official validation set), None if it has none."""
        return self.accuracy(self.test_set) if self.test_set else None


def total_steps(config: TrainConfig, n_train: int, ranks: int = 1) -> int:
    """--steps, or --epochs worth of steps (of ``ranks`` x --grad-accum x --batch-size examples) when
    epochs are given."""
    if config.epochs is None:
        return config.steps
    return max(1, math.ceil(config.epochs * math.ceil(n_train / (config.batch_size * config.grad_accum * ranks))))


def names(comma_separated: str | None) -> list[str]:
    """``"a, b,"`` -> ``["a", "b"]``: module names given as one flag value."""
    return [n.strip() for n in (comma_separated or "").split(",") if n.strip()]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(config: TrainConfig, task: Task, *, adapter: bool = True) -> tuple[torch.nn.Module, Any, Formulation]:
    """The model with the head ``task`` needs on it (wrapped with the --peft adapter when the
    method uses one and ``adapter``), its tokenizer, and the task's formulation for it."""
    kind = config.model_kind
    if kind == "auto":
        kind = model_kind(resolve(config.model, cache_dir=config.cache_dir), trust_remote_code=config.trust_remote_code)
    posed = formulation(task, kind, max_length=config.max_length, score=config.score)
    loaded = load(config.model, posed.head, num_labels=posed.num_labels, trust_remote_code=config.trust_remote_code,
                  cache_dir=config.cache_dir, dtype=config.dtype)
    if not (adapter and USES_ADAPTER[config.method]):
        return loaded.model, loaded.tokenizer, posed
    peft_config = config.adapter(head=posed.head, head_modules=loaded.head_modules + names(config.modules_to_save))
    return wrap(loaded.model, peft_config), loaded.tokenizer, posed


def splits(config: TrainConfig, task: Task) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, dev, test) subsampled to the configured sizes, seeded (MeZO's few-shot sets)."""
    return (subsample(task.train, config.train_size, config.seed), subsample(task.dev, config.dev_size, config.seed),
            subsample(task.test, config.test_size, config.seed))


# ``--lr auto``: (config, model, groups, tokenizer, formulation, train set, device, steps) -> the config
# with concrete learning rates and eps, and a line to print. The theory layer's
# ``hybridft.theory.auto.resolve_lr`` is one; whoever builds the run passes it (the CLI does).
ResolveLr = Callable[[TrainConfig, torch.nn.Module, Groups, Any, Formulation, list[Example], torch.device, int],
                     tuple[TrainConfig, str]]


def build(config: TrainConfig, *, resolve_lr: ResolveLr | None = None) -> Run:
    """Data, model, parameter groups, optimizer and schedules of ``config``; nothing is written.
    ``resolve_lr`` sets the step sizes of a config with ``lr="auto"`` (required for one)."""
    config.validate()
    if config.lr == "auto" and resolve_lr is None:
        raise ValueError("--lr auto needs a step-size resolver: pass resolve_lr=hybridft.theory.auto.resolve_lr")
    if config.threads:
        torch.set_num_threads(config.threads)
    world, device = distributed.init(pick_device(config.device))
    torch.manual_seed(config.seed)  # head initialisation and dropout; ZO directions never use it

    task = load_task(config.task, seed=config.seed, data_dir=config.data_dir)
    train_set, dev_set, test_set = splits(config, task)
    sampler = distributed.shard_sampler(len(train_set), config.batch_size * config.grad_accum, world, seed=config.seed,
                                        replacement=config.sampler == "replacement")
    model, tokenizer, posed = build_model(config, task)
    posed = fit_context(posed, context_length(model, tokenizer))
    groups = assign(config.method, model)
    model.to(device)

    steps = total_steps(config, len(train_set), world.size)
    if config.lr == "auto" and resolve_lr is not None:  # zo-lr, fo-lr and eps from the smoothness (docs/theory.md)
        config, message = resolve_lr(config, model, groups, tokenizer, posed, train_set, device, steps)
        if world.rank == 0:
            print(message)
    optimizer = build_optimizer(model, groups, zo_lr=config.zo_lr, seed=config.seed, fo=config.fo_step(),
                                **config.zo_step())
    schedule_names = [config.zo_schedule] + [config.fo_schedule] * (len(optimizer.param_groups) - 1)
    lr_scheduler = scheduler(optimizer, schedule_names, total_steps=steps, warmup_steps=config.warmup_steps)
    return Run(config=config, train_set=train_set, dev_set=dev_set, sampler=sampler, model=model,
               tokenizer=tokenizer, groups=groups, optimizer=optimizer, lr_scheduler=lr_scheduler,
               steps=steps, device=device, formulation=posed, test_set=test_set,
               data_parallel=distributed.data_parallel(world, device, model, groups.fo))


def fit_context(posed: Formulation, context: int | None) -> Formulation:
    """``posed`` with its ``max_length`` cut to the model's context (one warning), so that longer
    inputs are truncated instead of indexing past the position table."""
    if context is None or posed.max_length <= context:
        return posed
    warnings.warn(f"--max-length {posed.max_length} exceeds the model's context of {context} tokens; "
                  f"inputs are truncated to {context}", stacklevel=3)
    return dataclasses.replace(posed, max_length=context)  # type: ignore[type-var]


def train_step(run: Run, step: int, indices: list[int]) -> dict[str, Any]:
    """One optimizer step and one scheduler step on the mini-batch ``indices`` (this rank's slice
    of it, with several ranks); its metrics."""
    lrs = {g["name"]: g["lr"] for g in run.optimizer.param_groups}
    parallel = run.data_parallel
    sent, waited = (dict(parallel.sent), parallel.seconds) if parallel else ({}, 0.0)
    reduce = parallel.reducer(len(indices)) if parallel else None
    # lomo, adalomo: each gradient is averaged over ranks in its own hook
    sync = parallel.in_backward(len(indices)) if parallel and run.optimizer.updates_in_backward else None
    closure = step_closure(run.model, run.optimizer, run.formulation, run.batch, indices,
                           grad_accum=run.config.grad_accum, fused=run.config.fused)
    loss = float(run.optimizer.step(closure, reduce=reduce, sync=sync))
    run.lr_scheduler.step()
    update = run.optimizer.last_update
    return {
        "step": step + 1, "epoch": run.sampler.epoch + run.sampler.position / len(run.sampler), "loss": loss,
        "zo_lr": lrs["zo"] if run.groups.zo else None, "fo_lr": lrs.get("fo"),
        "projected_grad": (sum(update.projected_grads) / len(update.projected_grads)) if update else None,
        "skipped": run.optimizer.skipped,
        **{f"sent_bytes_{part}": parallel.sent[part] - sent[part] for part in sent if parallel},
        **({"allreduce_seconds": parallel.seconds - waited} if parallel else {}),
    }


def train(config: TrainConfig, *, overwrite: bool = False, resume: bool = False,
          resolve_lr: ResolveLr | None = None) -> Result:
    """Fine-tune ``config.model`` on ``config.task`` with ``config.method``; write the run to disk.
    ``resume``: continue the run in ``config.output_dir`` from its latest checkpoint, exactly.
    ``resolve_lr``: see :func:`build` (needed for ``lr="auto"``).
    The output directory is locked for the whole run (:mod:`hybridft.run.lock`: a second run
    into it is refused); SIGTERM, SIGINT or SIGUSR1 stops the run at a checkpoint, raising
    :class:`~hybridft.run.stop.Stopped`; a write that fails raises
    :class:`~hybridft.run.disk.WriteFailed`."""
    config.validate()
    out = prepare_output_dir(config, overwrite, resume)
    with lock.held(out, hold=distributed.world().main):  # only rank 0 writes
        check_output_dir(out, overwrite, resume)  # again, locked: another run may have written it meanwhile
        run = build(config, resolve_lr=resolve_lr)
        done, extra = begin(run, out, resume)
        loop(run, out, done, extra)
        return finish(run, out, extra)


def begin(run: Run, out: Path, resume: bool) -> tuple[int, dict[str, Any]]:
    """Start the run in ``out``, or restore it from its latest checkpoint (rank 0 writes), and
    measure the dev accuracy before training. Returns (steps done, the loop's saved values)."""
    main = run.world.main
    done, extra = restore(run, out) if resume else start(run, out) if main else (0, {})
    if "dev_accuracy_before" not in extra:  # a resumed run measured it before its first step
        extra["dev_accuracy_before"] = run.dev_accuracy()
    if main:
        print(f"dev accuracy before training: {extra['dev_accuracy_before']:.4f} ({len(run.dev_set)} examples)")
    return done, extra


def loop(run: Run, out: Path, done: int, extra: dict[str, Any]) -> None:
    """Steps ``done + 1`` to ``run.steps``: rank 0 logs every step and writes a checkpoint every
    ``checkpoint_every`` steps and after the last. A stop signal (:mod:`hybridft.run.stop`) ends
    the loop after the current step, at a checkpoint, with :class:`~hybridft.run.stop.Stopped`."""
    config, main = run.config, run.world.main
    clock, bad = time.perf_counter() - extra.get("seconds", 0.0), 0
    with tqdm(total=run.steps, initial=done, desc=f"{config.method} {config.task}",
              disable=not (config.progress and main), dynamic_ncols=True) as bar, \
            stop.requested() as request, open_logs(out, main) as logs:
        for step, indices in zip(range(done, run.steps), run.sampler):
            record = train_step(run, step, indices)
            if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < run.steps:
                tick = time.perf_counter()
                record["dev_accuracy"] = run.dev_accuracy()
                clock += time.perf_counter() - tick  # "seconds" counts training time only
            extra.update(seconds=time.perf_counter() - clock, loss=record["loss"])
            if logs:
                log(logs, out, {**record, "seconds": extra["seconds"]}, run.optimizer.last_update)
            bad = guard(run, out, step, bad + 1 if record["skipped"] else 0)
            signum = stop_signal(run, request)
            periodic = not bad and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0
            if signum or periodic or step + 1 == run.steps:
                rng = run.data_parallel.rng_states() if run.data_parallel else None  # collective: every rank
                if logs:
                    save_checkpoint(run, out, step + 1, logs, extra, rng)
            bar.set_postfix(loss=f"{record['loss']:.4f}", zo_lr=f"{record['zo_lr'] or 0:.1e}",
                            fo_lr=f"{record['fo_lr'] or 0:.1e}", refresh=False)
            bar.update()
            if signum:
                raise stop.Stopped(f"stopped at step {step + 1} by {stop.name(signum)}; "
                                   f"resume with hybridft train --resume {out}", signum)


def stop_signal(run: Run, request: stop.Request) -> int:
    """The stop signal this process (with several ranks: any rank) received, 0 for none; every
    rank gets the same answer, so that all stop after the same step (one tiny all-reduce)."""
    signum = request.signum or 0
    return run.data_parallel.largest(signum) if run.data_parallel else signum


def finish(run: Run, out: Path, extra: dict[str, Any]) -> Result:
    """The end of a run: final dev (and test) accuracy; rank 0 saves the model, then ``eval.json``."""
    before, after, loss = extra["dev_accuracy_before"], run.dev_accuracy(), extra.get("loss", float("nan"))
    if run.data_parallel:
        run.data_parallel.check_identical(run.model)
    say = print if run.world.main else lambda *_: None
    say(f"dev accuracy after {run.steps} steps: {after:.4f}")
    test = run.test_accuracy()
    if test is not None:
        say(f"test accuracy after {run.steps} steps: {test:.4f} ({len(run.test_set)} examples)")
    result = {"dev_accuracy_before": before, "dev_accuracy_after": after, "dev_size": len(run.dev_set),
              "test_accuracy_after": test, "test_size": len(run.test_set), "steps": run.steps, "final_loss": loss,
              "train_seconds": extra.get("seconds", 0.0), "skipped_steps": run.optimizer.skipped_steps,
              "peak_memory_mib": peak_memory_mib(run.device), "ranks": run.world.size}
    if run.world.main:
        with disk.writing("the model", out):
            disk.require(out)  # removed mid-run: transformers would save into a new, empty directory
            export.save(run.model, run.tokenizer, out, merged=run.config.save_merged)
        with disk.writing("eval.json", out):
            checkpoint.write_atomically(out / "eval.json", json.dumps(result, indent=2))  # last: marks the run complete
        print(f"saved to {out}")
    return Result(output_dir=out, dev_accuracy_before=before, dev_accuracy_after=after, final_loss=loss,
                  model=run.model, tokenizer=run.tokenizer, test_accuracy_after=test)


def start(run: Run, out: Path) -> tuple[int, dict[str, Any]]:
    """A fresh run directory: config.json, and no logs, checkpoints or results of an overwritten run
    (whose config.json goes first: a start that fails midway leaves no run to resume by mistake)."""
    with disk.writing("config.json", out):
        out.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", *LOGS, "eval.json"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / checkpoint.DIRNAME, ignore_errors=True)
        checkpoint.write_atomically(out / "config.json", json.dumps(describe(run), indent=2))
    return 0, {}


def restore(run: Run, out: Path) -> tuple[int, dict[str, Any]]:
    """Load the latest checkpoint of ``out`` into ``run`` and cut the logs back to it; with no
    checkpoint yet, start over. Returns (steps done, the loop's saved values)."""
    with disk.writing("the logs", out):  # cut back to the checkpoint
        state = checkpoint.resume(run, out, LOGS, write=run.world.main)
    if run.world.main:
        print(f"resuming {out} after step {state['step']}")
    return state["step"], state["extra"]


def guard(run: Run, out: Path, step: int, bad: int) -> int:
    """Report a skipped step; stop after ``max_bad_steps`` in a row. Returns ``bad``."""
    if bad and run.world.main:
        tqdm.write(f"step {step + 1}: non-finite loss or gradient; step skipped, weights unchanged")
    if bad >= run.config.max_bad_steps:
        saved = checkpoint.checkpoints(out)
        raise TrainingDiverged(f"{bad} consecutive steps (up to step {step + 1}) had a non-finite loss or gradient; "
                               f"stopped. Last good checkpoint: {saved[-1] if saved else 'none'}. Lower the learning rates.")
    return bad


def save_checkpoint(run: Run, out: Path, step: int, logs: checkpoint.Logs, extra: dict[str, Any],
                    rng: dict[str, Any] | None = None) -> None:
    """The checkpoint after ``step``, the logs made durable first; non-finite weights stop the run
    instead (TrainingDiverged), a failed write raises WriteFailed."""
    try:
        with disk.writing(f"checkpoint step {step}", out):
            checkpoint.save(run, out, step, logs=logs.sync(), extra=extra, keep=run.config.keep_checkpoints, rng=rng)
    except FloatingPointError as error:
        raise TrainingDiverged(str(error)) from error


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
            "steps": run.steps, "max_length": run.formulation.max_length,
            "train_examples": len(run.train_set), "dev_examples": len(run.dev_set),
            "test_examples": len(run.test_set), "formulation": type(run.formulation).__name__,
            "zo_parameters": sum(p.numel() for p in groups.zo.values()),
            "fo_parameters": sum(p.numel() for p in groups.fo.values()),
            "frozen_parameters": sum(p.numel() for p in groups.frozen.values()),
            "torch": torch.__version__, "ranks": run.world.size,
            **({"ddp_full_finetuning_bytes_per_step": distributed.ddp_bytes([*groups.zo.values(), *groups.fo.values()])}
               if run.data_parallel else {}),
        },
    }
