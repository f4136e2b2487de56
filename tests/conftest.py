"""Tiny models built from a config (offline, seconds), with the packaged MiniLM tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_bert_config(**changes):
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128, **changes)


def tiny_bert(num_labels: int = 2, seed: int = 0) -> torch.nn.Module:
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(num_labels=num_labels, initializer_range=0.2))


def save_tiny_bert(path: Path, tokenizer, **changes) -> Path:
    """A tiny pretrained-looking BERT checkpoint on disk, without a classification head."""
    from transformers import BertModel

    torch.manual_seed(0)
    BertModel(tiny_bert_config(**changes)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from hybridft.models import resolve

    return AutoTokenizer.from_pretrained(resolve("minilm"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A tiny pretrained-looking BERT checkpoint on disk, without a classification head."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), tokenizer)


@pytest.fixture(scope="session")
def tiny_bert_no_dropout_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """The same without dropout: a run's only randomness is then its seeds (no global RNG draws)."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert-no-dropout"), tokenizer,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


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
