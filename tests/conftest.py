"""Tiny models built from a config (offline, seconds), with the packaged MiniLM tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: a second thread only adds synchronisation (and the cores are shared)


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

    from hybridft.data.models import resolve

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


TINY_DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def tiny_causal_lm(family: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """A tiny randomly initialised causal LM of ``family`` (llama, opt or gpt2)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, max_position_embeddings=512, num_key_value_heads=2,
                                            bos_token_id=1, eos_token_id=0, **TINY_DECODER))
    if family == "opt":
        return OPTForCausalLM(OPTConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=512,
                                        bos_token_id=1, eos_token_id=0, pad_token_id=0))
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=512,
                                      bos_token_id=0, eos_token_id=0))


def bpe_tokenizer(bos_prefix: bool) -> object:
    """A GPT-2-style byte-level BPE tokenizer trained offline on a few sentences (words carry their
    leading space, as in GPT-2, OPT, Llama-3 and SmolLM2); ``bos_prefix`` makes it start every text
    with <s>, as Llama's and OPT's tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["it was great, a gorgeous and witty film", "it was terrible, dull and far too long",
              "does the pronoun refer to the noun? yes or no", "the trophy does not fit in the suitcase because it is too big"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus * 20, trainer)
    if bos_prefix:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   bos_token="<s>" if bos_prefix else "<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_causal_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Llama, OPT (tokenizers that start texts with <s>) and GPT-2 (no prefix) checkpoints."""
    dirs = {}
    for family in ("llama", "opt", "gpt2"):
        tok = bpe_tokenizer(bos_prefix=family != "gpt2")
        path = tmp_path_factory.mktemp(f"tiny-{family}")
        tiny_causal_lm(family, len(tok)).save_pretrained(path)
        tok.save_pretrained(path)
        dirs[family] = path
    return dirs


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_tiny_gguf(path: Path) -> Path:
    """A tiny Llama with a byte-level BPE tokenizer as an (unquantized, f32) GGUF file, written with
    the gguf package the way llama.cpp lays one out (the values need not match a real model)."""
    import json

    import gguf

    tok = bpe_tokenizer(bos_prefix=False)
    model = tiny_causal_lm("llama", len(tok))
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(len(tok))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda item: item[1])]
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")  # model.layers.<i>.<module>.weight
        gguf_name = top.get(name) or f"blk.{parts[2]}.{GGUF_NAMES['.'.join(parts[3:-1])]}.weight"
        writer.add_tensor(gguf_name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def zo_step(**flags):
    """The ZO step's objects for CLI-style flags (``fused``, ``threads``, ``rounding``, ...), made
    at the same edge the CLI uses (``TrainConfig.zo_step``)."""
    from hybridft.run.config import TrainConfig

    renamed = {"threads": "zo_threads", "rounding": "zo_rounding", "weight_decay": "zo_weight_decay"}
    return TrainConfig(**{renamed.get(k, k): v for k, v in flags.items()}).zo_step()


def sgd(lr: float):
    """params -> plain SGD at ``lr`` (build_optimizer's ``fo``)."""
    import functools

    from hybridft.engine.methods import fo_optimizer

    return functools.partial(fo_optimizer, "sgd", lr=lr)
