"""How one example becomes model inputs, for both model kinds.

A causal LM sees, per candidate (a label word, or an option), a ``(context, continuation)``
pair: the context is ``prompt`` filled with the example's fields, the continuation is the
label word (classification) or ``continuation`` filled with the option (multiple choice). It is
scored by the log-likelihood of the continuation's tokens given the context (MeZO's templates).

An encoder sees ``encoder`` (and ``encoder_pair`` as a second segment, if set) filled with the
example's fields: once for classification, once per option (with ``{option}``) for multiple
choice.

Templates are Python format strings; the fields are ``text``, the example's ``fields``, for
multiple choice ``option``, and the template's ``word_fields``: a word picked by another field's
value (COPA's ``{connective}``, "because" when ``question`` is "cause", "so" when it is "effect").
A field may be followed by filters, ``{premise|strip_period}``, applied left to right (FILTERS):
what MeZO's templates do to their fields, so that every built-in template is also a task file.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hybridft.data.tasks.task import Example

_NO_SPACE_AFTER = "([{\"'/-"


def join(context: str, continuation: str) -> tuple[str, str]:
    """Put the separating space at the start of the continuation, where byte-level BPE
    tokenizers expect it (" great" is one token, " " + "great" two): trailing spaces of the
    context move to the continuation, and a space is inserted between a word-like context end
    and a continuation that starts with a letter or digit. A context ending in a newline, an
    opening bracket or a quote gets no space."""
    stripped = context.rstrip(" ")
    if not stripped or continuation[:1].isspace():
        return stripped, continuation if stripped else continuation.lstrip()
    if stripped != context or (continuation[:1].isalnum() and not stripped[-1].isspace()
                               and stripped[-1] not in _NO_SPACE_AFTER):
        return stripped, " " + continuation
    return stripped, continuation


def _strip_period(value: str) -> str:
    value = value.rstrip()
    return value[:-1] if value.endswith(".") else value


def _lower_first(value: str) -> str:
    first = value.split(" ", 1)[0]
    return value if first == "I" or first.startswith("I'") else value[:1].lower() + value[1:]


def _end_question(value: str) -> str:
    value = value.rstrip()
    return value if value.endswith("?") else value + "?"


# MeZO's field clean-ups: COPA's premise loses its period and each choice's first word its capital
# (but not "I"); a BoolQ question gets a capital and a question mark.
FILTERS: dict[str, Callable[[str], str]] = {
    "strip_period": _strip_period,
    "lower_first": _lower_first,
    "upper_first": lambda value: value[:1].upper() + value[1:],
    "end_question": _end_question,
}


class _Values(dict[str, str]):
    """Field values that also answer ``name|filter|...`` (str.format_map looks the whole
    ``{...}`` name up here)."""

    def __missing__(self, key: str) -> str:
        name, *filters = key.split("|")
        if not filters:
            raise KeyError(key)
        value = self[name]
        for filter_name in filters:
            value = FILTERS[filter_name](value)
        return value


def field_uses(template: str) -> set[str]:
    """The ``{name}`` and ``{name|filter}`` fields a format string uses, as written."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def field_names(template: str) -> set[str]:
    """The ``{name}`` fields a format string uses (without their filters)."""
    return {name.split("|")[0] for name in field_uses(template)}


@dataclass(frozen=True)
class Template:
    prompt: str = "{text}"
    label_words: tuple[str, ...] = ()
    continuation: str = "{option}"
    encoder: str = "{text}"
    encoder_pair: str | None = None
    word_fields: Mapping[str, tuple[str, Mapping[str, str]]] = field(default_factory=dict)  # name -> (field, value -> word)

    def formats(self, multiple_choice: bool) -> list[str]:
        """The format strings a model kind may fill (the continuation only for multiple choice)."""
        formats = [self.prompt, self.encoder] + ([self.encoder_pair] if self.encoder_pair else [])
        return formats + ([self.continuation] if multiple_choice else [])

    def check(self, fields: set[str], *, multiple_choice: bool, where: str) -> None:
        """ValueError naming ``where`` if a template uses a field the examples do not have, or
        a filter that is not in FILTERS."""
        known = fields | {"text"} | ({"option"} if multiple_choice else set())
        sources = {source for source, _ in self.word_fields.values()}
        if sources - known:
            raise ValueError(f"{where}: word_fields pick from unknown field(s) {', '.join(sorted(sources - known))} "
                             f"(known: {', '.join(sorted(known))})")
        known |= set(self.word_fields)
        for template in self.formats(multiple_choice):
            unknown = sorted(field_names(template) - known)
            if unknown:
                raise ValueError(f"{where}: template {template!r} uses unknown field(s) {', '.join(unknown)} "
                                 f"(known: {', '.join(sorted(known))})")
            filters = sorted({f for use in field_uses(template) for f in use.split("|")[1:]} - set(FILTERS))
            if filters:
                raise ValueError(f"{where}: template {template!r} uses unknown filter(s) {', '.join(filters)} "
                                 f"(known: {', '.join(FILTERS)})")

    def _values(self, example: Example, option: str | None = None) -> _Values:
        values = _Values(example.fields, text=example.text)
        if option is not None:
            values["option"] = option
        for name, (source, words) in self.word_fields.items():
            values[name] = words[values[source]]
        return values

    def candidates(self, example: Example) -> list[tuple[str, str]]:
        """One ``(context, continuation)`` per label word or option, in label order."""
        if example.options:
            filled = [self._values(example, o) for o in example.options]
            pairs = [(self.prompt.format_map(v), self.continuation.format_map(v)) for v in filled]
        else:
            context = self.prompt.format_map(self._values(example))
            pairs = [(context, word) for word in self.label_words]
        return [join(context, continuation) for context, continuation in pairs]

    def encoder_inputs(self, example: Example) -> list[tuple[str, str | None]]:
        """One ``(text, text_pair)`` for classification, one per option for multiple choice."""
        options: list[str | None] = list(example.options) or [None]
        return [(self.encoder.format_map(self._values(example, o)),
                 self.encoder_pair.format_map(self._values(example, o)) if self.encoder_pair else None)
                for o in options]


# Sentiment (SST-2, movie reviews). MeZO's template, "<sentence> It was" + " terrible"/" great",
# scored 0.50 zero-shot with SmolLM2-135M-Instruct on 80 Rotten Tomatoes dev sentences (it says
# "great" 97% of the time); this one scored 0.75 (BENCHMARKS.md). MeZO's is one task file away
# (README: "Your own task").
SENTIMENT = Template(prompt="Review: {text}\nSentiment:", label_words=(" negative", " positive"))
