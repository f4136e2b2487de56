"""bf16/fp16 models do not drift under perturbation: 100 ZO steps with learning rate 0, through
the optimizer, leave every weight bitwise unchanged (MeZO's in-place +eps, -2 eps, +eps does not)."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from hybridft.engine.methods import assign, build_optimizer
from hybridft.engine.estimators import TwoSided
from hybridft.engine.rules import replay_, update_
from hybridft.engine.storage import stochastic_round, storage_rule
from hybridft.engine.zo import ZOUpdate, direction, parameter_key, perturb_

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
    opt = build_optimizer(model, groups, zo_lr=0.0, seed=0, estimator=TwoSided(eps=1e-2))
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


def kept(before: torch.Tensor, after: torch.Tensor, exact: torch.Tensor) -> float:
    """The share of the exact update ``exact`` that the stored weights moved along it."""
    moved = after.float() - before.float()
    return float((moved * exact).sum() / (exact * exact).sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_keeps_small_zo_updates_that_nearest_rounding_loses(dtype):
    weight = (torch.randn(1000, 1000, generator=torch.Generator().manual_seed(0)) * 0.05).to(dtype)
    exact = -1e-6 * direction(weight, seed=3, key=1).float()  # a MeZO-sized step: lr 1e-6, g = 1
    shares = {}
    for rounding in ("nearest", "stochastic"):
        stored = weight.clone()
        update_(stored, key=1, update=ZOUpdate(step=0, seeds=(3,), projected_grads=(1.0,), lr=1e-6, weight_decay=0.0,
                                              rounding=rounding))
        shares[rounding] = kept(weight, stored, exact)
    assert shares["nearest"] < 0.2 and shares["stochastic"] == pytest.approx(1.0, abs=0.1), shares


def test_stochastic_round_picks_a_neighbour_with_the_probability_that_makes_it_exact():
    exact = torch.randn(1000, generator=torch.Generator().manual_seed(1)).repeat(2000)
    rounded = stochastic_round(exact, torch.bfloat16, torch.Generator().manual_seed(2))
    nearest = exact.to(torch.bfloat16)
    other = torch.nextafter(nearest, torch.where(exact > nearest.float(), float("inf"), float("-inf")).to(torch.bfloat16))
    assert bool(((rounded == nearest) | (rounded == other)).all()) and bool((rounded != nearest).any())
    gap = (other.float() - nearest.float()).abs().view(2000, 1000)[0]
    error = rounded.float().view(2000, 1000).mean(0) - exact[:1000]
    assert bool((error.abs() <= 4 * 0.5 * gap / 2000**0.5).all())  # mean of 2000 draws: 4 standard errors at most


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_half_precision_zo_run_replays_bitwise(rounding):
    model = small_bert(torch.bfloat16)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = assign("zo-full", model)
    opt = build_optimizer(model, groups, zo_lr=1e-4, seed=0, estimator=TwoSided(eps=1e-2), storage=storage_rule(rounding))
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 128, (4, 12), generator=g), "labels": torch.randint(0, 2, (4,), generator=g)}
    log = []
    for _ in range(5):
        opt.step(lambda: model(**batch).loss.detach())
        log.append(opt.last_update)
    assert {u.rounding for u in log} == {rounding}
    rebuilt = {n: initial[n].clone() for n in groups.zo}
    replay_(rebuilt.items(), log)
    assert all(torch.equal(rebuilt[n], p) for n, p in groups.zo.items())
    assert any(not torch.equal(initial[n], p) for n, p in groups.zo.items())


def test_the_optimizer_warns_on_nearest_rounding_of_half_precision_zo_weights_only():
    for dtype, rounding, warns in ((torch.bfloat16, "nearest", True), (torch.float16, "nearest", True),
                                   (torch.bfloat16, "stochastic", False), (torch.float32, "nearest", False)):
        model = small_bert(dtype)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            build_optimizer(model, assign("zo-full", model), zo_lr=1e-6, seed=0, storage=storage_rule(rounding))
        messages = [str(w.message) for w in caught]
        assert any("rounded to nearest" in m for m in messages) == warns, (dtype, rounding, messages)
