"""A HybridTrainer set up exactly like a CLI run (same model, head initialisation, data, seed and
settings), so that tests can compare the two."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorWithPadding, TrainerCallback

from hybridft.run.config import TrainConfig
from hybridft.integrations.hf_trainer import HybridTrainer, HybridTrainingArguments
from hybridft.data.tasks import load_task, subsample
from hybridft.run.train import build_model

OPTIM = {"adamw": "adamw_torch", "sgd": "sgd"}  # the CLI's torch.optim classes (not the fused AdamW default)


def model_and_data(config: TrainConfig) -> tuple[torch.nn.Module, Any, list[dict[str, Any]]]:
    """The model, tokenizer and tokenized training set of ``hybridft.run.train.train(config)``, built
    by the same code from the same seed (so the new head and LoRA start from the same values)."""
    torch.manual_seed(config.seed)
    task = load_task(config.task, seed=config.seed, data_dir=config.data_dir)
    model, tokenizer, posed = build_model(config, task)
    examples = subsample(task.train, config.train_size, config.seed)
    data = [{**tokenizer(e.text, truncation=True, max_length=posed.max_length), "labels": e.label} for e in examples]
    return model, tokenizer, data


def trainer(config: TrainConfig, out: str | Path, *, eval_size: int = 0, compute_metrics: Any = None,
            **overrides: Any) -> HybridTrainer:
    """A HybridTrainer with ``config``'s settings; ``overrides`` are more HybridTrainingArguments.
    ``eval_size`` > 0 evaluates on that many training examples."""
    model, tokenizer, data = model_and_data(config)
    settings: dict[str, Any] = dict(
        output_dir=str(out), max_steps=config.steps, per_device_train_batch_size=config.batch_size,
        learning_rate=config.fo_lr, lr_scheduler_type=config.fo_schedule, optim=OPTIM[config.fo_optimizer],
        weight_decay=config.fo_weight_decay, warmup_steps=config.warmup_steps, max_grad_norm=0.0, seed=config.seed,
        method=config.method, zo_learning_rate=config.zo_lr, zo_eps=config.eps, zo_weight_decay=config.zo_weight_decay,
        zo_num_directions=config.num_directions, zo_one_sided=config.one_sided, zo_distribution=config.distribution,
        zo_lr_scheduler_type=config.zo_schedule, zo_estimator=config.zo_estimator, zo_directions=config.zo_directions,
        zo_rank=config.zo_rank, zo_v_every=config.zo_v_every, zo_layer_fraction=config.zo_layer_fraction,
        zo_mask_fraction=config.zo_mask_fraction, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    settings.update(overrides)
    return HybridTrainer(model=model, args=HybridTrainingArguments(**settings), train_dataset=data,
                         eval_dataset=data[:eval_size] or None, compute_metrics=compute_metrics,
                         data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)


class KillAt(TrainerCallback):
    """SIGKILL this process at the end of optimizer step ``step``, as a crash or a pre-emption would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

