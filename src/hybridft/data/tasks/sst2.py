"""GLUE SST-2: binary sentence sentiment (0 negative, 1 positive).

Sources: the hub's ``nyu-mll/glue`` config ``sst2`` (train, validation), or the GLUE TSV files
``<data-dir>/sst2/train.tsv`` and ``dev.tsv`` (header ``sentence<TAB>label``; folder ``SST-2``
as GLUE's download names it works too). Test = the 872 validation sentences (the test split's
labels are hidden); dev = a seeded 10% of train.
"""

from __future__ import annotations

from hybridft.data.tasks import sources
from hybridft.data.tasks.task import Example, Task
from hybridft.data.tasks.template import SENTIMENT

HUB = ("nyu-mll/glue", "sst2")
FOLDERS = ("sst2", "SST-2")
HINT = "sst2/train.tsv and sst2/dev.tsv"


def example(record: sources.Record, where: str) -> Example:
    """A hub record (or a TSV row) -> Example; GLUE's trailing space is stripped."""
    label = str(record["label"]).strip()
    if label not in ("0", "1"):
        raise ValueError(f"{where}: label {record['label']!r} is not one of 0, 1")
    return Example(str(record["sentence"]).strip(), int(label))


def load(*, seed: int = 0, data_dir: str | None = None) -> Task:
    train, dev, test = sources.benchmark_splits(
        data_dir, seed, files={"train": ("train.tsv", "train"), "test": ("dev.tsv", "validation")}, folders=FOLDERS,
        hub=HUB, columns=("sentence", "label"), local_hint=HINT, example=example)
    return Task(name="sst2", label_names=("negative", "positive"), train=train, dev=dev, test=test, template=SENTIMENT)
