"""SuperGLUE's classification tasks as MeZO runs them: RTE, CB, BoolQ, WiC and MultiRC.

| task    | input                         | labels (class index order)              | label words (causal LM) |
|---------|-------------------------------|-----------------------------------------|-------------------------|
| rte     | premise, hypothesis           | entailment, not_entailment              | Yes, No                 |
| cb      | premise, hypothesis           | entailment, contradiction, neutral      | Yes, No, Maybe          |
| boolq   | question, passage             | false, true                             | No, Yes                 |
| wic     | word, sentence1, sentence2    | false, true                             | No, Yes                 |
| multirc | paragraph, question, answer   | false, true (is the answer correct?)    | No, Yes                 |

Sources: the hub's ``aps/super_glue`` config of the same name (train, validation), or SuperGLUE's
JSONL files ``<data-dir>/<task>/train.jsonl`` and ``val.jsonl`` (folders as the official zips name
them, ``RTE``, ``BoolQ``, ..., work too). Local labels are strings (RTE, CB), booleans (BoolQ,
WiC) or 0/1 (MultiRC); the hub's are class indices; both map to the same examples. MultiRC's
JSONL nests answers under questions under a paragraph: it is flattened to one example per
answer, as the hub does. Test = the official validation split; dev = a seeded 10% of train.

Causal LMs: MeZO's template, each label word scored after the prompt (BoolQ: MeZO's default
version, the question with a capital and a question mark, then a newline). Encoders: a sentence
pair into a classification head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from hybridft.data.tasks import sources
from hybridft.data.tasks.task import Example, Task
from hybridft.data.tasks.template import Template

HUB = "aps/super_glue"
BOOLEAN = ("false", "true")


@dataclass(frozen=True)
class Spec:
    folder: str  # as the official SuperGLUE zip names it
    columns: tuple[str, ...]  # the record's text fields; the first is the example's text
    label_names: tuple[str, ...]
    template: Template
    max_length: int = 256
    prepare: Callable[[list[sources.Record], str], list[sources.Record]] = field(default=lambda found, where: found)


def flatten_multirc(found: list[sources.Record], where: str) -> list[sources.Record]:
    """SuperGLUE MultiRC JSONL records (paragraph -> questions -> answers) in the hub's flat shape,
    one record per answer, in file order; hub records pass through."""
    flat = []
    for number, record in enumerate(found, 1):
        passage = record.get("passage")
        if not isinstance(passage, dict):
            flat.append(record)
            continue
        try:
            for question in passage["questions"]:
                flat += [{"paragraph": passage["text"], "question": question["question"], "answer": answer["text"],
                          "label": answer["label"]} for answer in question["answers"]]
        except (KeyError, TypeError) as error:
            raise ValueError(f"{where} record {number}: not a SuperGLUE MultiRC record (missing {error})") from error
    return flat


TASKS: dict[str, Spec] = {
    "rte": Spec("RTE", ("premise", "hypothesis"), ("entailment", "not_entailment"), Template(
        prompt='{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n', label_words=("Yes", "No"),
        encoder="{premise}", encoder_pair="{hypothesis}")),
    "cb": Spec("CB", ("premise", "hypothesis"), ("entailment", "contradiction", "neutral"), Template(
        prompt='Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n',
        label_words=("Yes", "No", "Maybe"), encoder="{premise}", encoder_pair="{hypothesis}")),
    "boolq": Spec("BoolQ", ("question", "passage"), BOOLEAN, Template(
        prompt="{passage} {question|upper_first|end_question}\n", label_words=("No", "Yes"),
        encoder="{question}", encoder_pair="{passage}")),
    "wic": Spec("WiC", ("word", "sentence1", "sentence2"), BOOLEAN, Template(
        prompt='Does the word "{word}" have the same meaning in these two sentences? Yes, No?\n{sentence1}\n{sentence2}\n',
        label_words=("No", "Yes"), encoder="{word}: {sentence1}", encoder_pair="{sentence2}"), max_length=128),
    "multirc": Spec("MultiRC", ("paragraph", "question", "answer"), BOOLEAN, Template(
        prompt='{paragraph}\nQuestion: {question}\nI found this answer "{answer}". Is that correct? Yes or No?\n',
        label_words=("No", "Yes"), encoder="{paragraph}", encoder_pair="{question} {answer}"),
        max_length=512, prepare=flatten_multirc),
}


def label_of(value: object, names: tuple[str, ...], where: str) -> int:
    """A class index from a hub class index, a label name, or a boolean (false/true tasks)."""
    if isinstance(value, bool):
        value = str(value).lower()
    if isinstance(value, int) and 0 <= value < len(names):
        return value
    text = str(value).strip().lower()
    if text in names:
        return names.index(text)
    if text.isdigit() and int(text) < len(names):
        return int(text)
    raise ValueError(f"{where}: label {value!r} is not one of {', '.join(names)} (or 0-{len(names) - 1})")


def example(spec: Spec, record: sources.Record, where: str) -> Example:
    """A hub record (or a flattened JSONL record) -> Example with the spec's columns as fields."""
    missing = [key for key in (*spec.columns, "label") if key not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    fields = {key: str(record[key]) for key in spec.columns}
    return Example(fields[spec.columns[0]], label_of(record["label"], spec.label_names, where), fields=fields)


def load(name: str, *, seed: int = 0, data_dir: str | None = None) -> Task:
    spec = TASKS[name]
    train, dev, test = sources.benchmark_splits(
        data_dir, seed, files={"train": ("train.jsonl", "train"), "test": ("val.jsonl", "validation")},
        folders=(name, spec.folder), hub=(HUB, name), columns=(), local_hint=f"{name}/train.jsonl and {name}/val.jsonl",
        example=lambda record, where: example(spec, record, where), prepare=spec.prepare)
    return Task(name=name, label_names=spec.label_names, train=train, dev=dev, test=test, template=spec.template,
                max_length=spec.max_length)
