"""SuperGLUE tasks (RTE, CB, BoolQ, COPA, WiC, MultiRC): the official JSONL files and the hub's
records give the same examples, MeZO's templates, and the COPA task file equals the built-in."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from hybridft.data.formulations import MultipleChoice, SequenceClassification
from hybridft.data.scoring import CandidateScoring
from hybridft.data.tasks import load_task, sources, superglue
from hybridft.run.config import TrainConfig
from hybridft.run.train import build, train_step
from shared_data import DATA
from test_tasks import write

needs_superglue = pytest.mark.skipif(not (DATA / "rte").is_dir(), reason=f"SuperGLUE RTE/CB files not found in {DATA}")


# Records in the official SuperGLUE JSONL formats (invented text), 20 train + 4 val per task.
def boolq(i):
    return {"question": f"is river {i} longer than river {i + 1}", "passage": f"River {i} runs far. It is long.",
            "idx": i, "label": i % 2 == 0}


def copa(i):
    return {"premise": f"The cook dropped plate {i}.", "choice1": "It broke on the floor." if i % 2 else "I swept it up.",
            "choice2": "Nobody was hungry.", "question": ("cause", "effect")[i % 2], "idx": i, "label": i % 3 % 2}


def wic(i):
    return {"word": "bank", "sentence1": f"He sat on the bank {i}.", "sentence2": f"She went to the bank {i}.",
            "idx": i, "label": i % 2 == 1, "start1": 14, "start2": 14, "end1": 18, "end2": 18, "version": 1.1}


def multirc(i):
    answers = [{"text": f"answer {i}.{a}", "idx": a, "label": (i + a) % 2} for a in range(3)]
    return {"idx": i, "version": 1.1, "passage": {"text": f"<b>Sent 1: </b>Paragraph {i}.<br>", "questions": [
        {"question": f"What is {i}?", "answers": answers, "idx": 0}, {"question": "Why?", "answers": answers[:1], "idx": 1}]}}


OFFICIAL = {"boolq": boolq, "copa": copa, "wic": wic, "multirc": multirc}


def write_official(root, name):
    (root / name).mkdir(parents=True, exist_ok=True)
    for split, indices in (("train", range(20)), ("val", range(20, 24))):
        write(root / name, f"{split}.jsonl", "".join(json.dumps(OFFICIAL[name](i)) + "\n" for i in indices))


def hub_shaped(root, name, split):
    """What ``load_dataset("aps/super_glue", name, split=split)`` serves: class indices, MultiRC flat."""
    found = sources.read_records(root / name / {"train": "train.jsonl", "validation": "val.jsonl"}[split])
    if name == "multirc":
        return [{"paragraph": r["passage"]["text"], "question": q["question"], "answer": a["text"], "label": a["label"],
                 "idx": {"paragraph": r["idx"], "question": q["idx"], "answer": a["idx"]}}
                for r in found for q in r["passage"]["questions"] for a in q["answers"]]
    names = superglue.TASKS[name].label_names if name in superglue.TASKS else None
    labels = {n: i for i, n in enumerate(names or ())} | {False: 0, True: 1}
    return [{**r, "label": labels[r["label"]] if names else r["label"]} for r in found]


def from_hub(monkeypatch, root, name):
    calls = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda path, config, split: calls.append((path, config, split)) or hub_shaped(root, config, split)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.delenv(sources.ENV, raising=False)
    task = load_task(name, seed=5)
    assert {(path, config) for path, config, _ in calls} == {("aps/super_glue", name)}
    return task


@pytest.mark.parametrize("name", ["boolq", "copa", "wic", "multirc"])
def test_official_files_and_hub_records_give_the_same_examples(name, tmp_path, monkeypatch):
    write_official(tmp_path, name)
    local = load_task(name, seed=5, data_dir=str(tmp_path))
    per_record = 4 if name == "multirc" else 1  # MultiRC: one example per answer (3 + 1 per paragraph)
    assert (len(local.train) + len(local.dev), len(local.test)) == (20 * per_record, 4 * per_record)
    hub = from_hub(monkeypatch, tmp_path, name)
    assert (hub.train, hub.dev, hub.test) == (local.train, local.dev, local.test)


def test_mezo_templates(tmp_path):
    for name in OFFICIAL:
        write_official(tmp_path, name)
    task = {name: load_task(name, data_dir=str(tmp_path)) for name in OFFICIAL}
    first = {name: t.test[0] for name, t in task.items()}
    assert task["boolq"].template.candidates(first["boolq"]) == [
        ("River 20 runs far. It is long. Is river 20 longer than river 21?\n", w) for w in ("No", "Yes")]
    assert first["boolq"].label == 1 and task["boolq"].template.encoder_inputs(first["boolq"]) == [
        ("is river 20 longer than river 21", "River 20 runs far. It is long.")]
    # COPA: the premise loses its period; " because" for a cause; each choice's first word is lower-cased, but not "I"
    assert task["copa"].template.candidates(first["copa"]) == [
        ("The cook dropped plate 20 because", " I swept it up."),
        ("The cook dropped plate 20 because", " nobody was hungry.")]
    copa21 = task["copa"].test[1]
    assert task["copa"].template.candidates(copa21)[0] == ("The cook dropped plate 21 so", " it broke on the floor.")
    assert task["copa"].template.encoder_inputs(copa21)[0] == ("The cook dropped plate 21.", "so it broke on the floor.")
    assert task["wic"].template.candidates(first["wic"])[1] == (
        'Does the word "bank" have the same meaning in these two sentences? Yes, No?\n'
        "He sat on the bank 20.\nShe went to the bank 20.\n", "Yes")
    assert task["multirc"].template.candidates(first["multirc"])[0] == (
        '<b>Sent 1: </b>Paragraph 20.<br>\nQuestion: What is 20?\nI found this answer "answer 20.0". Is that correct? '
        "Yes or No?\n", "No")
    assert [e.label for e in task["multirc"].test[:4]] == [0, 1, 0, 0]


@needs_superglue
@pytest.mark.parametrize("name,counts,test_labels", [
    ("rte", (2490, 277), [146, 131]),
    ("cb", (250, 56), [23, 28, 5]),
])
def test_real_rte_and_cb_files_and_their_hub_records(name, counts, test_labels, monkeypatch):
    local = load_task(name, seed=5, data_dir=str(DATA))
    assert (len(local.train) + len(local.dev), len(local.test)) == counts and len(local.dev) == round(counts[0] / 10)
    assert [sum(e.label == i for e in local.test) for i in range(local.num_labels)] == test_labels
    e = local.test[0]
    words = ("Yes", "No") if name == "rte" else ("Yes", "No", "Maybe")
    assert [w for _, w in local.template.candidates(e)] == list(words)
    assert local.template.encoder_inputs(e) == [(e.fields["premise"], e.fields["hypothesis"])]
    hub = from_hub(monkeypatch, DATA, name)
    assert (hub.train, hub.dev, hub.test) == (local.train, local.dev, local.test)


def test_copa_as_a_task_file_poses_the_same_inputs_as_the_builtin(tmp_path):
    write_official(tmp_path, "copa")
    # The task file of README ("Your own task"), paths relative to it.
    path = write(tmp_path, "copa.yaml", """\
name: copa
train: copa/train.jsonl
test: copa/val.jsonl
text: premise
label: label
options: [choice1, choice2]
word_fields:
  connective: {from: question, words: {cause: because, effect: so}}
template: "{premise|strip_period} {connective}"
continuation: "{option|lower_first}"
encoder: "{premise}"
encoder_pair: "{connective} {option|lower_first}"
""")
    mine, builtin = load_task(str(path), seed=3), load_task("copa", seed=3, data_dir=str(tmp_path))
    for split in ("train", "dev", "test"):
        ours, theirs = getattr(mine, split), getattr(builtin, split)
        assert len(ours) == len(theirs) > 0
        for a, b in zip(ours, theirs):
            assert (a.label, a.options) == (b.label, b.options)
            assert mine.template.candidates(a) == builtin.template.candidates(b)
            assert mine.template.encoder_inputs(a) == builtin.template.encoder_inputs(b)
    assert mine.multiple_choice and mine.num_labels == builtin.num_labels == 2


@pytest.mark.parametrize("name,record,message", [
    ("copa", {**copa(0), "question": "reason"}, "question 'reason' is not cause or effect"),
    ("boolq", {**boolq(0), "label": "maybe"}, "label 'maybe' is not one of false, true"),
    ("wic", {k: v for k, v in wic(0).items() if k != "sentence2"}, "record 1: missing field(s) sentence2"),
    ("multirc", {"idx": 0, "passage": {"text": "p"}}, "record 1: not a SuperGLUE MultiRC record (missing 'questions')"),
])
def test_malformed_official_records_are_one_line_errors_naming_the_file(tmp_path, name, record, message):
    write_official(tmp_path, name)
    write(tmp_path / name, "train.jsonl", json.dumps(record) + "\n")
    with pytest.raises(ValueError) as error:
        load_task(name, data_dir=str(tmp_path))
    assert f"{name}/train.jsonl" in str(error.value) and message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("name", ["copa", "multirc"])
def test_a_training_step_on_both_model_kinds(name, family, tmp_path, tiny_causal_dirs, tiny_bert_dir):
    write_official(tmp_path, name)
    model = str(tiny_bert_dir if family == "bert" else tiny_causal_dirs[family])
    run = build(TrainConfig(model=model, task=name, data_dir=str(tmp_path), train_size=8, dev_size=4, test_size=4,
                            batch_size=4, steps=1, zo_lr=0.1, eps=0.05, threads=1, progress=False, max_length=64))
    expected = CandidateScoring if family == "llama" else MultipleChoice if name == "copa" else SequenceClassification
    assert type(run.formulation) is expected
    assert torch.isfinite(torch.tensor(train_step(run, 0, next(iter(run.sampler)))["loss"]))
    assert 0.0 <= run.test_accuracy() <= 1.0
