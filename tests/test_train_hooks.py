"""What ``train`` leaves to its caller: ``--lr auto`` is resolved by a hook the caller passes (the
CLI passes the theory layer's), and ``loss.png`` is drawn by the caller (the CLI), not by ``train``."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hybridft.run.config import TrainConfig
from hybridft.run.train import build, train


def test_lr_auto_without_a_resolver_is_a_one_line_error_before_anything_loads(tmp_path):
    config = TrainConfig(model=str(tmp_path / "no-such-model"), lr="auto", output_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="resolve_lr") as error:
        build(config)
    assert len(str(error.value).splitlines()) == 1
    with pytest.raises(ValueError, match="resolve_lr"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_train_runs_with_the_step_sizes_its_resolver_gives_and_draws_no_plot(tiny_bert_dir, tmp_path, capsys):
    seen: dict[str, Any] = {}

    def resolve_lr(config: TrainConfig, model, groups, tokenizer, posed, examples, device, steps):
        seen.update(steps=steps, examples=len(examples), zo=bool(groups.zo))
        return config.replace(zo_lr=3e-4, fo_lr=5e-3, lr=None), "resolved by the test"

    out = tmp_path / "run"
    config = TrainConfig(model=str(tiny_bert_dir), train_size=64, dev_size=32, batch_size=8, steps=2, lr="auto",
                         progress=False, output_dir=str(out))
    train(config, resolve_lr=resolve_lr)
    assert seen == {"steps": 2, "examples": 64, "zo": True}
    assert "resolved by the test" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())
    assert (saved["lr"], saved["zo_lr"], saved["fo_lr"]) == (None, 3e-4, 5e-3)
    assert config.plot and not (out / "loss.png").exists()  # the CLI draws it after train returns
