"""YAML read as YAML 1.2 (core schema): every task file, ``--config`` file and bench file.

PyYAML implements YAML 1.1, where unquoted ``Yes``/``No``/``on``/``off``/``y``/``n`` are
booleans, ``010`` is octal, ``1:30`` is 90 and ``1e-3`` is a string. A task file's
``label_words: {entailment: Yes}`` then makes a causal LM score " True". ``Loader`` is PyYAML's
safe loader with the implicit bool, int and float rules of the YAML 1.2 core schema instead:

    bool   true | True | TRUE | false | False | FALSE
    int    [-+]?[0-9]+ | 0o[0-7]+ | 0x[0-9a-fA-F]+
    float  [-+]?(.[0-9]+ | [0-9]+(.[0-9]*)?)([eE][-+]?[0-9]+)? | [-+]?.inf | .nan   (any case of inf/nan as 1.2 lists)

Everything else (``yes``, ``on``, ``1_000``, ``1:30``, ``2024-01-31``) is a string; null stays
``~``/``null``/empty.
"""

from __future__ import annotations

import re
from typing import IO, Any

import yaml

BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
FLOAT = re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                   r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
# The 1.1 rules dropped: bool, int and float are replaced below; 1.2 has no implicit timestamps.
_DROPPED = {f"tag:yaml.org,2002:{name}" for name in ("bool", "int", "float", "timestamp")}


class Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 core-schema booleans, integers and floats."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in _DROPPED]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


def _construct_bool(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> bool:
    return loader.construct_scalar(node).lower() == "true"


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    value = str(loader.construct_scalar(node))
    if value.startswith("0x"):
        return int(value[2:], 16)
    if value.startswith("0o"):
        return int(value[2:], 8)
    return int(value, 10)  # "010" is ten, as YAML 1.2 reads it


# Integers before floats: the float rule's [0-9]+ alone would also match an integer.
Loader.add_implicit_resolver("tag:yaml.org,2002:bool", BOOL, list("tTfF"))
Loader.add_implicit_resolver("tag:yaml.org,2002:int", INT, list("-+0123456789"))
Loader.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT, list("-+.0123456789"))
Loader.add_constructor("tag:yaml.org,2002:bool", _construct_bool)
Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def load(stream: str | bytes | IO[str]) -> Any:
    """The YAML document in ``stream`` read as YAML 1.2 (``yaml.safe_load`` with 1.2 scalars)."""
    return yaml.load(stream, Loader=Loader)  # noqa: S506 - Loader is a SafeLoader
