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
for multiple choice) and ``max_length`` (default 128). Values are compared as text, so a JSON
``true`` label is written ``"True"`` in ``label_words``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hybridft.data.tasks import sources
from hybridft.data.tasks.task import Example, Task, holdout
from hybridft.data.tasks.template import Template

KEYS = {"name", "train", "dev", "test", "text", "label", "label_words", "options", "label_values", "template",
        "continuation", "encoder", "encoder_pair", "max_length"}


def read_spec(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path}: task file not found")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
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
    return spec


def label_map(spec: dict[str, Any], path: Path) -> tuple[dict[str, int], tuple[str, ...]]:
    """(label value -> class or option index, label names) from label_words or label_values."""
    if "options" in spec:
        options = spec["options"]
        if not isinstance(options, list) or len(options) < 2:
            raise ValueError(f"{path}: options must be a list of at least two columns")
        values = [str(v) for v in spec.get("label_values", range(len(options)))]
        if len(values) != len(options):
            raise ValueError(f"{path}: {len(values)} label_values for {len(options)} options")
        return {v: i for i, v in enumerate(values)}, tuple(map(str, options))
    words = spec["label_words"]
    if isinstance(words, list):
        words = dict(enumerate(words))
    if not isinstance(words, dict) or len(words) < 2:
        raise ValueError(f"{path}: label_words must map at least two label values to words")
    return {str(k): i for i, k in enumerate(words)}, tuple(str(k) for k in words)


def examples(file: Path, spec: dict[str, Any], labels: dict[str, int]) -> list[Example]:
    records = sources.read_records(file)
    sources.require(records, [spec["text"], spec["label"], *spec.get("options", [])], file)
    found = []
    for number, record in enumerate(records, 1):
        value = str(record[spec["label"]]).strip()
        if value not in labels:
            raise ValueError(f"{file} record {number}: label {value!r} is not one of {', '.join(labels)}")
        options = tuple(str(record[c]) for c in spec.get("options", []))
        fields = {str(k): "" if v is None else str(v) for k, v in record.items()}
        found.append(Example(str(record[spec["text"]]), labels[value], options=options, fields=fields))
    return found


def load(task_file: str | Path, *, seed: int = 0) -> Task:
    path = Path(task_file)
    spec = read_spec(path)
    labels, label_names = label_map(spec, path)
    multiple_choice = "options" in spec
    words = spec.get("label_words", {})
    template = Template(
        prompt=str(spec.get("template", "{text}")),
        label_words=tuple(str(w) for w in (words.values() if isinstance(words, dict) else words)),
        continuation=str(spec.get("continuation", "{option}")),
        encoder=str(spec.get("encoder", "{text}")),
        encoder_pair=str(spec["encoder_pair"]) if spec.get("encoder_pair") else None,
    )
    splits = {split: examples(path.parent / str(spec[split]), spec, labels) if split in spec else []
              for split in ("train", "dev", "test")}
    template.check(set(splits["train"][0].fields), multiple_choice=multiple_choice, where=str(path))
    train, dev = (splits["train"], splits["dev"]) if splits["dev"] else holdout(splits["train"], seed)
    return Task(name=str(spec.get("name", path.stem)), label_names=label_names, train=train, dev=dev,
                test=splits["test"], template=template, multiple_choice=multiple_choice,
                max_length=int(spec.get("max_length", 128)))
