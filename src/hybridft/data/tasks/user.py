"""User-defined tasks from a YAML file, without code. Classification:

    name: reviews                    # default: the file's stem
    train: data/train.csv            # .csv, .tsv or .jsonl; paths are relative to this file
    dev: data/dev.csv                # optional: else a seeded 10% of train
    test: data/test.csv              # optional
    text: review                     # the input column
    label: sentiment                 # the label column
    label_words: {neg: terrible, pos: great}   # label value -> word a causal LM scores (order = class index)
    template: "{review} It was"      # causal LM prompt over the columns ({text} = the text column)

Multiple choice: ``options: [col_a, col_b, ...]`` instead of ``label_words``; the label column
holds one of ``label_values`` (default 0, 1, ...), in option order; ``continuation`` (default
``{option}``) is what a causal LM scores after the prompt. Optional for both: ``encoder`` and
``encoder_pair`` (the encoder's input templates, default ``{text}``, and ``{option}`` filled in
for multiple choice), ``max_length`` (default 128) and ``word_fields``, a field whose word is
picked by another field's value (template.py; filters such as ``{premise|strip_period}`` too):

    word_fields:
      connective: {from: question, words: {cause: because, effect: so}}   # {connective} in templates

Values are compared as text, so a JSON ``true`` label is written ``true`` or ``"True"`` in
``label_words``. The file is read as YAML 1.2 (yaml12.py): ``Yes``/``No``/``on``/``off`` are
words, not booleans; a label word, option column or template that is still not a string (``~``,
``true``, ``3``) is refused, naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hybridft.data import yaml12
from hybridft.data.tasks import sources
from hybridft.data.tasks.task import Example, Task, holdout
from hybridft.data.tasks.template import Template, field_names

KEYS = {"name", "train", "dev", "test", "text", "label", "label_words", "options", "label_values", "template",
        "continuation", "encoder", "encoder_pair", "max_length", "word_fields"}
TEMPLATE_KEYS = ("template", "continuation", "encoder", "encoder_pair")


def read_spec(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path}: task file not found")
    try:
        spec = yaml12.load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from error
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected a mapping of task keys")
    unknown = sorted(set(map(str, spec)) - KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(KEYS))})")
    for key in ("train", "text", "label"):
        if key not in spec:
            raise ValueError(f"{path}: missing key {key!r}")
    if ("label_words" in spec) == ("options" in spec):
        raise ValueError(f"{path}: give either label_words (classification) or options (multiple choice)")
    for key in TEMPLATE_KEYS:
        if key in spec:
            string(spec[key], key, path)
    return spec


def string(value: Any, key: str, path: Path) -> str:
    """``value`` if it is a string; else a ValueError naming the file and the key (a YAML value
    like ``~`` or ``true`` that was meant as a word)."""
    if not isinstance(value, str):
        raise ValueError(f"{path}: {key} must be a string, got {value!r} (quote it in the task file)")
    return value


def word_fields(spec: dict[str, Any], path: Path) -> dict[str, tuple[str, dict[str, str]]]:
    """``word_fields`` as ``{name: (source field, {value: word})}`` (template.py)."""
    found = spec.get("word_fields") or {}
    if not isinstance(found, dict):
        raise ValueError(f"{path}: word_fields must map a new field to {{from: FIELD, words: {{VALUE: WORD}}}}")
    parsed = {}
    for name, entry in found.items():
        if not isinstance(entry, dict) or set(entry) != {"from", "words"} or not isinstance(entry["words"], dict):
            raise ValueError(f"{path}: word_fields.{name} must be {{from: FIELD, words: {{VALUE: WORD}}}}")
        words = {str(k): string(w, f"word_fields.{name}.words.{k}", path) for k, w in entry["words"].items()}
        parsed[str(name)] = (string(entry["from"], f"word_fields.{name}.from", path), words)
    return parsed


def label_map(spec: dict[str, Any], path: Path) -> tuple[dict[str, int], tuple[str, ...]]:
    """(label value -> class or option index, label names) from label_words or label_values."""
    if "options" in spec:
        options = spec["options"]
        if not isinstance(options, list) or len(options) < 2:
            raise ValueError(f"{path}: options must be a list of at least two columns")
        values = [str(v) for v in spec.get("label_values", range(len(options)))]
        if len(values) != len(options):
            raise ValueError(f"{path}: {len(values)} label_values for {len(options)} options")
        return {v: i for i, v in enumerate(values)}, tuple(string(o, f"options[{i}]", path) for i, o in enumerate(options))
    words = spec["label_words"]
    if isinstance(words, list):
        words = dict(enumerate(words))
    if not isinstance(words, dict) or len(words) < 2:
        raise ValueError(f"{path}: label_words must map at least two label values to words")
    for k, word in words.items():
        string(word, f"label_words.{k}", path)
    return {str(k): i for i, k in enumerate(words)}, tuple(str(k) for k in words)


def examples(file: Path, spec: dict[str, Any], labels: dict[str, int], template: Template) -> list[Example]:
    """The file's records as examples; a record without a column the task or its template reads,
    or with a word field's value that has no word, is a ValueError naming the file and record."""
    records = sources.read_records(file)
    columns = [spec["text"], spec["label"], *spec.get("options", [])]
    sources.require(records, columns, file)
    found = []
    for number, record in enumerate(records, 1):
        missing = [c for c in columns if c not in record]
        if missing:
            raise ValueError(f"{file} record {number}: missing column(s) {', '.join(missing)}")
        value = str(record[spec["label"]]).strip()
        if value not in labels:
            raise ValueError(f"{file} record {number}: label {value!r} is not one of {', '.join(labels)}")
        for source, words in template.word_fields.values():
            if source in record and str(record[source]) not in words:
                raise ValueError(f"{file} record {number}: {source} {str(record[source])!r} is not one of "
                                 f"{', '.join(words)} (word_fields)")
        options = tuple(str(record[c]) for c in spec.get("options", []))
        fields = {str(k): "" if v is None else str(v) for k, v in record.items()}
        found.append(Example(str(record[spec["text"]]), labels[value], options=options, fields=fields))
    return found


def check_fields(examples: list[Example], template: Template, file: Path, *, multiple_choice: bool) -> None:
    """Every record has each column the template reads (JSONL records may differ in keys)."""
    used = {name for t in template.formats(multiple_choice) for name in field_names(t)}
    used = (used | {source for source, _ in template.word_fields.values()}) - {"text", "option", *template.word_fields}
    for number, example in enumerate(examples, 1):
        missing = sorted(used - set(example.fields))
        if missing:
            raise ValueError(f"{file} record {number}: missing column(s) {', '.join(missing)} used by the template")


def load(task_file: str | Path, *, seed: int = 0) -> Task:
    path = Path(task_file)
    spec = read_spec(path)
    labels, label_names = label_map(spec, path)
    multiple_choice = "options" in spec
    words = spec.get("label_words", {})
    template = Template(
        prompt=spec.get("template", "{text}"),
        label_words=tuple(words.values() if isinstance(words, dict) else words),
        continuation=spec.get("continuation", "{option}"),
        encoder=spec.get("encoder", "{text}"),
        encoder_pair=spec.get("encoder_pair") or None,
        word_fields=word_fields(spec, path),
    )
    files = {split: path.parent / str(spec[split]) for split in ("train", "dev", "test") if split in spec}
    splits = {split: examples(file, spec, labels, template) for split, file in files.items()}
    template.check(set().union(*(e.fields for e in splits["train"])), multiple_choice=multiple_choice, where=str(path))
    for split, file in files.items():
        check_fields(splits[split], template, file, multiple_choice=multiple_choice)
    splits = {"dev": [], "test": [], **splits}
    train, dev = (splits["train"], splits["dev"]) if splits["dev"] else holdout(splits["train"], seed)
    return Task(name=str(spec.get("name", path.stem)), label_names=label_names, train=train, dev=dev,
                test=splits["test"], template=template, multiple_choice=multiple_choice,
                max_length=int(spec.get("max_length", 128)))
