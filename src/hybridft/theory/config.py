"""How `hybridft smoothness` measures: a frozen dataclass whose fields are CLI flags. The model,
task, adapter and the trajectory's optimizer come from ``TrainConfig``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hybridft.run.config import _f
from hybridft.theory.pairs import KINDS


def floats(comma_separated: str) -> list[float]:
    """``"1e-3, 1e-2"`` -> ``[0.001, 0.01]``; a one-line ValueError on anything else."""
    try:
        return [float(x) for x in comma_separated.split(",") if x.strip()]
    except ValueError as error:
        raise ValueError(f"expected comma-separated numbers, got {comma_separated!r}") from error


@dataclass(frozen=True)
class SmoothnessConfig:
    """The measurement: pairs at the start (several batches) and along the training trajectory."""

    start_batches: int = _f(3, "mini-batches with nearby pairs at the starting point")
    variance_batches: int = _f(8, "mini-batches whose gradients at the starting point give the gradient variance (>= start-batches)")
    points: int = _f(8, "points measured along the training trajectory after the start")
    every: int = _f(4, "training steps between measured points")
    kinds: str = _f("gradient,random,power", "directions of the nearby points, comma-separated (gradient and random are needed for the advice)")
    radius: float = _f(1e-2, "distance ||y - x|| of each nearby point")
    eps_grid: str = _f("1e-5,1e-4,1e-3,1e-2,1e-1", "ZO eps values whose estimation error is measured at the start")
    eps_directions: int = _f(3, "directions z per eps in that scan")
    radius_scan: bool = _f(False, "also measure the ratios at radii 1e-3, 1e-2, 1e-1, 1 at the start")
    bootstrap: int = _f(1000, "bootstrap resamples for the confidence intervals")

    def kind_list(self) -> list[str]:
        return [k.strip() for k in self.kinds.split(",") if k.strip()]

    def validate(self) -> None:
        """Raise ValueError with a one-line message on a value no measurement can use."""
        for name in ("start_batches", "variance_batches", "every", "eps_directions"):
            minimum = 2 if name == "variance_batches" else 1
            if getattr(self, name) < minimum:
                raise ValueError(f"--{name.replace('_', '-')} must be at least {minimum}, got {getattr(self, name)}")
        for name in ("points", "bootstrap"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.variance_batches < self.start_batches:
            raise ValueError(f"--variance-batches ({self.variance_batches}) must be >= --start-batches ({self.start_batches})")
        if self.radius <= 0:
            raise ValueError(f"--radius must be positive, got {self.radius}")
        unknown = set(self.kind_list()) - set(KINDS)
        if unknown or not {"gradient", "random"} <= set(self.kind_list()):
            raise ValueError(f"--kinds must include gradient and random, from {', '.join(KINDS)}; got {self.kinds!r}")
        grid = floats(self.eps_grid)
        if not grid or min(grid) <= 0:
            raise ValueError(f"--eps-grid must list positive numbers, got {self.eps_grid!r}")

    def replace(self, **changes: object) -> SmoothnessConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
