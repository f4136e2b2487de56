"""--peft: the FO part chosen per run (LoRA, IA3, prompt or prefix tuning, the task head alone, or a
peft config file) with every adapter method, on an encoder classifier and on causal LMs built from
configs (offline); combinations peft cannot run are refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model

from hybridft.cli import main
from hybridft.engine.adapters import adapter_config
from hybridft.engine.perturb import perturbed
from hybridft.engine.split import canonical_name
from hybridft.run import export
from hybridft.run.config import TrainConfig
from hybridft.run.train import build, train, train_step
from tests.conftest import tiny_bert
from tests.test_cli import assert_refused
from tests.test_resume import assert_bitwise_equal

pytestmark = pytest.mark.usefixtures("one_thread")

ADAPTER_METHODS = ("hybrid", "fo-lora", "zo-lora")
# What each kind adds to the model (a part of its parameter names), besides the task head.
MARKS = {"lora": "lora_", "ia3": "ia3_l", "prompt": "prompt_encoder", "prefix": "prompt_encoder", "none": "modules_to_save"}
# The (kind, model) pairs peft runs; prefix tuning of BERT and `none` on a causal LM are refused (below).
RUNS = [(kind, "bert") for kind in ("lora", "ia3", "prompt", "none")] + \
       [(kind, family) for kind in ("lora", "ia3", "prompt", "prefix") for family in ("gpt2", "llama")]


def small(model, **changes) -> TrainConfig:
    values = dict(model=str(model), train_size=8, dev_size=4, test_size=4, batch_size=4, eval_batch_size=8, steps=1,
                  zo_lr=0.1, eps=0.05, fo_lr=1e-2, threads=1, progress=False)
    return TrainConfig(**(values | changes))


@pytest.fixture
def models(tiny_bert_dir, tiny_causal_dirs):
    return {"bert": tiny_bert_dir, **tiny_causal_dirs}


@pytest.mark.parametrize("method", ADAPTER_METHODS)
@pytest.mark.parametrize("kind,family", RUNS)
def test_every_peft_kind_trains_with_every_adapter_method(kind, family, method, models):
    run = build(small(models[family], peft=kind, method=method))
    adapter, base = run.groups.partition.adapter, run.groups.partition.base
    assert any(MARKS[kind] in name for name in adapter)
    assert all(MARKS[kind] in name or "modules_to_save" in name for name in adapter)  # the kind's tensors + the head
    assert (family == "bert") == any("classifier" in name for name in adapter)  # a causal LM has no new head
    trained, other = (run.groups.zo, run.groups.fo) if method == "zo-lora" else (run.groups.fo, run.groups.zo)
    assert set(trained.values()) == set(adapter.values())
    assert set(other.values()) == (set(base.values()) if method == "hybrid" else set())
    before = {name: p.detach().clone() for name, p in {**base, **adapter}.items()}

    record = train_step(run, 0, next(iter(run.sampler)))
    assert torch.isfinite(torch.tensor(record["loss"]))
    moved = {name for name, p in adapter.items() if not torch.equal(p, before[name])}
    assert any(MARKS[kind] in name for name in moved), "the adapter did not move"  # not only the head
    base_moved = any(not torch.equal(p, before[name]) for name, p in base.items())
    assert base_moved == (method == "hybrid")
    assert all(p.grad is None for p in run.groups.zo.values())
    assert 0.0 <= run.dev_accuracy() <= 1.0


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_candidate_scores_match_the_loss_under_prompt_learning(kind, tiny_causal_dirs):
    # The virtual tokens' logits come first in prompt tuning: a single example's correct-candidate
    # score (mean token log-likelihood) is minus its loss only if scores skip them.
    run = build(small(tiny_causal_dirs["gpt2"], peft=kind, score="mean"))
    run.model.eval()
    cpu = torch.device("cpu")
    with torch.no_grad():
        for example in run.dev_set:
            batch = run.formulation.encode(run.tokenizer, [example], device=cpu)
            score = run.formulation.scores(run.model, batch)[0, example.label]
            assert float(score) == pytest.approx(-float(run.formulation.loss(run.model, batch)), abs=1e-5)


def test_zo_perturbation_reaches_ia3_vectors_held_in_a_parameter_dict(batch):
    # peft keeps IA3 vectors in an nn.ParameterDict, whose own forward never runs: the layer
    # holding it perturbs them (else zo-lora with --peft ia3 would estimate a zero gradient).
    model = get_peft_model(tiny_bert(), IA3Config()).eval()
    keys = {p: i for i, (name, p) in enumerate(model.named_parameters()) if "ia3_l" in name}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        plain = model(**inputs).logits
        with perturbed(model, keys, scale=0.5, seed=1):
            moved = model(**inputs).logits
        assert not torch.allclose(plain, moved) and torch.equal(model(**inputs).logits, plain)


def test_peft_none_trains_the_head_alone_and_zo_the_whole_base(tiny_bert_dir):
    run = build(small(tiny_bert_dir, peft="none", modules_to_save="pooler"))
    head = {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    assert {canonical_name(name).replace(".modules_to_save.default", "") for name in run.groups.fo} == head
    plain = {name for name, _ in tiny_bert().named_parameters()}
    assert set(run.groups.zo) == plain - head


@pytest.mark.parametrize("flags,message", [
    (["--peft", "prefix"], "peft prefix tuning needs a classifier whose forward takes past_key_values, "
                           "and BertForSequenceClassification does not"),
    (["--peft", "no/such/adapter_config.json"], "--peft must be one of lora, ia3, prompt, prefix, none or a peft config file"),
    (["--peft", "prompt", "--save-merged"], "--save-merged cannot merge --peft prompt"),
    (["--peft", "prompt", "--num-virtual-tokens", "0"], "--num-virtual-tokens must be at least 1"),
])
def test_a_combination_peft_cannot_run_is_one_line(flags, message, tiny_bert_dir, tmp_path, capsys):
    assert_refused(["train", "--model", str(tiny_bert_dir), "--output-dir", str(tmp_path / "run"), "--train-size", "8", "--batch-size", "4",
                    "--no-progress", *flags], capsys, message)


def test_peft_none_on_a_causal_lm_and_prompt_learning_of_multiple_choice_are_refused(tiny_causal_dirs, tmp_path, capsys):
    assert_refused(["train", "--model", str(tiny_causal_dirs["llama"]), "--output-dir", str(tmp_path / "run"),
                    "--train-size", "8", "--batch-size", "4", "--no-progress", "--peft", "none"], capsys,
                   "--peft none trains the new task head alone, and this model gets none (a causal LM")
    for kind in ("prompt", "prefix"):
        with pytest.raises(ValueError, match=f"{kind} tuning has no peft task type for AutoModelForMultipleChoice"):
            adapter_config(kind, head="AutoModelForMultipleChoice", head_modules=["classifier"])


def test_prompt_tuning_of_a_multiple_choice_encoder_is_one_line(tiny_bert_dir, tmp_path, capsys):
    (tmp_path / "train.csv").write_text("q,a,b,label\n" + "".join(f"pick {i},yes {i},no {i},{i % 2}\n" for i in range(10)))
    (tmp_path / "choice.yaml").write_text("train: train.csv\ntext: q\nlabel: label\noptions: [a, b]\n")
    assert_refused(["train", "--model", str(tiny_bert_dir), "--task", str(tmp_path / "choice.yaml"), "--output-dir",
                    str(tmp_path / "run"), "--batch-size", "4", "--no-progress", "--peft", "prompt"], capsys,
                   "prompt tuning has no peft task type for AutoModelForMultipleChoice")


def test_a_peft_config_file_as_peft_writes_it(tiny_bert_dir, tiny_causal_dirs, tmp_path):
    # A trained adapter's folder: peft saves inference_mode=true; the run trains it, with the head added.
    get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"])).save_pretrained(tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["inference_mode"] is True
    run = build(small(tiny_bert_dir, peft=str(tmp_path / "lora" / "adapter_config.json")))
    lora = {name: p for name, p in run.groups.fo.items() if "lora_" in name}
    assert lora and all(".query." in name for name in lora) and all(2 in p.shape for p in lora.values())
    assert any("classifier" in name for name in run.groups.fo) and all(p.requires_grad for p in run.groups.fo.values())
    train_step(run, 0, next(iter(run.sampler)))

    PromptTuningConfig(num_virtual_tokens=3).save_pretrained(tmp_path / "prompt")  # no task type: the run's is used
    run = build(small(tiny_causal_dirs["llama"], peft=str(tmp_path / "prompt")))
    assert [tuple(p.shape) for p in run.groups.fo.values()] == [(3, 32)]

    PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS").save_pretrained(tmp_path / "seq-cls")
    with pytest.raises(ValueError, match="task_type SEQ_CLS does not fit a AutoModelForCausalLM model"):
        build(small(tiny_causal_dirs["llama"], peft=str(tmp_path / "seq-cls")))
    (tmp_path / "other.json").write_text('{"r": 2}')
    with pytest.raises(ValueError, match="cannot read the peft config .*other.json: it names no peft_type"):
        build(small(tiny_bert_dir, peft=str(tmp_path / "other.json")))


@pytest.mark.parametrize("kind,family", [("ia3", "bert"), ("none", "bert"), ("prompt", "gpt2"), ("prefix", "llama")])
def test_each_kind_saves_reloads_resumes_and_replays(kind, family, models, tmp_path):
    config = small(models[family], peft=kind, steps=4, train_size=16, checkpoint_every=2, zo_lr=1e-2,
                   output_dir=str(tmp_path / "run"), plot=False)
    result = train(config)
    reloaded = export.load(tmp_path / "run")  # plain transformers + peft
    batch = inputs(result.tokenizer)
    result.model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, result.model(**batch).logits, atol=1e-6)

    # resume from the step-2 checkpoint of a copy: the same weights as the uninterrupted run
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    (resumed / "eval.json").unlink()
    assert main(["train", "--resume", str(resumed), "--no-progress"]) == 0
    for part in ("model/model.safetensors", "adapter/adapter_model.safetensors"):
        assert_bitwise_equal(tmp_path / "run" / part, resumed / part)

    assert main(["replay", str(tmp_path / "run")]) == 0  # the ZO log + the saved adapter rebuild the model
    for part in ("model/model.safetensors", "adapter/adapter_model.safetensors"):
        assert_bitwise_equal(tmp_path / "run" / part, tmp_path / "run" / "replayed" / part)


def inputs(tokenizer) -> dict[str, torch.Tensor]:
    """Two inputs without labels, as ``tokenizer`` encodes them."""
    return dict(tokenizer(["a gorgeous, witty film", "dull and far too long"], padding=True, return_tensors="pt"))
