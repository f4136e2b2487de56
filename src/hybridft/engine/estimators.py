"""ZO estimators: where a step evaluates the loss, and the projected gradients it gets from it.

An estimator is handed ``evaluate(directions, scale, grad=False)``, the closure at
theta + scale * z (theta itself for ``directions=None``; theta is restored exactly after
each evaluation, see ``perturb.py``), and the step's q directions; it returns the projected
gradients g_i ~ z_i . grad L and the loss at theta. ``grad=True`` runs the closure's backward
too: that evaluation is the step's first-order pass.

| estimator      | g_i                                     | passes per step (q directions) |
|----------------|-----------------------------------------|--------------------------------|
| TwoSided       | [L(theta+eps z_i) - L(theta-eps z_i)]/2eps | 2q forwards (+ the FO pass)  |
| OneSided       | [L(theta+eps z_i) - L(theta)]/eps        | q+1 forwards (+ the FO pass)   |
| FusedTwoSided  | as TwoSided; L(theta+eps z_1) is the FO pass | 2q-1 forwards + 1 fwd+bwd  |
| FusedOneSided  | as OneSided; L(theta) is the FO pass     | q forwards + 1 fwd+bwd         |
| NormalizedProbes | [L(theta+eps z_i) - L(theta)]/sigma, sigma = std_i L(theta+eps z_i) | q+1 forwards (+ the FO pass) |

Two-sided errors are O(eps^2), one-sided O(eps). The fused estimators need an FO part; the
two-sided one then takes the adapter gradient at theta + eps z_1, an O(eps) bias
(docs/step_cost.md). The FO pass runs last, because every closure call zeroes the gradients.
Hyperparameters are checked here, once, when the estimator is made.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from hybridft.engine.directions import Directions
from hybridft.engine.zo import HyperparameterError, projected_grad


class Evaluate(Protocol):
    def __call__(self, directions: Directions | None, scale: float, *, grad: bool = False) -> float: ...


def _check(eps: float, num_directions: int) -> None:
    if not (eps > 0 and math.isfinite(eps)):
        raise HyperparameterError("eps", f"must be positive, got {eps}")
    if not isinstance(num_directions, int) or num_directions < 1:
        raise HyperparameterError("num_directions", f"must be at least 1, got {num_directions}")


@dataclass(frozen=True)
class TwoSided:
    """g_i = [L(theta + eps z_i) - L(theta - eps z_i)] / (2 eps), averaged over q = ``num_directions``."""

    eps: float = 1e-3
    num_directions: int = 1
    fused: ClassVar[bool] = False  # whether the FO pass is one of the evaluations
    one_sided: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check(self.eps, self.num_directions)

    def estimate(self, evaluate: Evaluate, directions: Sequence[Directions]) -> tuple[list[float], float]:
        """(g_1..g_q, the loss at theta: the mean of the 2q perturbed losses, up to O(eps^2))."""
        pairs = [(evaluate(d, self.eps), evaluate(d, -self.eps)) for d in directions]
        grads = [projected_grad(plus, minus, self.eps) for plus, minus in pairs]
        return grads, sum(sum(pair) for pair in pairs) / (2 * len(pairs))


@dataclass(frozen=True)
class OneSided:
    """g_i = [L(theta + eps z_i) - L(theta)] / eps, averaged over q = ``num_directions``."""

    eps: float = 1e-3
    num_directions: int = 1
    fused: ClassVar[bool] = False
    one_sided: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check(self.eps, self.num_directions)

    def estimate(self, evaluate: Evaluate, directions: Sequence[Directions]) -> tuple[list[float], float]:
        """(g_1..g_q, the mean of L(theta) and the L(theta + eps z_i), as the step's ZO loss).
        L(theta) runs under no_grad first, like the other ZO losses."""
        at_theta = evaluate(None, 0.0)
        plus = [evaluate(d, self.eps) for d in directions]
        grads = [projected_grad(p, at_theta, self.eps, one_sided=True) for p in plus]
        return grads, sum(p + at_theta for p in plus) / (2 * len(plus))


@dataclass(frozen=True)
class FusedTwoSided(TwoSided):
    """TwoSided whose L(theta + eps z_1) is the FO pass (forward+backward at theta + eps z_1)."""

    fused: ClassVar[bool] = True

    def estimate(self, evaluate: Evaluate, directions: Sequence[Directions]) -> tuple[list[float], float]:
        """(g_1..g_q, [L(theta + eps z_1) + L(theta - eps z_1)] / 2, the loss at theta up to O(eps^2))."""
        first, rest = directions[0], directions[1:]
        minus_first = evaluate(first, -self.eps)
        pairs = [(evaluate(d, self.eps), evaluate(d, -self.eps)) for d in rest]
        pairs.insert(0, (evaluate(first, self.eps, grad=True), minus_first))
        grads = [projected_grad(plus, minus, self.eps) for plus, minus in pairs]
        return grads, sum(pairs[0]) / 2


@dataclass(frozen=True)
class FusedOneSided(OneSided):
    """OneSided whose L(theta) is the FO pass (forward+backward at theta)."""

    fused: ClassVar[bool] = True

    def estimate(self, evaluate: Evaluate, directions: Sequence[Directions]) -> tuple[list[float], float]:
        plus = [evaluate(d, self.eps) for d in directions]
        at_theta = evaluate(None, 0.0, grad=True)
        return [projected_grad(p, at_theta, self.eps, one_sided=True) for p in plus], at_theta


@dataclass(frozen=True)
class NormalizedProbes:
    """FZOO's estimate (Dang et al. 2025, arXiv 2506.09034): q = ``num_directions`` >= 2 one-sided
    probes, normalised by the standard deviation sigma of the q probe losses L(theta + eps z_i):

        g_i = [L(theta + eps z_i) - L(theta)] / sigma

    With ZOSGD the step is theta <- theta - lr / q sum_i g_i z_i. sigma ~ eps |grad L|, so g_i ~
    z_i . grad L / |grad L|: a normalised-SGD step whose size is set by lr alone, not by the
    gradient's scale (FZOO writes the one-sided quotient with its 1/eps and divides the step by
    sigma; that is this step with lr scaled by 1/eps). FZOO draws Rademacher
    z (``DirectionSampler("rademacher")``). A step whose probe losses are all equal (sigma = 0)
    has g = 0. Cost: q + 1 forwards (+ the FO pass), no extra memory."""

    eps: float = 1e-3
    num_directions: int = 8
    fused: ClassVar[bool] = False
    one_sided: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check(self.eps, self.num_directions)
        if self.num_directions < 2:
            raise HyperparameterError("num_directions", f"must be at least 2 for a standard deviation, got {self.num_directions}")

    def estimate(self, evaluate: Evaluate, directions: Sequence[Directions]) -> tuple[list[float], float]:
        """(g_1..g_q, L(theta))."""
        at_theta = evaluate(None, 0.0)
        plus = [evaluate(d, self.eps) for d in directions]
        mean = sum(plus) / len(plus)
        sigma = math.sqrt(sum((p - mean) ** 2 for p in plus) / (len(plus) - 1))
        if sigma == 0.0 or not math.isfinite(sigma):
            return [0.0 if sigma == 0.0 else sigma] * len(plus), at_theta
        return [(p - at_theta) / sigma for p in plus], at_theta


Estimator = TwoSided | OneSided | FusedTwoSided | FusedOneSided | NormalizedProbes


ESTIMATORS = ("spsa", "fzoo")


def estimator(*, eps: float = 1e-3, num_directions: int = 1, one_sided: bool = False,
              fused: bool = False, kind: str = "spsa") -> Estimator:
    """The estimator the flags ``--zo-estimator --eps --num-directions --one-sided --fused`` name:
    ``spsa`` (the finite differences of the table above) or ``fzoo`` (``NormalizedProbes``)."""
    if kind not in ESTIMATORS:
        raise HyperparameterError("estimator", f"must be one of {', '.join(ESTIMATORS)}; got {kind!r}")
    if kind == "fzoo":
        if fused:
            raise HyperparameterError("fused", "is not available with the fzoo estimator (its probes are one-sided forwards)")
        return NormalizedProbes(eps=eps, num_directions=num_directions)
    cls = {(False, False): TwoSided, (True, False): OneSided,
           (False, True): FusedTwoSided, (True, True): FusedOneSided}[(bool(one_sided), bool(fused))]
    return cls(eps=eps, num_directions=num_directions)
