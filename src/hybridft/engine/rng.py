"""Seeds and random-number states, kept explicit and local.

ZO directions never touch the global RNG: each parameter's slice of z comes from a fresh
``torch.Generator`` seeded by ``(step seed, parameter key)`` (``zo.direction``). The global RNG
is what dropout draws from; ``rng_state``/``set_rng_state`` capture and restore it, so that every
evaluation of one step sees the same dropout masks and a resumed run continues the same stream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """One round of splitmix64: a bijective 64-bit mixer (decorrelates nearby seeds)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def parameter_key(name: str) -> int:
    """A stable 64-bit identity for a parameter, from its canonical name (not its position)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def step_seed(seed: int, step: int, direction: int = 0) -> int:
    """The seed of direction ``direction`` at optimizer step ``step`` of a run seeded ``seed``."""
    return splitmix64(splitmix64(splitmix64(seed & MASK64) ^ step) ^ direction)


def generator(seed: int, device: torch.device) -> torch.Generator:
    """A fresh generator on ``device`` seeded by a mix of ``seed`` (a 64-bit value)."""
    g = torch.Generator(device=device)
    g.manual_seed(splitmix64(seed) & ((1 << 63) - 1))
    return g


def rng_state(cuda_devices: Sequence[int] | None = None) -> dict[str, Any]:
    """The global RNG states (CPU, and CUDA on ``cuda_devices``; None: every visible device)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if cuda_devices is None and torch.cuda.is_available():
        cuda_devices = range(torch.cuda.device_count())
    if cuda_devices:
        state["cuda"] = [torch.cuda.get_rng_state(d) for d in cuda_devices]
    return state


def set_rng_state(state: dict[str, Any], cuda_devices: Sequence[int] | None = None) -> None:
    """Restore what ``rng_state(cuda_devices)`` captured."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        devices = range(len(state["cuda"])) if cuda_devices is None else cuda_devices
        for device, cuda_state in zip(devices, state["cuda"]):
            torch.cuda.set_rng_state(cuda_state, device)
