"""SuperGLUE WSC: does the pronoun (span2) refer to the noun phrase (span1)? (0 no, 1 yes).

Sources: the hub's ``aps/super_glue`` config ``wsc.fixed`` (train, validation), or SuperGLUE's
JSONL files ``<data-dir>/wsc/train.jsonl`` and ``val.jsonl`` (spans under ``target``, boolean
labels; folder ``WSC`` works too). Test = the 104 validation examples; dev = a seeded 10% of
train. A span whose text is not in the passage (a case or punctuation quirk of the original
files) is fixed as the hub's ``wsc.fixed`` fixes it, so both sources give the same examples.

Causal LMs: MeZO's (PromptSource's) template, scored " No" / " Yes" after the question.
Encoders: a span formulation: the passage with the noun phrase in [brackets] and the pronoun in
*asterisks* (found by word index), paired with the question, into a 2-way classification head.
"""

from __future__ import annotations

from hybridft.data.tasks import sources
from hybridft.data.tasks.task import Example, Task
from hybridft.data.tasks.template import Template

HUB = ("aps/super_glue", "wsc.fixed")
FOLDERS = ("wsc", "WSC")
HINT = "wsc/train.jsonl and wsc/val.jsonl"
SPAN_KEYS = ("span1_text", "span1_index", "span2_text", "span2_index")

TEMPLATE = Template(
    prompt='{text}\nIn the previous sentence, does the pronoun "{pronoun}" refer to {span1}? Yes or No?\n',
    label_words=("No", "Yes"),
    encoder="{marked}",
    encoder_pair='Does "{span2}" refer to "{span1}"?',
)


def flatten(record: sources.Record) -> sources.Record:
    """A SuperGLUE JSONL record (spans under ``target``) in the hub's flat shape."""
    if "target" not in record:
        return record
    return {**{k: v for k, v in record.items() if k != "target"}, **record["target"]}


def fix_span(text: str, span: str, index: int) -> str:
    """The span as it appears in the passage: first-letter case of the word at ``index``, no
    trailing period, no newline (what ``wsc.fixed`` does; unchanged if already in the text)."""
    if span in text:
        return span
    words = text.split()
    if 0 <= index < len(words) and span:
        span = (span[0].lower() if words[index][0].islower() else span[0].upper()) + span[1:]
    return span.rstrip(".").replace("\n", " ")


def mark(text: str, spans: list[tuple[int, str, str, str]]) -> str:
    """``text`` with each (word index, span, left, right) span's words wrapped in its markers."""
    words = text.split()
    for index, span, left, right in spans:
        end = min(len(words), index + max(1, len(span.split()))) - 1
        if 0 <= index <= end:
            words[index] = left + words[index]
            words[end] = words[end] + right
    return " ".join(words)


def label_of(value: object, where: str) -> int:
    if value in (True, 1, "True", "true", "1"):
        return 1
    if value in (False, 0, "False", "false", "0"):
        return 0
    raise ValueError(f"{where}: label {value!r} is not a boolean (true/false or 1/0)")


def example(record: sources.Record, where: str) -> Example:
    """A hub ``wsc.fixed`` record (or a flattened JSONL record) -> Example."""
    missing = [k for k in ("text", "label", *SPAN_KEYS) if k not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    text = str(record["text"])
    index1, index2 = int(record["span1_index"]), int(record["span2_index"])
    span1, span2 = fix_span(text, str(record["span1_text"]), index1), fix_span(text, str(record["span2_text"]), index2)
    fields = {"span1": span1, "span2": span2, "pronoun": span2.lower(),
              "marked": mark(text, [(index1, span1, "[", "]"), (index2, span2, "*", "*")])}
    return Example(text, label_of(record["label"], where), fields=fields)


def load(*, seed: int = 0, data_dir: str | None = None) -> Task:
    train, dev, test = sources.benchmark_splits(
        data_dir, seed, files={"train": ("train.jsonl", "train"), "test": ("val.jsonl", "validation")}, folders=FOLDERS,
        hub=HUB, columns=("text", "label"), local_hint=HINT, example=lambda record, where: example(flatten(record), where))
    return Task(name="wsc", label_names=("no", "yes"), train=train, dev=dev, test=test, template=TEMPLATE, max_length=256)
