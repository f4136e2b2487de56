"""The ZO step as a composition of objects: each estimator evaluates where its docstring says,
hyperparameters are checked once where an object is made, a checkpoint composed differently is
refused, and a new rule is one class passed to HybridOptimizer."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from hybridft import (DirectionSampler, FusedOneSided, FusedTwoSided, HybridOptimizer, OneSided, TwoSided, ZOSGD,
                      replay_)
from hybridft.engine.storage import NearestRounding, StochasticRounding, storage_rule
from hybridft.engine.zo import HyperparameterError


class Model(nn.Module):
    """ZO weights ``w`` and an FO layer ``head``: loss = |w|^2 + head(w)^2."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(6), requires_grad=False)
        self.head = nn.Linear(6, 1)

    def forward(self) -> torch.Tensor:
        return (self.w ** 2).sum() + self.head(self.w).pow(2).sum()


def optimizer(model: Model, fo: bool = True, **parts) -> HybridOptimizer:
    sgd = torch.optim.SGD(model.head.parameters(), lr=0.01) if fo else None
    return HybridOptimizer(model, {"w": model.w}, sgd, lr=1e-3, seed=0, **parts)


def calls(opt: HybridOptimizer, model: Model) -> list[bool]:
    """Whether each closure call of one step ran with grad (the FO pass) or without."""
    seen: list[bool] = []

    def closure() -> torch.Tensor:
        seen.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = model()
        if torch.is_grad_enabled():
            loss.backward()
        return loss.detach()

    opt.step(closure)
    return seen


@pytest.mark.parametrize("estimator,expected", [
    (TwoSided(num_directions=3), [False] * 6 + [True]),      # 2q forwards, then the FO pass
    (OneSided(num_directions=3), [False] * 4 + [True]),      # q + 1 forwards, then the FO pass
    (FusedTwoSided(num_directions=3), [False] * 5 + [True]),  # 2q - 1 forwards, the FO pass last
    (FusedOneSided(num_directions=3), [False] * 3 + [True]),  # q forwards, the FO pass (at theta) last
])
def test_each_estimator_evaluates_the_closure_as_its_cost_says(estimator, expected):
    model = Model()
    assert calls(optimizer(model, estimator=estimator), model) == expected


def test_a_zo_only_step_has_no_fo_pass_and_fused_estimators_need_an_fo_part():
    model = Model()
    model.head.requires_grad_(False)
    opt = HybridOptimizer(model, {"w": model.w}, lr=1e-3, estimator=TwoSided(num_directions=2))
    assert calls(opt, model) == [False] * 4
    for fused in (FusedTwoSided(), FusedOneSided()):
        with pytest.raises(ValueError, match="FO part"):
            HybridOptimizer(model, {"w": model.w}, estimator=fused)


@pytest.mark.parametrize("make,name", [
    (lambda: TwoSided(eps=0.0), "eps"), (lambda: OneSided(eps=-1.0), "eps"),
    (lambda: FusedTwoSided(num_directions=0), "num_directions"), (lambda: TwoSided(eps=float("nan")), "eps"),
    (lambda: DirectionSampler(distribution="uniform"), "distribution"),
    (lambda: DirectionSampler(z_dtype="float8"), "z_dtype"), (lambda: DirectionSampler(threads=0), "threads"),
    (lambda: ZOSGD(weight_decay=-0.1), "weight_decay"), (lambda: storage_rule("up"), "rounding"),
])
def test_hyperparameters_are_checked_where_the_object_is_made(make, name):
    with pytest.raises(HyperparameterError) as error:
        make()
    assert error.value.name == name and len(str(error.value).splitlines()) == 1


def test_objects_are_immutable_values():
    assert TwoSided(eps=1e-3) == TwoSided() and storage_rule("nearest") == NearestRounding()
    with pytest.raises(AttributeError):
        TwoSided().eps = 1.0  # type: ignore[misc]
    assert storage_rule("stochastic") == StochasticRounding()


def test_a_checkpoint_of_a_differently_composed_step_is_refused_in_one_line():
    model = Model()
    state = optimizer(model, estimator=TwoSided(eps=1e-3)).state_dict()
    other = optimizer(Model(), estimator=TwoSided(eps=1e-2), rule=ZOSGD(weight_decay=0.1))
    with pytest.raises(ValueError, match="eps 0.001 there, 0.01 here; weight_decay 0.0 there, 0.1 here") as error:
        other.load_state_dict(state)
    assert len(str(error.value).splitlines()) == 1
    same = optimizer(Model(), estimator=TwoSided(eps=1e-3))
    same.load_state_dict(state)  # the same composition loads
    assert same.zo_group["lr"] == 1e-3


def test_a_state_dict_written_before_the_composition_loads():
    """The flat ZO group an optimizer of the flag era saved (state.json of an old checkpoint)."""
    model = Model()
    old = {"num_steps": 7, "seed": 0, "skipped_steps": 1, "fo": optimizer(model).fo_optimizer.state_dict(),
           "zo_group": {"lr": 5e-4, "initial_lr": 1e-3, "name": "zo", "eps": 0.001, "weight_decay": 0.0,
                        "num_directions": 1, "one_sided": False, "distribution": "gaussian", "fused": False,
                        "z_cache": False, "z_dtype": "float32", "embedding_rows": False, "rounding": "stochastic"}}
    opt = optimizer(model)
    opt.load_state_dict(old)
    assert (opt.num_steps, opt.skipped_steps, opt.zo_group["lr"], opt.zo_group["initial_lr"]) == (7, 1, 5e-4, 1e-3)
    old["zo_group"]["one_sided"] = True
    with pytest.raises(ValueError, match="one_sided True there, False here"):
        optimizer(Model()).load_state_dict(old)


@dataclass(frozen=True)
class Forward:
    """A new estimator in one class: g = [L(theta + eps z) - L(theta)] / eps with L(theta) from the FO pass."""

    eps: float = 1e-3
    num_directions: int = 1
    fused = True
    one_sided = True

    def estimate(self, evaluate, directions):
        plus = [evaluate(d, self.eps) for d in directions]
        at_theta = evaluate(None, 0.0, grad=True)
        return [(p - at_theta) / self.eps for p in plus], at_theta


def test_a_new_rule_is_one_class_handed_to_the_optimizer_and_replays():
    model = Model()
    initial = model.w.detach().clone()
    opt = optimizer(model, estimator=Forward(), directions=DirectionSampler(distribution="rademacher"))
    log = []
    for _ in range(5):
        assert calls(opt, model) == [False, True]
        log.append(opt.last_update)
    rebuilt = {"w": initial.clone()}
    replay_(rebuilt.items(), log)
    assert torch.equal(rebuilt["w"], model.w) and not torch.equal(initial, model.w)
    reference = Model()
    ref = optimizer(reference, estimator=FusedOneSided(), directions=DirectionSampler(distribution="rademacher"))
    for _ in range(5):
        calls(ref, reference)
    assert torch.equal(reference.w, model.w)  # the same estimate as the built-in fused one-sided


def test_normalized_probes_divide_the_one_sided_estimates_by_the_spread_of_the_probe_losses():
    """FZOO's g_i = [L(theta + eps z_i) - L(theta)] / sigma: checked against the losses the
    closure returned, and the run replays bitwise from its log."""
    from hybridft import NormalizedProbes

    model = Model()
    model.head.requires_grad_(False)
    initial = model.w.detach().clone()
    opt = HybridOptimizer(model, {"w": model.w}, lr=0.1, seed=0, estimator=NormalizedProbes(eps=1e-3, num_directions=4),
                          directions=DirectionSampler("rademacher"))
    losses: list[float] = []

    def closure() -> torch.Tensor:
        losses.append(float(model()))
        return torch.tensor(losses[-1])

    start, log = float(model()), []
    for _ in range(40):
        losses.clear()
        opt.step(closure)
        log.append(opt.last_update)
        theta, plus = losses[0], torch.tensor(losses[1:], dtype=torch.float64)
        expected = (plus - theta) / plus.std()
        assert torch.allclose(torch.tensor(log[-1].projected_grads, dtype=torch.float64), expected)
    assert float(model()) < 0.5 * start
    rebuilt = {"w": initial.clone()}
    replay_(rebuilt.items(), log)
    assert torch.equal(rebuilt["w"], model.w)
    with pytest.raises(HyperparameterError, match="num_directions must be at least 2"):
        NormalizedProbes(num_directions=1)
    other = HybridOptimizer(Model(), {"w": Model().w}, estimator=OneSided(eps=1e-3, num_directions=4))
    with pytest.raises(ValueError, match="estimator 'NormalizedProbes' there, 'OneSided' here"):
        other.load_state_dict(opt.state_dict())
