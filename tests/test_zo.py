"""Invariants of the ZO estimator: directions, exact restore, unbiasedness, order-freedom."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hybridft.engine.optim import HybridOptimizer
from hybridft.engine.perturb import perturbed
from hybridft.run.zo_log import rms_move
from hybridft.engine.directions import DirectionSampler
from hybridft.engine.estimators import OneSided, TwoSided
from hybridft.engine.rules import ZOSGD, replay_, update_
from hybridft.engine.zo import ZOUpdate, direction, parameter_key


class Quadratic(nn.Module):
    """f(theta) = 0.5 theta^T A theta + b^T theta, with theta split into two named parameters."""

    def __init__(self, dim: int = 6, seed: int = 0, reverse: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        m = torch.randn(dim, dim, generator=g)
        self.register_buffer("A", m @ m.T + torch.eye(dim))
        self.register_buffer("b", torch.randn(dim, generator=g))
        start = torch.randn(dim, generator=g)
        names = ["second", "first"] if reverse else ["first", "second"]
        for name in names:
            half = start[: dim // 2] if name == "first" else start[dim // 2 :]
            self.register_parameter(name, nn.Parameter(half.clone(), requires_grad=False))

    def theta(self) -> torch.Tensor:
        return torch.cat([self.first, self.second])

    def forward(self) -> torch.Tensor:
        t = self.theta()
        return 0.5 * t @ self.A @ t + self.b @ t

    def grad(self) -> torch.Tensor:
        return self.A @ self.theta() + self.b


def test_direction_is_a_function_of_seed_and_key_only():
    like = torch.empty(100)
    a = direction(like, seed=7, key=parameter_key("w"))
    assert torch.equal(a, direction(like, seed=7, key=parameter_key("w")))
    assert not torch.equal(a, direction(like, seed=8, key=parameter_key("w")))
    assert not torch.equal(a, direction(like, seed=7, key=parameter_key("v")))


def test_direction_leaves_global_rng_untouched():
    state = torch.get_rng_state()
    direction(torch.empty(1000), seed=1, key=2)
    direction(torch.empty(1000), seed=1, key=2, distribution="rademacher")
    assert torch.equal(state, torch.get_rng_state())


def test_rademacher_direction_is_plus_minus_one():
    z = direction(torch.empty(10_000), seed=3, key=4, distribution="rademacher")
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(z.mean())) < 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_perturbed_forward_sees_perturbation_and_restores_exactly(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)
    x = torch.randn(4, 16, dtype=dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    keys = {p: parameter_key(n) for n, p in model.named_parameters()}
    with torch.no_grad():
        clean = model(x)
        for step in range(100):
            with perturbed(model, keys, seed=step, scale=1e-2):
                moved = model(x)
            with perturbed(model, keys, seed=step, scale=-1e-2):
                model(x)
    assert not torch.equal(clean, moved)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_perturbed_restores_when_the_forward_raises():
    model = nn.Linear(4, 4)
    before = model.weight.detach().clone()
    keys = {p: parameter_key(n) for n, p in model.named_parameters()}

    def boom(module, args, output):
        raise RuntimeError("boom")

    handle = model.register_forward_hook(boom)
    with pytest.raises(RuntimeError), torch.no_grad(), perturbed(model, keys, seed=0, scale=1.0):
        model(torch.ones(1, 4))
    handle.remove()
    assert torch.equal(model.weight, before)


def test_two_sided_estimate_is_unbiased_on_a_quadratic():
    """E[g z] = grad f for z ~ N(0, I); the mean over N seeds is within 5 standard errors."""
    model = Quadratic()
    keys = {p: parameter_key(n) for n, p in model.named_parameters()}
    eps, n = 1e-3, 4000
    estimates = []
    with torch.no_grad():
        for seed in range(n):
            with perturbed(model, keys, seed=seed, scale=eps):
                plus = float(model())
            with perturbed(model, keys, seed=seed, scale=-eps):
                minus = float(model())
            g = (plus - minus) / (2 * eps)
            z = torch.cat([direction(model.first, seed=seed, key=keys[model.first]),
                           direction(model.second, seed=seed, key=keys[model.second])])
            estimates.append(g * z.double())
    stacked = torch.stack(estimates)
    mean, stderr = stacked.mean(0), stacked.std(0) / n**0.5
    true = model.grad().double()
    assert torch.all((mean - true).abs() <= 5 * stderr), (mean, true, stderr)
    # and it is informative: far from zero in the gradient's direction
    assert float(mean @ true) > 0.5 * float(true @ true)


def test_z_does_not_depend_on_parameter_order():
    runs = []
    for reverse in (False, True):
        model = Quadratic(reverse=reverse)
        opt = HybridOptimizer(model, dict(model.named_parameters()), lr=1e-2, seed=5, estimator=TwoSided(eps=1e-3))
        for _ in range(5):
            opt.step(lambda: model())
        runs.append((model.first.detach().clone(), model.second.detach().clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_zo_steps_descend_a_quadratic_and_global_rng_is_untouched():
    model = Quadratic(dim=8)
    opt = HybridOptimizer(model, dict(model.named_parameters()), lr=2e-3, seed=1,
                          estimator=TwoSided(eps=1e-3, num_directions=4))
    state = torch.get_rng_state()
    start = float(model())
    for _ in range(300):
        opt.step(lambda: model())
    assert float(model()) < 0.5 * start
    assert torch.equal(state, torch.get_rng_state())


def test_replay_rebuilds_zo_trained_weights():
    model = Quadratic()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = HybridOptimizer(model, dict(model.named_parameters()), lr=1e-2, seed=2,
                          estimator=TwoSided(eps=1e-3, num_directions=2), rule=ZOSGD(weight_decay=0.1))
    log = []
    for _ in range(10):
        opt.step(lambda: model())
        log.append(opt.last_update)
    rebuilt = {n: t.clone() for n, t in initial.items()}
    replay_(rebuilt.items(), log)
    for n, p in model.named_parameters():
        assert torch.equal(rebuilt[n], p), n


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_rms_move_of_a_log_is_the_realised_rms_change_of_the_weights(distribution):
    weights = {"a.weight": torch.zeros(300, 200), "b.bias": torch.zeros(40_000)}  # d = 100,000
    log = [ZOUpdate(step=t, seeds=(7 * t, 7 * t + 1), projected_grads=(3.0 - t, 0.5 * t), lr=1e-3 * (1 + t % 3),
                    weight_decay=0.0, distribution=distribution) for t in range(6)]
    replay_(weights.items(), log)
    realised = torch.cat([w.flatten() for w in weights.values()]).pow(2).mean().sqrt().item()
    assert rms_move(log) == pytest.approx(realised, rel=0.02)  # 1/sqrt(d) scale noise, far below 2%
    assert rms_move(log[:1]) == pytest.approx(1e-3 / 2 * (3.0**2 + 0.0**2) ** 0.5)
    assert rms_move([]) == 0.0
    with_rows = ZOUpdate(step=0, seeds=(1,), projected_grads=(1.0,), lr=1e-3, weight_decay=0.0, rows=((5, (0, 2)),))
    assert rms_move([with_rows]) is None


def test_update_applies_weight_decay_then_direction():
    p = torch.ones(5)
    update = ZOUpdate(step=0, seeds=(1,), projected_grads=(2.0,), lr=0.1, weight_decay=0.5)
    update_(p, key=9, update=update)
    expected = torch.ones(5) * (1 - 0.1 * 0.5) - 0.1 * 2.0 * direction(torch.ones(5), seed=1, key=9)
    assert torch.allclose(p, expected, rtol=1e-6, atol=1e-7)


def test_one_sided_and_rademacher_options_run_and_descend():
    for options in ({"estimator": OneSided(eps=1e-4)},
                    {"estimator": TwoSided(eps=1e-4), "directions": DirectionSampler(distribution="rademacher")}):
        model = Quadratic(dim=8)
        opt = HybridOptimizer(model, dict(model.named_parameters()), lr=2e-3, seed=1, **options)
        start = float(model())
        for _ in range(300):
            opt.step(lambda: model())
        assert float(model()) < start, options
