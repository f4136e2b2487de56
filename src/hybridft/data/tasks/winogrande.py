"""WinoGrande 1.1: fill the blank ``_`` of a sentence with option 1 or option 2.

Sources: the hub's ``allenai/winogrande`` config ``winogrande_<size>`` (train, validation), or
the release's JSONL files ``<data-dir>/winogrande/train_<size>.jsonl`` and ``dev.jsonl`` (answer
"1"/"2" in the record, or line by line in ``<split>-labels.lst`` beside it). Sizes xs, s, m, l,
xl (160 to 40,398 training sentences; the smaller sets are prefixes of xl). Test = the 1,267
dev sentences (the test split's labels are hidden); dev = a seeded 10% of train.

Causal LMs (MeZO): the context is the sentence up to the blank; each candidate continuation is
the option followed by the rest of the sentence. Encoders: a multiple-choice head over the
sentence with the blank filled by each option.
"""

from __future__ import annotations

from pathlib import Path

from hybridft.data.tasks import sources
from hybridft.data.tasks.task import Example, Task
from hybridft.data.tasks.template import Template

SIZES = ("xs", "s", "m", "l", "xl")
HUB = "allenai/winogrande"
FOLDERS = ("winogrande", "winogrande_1.1")

TEMPLATE = Template(prompt="{before}", continuation="{option}{after}", encoder="{before}{option}{after}")


def example(record: sources.Record, where: str) -> Example:
    """A hub record (or a release JSONL record) -> Example; label 0 = option1, 1 = option2."""
    missing = [k for k in ("sentence", "option1", "option2", "answer") if k not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    sentence, answer = str(record["sentence"]), str(record["answer"]).strip()
    if sentence.count("_") != 1:
        raise ValueError(f"{where}: the sentence must have exactly one blank '_', got {sentence!r}")
    if answer not in ("1", "2"):
        raise ValueError(f"{where}: answer {record['answer']!r} is not 1 or 2")
    before, after = sentence.split("_")
    return Example(sentence, int(answer) - 1, options=(str(record["option1"]), str(record["option2"])),
                   fields={"before": before, "after": after})


def with_labels(found: list[sources.Record], where: str) -> list[sources.Record]:
    """Release files without an ``answer`` field take it from ``<split>-labels.lst``."""
    if not found or "answer" in found[0] or not where.endswith(".jsonl"):
        return found
    labels_path = Path(where[: -len(".jsonl")] + "-labels.lst")
    if not labels_path.is_file():
        raise ValueError(f"{where}: records have no answer and {labels_path} is missing")
    labels = labels_path.read_text(encoding="utf-8").split()
    if len(labels) != len(found):
        raise ValueError(f"{labels_path}: {len(labels)} labels for {len(found)} records in {where}")
    return [{**r, "answer": a} for r, a in zip(found, labels)]


def load(size: str = "xl", *, seed: int = 0, data_dir: str | None = None) -> Task:
    if size not in SIZES:
        raise ValueError(f"unknown WinoGrande size {size!r}; choose from {', '.join(SIZES)}")
    train, dev, test = sources.benchmark_splits(
        data_dir, seed, files={"train": (f"train_{size}.jsonl", "train"), "test": ("dev.jsonl", "validation")},
        folders=FOLDERS, hub=(HUB, f"winogrande_{size}"), columns=("sentence", "option1", "option2"),
        local_hint=f"winogrande/train_{size}.jsonl and winogrande/dev.jsonl", example=example, prepare=with_labels)
    return Task(name=f"winogrande_{size}", label_names=("option1", "option2"), train=train, dev=dev, test=test,
                template=TEMPLATE, multiple_choice=True)
