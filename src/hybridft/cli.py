"""``hybridft`` command line: flags are derived from ``TrainConfig``'s fields; a YAML file
given with --config sets fields too, and flags override it."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from hybridft.run.config import TrainConfig, load_yaml

_TYPES = {"int": int, "float": float, "str": str}


def _flag_type(annotation: str) -> type:
    return _TYPES[annotation.replace(" | None", "").strip()]


# The fields that matter to a zero-shot evaluation (hybridft eval).
EVAL_FIELDS = ("model", "model_kind", "score", "cache_dir", "task", "data_dir", "seed", "max_length", "dev_size",
               "test_size", "eval_batch_size", "threads", "device", "trust_remote_code")


# The sections of ``train --help``: each TrainConfig field is in exactly one (tests/test_cli.py).
FLAG_GROUPS: dict[str, tuple[str, ...]] = {
    "model and task": ("model", "model_kind", "score", "dtype", "cache_dir", "trust_remote_code", "task", "data_dir"),
    "method and PEFT": ("method", "peft", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save",
                        "num_virtual_tokens"),
    "ZO rule": ("eps", "num_directions", "one_sided", "distribution", "fused", "z_cache", "zo_rounding", "z_dtype",
                "embedding_rows", "zo_threads", "zo_weight_decay", "zo_estimator", "zo_directions", "zo_rank",
                "zo_v_every", "zo_layer_fraction", "zo_mask_fraction"),
    "FO optimizer": ("fo_optimizer", "fo_momentum", "fo_weight_decay"),
    "learning rates and schedules": ("zo_lr", "fo_lr", "lr", "smoothness", "zo_schedule", "fo_schedule",
                                     "warmup_steps"),
    "data and evaluation": ("batch_size", "grad_accum", "sampler", "max_length", "train_size", "dev_size", "test_size",
                            "eval_batch_size", "eval_every"),
    "run and output": ("steps", "epochs", "seed", "output_dir", "save_merged", "checkpoint_every", "keep_checkpoints",
                       "max_bad_steps", "device", "threads", "progress", "plot"),
}


def add_config_flags(parser: argparse.ArgumentParser,
                     names: Sequence[str] | None = None) -> dict[str, argparse._ArgumentGroup]:
    """--config FILE.yaml and one flag per TrainConfig field (or per field in ``names``), in the
    sections of FLAG_GROUPS; returns the sections by title."""
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of config fields; flags override it")
    return add_dataclass_flags(parser, TrainConfig, names, groups=FLAG_GROUPS)


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, names: Sequence[str] | None = None,
                        groups: Mapping[str, Sequence[str]] | None = None) -> dict[str, argparse._ArgumentGroup]:
    """One flag per field of the dataclass ``cls`` (or per field in ``names``); every default is
    None so that unset flags are known. ``groups`` maps a --help section title to field names
    (a field in none is listed with the parser's own options); returns the sections by title."""
    fields = {f.name: f for f in dataclasses.fields(cls) if names is None or f.name in names}
    sections: dict[str, argparse._ArgumentGroup] = {}
    for title, members in (groups or {}).items():
        chosen = [fields.pop(name) for name in members if name in fields]
        if chosen:
            sections[title] = parser.add_argument_group(title)
            for f in chosen:
                _add_flag(sections[title], f)
    for f in fields.values():
        _add_flag(parser, f)
    return sections


def _add_flag(container: argparse._ActionsContainer, f: dataclasses.Field[Any]) -> None:
    flag = "--" + f.name.replace("_", "-")
    help_text = f.metadata["help"]
    if "default:" not in help_text:  # a help text may say its default itself, in words
        help_text += f" (default: {f.default})"
    if f.type == "bool":
        container.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    else:
        container.add_argument(flag, type=_flag_type(str(f.type)), default=None, help=help_text,
                               choices=f.metadata.get("choices"),
                               metavar=None if f.metadata.get("choices") else f.name.upper())


def dataclass_from_args(args: argparse.Namespace, cls: type) -> Any:
    """An instance of ``cls`` from the flags that were given (the others keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None}
    return cls(**values)


def given_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the user set: from --config's YAML file, then flags."""
    values: dict[str, Any] = load_yaml(args.config) if args.config else {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    return values


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    if getattr(args, "resume", None):
        from hybridft.run.checkpoint import resume_config

        return resume_config(args.resume, given_fields(args))
    try:
        return TrainConfig(**given_fields(args))
    except TypeError as error:
        raise ValueError(str(error)) from error


class Parser(argparse.ArgumentParser):
    """Usage errors in one line (the usage of ``train`` is long), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    root = Parser(prog="hybridft", description="Hybrid ZO (base) + FO (adapter) fine-tuning.")
    commands = root.add_subparsers(dest="command")
    train = commands.add_parser("train", help="fine-tune a model (with no flags: MiniLM + LoRA on Rotten Tomatoes, offline)")
    run_section = add_config_flags(train)["run and output"]
    run_section.add_argument("--overwrite", action="store_true", help="reuse an --output-dir that already holds a run")
    run_section.add_argument("--resume", metavar="OUTPUT_DIR", help="continue the run in OUTPUT_DIR from its latest "
                             "checkpoint (its config.json is the config; only runtime flags such as --threads may change)")
    replay = commands.add_parser("replay", help="rebuild a run's trained model from its initial model and ZO update log")
    replay.add_argument("run_dir", metavar="RUN_DIR", help="a finished run's --output-dir")
    replay.add_argument("--output-dir", help="where to save the rebuilt model (default: RUN_DIR/replayed)")
    bench = commands.add_parser("bench", help="run a grid of models x tasks x methods x seeds (resumes where it stopped)")
    bench.add_argument("--config", metavar="FILE.yaml", required=True, help="the bench grid (see README: Benchmarks)")
    bench.add_argument("--output-dir", help="where the bench lives (overrides the file's output_dir)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    plot = commands.add_parser("plot", help="redraw the plots of a bench directory or a training run")
    plot.add_argument("run_dir", metavar="RUN_DIR")
    evaluate = commands.add_parser("eval", help="zero-shot accuracy of a model on a task (where training starts)")
    add_config_flags(evaluate, EVAL_FIELDS)
    from hybridft.theory.config import SmoothnessConfig

    smoothness = commands.add_parser("smoothness", help="measure block-wise smoothness along a training trajectory, advise step sizes (docs/theory.md)")
    run_section = add_config_flags(smoothness)["run and output"]
    add_dataclass_flags(smoothness, SmoothnessConfig,
                        groups={"smoothness measurement": [f.name for f in dataclasses.fields(SmoothnessConfig)]})
    run_section.add_argument("--overwrite", action="store_true", help="reuse an --output-dir that already holds a measurement")
    return root


def one_line_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> str:
    return f"hybridft: warning: {message}\n"


def report(result: dict[str, Any]) -> str:
    """One line: ``zero-shot accuracy of M on T (formulation): dev x (n examples), test y (m examples)``."""
    parts = [f"{split} {result[f'{split}_accuracy']:.4f} ({result[f'{split}_size']} examples)"
             for split in ("dev", "test") if f"{split}_accuracy" in result]
    return f"zero-shot accuracy of {result['model']} on {result['task']} ({result['formulation']}): {', '.join(parts)}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["train", *argv]
    try:
        args = parser().parse_args(argv)
    except SystemExit as stop:  # usage error (one line, see Parser) or --help
        return stop.code if isinstance(stop.code, int) else 2
    warnings.formatwarning = one_line_warning
    try:
        if args.command in ("train", "replay", "bench", "eval", "smoothness"):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # per-file load/save bars; ours is the training bar
            # raised inside peft's wrapping by transformers 5; not actionable for a user
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        if args.command == "train":
            from hybridft.run import distributed
            from hybridft.run.train import train
            from hybridft.theory.auto import resolve_lr

            config = config_from_args(args)
            config.validate()
            try:
                result = train(config, overwrite=args.overwrite, resume=args.resume is not None, resolve_lr=resolve_lr)
                if config.plot and distributed.world().main:
                    from hybridft.study.plots import plot_run

                    print(f"plot: {plot_run(result.output_dir)}")
            except BaseException:
                distributed.shutdown(together=False)
                raise
            distributed.shutdown()
        elif args.command == "replay":
            from hybridft.run.replay import rebuild

            rebuild(args.run_dir, args.output_dir)
        elif args.command == "bench":
            from hybridft.study.bench import run_bench
            from hybridft.study.grid import load_bench
            from hybridft.theory.auto import resolve_lr

            root = run_bench(load_bench(args.config, args.output_dir), progress=not args.no_progress,
                             resolve_lr=resolve_lr)
            print(f"results: {root / 'results.md'}, plots: {root / 'plots'}")
        elif args.command == "plot":
            from hybridft.study.plots import plot

            for path in plot(args.run_dir):
                print(path)
        elif args.command == "eval":
            from hybridft.run.zero_shot import zero_shot

            print(report(zero_shot(config_from_args(args))))
        elif args.command == "smoothness":
            from hybridft.theory.command import smoothness
            from hybridft.theory.config import SmoothnessConfig

            smoothness(config_from_args(args), dataclass_from_args(args, SmoothnessConfig), overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as error:
        print(f"hybridft: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        from hybridft.run.disk import WriteFailed
        from hybridft.run.train import TrainingDiverged

        if not isinstance(error, (TrainingDiverged, WriteFailed)):
            raise
        print(f"hybridft: error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        from hybridft.run.stop import Stopped

        if not isinstance(error, Stopped):
            raise
        print(error, file=sys.stderr)  # "stopped at step N by SIGTERM; resume with ..."
        return error.exit_code  # 128 + the signal, as a shell reports it
    return 0


if __name__ == "__main__":
    sys.exit(main())
