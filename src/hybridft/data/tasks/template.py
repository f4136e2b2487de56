"""How one example becomes model inputs, for both model kinds.

A causal LM sees, per candidate (a label word, or an option), a ``(context, continuation)``
pair: the context is ``prompt`` filled with the example's fields, the continuation is the
label word (classification) or ``continuation`` filled with the option (multiple choice). It is
scored by the log-likelihood of the continuation's tokens given the context (MeZO's templates).

An encoder sees ``encoder`` (and ``encoder_pair`` as a second segment, if set) filled with the
example's fields: once for classification, once per option (with ``{option}``) for multiple
choice.

Templates are Python format strings; the fields are ``text``, the example's ``fields`` and, for
multiple choice, ``option``.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
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


def field_names(template: str) -> set[str]:
    """The ``{name}`` fields a format string uses."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


@dataclass(frozen=True)
class Template:
    prompt: str = "{text}"
    label_words: tuple[str, ...] = ()
    continuation: str = "{option}"
    encoder: str = "{text}"
    encoder_pair: str | None = None

    def _formats(self, multiple_choice: bool) -> list[str]:
        formats = [self.prompt, self.encoder] + ([self.encoder_pair] if self.encoder_pair else [])
        return formats + ([self.continuation] if multiple_choice else [])

    def check(self, fields: set[str], *, multiple_choice: bool, where: str) -> None:
        """ValueError naming ``where`` if a template uses a field the examples do not have."""
        known = fields | {"text"} | ({"option"} if multiple_choice else set())
        for template in self._formats(multiple_choice):
            unknown = sorted(field_names(template) - known)
            if unknown:
                raise ValueError(f"{where}: template {template!r} uses unknown field(s) {', '.join(unknown)} "
                                 f"(known: {', '.join(sorted(known))})")

    @staticmethod
    def _values(example: Example, option: str | None = None) -> dict[str, str]:
        values = {**example.fields, "text": example.text}
        if option is not None:
            values["option"] = option
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
