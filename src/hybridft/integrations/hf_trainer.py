"""Hybrid fine-tuning inside ``transformers.Trainer``: the Trainer's loop, HybridOptimizer's step.

``HybridTrainer`` is a ``Trainer`` that builds a ``HybridOptimizer`` (ZO on the base weights,
the Trainer's own optimizer choice on the adapter and head) and lets the Trainer run everything
else: data loading, mixed precision, DDP, gradient accumulation and clipping, logging,
evaluation, checkpoints, resume. What it overrides, and why:

- ``training_step``: the Trainer's forward + backward of the FO loss, unchanged; the micro-batch
  is also kept for the ZO half (its inputs, not its activations).
- the optimizer step: the Trainer calls ``optimizer.step()`` without a closure; a step pre-hook
  (a torch.optim API) hands HybridOptimizer a closure over the accumulation window, so the
  ZO evaluations run at the same (theta, phi) as the backward passes, just before both updates.
- ``create_optimizer``/``create_scheduler``: HybridOptimizer, and one LambdaLR whose ZO group
  follows ``zo_lr_scheduler_type`` and whose FO groups follow ``lr_scheduler_type``.
- the train sampler: the CLI's reshuffling order (``EpochSampler``) for the default strategy.
- ``_save``/``_load_from_checkpoint``/``_load_best_model``: the base weights ZO changed are saved
  in ``model/`` next to the adapter and loaded back (the optimizer state file holds the ZO state).
- ``log``: ``learning_rate`` is the FO group's; ``zo_learning_rate`` and ``projected_grad`` are added.
- ``get_batch_samples``: once, a check that the model's loss really is normalised by the item
  count when the Trainer assumes so (transformers issue #47688; see ``_check_loss_kwargs``).

Gradient accumulation, defined for the ZO half. An optimizer step covers a window of
k = ``gradient_accumulation_steps`` micro-batches B_1..B_k (per process). The FO half is the
Trainer's: each micro-batch's loss l_i (divided by k unless the loss is already normalised
over the window) is back-propagated as it arrives. The ZO half takes one direction z for the
whole window and differentiates the very same sum, averaged over processes:

    L_W(theta) = mean over processes of sum_i l_i(theta)
    projected_grad = [L_W(theta + eps z) - L_W(theta - eps z)] / (2 eps)

So an accumulated step is one hybrid step on the union of the micro-batches (up to padding),
for both halves, provided the Trainer's division by k is right: ``_check_loss_kwargs`` makes it so. Cost per step: the Trainer's k forward+backward passes plus 2k no-grad
forwards per direction (k more for ``method`` without an FO group, whose logged loss needs one
forward); one all-reduce of a scalar per evaluation when there are several processes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

from hybridft.engine.directions import direction_sampler
from hybridft.engine.estimators import estimator
from hybridft.engine.methods import FUSED_FO, METHODS, assign
from hybridft.engine.modes import evaluating
from hybridft.engine.optim import HybridOptimizer
from hybridft.engine.rules import ZOSGD
from hybridft.engine.sampler import EpochSampler
from hybridft.engine.storage import storage_rule
from hybridft.engine.zo import HyperparameterError
from hybridft.run.export import is_peft, load_base_, save_base

logger = logging.get_logger(__name__)

BASE_DIR = "model"  # under a checkpoint or output dir: the base model with the ZO updates


@dataclass
class HybridTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the ZO half. The usual fields (``learning_rate``, ``optim``,
    ``weight_decay``, ``lr_scheduler_type``, warmup) configure the FO half (adapter + head);
    ``seed`` also seeds the ZO directions and (unless ``data_seed`` is set) the batch order."""

    method: str = field(default="hybrid", metadata={"help": f"what is trained and how: {', '.join(METHODS)}"})
    zo_learning_rate: float = field(default=1e-6, metadata={"help": "learning rate of the ZO group (base weights)"})
    zo_eps: float = field(default=1e-3, metadata={"help": "ZO perturbation scale"})
    zo_weight_decay: float = field(default=0.0, metadata={"help": "weight decay of the ZO group"})
    zo_num_directions: int = field(default=1, metadata={"help": "ZO directions averaged per step (q)"})
    zo_one_sided: bool = field(default=False, metadata={"help": "one-sided ZO estimate (L(theta+eps z) - L(theta)) / eps"})
    zo_distribution: str = field(default="gaussian", metadata={"help": "distribution of z: gaussian or rademacher"})
    zo_rounding: str = field(default="stochastic", metadata={"help": "ZO updates into bf16/fp16 weights: stochastic or nearest rounding"})
    zo_lr_scheduler_type: str = field(default="constant", metadata={"help": "schedule of the ZO learning rate (a lr_scheduler_type)"})
    zo_estimator: str = field(default="spsa", metadata={"help": "spsa (finite differences) or fzoo (zo_num_directions >= 2 one-sided probes normalised by the std of their losses)"})
    zo_directions: str = field(default="dense", metadata={"help": "dense, low-rank, layer-subset or magnitude-mask (docs/zo_rules.md)"})
    zo_rank: int = field(default=2, metadata={"help": "rank of low-rank directions"})
    zo_v_every: int = field(default=1, metadata={"help": "keep V of low-rank directions for this many steps"})
    zo_layer_fraction: float = field(default=0.25, metadata={"help": "fraction of the blocks perturbed per step (layer-subset)"})
    zo_mask_fraction: float = field(default=0.25, metadata={"help": "fraction of each tensor's smallest weights perturbed (magnitude-mask)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.method in FUSED_FO:
            raise ValueError(f"method {self.method} updates each weight inside backward, which the Trainer's loop "
                             f"(its clipping, accumulation and optimizer step) cannot drive; use hybridft train --method {self.method}")
        if self.zo_learning_rate <= 0:
            raise ValueError(f"zo_learning_rate must be positive, got {self.zo_learning_rate}")
        self.zo_step()  # each object checks its own values

    def zo_step(self) -> dict[str, Any]:
        """The objects the ZO step is composed of (``HybridOptimizer``'s estimator, directions,
        rule, storage), made from the ``zo_*`` fields; a bad value is a one-line error naming its field."""
        try:
            return {"estimator": estimator(eps=self.zo_eps, num_directions=self.zo_num_directions,
                                           one_sided=self.zo_one_sided, kind=self.zo_estimator),
                    "directions": direction_sampler(self.zo_directions, rank=self.zo_rank, v_every=self.zo_v_every,
                                                    fraction=self.zo_layer_fraction, mask_fraction=self.zo_mask_fraction,
                                                    distribution=self.zo_distribution),
                    "rule": ZOSGD(weight_decay=self.zo_weight_decay),
                    "storage": storage_rule(self.zo_rounding)}
        except HyperparameterError as error:
            names = {"fraction": "zo_layer_fraction", "num_directions": "zo_num_directions"}
            raise ValueError(f"{names.get(error.name, 'zo_' + error.name)} {error.problem}") from None


@dataclass(frozen=True)
class MicroBatch:
    """What the ZO half needs of one micro-batch: its inputs, the Trainer's item count, its loss."""

    inputs: dict[str, Any]
    num_items: torch.Tensor | int | None
    loss: torch.Tensor


def lr_multiplier(name: str, *, warmup_steps: int, total_steps: int, kwargs: dict[str, Any] | None = None) -> Callable[[int], float]:
    """transformers' schedule ``name`` as a step -> factor function (the one ``get_scheduler`` uses)."""
    from transformers import get_scheduler

    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = get_scheduler(name, optimizer=probe, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                             scheduler_specific_kwargs=kwargs)
    if not isinstance(schedule, torch.optim.lr_scheduler.LambdaLR):
        raise ValueError(f"HybridTrainer needs a per-step lr schedule (linear, cosine, constant, ...); got {name!r}")
    return schedule.lr_lambdas[0]


class HybridTrainer(Trainer):
    """``transformers.Trainer`` with hybrid ZO (base) + FO (adapter, head) steps; same constructor,
    ``args`` a ``HybridTrainingArguments``. The model is a peft model for the adapter methods."""

    args: HybridTrainingArguments

    def __init__(self, model: nn.Module | None = None, args: HybridTrainingArguments | None = None,
                 *rest: Any, **kwargs: Any) -> None:
        # Checked before Trainer.__init__, which creates the output directory.
        if not isinstance(args, HybridTrainingArguments):
            raise ValueError("HybridTrainer needs args=HybridTrainingArguments(...) (TrainingArguments plus the ZO settings)")
        if args.deepspeed or args.fsdp:
            raise ValueError("HybridTrainer does not support DeepSpeed or FSDP: ZO perturbs whole, unsharded weights")
        if kwargs.get("optimizers", (None, None))[0] is not None:
            raise ValueError("HybridTrainer builds its own HybridOptimizer; choose the FO optimizer with args.optim "
                             "or optimizer_cls_and_kwargs instead of optimizers=")
        if model is not None:
            assign(args.method, model)  # the model fits the method (an adapter where one is needed)
        super().__init__(model, args, *rest, **kwargs)
        self.groups = assign(self.args.method, self.model)
        self._window: list[MicroBatch] = []
        self._step_lrs: dict[str, float] = {}
        self._loss_kwargs_checked = False

    # ---- optimizer, schedule, batch order ----

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.groups = assign(self.args.method, self.model)  # again: model_init may have made a new model
            fo = super().create_optimizer(model) if self.groups.fo else None  # the Trainer's choice, on requires_grad
            a = self.args
            self.optimizer = HybridOptimizer(self.model, self.groups.zo, fo, lr=a.zo_learning_rate, seed=a.seed,
                                             **a.zo_step())
            self.optimizer.register_step_pre_hook(self._hand_closure)
        return self.optimizer

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """One LambdaLR: group 0 (ZO) follows zo_lr_scheduler_type, the FO groups lr_scheduler_type,
        with the same warmup."""
        if self.lr_scheduler is None:
            optimizer = optimizer if optimizer is not None else self.optimizer
            steps = dict(warmup_steps=self.args.get_warmup_steps(num_training_steps), total_steps=num_training_steps)
            zo = lr_multiplier(self.args.zo_lr_scheduler_type, **steps)  # type: ignore[arg-type]
            fo = lr_multiplier(self.args.lr_scheduler_type, kwargs=self.args.lr_scheduler_kwargs, **steps)  # type: ignore[arg-type]
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [zo] + [fo] * (len(optimizer.param_groups) - 1))
            self._created_lr_scheduler = True  # the Trainer rebuilds it on the next train() call
        return self.lr_scheduler

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        """The default ("random") strategy becomes the CLI's reshuffling order; others are the Trainer's."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "random" or dataset is None or not hasattr(dataset, "__len__"):
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return EpochSampler(len(dataset), seed=seed)

    # ---- the step ----

    def get_batch_samples(
        self, epoch_iterator: Any, num_batches: int, device: torch.device
    ) -> tuple[list, torch.Tensor | int | None]:
        """The Trainer's, plus a check, once, that the model really normalises its loss by
        ``num_items_in_batch`` when the Trainer assumes so (see ``_check_loss_kwargs``)."""
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if num_items is not None and not self._loss_kwargs_checked:
            self._loss_kwargs_checked = True
            if not self._check_loss_kwargs(batch_samples[0], num_items):
                num_items = None
        return batch_samples, num_items

    @torch.no_grad()
    def _check_loss_kwargs(self, inputs: dict[str, Any], num_items: torch.Tensor | int) -> bool:
        """Whether the loss depends on ``num_items_in_batch``; if not, the model is told not to take it.

        The Trainer assumes a model whose forward takes ``**kwargs`` divides its loss by the
        window's item count, so it neither divides by the accumulation steps nor averages over
        processes; heads that ignore the count (BERT's sequence classifier, for one) then train on
        a loss k (and P) times too large (transformers issue #47688). Adam hides that; the ZO step,
        plain SGD on the same loss, would not. Cost: two no-grad forwards, once.
        """
        if self.loss_is_scaled_for_ga is not None or self.compute_loss_func is not None:
            return True  # the user decided
        prepared = self._prepare_inputs(inputs)
        with evaluating(self.model), self.compute_loss_context_manager():
            once = self.compute_loss(self.model, prepared, num_items_in_batch=num_items)
            twice = self.compute_loss(self.model, prepared, num_items_in_batch=2 * num_items)
        if bool(once == 0) or not torch.equal(once, twice):
            return True
        if self.is_world_process_zero():
            logger.warning("the model's loss ignores num_items_in_batch: HybridTrainer averages it over gradient "
                           "accumulation steps and processes itself (model_accepts_loss_kwargs=False)")
        self.model_accepts_loss_kwargs = False
        return False

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """The Trainer's forward + backward (FO half); the micro-batch is kept for the ZO half."""
        if self.groups.fo:
            loss = super().training_step(model, inputs, num_items_in_batch)
        else:  # ZO only: nothing to back-propagate; one no-grad forward gives the loss the Trainer logs
            with torch.no_grad(), evaluating(self.model), self.compute_loss_context_manager():
                loss = self._micro_loss(inputs, num_items_in_batch)
        self._window.append(MicroBatch(inputs, num_items_in_batch, loss))
        return loss

    def _hand_closure(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        """Step pre-hook: ``optimizer.step()`` from the Trainer's loop gets the window's closure."""
        if kwargs.get("closure", args[1] if len(args) > 1 else None) is not None:
            return None  # a caller that brings its own closure keeps it
        window, self._window = self._window, []
        if not window:
            raise RuntimeError("HybridOptimizer.step() without a closure: no micro-batch since the last step")
        fo_loss = torch.stack([m.loss for m in window]).sum()
        self._step_lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}

        def closure() -> torch.Tensor:
            if torch.is_grad_enabled():
                return fo_loss  # training_step already back-propagated every micro-batch, at this same point
            return self._window_loss(window)

        return args[:1], {**kwargs, "closure": closure}

    @torch.no_grad()
    def _window_loss(self, window: list[MicroBatch]) -> torch.Tensor:
        """L_W: the sum of the micro-batch losses as training_step back-propagates them, in eval
        mode (the same function at +eps z and -eps z), averaged over processes."""
        with evaluating(self.model), self.compute_loss_context_manager():
            total = torch.stack([self._micro_loss(m.inputs, m.num_items) for m in window]).sum()
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, reduction="mean")
        return total

    def _micro_loss(self, inputs: dict[str, Any], num_items: torch.Tensor | int | None) -> torch.Tensor:
        """One micro-batch's loss, scaled for the window exactly as ``Trainer.training_step`` scales it."""
        loss = self.compute_loss(self.model, self._prepare_inputs(inputs), num_items_in_batch=num_items).detach()
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items is not None) or self.compute_loss_func is not None
        return loss if scaled else loss / self.current_gradient_accumulation_steps

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs: ``learning_rate`` is the FO group's, plus ``zo_learning_rate`` and the last
        step's ``projected_grad`` (mean over directions)."""
        if "learning_rate" in logs and self._step_lrs:
            logs["learning_rate"] = self._step_lrs.get("fo", self._step_lrs["zo"])
            if self.groups.zo:
                logs["zo_learning_rate"] = self._step_lrs["zo"]
            update = self._hybrid_optimizer().last_update
            if update is not None:
                logs["projected_grad"] = sum(update.projected_grads) / len(update.projected_grads)
        super().log(logs, start_time)

    def _hybrid_optimizer(self) -> HybridOptimizer:
        optimizer = self.optimizer
        while not isinstance(optimizer, HybridOptimizer):  # accelerate wraps it
            optimizer = optimizer.optimizer  # type: ignore[union-attr]
        return optimizer

    # ---- saving and resuming: the base weights ZO changed ----

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The Trainer's files (for a peft model: the adapter), plus ``model/``: the base model with
        the weights ZO changed, which the adapter alone would silently drop."""
        super()._save(output_dir, state_dict)
        if self.args.should_save and self.groups.zo and is_peft(self.model):
            save_base(self.model, Path(output_dir if output_dir is not None else self.args.output_dir) / BASE_DIR)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_base(resume_from_checkpoint, model if model is not None else self.model)

    def _load_best_model(self) -> None:
        super()._load_best_model()
        if self.state.best_model_checkpoint is not None:
            self._load_base(self.state.best_model_checkpoint, self.model)

    def _load_base(self, checkpoint: str, model: nn.Module) -> None:
        base = Path(checkpoint) / BASE_DIR
        if is_peft(model) and base.is_dir():
            load_base_(model, base)
        elif self.groups.zo and is_peft(model):
            raise ValueError(f"{checkpoint} has no {BASE_DIR}/: it does not hold the base weights ZO trained")

