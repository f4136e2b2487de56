"""bf16/fp16 models do not drift under perturbation: 100 ZO steps with learning rate 0, through
the optimizer, leave every weight bitwise unchanged (MeZO's in-place +eps, -2 eps, +eps does not)."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from hybridft.methods import assign, build_optimizer
from hybridft.zo import ZOUpdate, parameter_key, perturb_, update_

pytestmark = pytest.mark.usefixtures("one_thread")


def small_bert(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=128, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config).to(dtype)


def bits(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().view(torch.int16) for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_100_zo_steps_with_lr_0_leave_low_precision_weights_bitwise_unchanged(dtype):
    model = small_bert(dtype)
    groups = assign("zo-full", model)
    opt = build_optimizer(model, groups, zo_lr=0.0, fo_lr=1.0, eps=1e-2, seed=0)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 128, (4, 12), generator=g), "labels": torch.randint(0, 2, (4,), generator=g)}
    before = bits(model)

    def closure() -> torch.Tensor:
        return model(**batch).loss.detach()

    grads = []
    for _ in range(100):
        opt.step(closure)
        grads.append(opt.last_update.projected_grads[0])
    assert opt.skipped_steps == 0 and all(g == g for g in grads)  # every step ran (no NaN skipped it)
    assert sum(g != 0 for g in grads) > 50  # and the perturbed forwards saw the perturbation
    after = bits(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_in_place_plus_minus_arithmetic_drifts_in_low_precision(dtype):
    """The failure the test above guards against: MeZO's restore by arithmetic."""
    model = small_bert(dtype)
    before = bits(model)
    with torch.no_grad():
        for seed in range(10):
            for name, p in model.named_parameters():
                for scale in (1e-3, -2e-3, 1e-3):
                    perturb_(p, seed=seed, key=parameter_key(name), scale=scale)
    after = bits(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_small_zo_updates_round_away_in_low_precision_and_the_optimizer_warns(dtype):
    model = small_bert(dtype)
    with pytest.warns(UserWarning, match=f"ZO weights are {str(dtype)[6:]}: .* rounded away"):
        build_optimizer(model, assign("zo-full", model), zo_lr=1e-6, fo_lr=1.0, eps=1e-3, seed=0)
    # what the warning is about: a MeZO-sized update (lr 1e-6, |g| 1) leaves most weights as they were
    weight = model.bert.encoder.layer[0].intermediate.dense.weight.detach()
    update = ZOUpdate(step=0, seeds=(3,), projected_grads=(1.0,), lr=1e-6, weight_decay=0.0)
    low, full = weight.clone(), weight.float()
    update_(low, key=1, update=update)
    update_(full, key=1, update=update)
    assert (low == weight).float().mean() > 0.9 and (full != weight.float()).float().mean() > 0.99


def test_float32_zo_weights_give_no_precision_warning():
    model = small_bert(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_optimizer(model, assign("zo-full", model), zo_lr=1e-6, fo_lr=1.0, eps=1e-3, seed=0)
