"""`hybridft train --lr auto`: zo-lr, fo-lr and eps from the smoothness at the starting point.

Either measures now (``SmoothnessConfig`` defaults: pairs on 3 mini-batches, gradients on 8, the
eps scan; about 30 forward+backward passes over all weights, no training steps) or reads a
``smoothness.json`` written by ``hybridft smoothness`` (``--smoothness FILE``). The advice is for
this run's batch size, training-set size, step count and number of ZO directions. The FO advice
is for plain SGD (the analysis' rule): with AdamW or momentum the FO learning rate is kept, and
the message says so. The resolved config holds the advised numbers with ``lr`` unset, so the
run's config.json records them and ``--resume`` continues with them without measuring again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hybridft.run.config import TrainConfig
from hybridft.data.formulations import Formulation
from hybridft.engine.methods import FUSED_FO
from hybridft.engine.sampler import ReshufflingSampler
from hybridft.data.tasks import Example
from hybridft.theory.advice import Advice, advise
from hybridft.theory.config import SmoothnessConfig, floats
from hybridft.theory.eps import advise_eps, eps_scan
from hybridft.theory.estimates import Data, statistics
from hybridft.theory.smoothness import LossFn, measure_start, from_dict


@dataclass(frozen=True)
class Resolved:
    config: TrainConfig  # with zo_lr, fo_lr and eps set from the advice
    advice: Advice
    eps: float | None
    message: str


def _loss_fns(model: torch.nn.Module, tokenizer: Any, posed: Formulation, examples: Sequence[Example],
              config: TrainConfig, device: torch.device, k: int) -> list[LossFn]:
    """The task loss on k mini-batches of the run's size, from a permutation other than training's."""
    batches = ReshufflingSampler(len(examples), config.batch_size, seed=config.seed + 1).epoch_batches(0)[:k]
    encoded = [posed.encode(tokenizer, [examples[i] for i in b], device=device) for b in batches]
    return [lambda batch=batch: posed.loss(model, batch) for batch in encoded]


def _measure(config: TrainConfig, model: torch.nn.Module, groups: Any, tokenizer: Any, posed: Formulation,
             examples: Sequence[Example], device: torch.device, settings: SmoothnessConfig,
             ) -> tuple[Data, list[dict[str, float]]]:
    blocks = {"theta": list(groups.zo.values()), "phi": list(groups.fo.values())}
    fns = _loss_fns(model, tokenizer, posed, examples, config, device, settings.variance_batches)
    data, _, first = measure_start(model, blocks, fns, pairs_on=settings.start_batches, kinds=settings.kind_list(),
                                   radius=settings.radius, generator=torch.Generator().manual_seed(config.seed),
                                   power={}, n=len(examples), batch_size=config.batch_size)
    scan = []
    if groups.zo:
        scan = eps_scan(model, groups.zo, first["theta"], fns[0], eps_grid=floats(settings.eps_grid),
                        directions=settings.eps_directions, seed=config.seed)
    return data, scan


def resolve(config: TrainConfig, model: torch.nn.Module, groups: Any, tokenizer: Any, posed: Formulation,
            examples: Sequence[Example], device: torch.device, steps: int,
            settings: SmoothnessConfig | None = None) -> Resolved:
    """The config with the advised learning rates and eps (see the module docstring)."""
    start = time.perf_counter()
    if config.smoothness:
        try:
            record = json.loads(Path(config.smoothness).read_text(encoding="utf-8"))
            data, scan = from_dict(record["measurement"]), record["measurement"]["eps_scan"]
        except (OSError, KeyError, json.JSONDecodeError) as error:
            raise ValueError(f"--smoothness {config.smoothness}: not a smoothness.json ({error})") from error
        dims = {"theta": sum(p.numel() for p in groups.zo.values()), "phi": sum(p.numel() for p in groups.fo.values())}
        if data.dims != dims:
            raise ValueError(f"--smoothness {config.smoothness} was measured on blocks of {data.dims} weights, "
                             f"this run has {dims}: another model, adapter or method")
    else:
        data, scan = _measure(config, model, groups, tokenizer, posed, examples, device, settings or SmoothnessConfig())
    _, constants = statistics(data, torch.arange(data.items), torch.arange(next(iter(data.gram.values())).shape[0]))
    advice = advise(constants, batch_size=config.batch_size, n=len(examples), steps=steps,
                    directions=config.num_directions)
    changes: dict[str, float] = {}
    notes = []
    if advice.zo_lr is not None:
        changes["zo_lr"] = advice.zo_lr
    plain_sgd = FUSED_FO.get(config.method, config.fo_optimizer) in ("sgd", "fused-sgd") and config.fo_momentum == 0
    if advice.fo_lr is not None and plain_sgd:
        changes["fo_lr"] = advice.fo_lr
    elif advice.fo_lr is not None:
        notes.append(f"fo-lr {config.fo_lr:g} kept: the advice ({advice.fo_lr:.3g}) is for plain SGD (--fo-optimizer sgd)")
    eps = advise_eps(scan) if scan else None
    if eps is not None:
        changes["eps"] = eps
    if any(v <= 0 for v in changes.values()):
        raise ValueError(f"--lr auto: the measurement gave a non-positive step size {changes}; measure with hybridft smoothness")
    source = config.smoothness or f"measured in {time.perf_counter() - start:.0f} s"
    told = ", ".join(f"{k.replace('_', '-')} {v:.3g}" for k, v in changes.items())
    message = f"--lr auto ({source}, for {steps} steps of batch {config.batch_size}): {told}" + "".join(f"; {n}" for n in notes)
    # concrete rates, lr unset: config.json records them and --resume reuses them without measuring
    return Resolved(config=config.replace(**changes, lr=None, smoothness=None), advice=advice, eps=eps, message=message)


def resolve_lr(config: TrainConfig, model: torch.nn.Module, groups: Any, tokenizer: Any, posed: Formulation,
               examples: Sequence[Example], device: torch.device, steps: int) -> tuple[TrainConfig, str]:
    """:func:`resolve` as the ``resolve_lr`` hook of ``hybridft.run.train.build``: (config, message)."""
    resolved = resolve(config, model, groups, tokenizer, posed, examples, device, steps)
    return resolved.config, resolved.message
