"""The training loop, top to bottom: data, model, method, optimizer, steps, evaluation, save."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hybridft import evaluate, export
from hybridft.config import TrainConfig
from hybridft.methods import USES_ADAPTER, assign, build_optimizer, lora_config, wrap
from hybridft.models import load_classifier
from hybridft.sampler import ReshufflingSampler
from hybridft.schedules import scheduler
from hybridft.tasks import load_task, subsample


@dataclass(frozen=True)
class Result:
    output_dir: Path
    dev_accuracy_before: float
    dev_accuracy_after: float
    final_loss: float
    model: torch.nn.Module
    tokenizer: Any


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


def train(config: TrainConfig, *, overwrite: bool = False) -> Result:
    """Fine-tune ``config.model`` on ``config.task`` with ``config.method``; write the run to disk."""
    config.validate()
    out = prepare_output_dir(config, overwrite)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = pick_device(config.device)
    torch.manual_seed(config.seed)  # head initialisation and dropout; ZO directions never use it

    task = load_task(config.task, seed=config.seed)
    train_set = subsample(task.train, config.train_size, config.seed)
    dev_set = subsample(task.dev, config.dev_size, config.seed)
    sampler = ReshufflingSampler(len(train_set), config.batch_size, seed=config.seed,
                                 replacement=config.sampler == "replacement")
    loaded = load_classifier(config.model, task.num_labels, trust_remote_code=config.trust_remote_code)
    model, tokenizer = loaded.model, loaded.tokenizer
    if USES_ADAPTER[config.method]:
        targets = config.target_modules
        if targets and targets != "all-linear":
            targets = names(targets)  # type: ignore[assignment]
        extra = names(config.modules_to_save)
        model = wrap(model, lora_config(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                                        target_modules=targets, head_modules=loaded.head_modules + extra))
    groups = assign(config.method, model)
    model.to(device)

    steps = total_steps(config, len(train_set))
    optimizer = build_optimizer(
        model, groups, zo_lr=config.zo_lr, fo_lr=config.fo_lr, eps=config.eps, seed=config.seed,
        fo_optimizer=config.fo_optimizer, fo_momentum=config.fo_momentum,
        zo_weight_decay=config.zo_weight_decay, fo_weight_decay=config.fo_weight_decay,
        num_directions=config.num_directions, one_sided=config.one_sided, distribution=config.distribution,
        fused=config.fused, z_cache=config.z_cache, z_dtype=config.z_dtype, embedding_rows=config.embedding_rows,
        threads=config.zo_threads,
    )
    schedule_names = [config.zo_schedule] + [config.fo_schedule] * (len(optimizer.param_groups) - 1)
    lr_scheduler = scheduler(optimizer, schedule_names, total_steps=steps, warmup_steps=config.warmup_steps)

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(describe(config, groups, steps, len(train_set), len(dev_set)), indent=2))
    eval_args = dict(max_length=config.max_length, batch_size=config.eval_batch_size, device=device)
    before = evaluate.accuracy(model, tokenizer, dev_set, **eval_args)  # type: ignore[arg-type]
    print(f"dev accuracy before training: {before:.4f} ({len(dev_set)} examples)")

    start, loss = time.perf_counter(), float("nan")
    bar = tqdm(total=steps, desc=f"{config.method} {config.task}", disable=not config.progress, dynamic_ncols=True)
    with open(out / "metrics.jsonl", "w", encoding="utf-8") as metrics:
        for step, indices in zip(range(steps), sampler):
            batch = evaluate.encode(tokenizer, [train_set[i] for i in indices], max_length=config.max_length, device=device)

            def closure() -> torch.Tensor:
                # ZO evaluations: one function at +eps and -eps (eval mode; with --fused the FO pass is one
                # of them, so all run in train mode, the optimizer replaying the RNG so dropout masks agree)
                model.train(torch.is_grad_enabled() or config.fused)
                optimizer.zero_grad()
                value = evaluate.loss(model, batch)
                if torch.is_grad_enabled():
                    value.backward()
                return value.detach()

            lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
            loss = float(optimizer.step(closure))
            lr_scheduler.step()
            update = optimizer.last_update
            record = {
                "step": step + 1, "epoch": sampler.epoch + sampler.position / len(sampler), "loss": loss,
                "zo_lr": lrs["zo"] if groups.zo else None, "fo_lr": lrs.get("fo"),
                "projected_grad": (sum(update.projected_grads) / len(update.projected_grads)) if update else None,
                "seconds": time.perf_counter() - start,
            }
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            bar.set_postfix(loss=f"{loss:.4f}", zo_lr=f"{lrs['zo']:.1e}", fo_lr=f"{lrs.get('fo', 0):.1e}", refresh=False)
            bar.update()
    bar.close()

    after = evaluate.accuracy(model, tokenizer, dev_set, **eval_args)  # type: ignore[arg-type]
    print(f"dev accuracy after {steps} steps: {after:.4f}")
    result = {"dev_accuracy_before": before, "dev_accuracy_after": after, "dev_size": len(dev_set),
              "steps": steps, "final_loss": loss, "train_seconds": time.perf_counter() - start}
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    export.save(model, tokenizer, out, merged=config.save_merged)
    print(f"saved to {out}")
    return Result(output_dir=out, dev_accuracy_before=before, dev_accuracy_after=after, final_loss=loss,
                  model=model, tokenizer=tokenizer)


def describe(config: TrainConfig, groups: Any, steps: int, n_train: int, n_dev: int) -> dict[str, Any]:
    """The resolved config plus what it resolved to (sizes, step count, trained parameters)."""
    return {
        **config.to_dict(),
        "resolved": {
            "steps": steps, "train_examples": n_train, "dev_examples": n_dev,
            "zo_parameters": sum(p.numel() for p in groups.zo.values()),
            "fo_parameters": sum(p.numel() for p in groups.fo.values()),
            "frozen_parameters": sum(p.numel() for p in groups.frozen.values()),
            "torch": torch.__version__,
        },
    }
