"""HybridOptimizer on a tiny BERT + LoRA: gradients where they belong, descent, exact resume."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hybridft.engine.estimators import TwoSided
from hybridft.engine.methods import assign, build_optimizer
from hybridft.engine.methods import fo_optimizer as make_fo
from hybridft.engine.schedules import scheduler
from tests.conftest import tiny_bert


def hybrid_setup(method: str = "hybrid", fo_optimizer: str = "sgd", seed: int = 0):
    model = tiny_bert(seed=0)
    if method in ("hybrid", "fo-lora", "zo-lora"):
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    groups = assign(method, model)
    opt = build_optimizer(model, groups, zo_lr=1e-3, seed=seed, fo=functools.partial(make_fo, fo_optimizer, lr=0.05),
                          estimator=TwoSided(eps=1e-3))
    sched = scheduler(opt, ["cosine"] + ["linear"] * (len(opt.param_groups) - 1), total_steps=20, warmup_steps=2)
    return model, groups, opt, sched


def closure_for(model, opt, batch, same_mode: bool = False):
    """The LBFGS-style closure; ``same_mode``: train mode for the no-grad evaluations too (fused)."""

    def closure():
        model.train(torch.is_grad_enabled() or same_mode)
        opt.zero_grad()
        loss = model(**batch).loss
        if torch.is_grad_enabled():
            loss.backward()
        return loss.detach()

    return closure


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_base_never_gets_grad_and_adapter_does(batch):
    model, groups, opt, _ = hybrid_setup()
    closure = closure_for(model, opt, batch)
    with torch.enable_grad():
        closure()
    assert all(p.grad is None for p in groups.zo.values())
    assert all(p.grad is not None for p in groups.fo.values())
    opt.step(closure)
    assert all(p.grad is None for p in groups.zo.values())
    assert all(not opt.fo_optimizer.state.get(p) for p in groups.zo.values())


def test_hybrid_step_changes_base_and_adapter(batch):
    model, groups, opt, _ = hybrid_setup()
    before = {n: p.detach().clone() for n, p in (groups.zo | groups.fo).items()}
    opt.step(closure_for(model, opt, batch))
    changed = {n for n, p in (groups.zo | groups.fo).items() if not torch.equal(p, before[n])}
    assert "bert.encoder.layer.0.attention.self.query.weight" in changed  # ZO moved a base weight
    assert any("lora_B" in n for n in changed)  # FO moved the adapter
    assert opt.last_update is not None and len(opt.last_update.projected_grads) == 1


@pytest.mark.parametrize("method", ["hybrid", "fo-lora", "zo-full"])
def test_training_loss_goes_down(batch, method):
    model, _, opt, _ = hybrid_setup(method, fo_optimizer="adamw")
    for group in opt.param_groups:
        group["lr"] = 1e-2 if group["name"] == "fo" else 1e-3
    closure = closure_for(model, opt, batch)
    with torch.no_grad():
        model.eval()
        start = float(model(**batch).loss)
    for _ in range(40 if method != "zo-full" else 150):
        opt.step(closure)
    with torch.no_grad():
        model.eval()
        end = float(model(**batch).loss)
    assert end < start - 0.05, (start, end)


def test_separate_schedules_per_group(batch):
    model, _, opt, sched = hybrid_setup()
    closure = closure_for(model, opt, batch)
    seen = []
    for _ in range(10):
        opt.step(closure)
        sched.step()
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]))
    zo_lrs, fo_lrs = zip(*seen)
    assert zo_lrs != fo_lrs  # cosine vs linear
    assert opt.fo_optimizer.param_groups[0]["lr"] == fo_lrs[-1]  # the FO optimizer sees the schedule


def test_state_dict_resume_is_bitwise_exact(batch):
    torch.manual_seed(0)
    model, _, opt, sched = hybrid_setup(fo_optimizer="adamw")
    closure = closure_for(model, opt, batch)
    for _ in range(3):
        opt.step(closure)
        sched.step()
    saved = (weights(model), copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict()), torch.get_rng_state())
    for _ in range(3):
        opt.step(closure)
        sched.step()
    reference = weights(model)

    model2, _, opt2, sched2 = hybrid_setup(fo_optimizer="adamw")
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    torch.set_rng_state(saved[3])  # dropout in the FO pass draws from the global RNG
    closure2 = closure_for(model2, opt2, batch)
    for _ in range(3):
        opt2.step(closure2)
        sched2.step()
    resumed = weights(model2)
    assert reference.keys() == resumed.keys()
    for k in reference:
        assert torch.equal(reference[k], resumed[k]), k


def test_same_seed_same_run_different_seed_different_run(batch):
    def run(seed):
        model, _, opt, _ = hybrid_setup(seed=seed)
        closure = closure_for(model, opt, batch)
        for _ in range(3):
            opt.step(closure)
        return weights(model)

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_zo_params_with_requires_grad_are_refused():
    from hybridft.engine.optim import HybridOptimizer

    layer = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="requires_grad"):
        HybridOptimizer(layer, dict(layer.named_parameters()))
