"""Model loading: the model kind from a config, and GGUF files dequantized once into a cache."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from conftest import save_tiny_bert, write_tiny_gguf
from hybridft.data.models import dequantized, load, model_kind, resolve


def test_model_kind_from_config(tiny_causal_dirs, tiny_bert_dir):
    assert {family: model_kind(str(path)) for family, path in tiny_causal_dirs.items()} == dict.fromkeys(tiny_causal_dirs, "causal")
    assert model_kind(str(tiny_bert_dir)) == "encoder"
    assert model_kind(resolve("minilm")) == "encoder"


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_gguf_is_dequantized_once_and_the_copy_loads_the_same_model(gguf_file, tmp_path, monkeypatch):
    import transformers

    cache = str(tmp_path / "cache")
    first = dequantized(str(gguf_file), cache)
    assert (first / "model.safetensors").is_file() and (first / "tokenizer.json").is_file()
    assert not list(first.parent.glob("*.tmp*")), "the temporary folder was not renamed"
    direct = transformers.AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted the GGUF file again")

    monkeypatch.setattr(transformers, "GgufConfig", no_conversion)  # a second conversion would fail here
    start = time.perf_counter()
    loaded = load(str(gguf_file), "AutoModelForCausalLM", cache_dir=cache)
    assert time.perf_counter() - start < 5.0
    assert loaded.path == str(first) and loaded.head_modules == []
    ids = torch.tensor([loaded.tokenizer("it was great")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, direct(ids).logits)


def test_a_changed_gguf_file_gets_a_new_cache_entry(gguf_file, tmp_path):
    cache = str(tmp_path / "cache")
    first = dequantized(str(gguf_file), cache)
    stat = gguf_file.stat()
    os.utime(gguf_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert dequantized(str(gguf_file), cache) != first


def test_missing_gguf_file_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="GGUF file not found"):
        dequantized(str(tmp_path / "nope.gguf"), str(tmp_path))


def test_a_half_precision_checkpoint_loads_in_float32_unless_another_dtype_is_asked(tmp_path, tokenizer, capsys):
    """transformers 5 loads a checkpoint in its own dtype by default; hybridft loads float32."""
    path = save_tiny_bert(tmp_path / "bf16", tokenizer)
    load(str(path), "AutoModel").model.to(torch.bfloat16).save_pretrained(path)
    head = "AutoModelForSequenceClassification"
    dtypes = [{p.dtype for p in load(str(path), head, num_labels=2, **d).model.parameters()}
              for d in ({}, {"dtype": "auto"}, {"dtype": "bfloat16"}, {"dtype": "float16"})]
    assert dtypes == [{torch.float32}, {torch.bfloat16}, {torch.bfloat16}, {torch.float16}]
    from hybridft.cli import main

    out = tmp_path / "run"
    args = ["train", "--model", str(path), "--dtype", "bfloat16", "--train-size", "16", "--dev-size", "8",
            "--batch-size", "8", "--steps", "1", "--no-progress", "--no-plot", "--output-dir", str(out)]
    with pytest.warns(UserWarning, match="ZO weights are bfloat16, rounded to nearest"):
        assert main([*args, "--zo-rounding", "nearest"]) == 0
    assert json.loads((out / "zo_updates.jsonl").read_text().splitlines()[0])["rounding"] == "nearest"
    capsys.readouterr()
    assert main([*args[:3], "--dtype", "int8", *args[5:], "--overwrite"]) == 2
    assert "argument --dtype: invalid choice: 'int8'" in capsys.readouterr().err
