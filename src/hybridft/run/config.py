"""The run configuration: one frozen dataclass whose fields (with their help text) are the CLI
flags, and which a YAML file may set. It is read at the edges (CLI, builders) only."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hybridft.data import yaml12
from hybridft.engine.adapters import CONFIG_FILE, PEFT_KINDS, adapter_config
from hybridft.engine.directions import SAMPLERS, direction_sampler
from hybridft.engine.estimators import ESTIMATORS, estimator
from hybridft.engine.methods import FUSED_FO, METHODS, USES_ADAPTER, fo_optimizer
from hybridft.engine.rules import ZOSGD
from hybridft.engine.schedules import SCHEDULES
from hybridft.engine.storage import storage_rule
from hybridft.engine.zo import DISTRIBUTIONS, ROUNDINGS, Z_DTYPES, HyperparameterError

# The flag that sets each hyperparameter of the ZO step's objects (for their one-line errors).
ZO_FLAGS = {"eps": "--eps", "num_directions": "--num-directions", "distribution": "--distribution",
            "z_dtype": "--z-dtype", "threads": "--zo-threads", "weight_decay": "--zo-weight-decay",
            "rounding": "--zo-rounding", "estimator": "--zo-estimator", "directions": "--zo-directions",
            "fused": "--fused", "rank": "--zo-rank", "v_every": "--zo-v-every", "fraction": "--zo-layer-fraction",
            "mask_fraction": "--zo-mask-fraction"}

MODEL_KINDS = ("auto", "encoder", "causal")
DTYPES = ("float32", "bfloat16", "float16", "float64", "auto")


def _f(default: Any, help: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run."""

    model: str = _f("minilm", "HF hub id, local directory, GGUF file (path or owner/repo/file.gguf), or packaged name (minilm, smollm2)")
    model_kind: str = _f("auto", "encoder (classification / multiple-choice head) or causal (candidate scoring); auto: from the model's config", choices=MODEL_KINDS)
    score: str = _f("mean", "how a causal LM ranks candidates: mean (length-normalised) or sum of their token log-likelihoods", choices=("mean", "sum"))
    dtype: str = _f("float32", "dtype the weights are loaded in: float32 (default), bfloat16 / float16 (half the memory; ZO updates are then stored by --zo-rounding), float64, or auto (the checkpoint's own, transformers' default)", choices=DTYPES)
    cache_dir: str | None = _f(None, "where dequantized GGUF models are kept (default: $HYBRIDFT_CACHE_DIR or ~/.cache/hybridft)")
    task: str = _f("rotten_tomatoes", "task name (rotten_tomatoes, imdb, sst2, wsc, winogrande, winogrande_xs/s/m/l/xl, rte, cb, boolq, copa, wic, multirc) or a task file (.yaml)")
    data_dir: str | None = _f(None, "folder with local copies of the benchmark files (sst2/, wsc/, winogrande/, rte/, cb/, ...; default: $HYBRIDFT_DATA_DIR, else the datasets hub)")
    method: str = _f("hybrid", "what is trained and how (lomo / adalomo: every weight by SGD / AdaLomo inside the backward pass, docs/lomo.md)", choices=METHODS)
    steps: int = _f(100, "optimizer steps (ignored when --epochs is set)")
    epochs: float | None = _f(None, "train for this many passes over the training set instead of --steps")
    batch_size: int = _f(16, "examples per step")
    grad_accum: int = _f(1, "micro-batches of --batch-size examples per step: one step on their union (the gradient and ZO estimate of K x --batch-size examples), with the activation memory of one micro-batch")
    zo_lr: float = _f(1e-6, "learning rate of the ZO group (base weights; adapter for zo-lora)")
    fo_lr: float = _f(2e-3, "learning rate of the FO group (adapter + head; all weights for fo-full, lomo and adalomo; adalomo's is relative to each weight's RMS)")
    eps: float = _f(1e-3, "ZO perturbation scale")
    lr: str | None = _f(None, "auto: set zo-lr, fo-lr (plain SGD) and eps from a short smoothness measurement at the start (docs/theory.md)")
    smoothness: str | None = _f(None, "with --lr auto: use this smoothness.json (from hybridft smoothness) instead of measuring")
    seed: int = _f(0, "seed of the data split, sampler, ZO directions and initialisation")
    lora_r: int = _f(8, "LoRA rank")
    lora_alpha: int = _f(16, "LoRA alpha")
    lora_dropout: float = _f(0.0, "LoRA dropout")
    target_modules: str | None = _f("all-linear", "comma-separated module names for LoRA, or all-linear (every linear layer but the output layer; null in a config file: peft's per-architecture choice)")
    modules_to_save: str | None = _f(None, "comma-separated modules trained in full with the adapter, besides the new task head (e.g. pooler)")
    peft: str = _f("lora", "the adapter of hybrid, fo-lora and zo-lora: lora, ia3, prompt (prompt tuning), prefix (prefix tuning), none (the new task head alone), or a peft config file (adapter_config.json, or its folder)")
    num_virtual_tokens: int = _f(10, "virtual tokens of --peft prompt and prefix")
    fo_optimizer: str = _f("adamw", "optimizer of the FO group (sgd: plain SGD as in the analysis; lomo and adalomo always use their own rule, fused into backward)", choices=("sgd", "adamw"))
    fo_momentum: float = _f(0.0, "SGD momentum of the FO group (0: plain SGD, as in the analysis)")
    zo_weight_decay: float = _f(0.0, "weight decay of the ZO group")
    fo_weight_decay: float = _f(0.0, "weight decay of the FO group")
    zo_schedule: str = _f("constant", "learning-rate schedule of the ZO group", choices=SCHEDULES)
    fo_schedule: str = _f("linear", "learning-rate schedule of the FO group", choices=SCHEDULES)
    warmup_steps: int = _f(0, "linear warmup steps for both groups")
    num_directions: int = _f(1, "ZO directions averaged per step (q)")
    one_sided: bool = _f(False, "one-sided ZO estimate (L(theta+eps z) - L(theta)) / eps")
    distribution: str = _f("gaussian", "distribution of the ZO direction z", choices=DISTRIBUTIONS)
    fused: bool = _f(False, "fused estimator: the FO forward+backward is a ZO evaluation (at theta+eps z; at theta with --one-sided), one forward less per step (docs/step_cost.md)")
    z_cache: bool = _f(False, "generate z once per step and keep it for the step (memory: one copy of the ZO weights)")
    zo_rounding: str = _f("stochastic", "how ZO updates are stored into bfloat16/float16 weights (float32 takes them exactly): stochastic (unbiased; replays exactly) or nearest (MeZO's: an update under half a weight's spacing is lost)", choices=ROUNDINGS)
    z_dtype: str = _f("float32", "draw z in float32 (then cast) or in the weights' own dtype", choices=Z_DTYPES)
    embedding_rows: bool = _f(False, "perturb and update only the input-embedding rows of the batch's tokens (untied embeddings; docs/step_cost.md)")
    zo_threads: int = _f(1, "threads generating z in parallel across parameters (update and z-cache passes; same z)")
    zo_estimator: str = _f("spsa", "ZO estimator: spsa (finite differences, --one-sided/--fused) or fzoo (--num-directions >= 2 one-sided probes normalised by the std of their losses; docs/zo_rules.md)", choices=ESTIMATORS)
    zo_directions: str = _f("dense", "ZO directions: dense (MeZO's), low-rank (LOZO: z = U V^T per 2-D weight, --zo-rank) layer-subset (LeZO: a random --zo-layer-fraction of the blocks per step) or magnitude-mask (Sparse-MeZO: each tensor's --zo-mask-fraction smallest weights); docs/zo_rules.md", choices=SAMPLERS)
    zo_rank: int = _f(2, "rank r of low-rank directions (--zo-directions low-rank)")
    zo_v_every: int = _f(1, "keep V of low-rank directions for this many steps (LOZO's lazy V)")
    zo_layer_fraction: float = _f(0.25, "fraction of the blocks perturbed per step (--zo-directions layer-subset)")
    zo_mask_fraction: float = _f(0.25, "fraction of each tensor's weights, the smallest in magnitude, perturbed and updated (--zo-directions magnitude-mask)")
    sampler: str = _f("reshuffle", "mini-batch sampling", choices=("reshuffle", "replacement"))
    max_length: int | None = _f(None, "tokens per input, longer inputs are truncated (default: the task's: 64 movie reviews, 128 SST-2/WinoGrande/task files, 256 WSC)")
    train_size: int | None = _f(None, "subsample the training split to this many examples")
    dev_size: int | None = _f(1000, "subsample the dev split to this many examples")
    test_size: int | None = _f(1000, "subsample the test split (where the task has one) to this many examples")
    eval_batch_size: int = _f(64, "examples per evaluation forward")
    eval_every: int = _f(0, "also measure dev accuracy every this many steps (0: only before and after)")
    threads: int | None = _f(None, "torch CPU threads (default: torch's choice)")
    device: str = _f("auto", "cpu, cuda, or auto")
    output_dir: str | None = _f(None, "where to write the run (default: runs/<time>-<method>)")
    save_merged: bool = _f(False, "also save the model with the adapter merged in (plain transformers load)")
    trust_remote_code: bool = _f(False, "allow model code from the hub to run")
    progress: bool = _f(True, "show a progress bar")
    plot: bool = _f(True, "draw loss.png (loss and dev accuracy against steps) at the end")
    checkpoint_every: int = _f(50, "write a checkpoint every this many steps (0: only at the end); resume with --resume")
    keep_checkpoints: int = _f(2, "checkpoints kept (the newest)")
    max_bad_steps: int = _f(5, "stop after this many consecutive steps skipped for a non-finite loss or gradient")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def zo_step(self) -> dict[str, Any]:
        """The objects the ZO step is composed of (``HybridOptimizer``'s estimator, directions,
        rule, storage); each checks its own values when made (a one-line error naming the flag)."""
        try:
            return {"estimator": estimator(eps=self.eps, num_directions=self.num_directions, one_sided=self.one_sided,
                                           fused=self.fused, kind=self.zo_estimator),
                    "directions": direction_sampler(self.zo_directions, rank=self.zo_rank, v_every=self.zo_v_every,
                                                    fraction=self.zo_layer_fraction, mask_fraction=self.zo_mask_fraction,
                                                    distribution=self.distribution,
                                                    z_dtype=self.z_dtype, cache=self.z_cache,
                                                    embedding_rows=self.embedding_rows, threads=self.zo_threads),
                    "rule": ZOSGD(weight_decay=self.zo_weight_decay),
                    "storage": storage_rule(self.zo_rounding)}
        except HyperparameterError as error:
            raise ValueError(f"{ZO_FLAGS.get(error.name, error.name)} {error.problem}") from None

    def fo_step(self) -> Callable[[list[Any]], Any]:
        """The FO optimizer this config names, as params -> optimizer (lomo's and adalomo's: their rule fused into backward)."""
        name = FUSED_FO.get(self.method, self.fo_optimizer)
        return functools.partial(fo_optimizer, name, lr=self.fo_lr, momentum=self.fo_momentum,
                                 weight_decay=self.fo_weight_decay)

    def adapter(self, *, head: str, head_modules: list[str]) -> Any:
        """The peft config of --peft (with the LoRA or virtual-token flags) for a model loaded with
        the auto class ``head``, whose new modules ``head_modules`` are trained with the adapter."""
        if self.peft == "none" and not head_modules:
            raise ValueError(f"--peft none trains the new task head alone, and this model gets none (a causal LM, or a "
                             f"checkpoint with its head): --method {self.method} would have no adapter part; use zo-full "
                             "or fo-full, another --peft, or --modules-to-save")
        targets: list[str] | str | None = self.target_modules
        if targets and targets != "all-linear":
            targets = [n.strip() for n in targets.split(",") if n.strip()]
        config = adapter_config(self.peft, head=head, head_modules=head_modules, r=self.lora_r, alpha=self.lora_alpha,
                                dropout=self.lora_dropout, target_modules=targets,
                                num_virtual_tokens=self.num_virtual_tokens)
        if self.save_merged and config.is_prompt_learning:
            raise ValueError(f"--save-merged cannot merge the prompt-learning adapter of {self.peft} into the weights")
        return config

    def validate(self) -> None:
        """Raise ValueError with a one-line message on a value no run can use."""
        check_types(self)
        for name in ("zo_lr", "fo_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("steps", "batch_size", "grad_accum", "lora_r", "num_virtual_tokens", "eval_batch_size",
                     "keep_checkpoints", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr not in (None, "auto") or (self.smoothness and self.lr != "auto"):
            raise ValueError(f"--lr takes only auto (with --smoothness FILE optional); got lr={self.lr!r}")
        if self.eval_every < 0:
            raise ValueError(f"--eval-every must be 0 or positive, got {self.eval_every}")
        if self.fused and self.method != "hybrid":
            raise ValueError(f"--fused needs a method with both a ZO and an FO part (hybrid), not {self.method}")
        if (self.z_cache or self.embedding_rows) and self.method in ("fo-lora", "fo-full", "lomo", "adalomo"):
            raise ValueError(f"--z-cache and --embedding-rows need a method with a ZO part, not {self.method}")
        check_fused(self)
        if self.embedding_rows and self.grad_accum > 1:
            raise ValueError("--embedding-rows needs --grad-accum 1: the micro-batches of a step read different embedding rows")
        if self.lr == "auto" and self.grad_accum > 1:
            raise ValueError("--lr auto measures and advises for steps of one --batch-size batch; with --grad-accum, "
                             "set --zo-lr, --fo-lr and --eps yourself")
        check_peft(self)
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"--epochs must be positive, got {self.epochs}")
        for name in ("train_size", "dev_size", "test_size", "max_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be 0 or more, got {self.checkpoint_every}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}; got {getattr(self, f.name)!r}")
        self.zo_step()


def check_fused(config: TrainConfig) -> None:
    """A method whose FO rule updates inside backward (lomo, adalomo) takes no accumulation and no momentum."""
    if config.method not in FUSED_FO:
        return
    if config.grad_accum > 1:
        raise ValueError(f"--grad-accum must be 1 for --method {config.method}: it updates each weight inside "
                         f"backward, before a second micro-batch's gradient could be added")
    if config.fo_momentum:
        raise ValueError(f"--fo-momentum must be 0 for --method {config.method}: its rule keeps no first moment")


def check_peft(config: TrainConfig) -> None:
    """--peft names a kind or a peft config file; --save-merged only with an adapter that merges."""
    path = Path(config.peft)
    if config.peft not in PEFT_KINDS and not (path.is_file() or (path / CONFIG_FILE).is_file()):
        raise ValueError(f"--peft must be one of {', '.join(PEFT_KINDS)} or a peft config file ({CONFIG_FILE}); "
                         f"got {config.peft!r}, which is no file")
    if config.save_merged and config.peft in ("prompt", "prefix") and USES_ADAPTER.get(config.method):
        raise ValueError(f"--save-merged cannot merge --peft {config.peft} into the weights (virtual tokens are no weight update)")


_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def check_types(config: TrainConfig) -> None:
    """Each field holds its annotated type (a YAML file can hold anything)."""
    for f in dataclasses.fields(config):
        value, annotation = getattr(config, f.name), str(f.type)
        if value is None and annotation.endswith("| None"):
            continue
        allowed = _TYPES.get(annotation.replace("| None", "").strip())
        if allowed is None:  # a type this check does not know: the field's own checks apply
            continue
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ValueError(f"{f.name} must be {annotation.replace('| None', 'or null').strip()}, got {value!r}")


def underscored(mapping: dict[Any, Any]) -> dict[str, Any]:
    """``mapping`` with its keys as field names: a YAML file may write ``zo-lr`` or ``zo_lr``."""
    return {str(k).replace("-", "_"): v for k, v in mapping.items()}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of config fields (dashes or underscores); unknown keys are an error."""
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml12.load(f) or {}  # YAML 1.2: `yes`/`on` stay strings, 1e-3 is a float
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            raise ValueError(f"{path} is not valid YAML ({where}{getattr(error, 'problem', None) or error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config fields")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = underscored(data)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown config field(s) {', '.join(unknown)}")
    floats = {f.name for f in dataclasses.fields(TrainConfig) if str(f.type).startswith("float")}
    for name in floats & set(values):
        if isinstance(values[name], str):  # PyYAML (YAML 1.1) reads 1e-3 as a string
            try:
                values[name] = float(values[name])
            except ValueError:
                pass  # reported with the field's type by TrainConfig.validate
    return values
