"""Tiny models built from a config (offline, seconds), with the packaged MiniLM tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_bert(num_labels: int = 2, seed: int = 0) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels,
                        initializer_range=0.2)
    return BertForSequenceClassification(config)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from hybridft.models import resolve

    return AutoTokenizer.from_pretrained(resolve("minilm"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A tiny pretrained-looking BERT checkpoint on disk, without a classification head."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def batch(tokenizer) -> dict[str, torch.Tensor]:
    texts = ["a gorgeous, witty film", "dull and far too long", "i loved every minute", "a mess from start to end"] * 2
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    encoded["labels"] = torch.tensor([1, 0, 1, 0] * 2)
    return dict(encoded)


@pytest.fixture
def one_thread():
    """torch on one CPU thread for the test (tiny models; two threads only contend on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
