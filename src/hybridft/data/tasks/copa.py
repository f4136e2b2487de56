"""SuperGLUE COPA: which of two alternatives is the cause (or the effect) of the premise?

Sources: the hub's ``aps/super_glue`` config ``copa`` (train, validation), or SuperGLUE's JSONL
files ``<data-dir>/copa/train.jsonl`` and ``val.jsonl`` (``premise``, ``choice1``, ``choice2``,
``question`` "cause" or "effect", ``label`` 0 or 1; folder ``COPA`` works too). Test = the 100
validation examples; dev = a seeded 10% of the 400 training examples.

Causal LMs (MeZO): the premise without its final period, then " because" for a cause or " so"
for an effect; each choice, its first word lower-cased (but not "I"), is scored after it.
Encoders: a multiple-choice head over (premise, connective + choice) pairs. The same template as
a task file is in the README ("Your own task").
"""

from __future__ import annotations

from hybridft.data.tasks import sources
from hybridft.data.tasks.task import Example, Task
from hybridft.data.tasks.template import Template

HUB = ("aps/super_glue", "copa")
FOLDERS = ("copa", "COPA")
HINT = "copa/train.jsonl and copa/val.jsonl"
CONNECTIVES = {"cause": "because", "effect": "so"}

TEMPLATE = Template(
    prompt="{premise|strip_period} {connective}",
    continuation="{option|lower_first}",
    encoder="{premise}",
    encoder_pair="{connective} {option|lower_first}",
    word_fields={"connective": ("question", CONNECTIVES)},
)


def example(record: sources.Record, where: str) -> Example:
    """A hub (or JSONL) record -> Example; label 0 = choice1, 1 = choice2."""
    missing = [k for k in ("premise", "choice1", "choice2", "question", "label") if k not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    if record["question"] not in CONNECTIVES:
        raise ValueError(f"{where}: question {record['question']!r} is not cause or effect")
    label = str(record["label"]).strip()
    if label not in ("0", "1"):
        raise ValueError(f"{where}: label {record['label']!r} is not 0 or 1")
    fields = {k: str(record[k]) for k in ("premise", "choice1", "choice2", "question")}
    return Example(fields["premise"], int(label), options=(fields["choice1"], fields["choice2"]), fields=fields)


def load(*, seed: int = 0, data_dir: str | None = None) -> Task:
    train, dev, test = sources.benchmark_splits(
        data_dir, seed, files={"train": ("train.jsonl", "train"), "test": ("val.jsonl", "validation")}, folders=FOLDERS,
        hub=HUB, columns=("premise", "choice1", "choice2", "question"), local_hint=HINT, example=example)
    return Task(name="copa", label_names=("choice1", "choice2"), train=train, dev=dev, test=test, template=TEMPLATE,
                multiple_choice=True)
