"""Zero-shot evaluation: a model's accuracy on a task before any training, i.e. where a training
run starts (``hybridft eval``). Same data, seed, head initialisation and formulation as
``train.build``, so its dev accuracy equals a training run's "before" accuracy."""

from __future__ import annotations

from typing import Any

import torch

from hybridft.data import evaluate
from hybridft.run.config import TrainConfig
from hybridft.data.tasks import load_task
from hybridft.run.train import build_model, pick_device, splits


def zero_shot(config: TrainConfig) -> dict[str, Any]:
    """Dev (and, where the task has one, test) accuracy of ``config.model`` on ``config.task``.
    Cost: one forward per eval batch (times the number of candidates for a causal LM)."""
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = pick_device(config.device)
    torch.manual_seed(config.seed)  # a new encoder head starts as it would in training
    task = load_task(config.task, seed=config.seed, data_dir=config.data_dir)
    _, dev_set, test_set = splits(config, task)
    model, tokenizer, posed = build_model(config, task, adapter=False)
    model.to(device)
    result: dict[str, Any] = {"model": config.model, "task": task.name, "formulation": type(posed).__name__}
    for split, examples in (("dev", dev_set), ("test", test_set)):
        if examples:
            result[f"{split}_accuracy"] = evaluate.accuracy(model, posed, tokenizer, examples,
                                                            batch_size=config.eval_batch_size, device=device)
            result[f"{split}_size"] = len(examples)
    return result
