"""The convergence-analysis toolkit (docs/theory.md): measure the block-wise (hybrid) smoothness
of a model and task, advise step sizes from it, and verify convergence on synthetic problems.

- ``pairs``, ``smoothness``: exact-gradient ratios from pairs of nearby points, along a training trajectory;
- ``envelope``, ``estimates``: plain Lipschitz and (L0, L1) fits with bootstrap intervals;
- ``advice``, ``eps``, ``auto``: step sizes and eps from the constants; ``hybridft train --lr auto``;
- ``problems``, ``verify``: synthetic problems with known constants and convergence runs;
- ``plots``, ``command``, ``reproduce``: figures, ``hybridft smoothness``, and everything in one command.
"""

from hybridft.theory.advice import Advice, Constants, advise
from hybridft.theory.envelope import Envelope, Interval, fit_envelope

__all__ = ["Advice", "Constants", "Envelope", "Interval", "advise", "fit_envelope"]
