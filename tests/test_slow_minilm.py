"""Real MiniLM on Rotten Tomatoes (minutes on 2 cores): run with pytest -m slow."""

from __future__ import annotations

import pytest

from hybridft.run.config import TrainConfig
from hybridft.run.train import train


@pytest.mark.slow
def test_default_hybrid_run_learns_rotten_tomatoes(tmp_path):
    result = train(TrainConfig(output_dir=str(tmp_path / "run"), progress=False))
    assert result.dev_accuracy_before < 0.6
    # Seed 0 on the split of 2026-12-04 (768 dev / 853 fixed test sentences) gave 0.7565 dev and
    # 0.7761 test; the old split's 0.77 reference was a dev accuracy on other sentences.
    assert result.dev_accuracy_after >= 0.74, result.dev_accuracy_after
    assert result.test_accuracy_after >= 0.76, result.test_accuracy_after
