"""``hybridft`` command line: flags are derived from ``TrainConfig``'s fields; a YAML file
given with --config sets fields too, and flags override it."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from hybridft.config import TrainConfig, load_yaml

_TYPES = {"int": int, "float": float, "str": str}


def _flag_type(annotation: str) -> type:
    return _TYPES[annotation.replace(" | None", "").strip()]


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """--config FILE.yaml and one flag per TrainConfig field."""
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of config fields; flags override it")
    add_dataclass_flags(parser, TrainConfig)


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the dataclass ``cls``; every default is None so that unset flags are known."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=_flag_type(str(f.type)), default=None, help=help_text,
                                choices=f.metadata.get("choices"), metavar=None if f.metadata.get("choices") else f.name.upper())


def dataclass_from_args(args: argparse.Namespace, cls: type) -> Any:
    """An instance of ``cls`` from the flags that were given (the others keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None}
    return cls(**values)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = load_yaml(args.config) if args.config else {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name)
        if value is not None:
            values[f.name] = value
    try:
        return TrainConfig(**values)
    except TypeError as error:
        raise ValueError(str(error)) from error


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="hybridft", description="Hybrid ZO (base) + FO (adapter) fine-tuning.")
    commands = root.add_subparsers(dest="command")
    train = commands.add_parser("train", help="fine-tune a model (with no flags: MiniLM + LoRA on Rotten Tomatoes, offline)")
    add_config_flags(train)
    train.add_argument("--overwrite", action="store_true", help="reuse an --output-dir that already holds a run")
    from hybridft.theory.config import SmoothnessConfig

    smoothness = commands.add_parser("smoothness", help="measure block-wise smoothness along a training trajectory, advise step sizes (docs/theory.md)")
    add_config_flags(smoothness)
    add_dataclass_flags(smoothness, SmoothnessConfig)
    smoothness.add_argument("--overwrite", action="store_true", help="reuse an --output-dir that already holds a measurement")
    return root


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["train", *argv]
    args = parser().parse_args(argv)
    try:
        if args.command == "train":
            from transformers.utils import logging as hf_logging

            from hybridft.train import train

            hf_logging.disable_progress_bar()  # per-file load/save bars; ours is the training bar
            # raised inside peft's wrapping by transformers 5; not actionable for a user
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            config = config_from_args(args)
            config.validate()
            train(config, overwrite=args.overwrite)
        elif args.command == "smoothness":
            from hybridft.theory.command import smoothness
            from hybridft.theory.config import SmoothnessConfig

            smoothness(config_from_args(args), dataclass_from_args(args, SmoothnessConfig), overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as error:
        print(f"hybridft: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
