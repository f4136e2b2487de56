"""Task loading: local files and hub records give the same examples; templates; splits; user
task files; bad task input is a one-line error naming the file."""

from __future__ import annotations

import json
import sys
import types

import pytest

from hybridft.data.tasks import Example, holdout, load_task, sources, sst2, subsample, winogrande, wsc
from hybridft.data.tasks.template import join
from shared_data import DATA, needs_data

# Records shaped like the datasets hub's (nyu-mll/glue sst2, aps/super_glue wsc.fixed, allenai/winogrande).
HUB_SST2 = {"sentence": "hide new secretions from the parental units ", "label": 0, "idx": 0}
HUB_WSC = {"text": "Mark told Pete many lies about himself, which Pete included in his book. He should have been more truthful.",
           "span1_index": 0, "span2_index": 13, "span1_text": "Mark", "span2_text": "He", "label": 0, "idx": 0}
HUB_WINOGRANDE = {"sentence": "John moved the couch from the garage to the backyard to create space. The _ is small.",
                  "option1": "garage", "option2": "backyard", "answer": "1"}


def test_hub_records_map_to_examples():
    assert sst2.example(HUB_SST2, "r") == Example("hide new secretions from the parental units", 0)
    e = wsc.example(HUB_WSC, "r")
    assert (e.label, e.fields["span1"], e.fields["pronoun"]) == (0, "Mark", "he")
    assert e.fields["marked"].startswith("[Mark] told") and "*He* should" in e.fields["marked"]
    w = winogrande.example(HUB_WINOGRANDE, "r")
    assert (w.label, w.options) == (0, ("garage", "backyard"))
    assert w.fields == {"before": "John moved the couch from the garage to the backyard to create space. The ", "after": " is small."}


def test_wsc_spans_are_fixed_as_wsc_fixed_does():
    record = {**HUB_WSC, "span1_text": "mark.", "label": True}
    assert wsc.example(record, "r").fields["span1"] == "Mark"
    assert wsc.example(wsc.flatten({"text": HUB_WSC["text"], "label": False, "idx": 0, "target": {
        k: HUB_WSC[k] for k in wsc.SPAN_KEYS}}), "r") == wsc.example(HUB_WSC, "r")


def test_templates_put_the_space_on_the_continuation():
    assert join("It was", "great") == ("It was", " great")
    assert join("It was ", " great") == ("It was", " great")
    assert join("Yes or No?\n", "Yes") == ("Yes or No?\n", "Yes")
    assert join("", "Kyle couldn't") == ("", "Kyle couldn't")
    assert join("the (", "cat)") == ("the (", "cat)")
    e = winogrande.example(HUB_WINOGRANDE, "r")
    assert winogrande.TEMPLATE.candidates(e) == [("John moved the couch from the garage to the backyard to create space. The",
                                                  f" {o} is small.") for o in ("garage", "backyard")]
    assert [t for t, _ in winogrande.TEMPLATE.encoder_inputs(e)][1].endswith("The backyard is small.")


def test_subsample_and_holdout_are_seeded_and_disjoint():
    examples = [Example(str(i), i % 2) for i in range(100)]
    train, dev = holdout(examples, seed=3)
    assert len(dev) == 10 and not {e.text for e in train} & {e.text for e in dev}
    assert holdout(examples, seed=3) == (train, dev) and holdout(examples, seed=4) != (train, dev)
    assert subsample(train, 20, 0) == subsample(train, 20, 0) != subsample(train, 20, 1)
    assert subsample(train, None, 0) == train and subsample(train, 1000, 0) == train


def test_movie_reviews_hold_out_one_test_split_for_every_seed():
    task = load_task("rotten_tomatoes")
    assert (len(task.train), len(task.dev), len(task.test), task.max_length) == (6909, 768, 853, 64)
    assert task.train[0].text.startswith("the affectionate loopiness that once") and task.test[0].text.startswith("too clunky and too busy ribbing")
    other = load_task("rotten_tomatoes", seed=1)
    assert other.test == task.test and other.dev != task.dev  # test is fixed; dev follows the run seed
    for t in (task, other):
        texts = [{e.text for e in split} for split in (t.train, t.dev, t.test)]
        assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
        assert len(t.train) + len(t.dev) + len(t.test) == 8530


@needs_data
def test_local_files_give_the_official_counts():
    counts = {name: (len(t.train) + len(t.dev), len(t.test))
              for name, t in ((n, load_task(n, data_dir=str(DATA))) for n in ("sst2", "wsc", "winogrande", "winogrande_xs"))}
    assert counts == {"sst2": (67349, 872), "wsc": (554, 104), "winogrande": (40398, 1267), "winogrande_xs": (160, 1267)}
    test = load_task("sst2", data_dir=str(DATA)).test
    assert sum(e.label for e in test) == 444  # 444 positive, 428 negative (data README)


@needs_data
def test_environment_variable_points_at_the_data(monkeypatch):
    monkeypatch.setenv(sources.ENV, str(DATA))
    assert len(load_task("wsc").test) == 104


def hub_shaped(path, name, split):
    """The local files' records as the hub serves them (flat spans, integer labels, no qID)."""
    folder, file = {("nyu-mll/glue", "train"): ("sst2", "train.tsv"), ("nyu-mll/glue", "validation"): ("sst2", "dev.tsv"),
                    ("aps/super_glue", "train"): ("wsc", "train.jsonl"), ("aps/super_glue", "validation"): ("wsc", "val.jsonl"),
                    ("allenai/winogrande", "train"): ("winogrande", f"train_{name.split('_')[-1]}.jsonl"),
                    ("allenai/winogrande", "validation"): ("winogrande", "dev.jsonl")}[(path, split)]
    records = sources.read_records(DATA / folder / file)
    if folder == "sst2":
        return [{"sentence": r["sentence"], "label": int(r["label"]), "idx": i} for i, r in enumerate(records)]
    if folder == "wsc":
        return [{**wsc.flatten(r), "label": int(r["label"])} for r in records]
    return [{k: v for k, v in r.items() if k != "qID"} for r in records]


@needs_data
@pytest.mark.parametrize("name", ["sst2", "wsc", "winogrande_xs"])
def test_hub_and_local_files_give_the_same_examples(name, monkeypatch):
    calls = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda path, config, split: calls.append((path, config, split)) or hub_shaped(path, config, split)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.delenv(sources.ENV, raising=False)
    from_hub = load_task(name)
    local = load_task(name, data_dir=str(DATA))  # usually parsed already by another test
    assert (from_hub.train, from_hub.dev, from_hub.test) == (local.train, local.dev, local.test)
    assert {c[1] for c in calls} == {{"sst2": "sst2", "wsc": "wsc.fixed"}.get(name, "winogrande_xs")}


def test_without_data_or_datasets_the_error_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    monkeypatch.delenv(sources.ENV, raising=False)
    with pytest.raises(ValueError, match="--data-dir.*sst2/train.tsv.*pip install datasets"):
        load_task("sst2", seed=11)


# ---- user task files ----------------------------------------------------------------------

def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def classification_task(tmp_path, **overrides):
    write(tmp_path, "train.csv", "review,sentiment\n" + "".join(f"\"good film, {i}\",pos\nbad film {i},neg\n" for i in range(10)))
    spec = {"train": "train.csv", "text": "review", "label": "sentiment", "label_words": {"neg": "terrible", "pos": "great"},
            "template": "Review: {review}\nIt was"} | overrides
    return write(tmp_path, "task.yaml", json.dumps(spec))  # JSON is YAML


def test_user_classification_task(tmp_path):
    task = load_task(str(classification_task(tmp_path)))
    assert (task.name, task.label_names, len(task.train), len(task.dev), task.multiple_choice) == ("task", ("neg", "pos"), 18, 2, False)
    e = next(e for e in task.train if e.label == 1)
    assert task.template.candidates(e)[1] == (f"Review: {e.text}\nIt was", " great")


def test_user_multiple_choice_task(tmp_path):
    rows = [{"q": f"q{i}", "a": "yes", "b": "no", "answer": "B" if i % 2 else "A"} for i in range(6)]
    write(tmp_path, "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write(tmp_path, "dev.tsv", "q\ta\tb\tanswer\nq9\tyes\tno\tA\n")
    path = write(tmp_path, "mc.yaml", "name: mine\ntrain: train.jsonl\ndev: dev.tsv\ntext: q\nlabel: answer\n"
                                      "options: [a, b]\nlabel_values: [A, B]\ntemplate: 'Q: {q} A:'\n")
    task = load_task(str(path))
    assert task.multiple_choice and [e.label for e in task.train] == [0, 1, 0, 1, 0, 1] and len(task.dev) == 1
    assert task.template.candidates(task.train[1]) == [("Q: q1 A:", " yes"), ("Q: q1 A:", " no")]


@pytest.mark.parametrize("change,message", [
    ({"train": "missing.csv"}, "missing.csv: file not found"),
    ({"text": "body"}, "train.csv: missing column(s) body"),
    ({"label_words": {"neg": "terrible", "positive": "great"}}, "train.csv record 1: label 'pos' is not one of neg, positive"),
    ({"template": "{review} {stars}"}, "task.yaml: template '{review} {stars}' uses unknown field(s) stars"),
    ({"colour": "red"}, "task.yaml: unknown key(s) colour"),
])
def test_bad_user_task_is_a_one_line_error_naming_the_file(tmp_path, change, message):
    with pytest.raises(ValueError) as error:
        load_task(str(classification_task(tmp_path, **change)))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_empty_split_and_unknown_task_are_one_line_errors(tmp_path):
    write(tmp_path, "train.csv", "review,sentiment\n")
    with pytest.raises(ValueError, match="train.csv: no records"):
        load_task(str(write(tmp_path, "t.yaml", "train: train.csv\ntext: review\nlabel: sentiment\nlabel_words: [a, b]\n")))
    with pytest.raises(ValueError, match="t2.yaml: task file not found"):
        load_task(str(tmp_path / "t2.yaml"))
    with pytest.raises(ValueError, match="unknown task 'sst3'"):
        load_task("sst3")


@needs_data
def test_a_task_file_poses_sst2_with_mezos_template(tmp_path):
    spec = {"name": "sst2_mezo", "train": str(DATA / "sst2" / "dev.tsv"), "text": "sentence", "label": "label",
            "label_words": {"0": "terrible", "1": "great"}, "template": "{sentence} It was"}
    task = load_task(str(write(tmp_path, "sst2_mezo.yaml", json.dumps(spec))))
    builtin = load_task("sst2", data_dir=str(DATA)).test
    assert sorted((e.text.strip(), e.label) for e in task.train + task.dev) == sorted((e.text, e.label) for e in builtin)
    e = task.train[0]
    assert task.template.candidates(e) == [(f"{e.text} It was", " terrible"), (f"{e.text} It was", " great")]
