"""The convergence toolkit on synthetic problems with known constants: the estimator recovers
them, the advice obeys its formulas, the method converges, reshuffling beats with-replacement."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from hybridft.theory.advice import Constants, advise
from hybridft.theory.envelope import fit_envelope
from hybridft.theory.estimates import envelopes
from hybridft.theory.problems import CoupledQuadratic, ExpSmooth, LowRankLogistic
from hybridft.theory.smoothness import measure_start
from hybridft.theory.verify import blocks, exp_smooth_envelopes, run

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: threads only contend


def test_envelope_is_the_tightest_line_above_the_points():
    g = torch.tensor([1.0, 2.0, 3.0, 4.0])
    env = fit_envelope(g, 0.5 + 2.0 * g)  # points on a line: the line itself
    assert env.l0 == pytest.approx(0.5) and env.l1 == pytest.approx(2.0)
    r = torch.tensor([3.0, 1.0, 2.0, 5.0])
    env = fit_envelope(g, r)
    assert bool((env.l0 + env.l1 * g >= r - 1e-12).all()) and env.l0 >= 0 and env.l1 >= 0
    assert fit_envelope(g, torch.tensor([4.0, 3.0, 2.0, 1.0])).l1 == 0.0  # decreasing: L1 = 0, L0 = max


def test_estimator_recovers_known_l0_l1_on_an_exp_smooth_problem():
    """h'' = L0 + L1 |h'| exactly, so one-dimensional pairs lie on the line and the envelope is it."""
    fitted = exp_smooth_envelopes((1.0, 2.0), (0.5, 3.0))
    for block, (l0, l1) in {"theta": (1.0, 2.0), "phi": (0.5, 3.0)}.items():
        assert fitted[block, block, "gradient"].l0 == pytest.approx(l0, rel=0.02, abs=0.01)
        assert fitted[block, block, "gradient"].l1 == pytest.approx(l1, rel=0.02)
    for measured, moved in (("phi", "theta"), ("theta", "phi")):  # no coupling
        assert (fitted[measured, moved, "gradient"].l0, fitted[measured, moved, "gradient"].l1) == (0.0, 0.0)


def test_measured_ratios_never_exceed_the_quadratic_constants_and_power_finds_them():
    problem = CoupledQuadratic(d_theta=12, d_phi=6, n=16, condition=30.0, seed=3)
    zo, fo = blocks(problem, "hybrid")
    fns = [lambda b=b: problem(b) for b in ([0, 1, 2, 3], [4, 5, 6, 7])] * 6
    data, _, _ = measure_start(problem, {"theta": list(zo.values()), "phi": list(fo.values())}, fns, pairs_on=12,
                               kinds=("gradient", "random", "power"), radius=1e-3, generator=torch.Generator().manual_seed(0),
                               power={}, n=16, batch_size=4)
    _, largest = envelopes(data, torch.arange(data.items))
    known = problem.known()
    for measured in ("theta", "phi"):
        for moved in ("theta", "phi"):
            exact = known[f"{measured}_{moved}"]
            assert largest[measured, moved, "all"] <= exact * (1 + 1e-9)  # a sampled ratio is a lower bound
        assert largest[measured, measured, "power"] == pytest.approx(known[f"{measured}_{measured}"], rel=0.03)


def _constants(**changes: object) -> Constants:
    values = dict(zo_dim=1000, fo_dim=50, theta_theta=2.0, theta_theta_random=2.0, phi_theta=0.0, phi_theta_random=0.0,
                  phi_phi=4.0, theta_phi=0.0, l1=0.0, grad_sq={"theta": 1.0, "phi": 1.0},
                  variance={"theta": 8.0, "phi": 8.0}, loss_gap=1.0)
    return Constants(**{**values, **changes})  # type: ignore[arg-type]


def test_advice_follows_its_formulas():
    c = _constants()
    big = advise(c, batch_size=4, n=1000, steps=0)
    assert big.zo_lr == pytest.approx(1 / ((1000 + 2) * 2.0))  # Lambda^z = Lambda: classical 1/((d+2) L)
    assert big.fo_lr == pytest.approx(1 / 4.0) and big.zo_lr_worst_case == pytest.approx(big.zo_lr)
    long, longer = advise(c, batch_size=4, n=1000, steps=10**6), advise(c, batch_size=4, n=1000, steps=4 * 10**6)
    assert longer.fo_lr == pytest.approx(long.fo_lr / 2)  # the horizon branch: 1 / sqrt(K)
    assert advise(c, batch_size=64, n=1000, steps=10**6).fo_lr > long.fo_lr  # larger batch, less noise
    assert advise(c, batch_size=1000, n=1000, steps=10**6).fo_lr == pytest.approx(0.25)  # full batch: no noise
    directional = advise(_constants(theta_theta_random=0.01), batch_size=4, n=1000, steps=0)
    assert directional.zo_lr == pytest.approx(1 / (2.0 + 1001 * 0.01)) and directional.zo_lr > big.zo_lr
    assert advise(_constants(phi_theta=5.0), batch_size=4, n=1000, steps=0).coupling > 1
    capped = advise(_constants(l1=100.0), batch_size=4, n=1000, steps=0)
    assert capped.fo_lr * 100.0 * math.sqrt(1 + 8 * 996 / (4 * 999)) == pytest.approx(1.0)  # step inside 1/L1
    fo_only = advise(_constants(zo_dim=0), batch_size=4, n=1000, steps=0)
    assert fo_only.zo_lr is None and fo_only.fo_lr is not None


CASES = {
    "quadratic": (functools.partial(CoupledQuadratic, d_theta=8, d_phi=8, n=16, condition=10.0, noise=0.5), 4),
    "logistic": (functools.partial(LowRankLogistic, features=5, classes=3, rank=2, n=32), 8),
    "exp-smooth": (functools.partial(ExpSmooth, d_theta=3, d_phi=2, n=16), 4),
}


@pytest.mark.parametrize("case", CASES)
def test_hybrid_converges_to_a_stationary_point_with_the_advised_steps(case):
    make, batch_size = CASES[case]
    curve = run(make, "hybrid", epochs=25, batch_size=batch_size)
    assert all(math.isfinite(g) for g in curve.grad_norms)
    assert curve.min_so_far()[-1] < 0.2 * curve.start, (curve.start, curve.min_so_far()[-1])


def test_reshuffling_is_not_slower_than_with_replacement_on_the_quadratic():
    """Same problem, seed and constant advised steps; the gradient norm over the last epochs.
    With replacement the FO block's batch noise does not cancel within an epoch; measured over
    6 instances reshuffling ends about 30% lower in every one."""
    ratios = []
    for seed in range(6):
        make = functools.partial(CoupledQuadratic, d_theta=4, d_phi=16, n=16, condition=10.0, noise=3.0, seed=seed)
        curves = [run(make, method, epochs=12, batch_size=4, seed=seed, schedule="constant")
                  for method in ("hybrid", "hybrid-replacement")]
        tails = [sum(c.grad_norms[-4:]) / 4 for c in curves]
        ratios.append(tails[0] / tails[1])
    assert sum(r < 1 for r in ratios) >= 5 and sum(ratios) / len(ratios) < 0.9, ratios
