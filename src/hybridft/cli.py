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


# The fields that matter to a zero-shot evaluation (hybridft eval).
EVAL_FIELDS = ("model", "model_kind", "score", "cache_dir", "task", "data_dir", "seed", "max_length", "dev_size",
               "test_size", "eval_batch_size", "threads", "device", "trust_remote_code")


def add_config_flags(parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """One flag per TrainConfig field (or per field in ``names``); every default is None so that
    unset flags are known."""
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of config fields; flags override it")
    for f in dataclasses.fields(TrainConfig):
        if names is not None and f.name not in names:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=_flag_type(str(f.type)), default=None, help=help_text,
                                choices=f.metadata.get("choices"), metavar=None if f.metadata.get("choices") else f.name.upper())


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = load_yaml(args.config) if args.config else {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
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
    evaluate = commands.add_parser("eval", help="zero-shot accuracy of a model on a task (where training starts)")
    add_config_flags(evaluate, EVAL_FIELDS)
    return root


def report(result: dict[str, Any]) -> str:
    """One line: ``zero-shot accuracy of M on T (formulation): dev x (n examples), test y (m examples)``."""
    parts = [f"{split} {result[f'{split}_accuracy']:.4f} ({result[f'{split}_size']} examples)"
             for split in ("dev", "test") if f"{split}_accuracy" in result]
    return f"zero-shot accuracy of {result['model']} on {result['task']} ({result['formulation']}): {', '.join(parts)}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["train", *argv]
    args = parser().parse_args(argv)
    try:
        if args.command in ("train", "eval"):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # per-file load/save bars; ours is the training bar
        if args.command == "train":
            from hybridft.train import train

            # raised inside peft's wrapping by transformers 5; not actionable for a user
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            config = config_from_args(args)
            config.validate()
            train(config, overwrite=args.overwrite)
        elif args.command == "eval":
            from hybridft.zero_shot import zero_shot

            print(report(zero_shot(config_from_args(args))))
    except (ValueError, FileNotFoundError) as error:
        print(f"hybridft: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
