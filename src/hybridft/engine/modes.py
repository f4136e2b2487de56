"""Train/eval mode for a block of code: evaluations and measurements run without dropout, and
leave the model in the mode they found it in, even when they raise."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block (no dropout: the same function at theta + eps z and
    theta - eps z, and at every evaluation), the previous mode after it, also on an exception.
    The mode is the root module's ``training`` flag, set on every submodule by ``train(mode)``."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
