"""Task files and YAML: every YAML file is read as YAML 1.2, so a label word is never silently a
boolean; bad task input is one line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import json

import pytest

from hybridft.cli import main
from hybridft.data import yaml12
from hybridft.data.tasks import load_task
from hybridft.run.config import load_yaml
from hybridft.study.grid import load_bench
from test_cli import TINY, assert_refused
from test_tasks import classification_task, write

ROWS = "review,sentiment\n" + "".join(f"good film {i},pos\nbad film {i},neg\n" for i in range(10))


def task_file(tmp_path, yaml_text: str):
    write(tmp_path, "train.csv", ROWS)
    return write(tmp_path, "task.yaml", "train: train.csv\ntext: review\nlabel: sentiment\n" + yaml_text)


def test_yaml_1_1_booleans_and_1_2_numbers():
    assert yaml12.load("[Yes, No, on, off, y, n, YES, true, False, ~, null]") == [
        "Yes", "No", "on", "off", "y", "n", "YES", True, False, None, None]
    assert yaml12.load("[1e-3, 2E-4, 1.5, .5, 010, 0x1F, 0o17, -3, 1_000, '1', 2024-01-31]") == [
        1e-3, 2e-4, 1.5, 0.5, 10, 31, 15, -3, "1_000", "1", "2024-01-31"]


@pytest.mark.parametrize("word", ["Yes", "No", "on", "off", "y", "n"])
def test_a_yaml_1_1_boolean_word_is_the_word_a_causal_lm_scores(tmp_path, word):
    task = load_task(str(task_file(tmp_path, f"label_words: {{neg: {word}, pos: Maybe}}\ntemplate: '{{review}} Answer:'\n")))
    assert task.template.label_words == (word, "Maybe")
    e = task.train[0]
    assert task.template.candidates(e) == [(f"{e.text} Answer:", f" {word}"), (f"{e.text} Answer:", " Maybe")]


@pytest.mark.parametrize("yaml_text,message", [
    ("label_words: {neg: ~, pos: great}\n", "task.yaml: label_words.neg must be a string, got None"),
    ("label_words: {neg: bad, pos: true}\n", "task.yaml: label_words.pos must be a string, got True"),
    ("label_words: [bad, 3]\n", "task.yaml: label_words.1 must be a string, got 3"),
    ("label_words: [bad, good]\ntemplate: ~\n", "task.yaml: template must be a string, got None"),
    ("label_words: [bad, good]\nencoder_pair: false\n", "task.yaml: encoder_pair must be a string, got False"),
    ("options: [review, ~]\n", "task.yaml: options[1] must be a string, got None"),
    ("label_words: [bad, good]\nword_fields: {w: {from: review, words: {a: ~}}}\n", "word_fields.w.words.a must be a string"),
    ("label_words: {neg: bad, pos: good}\ntemplate: '{review|shout}'\n", "uses unknown filter(s) shout"),
])
def test_a_label_word_option_or_template_that_is_not_a_string_is_refused(tmp_path, yaml_text, message):
    with pytest.raises(ValueError) as error:
        load_task(str(task_file(tmp_path, yaml_text)))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_boolean_labels_of_a_jsonl_file_match_boolean_keys(tmp_path):
    write(tmp_path, "train.jsonl", "".join(json.dumps({"q": f"q{i}", "answer": i % 2 == 1}) + "\n" for i in range(10)))
    path = write(tmp_path, "bq.yaml", "train: train.jsonl\ntext: q\nlabel: answer\nlabel_words: {false: No, true: Yes}\n"
                                      "template: '{q}?\\n'\n")
    task = load_task(str(path))
    assert task.template.label_words == ("No", "Yes") and {e.label for e in task.train + task.dev} == {0, 1}
    assert all(e.label == int(e.text[1:]) % 2 for e in task.train)


def test_config_and_bench_files_are_read_as_yaml_1_2(tmp_path, capsys):
    config = write(tmp_path, "run.yaml", "zo-lr: 1e-3\nprogress: false\ntask: 'yes'\n")
    assert load_yaml(config) == {"zo_lr": 1e-3, "progress": False, "task": "yes"}
    bench = write(tmp_path, "bench.yaml", f"output_dir: {tmp_path / 'out'}\nmodels: [minilm]\ntasks: [rotten_tomatoes]\n"
                                          "methods: [hybrid]\nlr_grid: {hybrid: {zo-lr: [1e-3, 1e-2]}}\n")
    assert load_bench(bench).lr_grid["hybrid"]["zo_lr"] == [1e-3, 1e-2]
    out = tmp_path / "run"
    assert_refused(["train", "--config", str(write(tmp_path, "on.yaml", "progress: on\n")), "--output-dir", str(out)],
                   capsys, "progress must be bool, got 'on'")
    assert not out.exists()


# ---- bad task input through the command line -------------------------------------------------

def jsonl_task(tmp_path, lines: list[str], **overrides):
    write(tmp_path, "train.jsonl", "".join(line + "\n" for line in lines))
    spec = {"train": "train.jsonl", "text": "review", "label": "sentiment", "label_words": {"neg": "terrible", "pos": "great"},
            "template": "{review} It was"} | overrides
    return write(tmp_path, "task.yaml", json.dumps(spec))


def good_lines(n: int = 10) -> list[str]:
    return [json.dumps({"review": f"film {i}", "sentiment": "pos" if i % 2 else "neg"}) for i in range(n)]


@pytest.mark.parametrize("make,message", [
    (lambda p: classification_task(p, label_words={"neg": "terrible", "positive": "great"}),
     "train.csv record 1: label 'pos' is not one of neg, positive"),
    (lambda p: jsonl_task(p, good_lines(2) + ["{not json"] + good_lines(3)), "train.jsonl:3: not valid JSON"),
    (lambda p: classification_task(p, text="body"), "train.csv: missing column(s) body"),
    (lambda p: jsonl_task(p, good_lines(3) + ['{"review": "film"}']), "train.jsonl record 4: missing column(s) sentiment"),
    (lambda p: jsonl_task(p, []), "train.jsonl: no records"),
    (lambda p: (write(p, "train.csv", ""), write(p, "task.yaml", "train: train.csv\ntext: a\nlabel: b\nlabel_words: [x, y]\n"))[1],
     "train.csv: no records"),
    (lambda p: classification_task(p, template="{review} {stars}"), "template '{review} {stars}' uses unknown field(s) stars"),
    (lambda p: jsonl_task(p, [json.dumps({"review": "film", "sentiment": "neg", "stars": 3})] + good_lines(10),
                          template="{review} {stars}"), "train.jsonl record 2: missing column(s) stars used by the template"),
    (lambda p: jsonl_task(p, good_lines(), word_fields={"w": {"from": "sentiment", "words": {"neg": "bad"}}}, template="{w}"),
     "train.jsonl record 2: sentiment 'pos' is not one of neg (word_fields)"),
])
def test_bad_task_input_is_one_line_exit_2_and_writes_nothing(tiny_bert_dir, tmp_path, capsys, make, message):
    task, out = make(tmp_path), tmp_path / "out"
    assert_refused(["train", "--model", str(tiny_bert_dir), "--task", str(task), "--output-dir", str(out), *TINY],
                   capsys, message)
    assert not out.exists()
