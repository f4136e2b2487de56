"""The lower-variance ZO rules as step objects: low-rank directions (LOZO), layer subsets (LeZO)
and normalised probes (FZOO). Each keeps the engine's invariants: exact replay from the log
(float32 and bfloat16), exact resume through state_dict, and only the weights it means to touch
change."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hybridft.engine.directions import LayerSubsetSampler, LowRankSampler, MagnitudeMaskSampler, active_keys, block_of
from hybridft.engine.methods import assign, build_optimizer
from hybridft.engine.rules import replay_
from hybridft.engine.zo import HyperparameterError, direction, magnitude_mask
from hybridft.run import zo_log
from tests.conftest import sgd, tiny_bert, zo_step
from tests.test_optim import closure_for

pytestmark = pytest.mark.usefixtures("one_thread")

RULES = {
    "low-rank": {"zo_directions": "low-rank", "zo_rank": 2, "zo_v_every": 2},
    "low-rank-fused-cache-rows": {"zo_directions": "low-rank", "zo_rank": 3, "fused": True, "z_cache": True,
                                  "embedding_rows": True, "threads": 2},
    "layer-subset": {"zo_directions": "layer-subset", "zo_layer_fraction": 0.5},
    "layer-subset-cache-rows": {"zo_directions": "layer-subset", "zo_layer_fraction": 0.34, "z_cache": True,
                                "embedding_rows": True},
    "fzoo": {"zo_estimator": "fzoo", "num_directions": 3, "distribution": "rademacher"},
    "magnitude-mask": {"zo_directions": "magnitude-mask", "zo_mask_fraction": 0.3, "num_directions": 2,
                       "zo_weight_decay": 0.1},
    "magnitude-mask-fused-cache-rows": {"zo_directions": "magnitude-mask", "zo_mask_fraction": 0.5, "fused": True,
                                        "z_cache": True, "embedding_rows": True},
}


def hybrid(dtype: torch.dtype = torch.float32, **flags):
    model = get_peft_model(tiny_bert(seed=0), LoraConfig(r=2, target_modules=["query", "value"],
                                                         modules_to_save=["classifier"]))
    model.to(dtype)
    groups = assign("hybrid", model)
    opt = build_optimizer(model, groups, zo_lr=1e-2, seed=3, fo=sgd(0.05), **zo_step(eps=1e-2, **flags))
    return model, groups, opt


def batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(1, 300, (4, 8), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(2, (4,), generator=g)}


def test_low_rank_z_has_rank_r_unit_variance_and_consistent_rows():
    w = torch.zeros(400, 300)
    z = direction(w, seed=1, key=2, low_rank=(3, 9))
    assert torch.linalg.matrix_rank(z) == 3
    assert abs(float(z.mean())) < 0.05 and float(z.var()) == pytest.approx(1.0, rel=0.1)
    rows = torch.tensor([0, 5, 399])
    assert torch.equal(direction(w, seed=1, key=2, low_rank=(3, 9), rows=rows), z[rows])
    assert not torch.equal(direction(w, seed=1, key=2, low_rank=(3, 10)), z)  # another V
    bias = torch.zeros(300)
    assert torch.equal(direction(bias, seed=1, key=2, low_rank=(3, 9)), direction(bias, seed=1, key=2))  # dense


def test_layer_subsets_are_a_seeded_fraction_of_the_blocks_derived_from_names():
    names = {i: f"bert.encoder.layer.{i // 2}.attention.w{i % 2}" for i in range(8)} | {8: "bert.embeddings.word"}
    assert {block_of(n) for n in names.values()} == {"block.0", "block.1", "block.2", "block.3", "other"}
    chosen = [active_keys(names, 0.4, seed) for seed in range(30)]
    assert all(len({block_of(names[k]) for k in c}) == 2 for c in chosen)  # round(0.4 * 5) units
    for c in chosen:  # whole units: every parameter of a chosen block
        units = {block_of(names[k]) for k in c}
        assert c == {k for k, n in names.items() if block_of(n) in units}
    assert chosen[0] == active_keys(names, 0.4, 0) and len(set(chosen)) > 3
    assert active_keys(names, 1.0, 5) == frozenset(names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", list(RULES))
def test_every_rule_replays_bitwise_from_its_log(rule, dtype):
    model, groups, opt = hybrid(dtype, **RULES[rule])
    initial, lines = {n: p.detach().clone() for n, p in groups.zo.items()}, []
    for step in range(4):
        opt.step(closure_for(model, opt, batch(step), same_mode=RULES[rule].get("fused", False)))
        lines.append(zo_log.to_json(opt.last_update))
    log = [zo_log.from_json(line) for line in lines]  # through the log format
    rebuilt = {n: t.clone() for n, t in initial.items()}
    replay_(rebuilt.items(), log)
    assert all(torch.equal(rebuilt[n], p) for n, p in groups.zo.items())
    assert any(not torch.equal(initial[n], p) for n, p in groups.zo.items())


def test_a_layer_subset_step_touches_only_its_blocks():
    model, groups, opt = hybrid(zo_directions="layer-subset", zo_layer_fraction=0.34)
    names = {k: n for k, n in opt.names.items()}
    for step in range(6):
        before = {n: p.detach().clone() for n, p in groups.zo.items()}
        opt.step(closure_for(model, opt, batch(step)))
        active = active_keys(names, 0.34, opt.last_update.seeds[0])
        moved = {n for n, p in groups.zo.items() if not torch.equal(before[n], p)}
        assert moved and moved <= {names[k] for k in active}
        assert len({block_of(n) for n in moved}) == 1  # round(0.34 * 3 units)


def test_resume_through_state_dict_is_exact_for_the_rules():
    for flags in (RULES["low-rank"], RULES["layer-subset"]):
        model, _, opt = hybrid(**flags)
        for step in range(3):
            opt.step(closure_for(model, opt, batch(step)))
        saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), torch.get_rng_state())
        for step in range(3, 6):
            opt.step(closure_for(model, opt, batch(step)))
        model2, _, opt2 = hybrid(**flags)
        model2.load_state_dict(saved[0])
        opt2.load_state_dict(saved[1])
        torch.set_rng_state(saved[2])  # dropout in the FO pass draws from the global RNG
        for step in range(3, 6):
            opt2.step(closure_for(model2, opt2, batch(step)))
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    with pytest.raises(ValueError, match="sampler"):
        hybrid(**RULES["low-rank"])[2].load_state_dict(hybrid(**RULES["layer-subset"])[2].state_dict())


@pytest.mark.parametrize("make,name", [
    (lambda: LowRankSampler(rank=0), "rank"), (lambda: LowRankSampler(v_every=0), "v_every"),
    (lambda: LayerSubsetSampler(fraction=0.0), "fraction"), (lambda: LayerSubsetSampler(fraction=1.5), "fraction"),
    (lambda: MagnitudeMaskSampler(fraction=0.0), "mask_fraction"),
])
def test_rule_hyperparameters_are_checked_where_made(make, name):
    with pytest.raises(HyperparameterError) as error:
        make()
    assert error.value.name == name


def test_plain_log_lines_keep_their_old_fields():
    model, _, opt = hybrid()
    opt.step(closure_for(model, opt, batch(0)))
    assert set(__import__("json").loads(zo_log.to_json(opt.last_update))) == {
        "step", "seeds", "projected_grads", "lr", "weight_decay", "distribution", "z_dtype", "rows", "rounding"}


def test_magnitude_mask_keeps_the_smallest_fraction_of_each_tensor():
    w = torch.tensor([[0.5, -0.1, 2.0], [-3.0, 0.05, 0.2]])
    assert magnitude_mask(w, 0.5).tolist() == [[False, True, False], [False, True, True]]
    assert magnitude_mask(w, 1.0).all() and magnitude_mask(w, 1e-9).sum() == 1


def test_a_magnitude_mask_step_moves_only_the_small_weights_of_each_tensor():
    model, groups, opt = hybrid(zo_directions="magnitude-mask", zo_mask_fraction=0.3)
    for step in range(3):
        before = {n: p.detach().clone() for n, p in groups.zo.items()}
        opt.step(closure_for(model, opt, batch(step)))
        for n, p in groups.zo.items():
            moved = p != before[n]
            assert not (moved & ~magnitude_mask(before[n], 0.3)).any(), n  # only masked-in weights move
            if p.numel() > 1000:
                assert moved.float().mean() > 0.2, n  # and most of them do
