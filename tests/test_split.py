"""The base/adapter partition is structural, disjoint and complete for any peft config."""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
from peft.utils.constants import DUMMY_TARGET_MODULES

from hybridft.engine.methods import assign
from hybridft.engine.split import Partition, canonical_name, check, split
from tests.conftest import tiny_bert, tiny_causal_lm


def _configs():
    return {
        "lora": LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
        "lora-seq-cls": LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query", "value"]),
        "lora-bias-all": LoraConfig(r=4, target_modules=["query"], bias="all", modules_to_save=["classifier"]),
        "ia3": IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"],
                         modules_to_save=["classifier"]),
        "prompt": PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4),
        "prefix": PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4),
        "none": LoraConfig(target_modules=DUMMY_TARGET_MODULES, modules_to_save=["classifier"]),  # --peft none
    }


@pytest.mark.parametrize("name", list(_configs()))
def test_partition_is_disjoint_complete_and_matches_what_peft_trains(name):
    model = get_peft_model(tiny_bert(), _configs()[name])
    trainable = {p for p in model.parameters() if p.requires_grad}
    partition = split(model)
    assert set(partition.adapter.values()) == trainable
    all_params = set(model.parameters())
    groups = [set(g.values()) for g in (partition.base, partition.adapter, partition.inactive)]
    assert set().union(*groups) == all_params
    assert sum(len(g) for g in groups) == len(all_params)
    # every pretrained weight the forward reads is in the base group, under its plain name
    plain = {n for n, _ in tiny_bert().named_parameters()}
    assert set(partition.base) <= plain
    assert "bert.embeddings.word_embeddings.weight" in partition.base


def assert_disjoint_and_complete(model, partition: Partition) -> None:
    groups = [set(g.values()) for g in (partition.base, partition.adapter, partition.inactive)]
    assert set().union(*groups) == set(model.parameters())
    assert sum(len(g) for g in groups) == len(set(model.parameters()))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["ia3", "prompt", "prefix"])
def test_causal_lm_virtual_tokens_and_ia3_vectors_are_adapter_parameters(kind, family):
    config = {"ia3": IA3Config(), "prompt": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4),
              "prefix": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)}[kind]
    model = get_peft_model(tiny_causal_lm(family, vocab_size=64), config)
    partition = split(model)
    assert_disjoint_and_complete(model, partition)
    assert set(partition.adapter.values()) == {p for p in model.parameters() if p.requires_grad}
    assert all(("ia3_l" if kind == "ia3" else "prompt_encoder") in name for name in partition.adapter)
    assert set(partition.base) == {n for n, _ in tiny_causal_lm(family, vocab_size=64).named_parameters()}
    assert not partition.inactive


def test_shadowed_head_original_is_inactive_not_base():
    model = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    partition = split(model)
    assert "classifier.weight" not in partition.base
    assert model.base_model.model.classifier.original_module.weight in set(partition.inactive.values())


def test_check_rejects_overlap_and_missing():
    model = tiny_bert()
    partition = split(model)
    name, param = next(iter(partition.base.items()))
    with pytest.raises(ValueError, match="both"):
        check(model, Partition(base=partition.base, adapter={name: param}, inactive={}))
    with pytest.raises(ValueError, match="no group"):
        check(model, Partition(base={}, adapter={}, inactive={}))


def test_canonical_name_strips_peft_wrapping():
    assert canonical_name("base_model.model.bert.layer.0.query.base_layer.weight") == "bert.layer.0.query.weight"
    assert canonical_name("base_model.model.classifier.original_module.bias") == "classifier.bias"


@pytest.mark.parametrize("method", ["hybrid", "fo-lora", "zo-lora", "fo-full", "zo-full", "lomo"])
def test_methods_assign_rules_and_only_fo_group_requires_grad(method):
    model = tiny_bert()
    if method in ("hybrid", "fo-lora", "zo-lora"):
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    groups = assign(method, model)
    for p in groups.fo.values():
        assert p.requires_grad
    for p in list(groups.zo.values()) + list(groups.frozen.values()):
        assert not p.requires_grad
    n_all = len(set(model.parameters()))
    assert len(groups.zo) + len(groups.fo) + len(groups.frozen) == n_all
    expected_nonempty = {"hybrid": ("zo", "fo"), "fo-lora": ("fo",), "zo-lora": ("zo",), "fo-full": ("fo",), "zo-full": ("zo",),
                         "lomo": ("fo",)}
    for group in ("zo", "fo"):
        assert bool(getattr(groups, group)) == (group in expected_nonempty[method])


def test_unknown_method_is_a_value_error():
    with pytest.raises(ValueError, match="unknown method"):
        assign("sgd-everything", tiny_bert())
