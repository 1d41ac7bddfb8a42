"""Run configuration: dataclasses <-> YAML <-> Megatron-style flags, and the DeepSpeed config.

The dataclasses are the single source of truth. A YAML file (`--config FILE`, sections `model:`,
`data:`, `training:`) fills them, and every field is also a flag named after it
(`num_layers` -> `--num-layers`, booleans as `--flag` / `--no-flag`). Precedence: dataclass
defaults < `defaults_yaml` < `--config` < flags. Unknown sections, keys and flags are errors that
name the nearest valid one.

The DeepSpeed JSON holds engine choices only (ZeRO stage, offload, precision, communication).
Batch sizes, optimizer, LR schedule and clipping belong to `TrainingConfig` and are injected by
`build_deepspeed_config`; a JSON that sets one of them is an error naming the flag that owns it.

Every error is a `ConfigError`; an entry point prints it to stderr and exits with status 2, as
argparse does for a bad command line:

    try:
        run = parse_config(argv, GPTConfig)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
"""
from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import difflib
import functools
import inspect
import json
import os
import sys
import textwrap
import types
import typing
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import yaml

from megatron_lite.data.config import DataConfig  # noqa: F401  (the data: section; re-exported)
from megatron_lite.errors import ConfigError  # noqa: F401  (re-exported)




# ---------------------------------------------------------------------------------------------
# The dataclasses
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainingConfig:
    micro_batch_size: int = 4
    """Samples per rank per forward/backward pass."""
    global_batch_size: int = 8
    """Samples per optimizer step across all data-parallel ranks; the rest is grad accumulation."""
    train_iters: int = 100
    """Optimizer steps to train for (counted from step 0, also across resumes)."""
    exit_interval: Optional[int] = None
    """Save and stop when the step count is a multiple of this (to split a run into jobs)."""
    lr: float = 1e-3
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 0.0
    """Learning rate the linear and cosine schedules decay to."""
    lr_warmup_iters: int = 0
    """Steps of linear warmup."""
    lr_decay_style: Literal["linear", "cosine", "constant"] = "linear"
    """Schedule after warmup: linear or cosine decay to min_lr, or constant at lr."""
    lr_decay_iters: Optional[int] = None
    """Step at which decay reaches min_lr (warmup included); None means train_iters."""
    weight_decay: float = 0.01
    """Decoupled (AdamW) weight decay."""
    adam_beta1: float = 0.9
    """Adam first-moment decay."""
    adam_beta2: float = 0.95
    """Adam second-moment decay."""
    adam_eps: float = 1e-8
    """Adam denominator epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    seed: int = 1234
    """Seed of initialisation, dropout and data order."""
    tensor_model_parallel_size: int = 1
    """Ranks each layer is sharded over; the remaining ranks are data parallel."""
    sequence_parallel_size: int = 1
    """Ranks each sequence is split over, for models that split sequences (LongNet); world size
    = tensor x sequence x data parallel sizes."""
    save: Optional[str] = None
    """Checkpoint directory; None saves nothing."""
    save_interval: Optional[int] = None
    """Save every this many steps (a final checkpoint is written at the end regardless)."""
    load: Optional[str] = None
    """Checkpoint directory to resume from (or to take weights from with finetune)."""
    finetune: bool = False
    """Load only the weights from `load`: optimizer, schedule and data position start fresh."""
    load_fallback: bool = True
    """When the checkpoint `latest` names fails verification (its manifest or the pickle scan),
    load the newest older one that verifies, saying which was skipped and why; off
    (--no-load-fallback): stop with the reason instead."""
    keep_last: Optional[int] = None
    """Keep only the newest K checkpoints, removing older ones after a newer one is complete."""
    eval_interval: Optional[int] = None
    """Evaluate on the validation split every this many steps; None evaluates only at the end."""
    eval_iters: int = 10
    """Validation batches per evaluation."""
    log_interval: int = 1
    """Log metrics every this many steps."""
    log_dir: Optional[str] = None
    """TensorBoard and metrics.jsonl directory; None means <save>/logs."""
    checkpoint_activations: bool = False
    """Recompute each layer's activations in backward (same dropout masks) to save memory."""
    max_skipped_steps: int = 10
    """Abort after this many consecutive steps with a NaN/inf loss."""
    peak_flops: Optional[float] = None
    """Peak FLOP/s per rank for MFU; None measures it (CPU) or looks it up (GPU)."""
    no_progress_bar: bool = False
    """Hide the tqdm progress bar."""
    cpu_optimizer: bool = False
    """Require DeepSpeed's CPU Adam; it needs ZeRO-Offload (zero_optimization.offload_optimizer)."""
    reset_stream_state: bool = False
    """On resume, start every stream's model state (Transformer-XL's memory) afresh instead of
    loading the checkpoint's (needed to resume at another parallel layout)."""
    fused_kernels: Literal["auto", "apex", "torch"] = "auto"
    """Layer norm and Adam kernels: apex's fused ones on CUDA when apex imports (auto), apex or
    an error (apex), or torch's (torch). See megatron_lite/parallel/kernels.py."""
    compile: bool = False
    """Run the model's loss through torch.compile (inductor). The first step compiles (tens of
    seconds on CPU); BENCHMARKS.md, "Training throughput (GPT, torch.compile)", has the
    measured gain (1.33x at the tiny GPT, none at 106M)."""

    def __post_init__(self):
        for name in ("micro_batch_size", "global_batch_size", "tensor_model_parallel_size",
                     "sequence_parallel_size", "log_interval", "max_skipped_steps"):
            value = getattr(self, name)
            _check(value >= 1, f"{name} must be at least 1, got {value}")
        for name in ("train_iters", "lr_warmup_iters", "eval_iters", "seed"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("exit_interval", "lr_decay_iters", "save_interval", "keep_last",
                     "eval_interval"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"{name} must be at least 1 or none, got {value}")
        _check(self.lr_decay_style in ("linear", "cosine", "constant"),
               f"lr_decay_style must be linear, cosine or constant, got {self.lr_decay_style!r}")
        _check(0.0 <= self.min_lr <= self.lr,
               f"need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        for name in ("adam_beta1", "adam_beta2"):
            _check(0.0 <= getattr(self, name) < 1.0,
                   f"{name} must be in [0, 1), got {getattr(self, name)}")
        _check(self.adam_eps > 0, f"adam_eps must be positive, got {self.adam_eps}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.clip_grad >= 0, f"clip_grad must be >= 0 (0 disables), got {self.clip_grad}")
        _check(self.peak_flops is None or self.peak_flops > 0,
               f"peak_flops must be positive or none, got {self.peak_flops}")
        _check(not self.finetune or self.load is not None,
               "finetune loads weights from `load`: set --load / training.load to a checkpoint")
        if self.log_dir is None and self.save is not None:
            self.log_dir = os.path.join(self.save, "logs")


@dataclass
class RunConfig:
    model: Any
    """The model's config dataclass (any dataclass: GPTConfig, T5Config, ...)."""
    data: DataConfig
    training: TrainingConfig
    deepspeed: bool = False
    """--deepspeed was given (the launcher's convention; the engine is DeepSpeed either way)."""
    deepspeed_config: Optional[str] = None
    """--deepspeed_config JSON path; None uses the default engine config (fp32, ZeRO 0)."""
    local_rank: Optional[int] = None
    """--local_rank passed by the deepspeed launcher."""
    config_path: Optional[str] = None
    """The YAML the run was configured from (--config, else defaults_yaml)."""
    model_name: Optional[str] = None
    """--model: the registered architecture (an entry point may give a default)."""
    model_modules: list = dataclasses.field(default_factory=list)
    """--model-module: modules imported before the registry lookup (models of your own)."""

    def to_dict(self) -> dict:
        """The three sections as plain types: dumped to YAML, it configures the same run again."""
        return {"model": dataclasses.asdict(self.model), "data": dataclasses.asdict(self.data),
                "training": dataclasses.asdict(self.training)}


def _check(condition: bool, message: str):
    # Plain ValueError: parse_config wraps it with the config file the values came from.
    if not condition:
        raise ValueError(message)


# ---------------------------------------------------------------------------------------------
# Field types: what a YAML value or a flag string may be for each annotation
# ---------------------------------------------------------------------------------------------

_NONE_STRINGS = ("none", "null")


def _unwrap_optional(tp):
    """(inner type, allows None) for Optional[X] / X | None; (tp, False) otherwise."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return tp, False
    args = typing.get_args(tp)
    if len(args) != 2 or type(None) not in args:
        raise TypeError(f"unions other than Optional[X] are not supported: {tp}")
    return next(a for a in args if a is not type(None)), True


def _type_name(tp) -> str:
    inner, optional = _unwrap_optional(tp)
    origin = typing.get_origin(inner)
    if origin is Literal:
        name = "one of " + ", ".join(repr(c) for c in typing.get_args(inner))
    elif origin in (list, tuple):
        item = _type_name(typing.get_args(inner)[0])
        name = f"a list (comma-separated on the command line), each item {item}"
    else:
        name = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}[inner]
    return name + (" or none" if optional else "")


def _check_supported(tp, where: str):
    """Fail at parser build time, naming the field, on a type YAML and flags cannot express."""
    try:
        inner, _ = _unwrap_optional(tp)
    except TypeError as e:
        raise TypeError(f"{where}: {e}") from None
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if origin in (list, tuple):
        homogeneous = len(args) == 1 if origin is list else (len(args) == 2 and args[1] is ...)
        if not homogeneous or args[0] not in (bool, int, float, str):
            raise TypeError(f"{where}: only list[X] / tuple[X, ...] of bool, int, float or str "
                            f"are supported, got {tp}")
    elif origin is not Literal and inner not in (bool, int, float, str):
        raise TypeError(f"{where}: unsupported field type {tp}; use bool, int, float, str, "
                        f"Literal, Optional or a list of those")


def _convert(value, tp, from_cli: bool):
    """Coerce a YAML value (or, with from_cli, a flag string) to `tp`; ValueError if it cannot."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (from_cli and optional and str(value).lower() in _NONE_STRINGS):
        if optional:
            return None
        raise ValueError
    origin = typing.get_origin(inner)
    if origin is Literal:
        choices = typing.get_args(inner)
        for choice in choices:
            if value == choice or (from_cli and str(choice) == value):
                return choice
        raise ValueError
    if origin in (list, tuple):
        item_tp = typing.get_args(inner)[0]
        items = value.split(",") if from_cli else value
        if not isinstance(items, (list, tuple)):
            raise ValueError
        converted = [_convert(item.strip() if from_cli else item, item_tp, from_cli)
                     for item in items]
        return origin(converted)
    if inner is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if inner is int:
        if from_cli:
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError
    if inner is float:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, (int, float)):
            return float(value)
        # PyYAML reads `1e-3` (no dot in the mantissa) as a string; accept what float() accepts.
        if isinstance(value, str):
            return float(value)
        raise ValueError
    if inner is str:
        if isinstance(value, str):
            return value
        raise ValueError
    raise AssertionError(f"unchecked type {tp}")


@functools.lru_cache(maxsize=None)
def _field_docs(cls) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field), used as flag help."""
    # Cached: inspect.getsource re-parses the whole module (~30 ms) on every call.
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


# ---------------------------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------------------------

class _LinedDict(dict):
    """A YAML mapping that remembers the line of each key, for error messages."""
    lines: dict


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _LinedDict:
    loader.flatten_mapping(node)
    lines = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in lines:
            # PyYAML would silently keep the last value; a config edited twice is a likely typo.
            raise ConfigError(f"{loader.name}:{line}: duplicate key {key!r} "
                              f"(first set on line {lines[key]})")
        lines[key] = line
    mapping = _LinedDict(loader.construct_mapping(node, deep=True))
    mapping.lines = lines
    return mapping


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

_SECTIONS = ("model", "data", "training")


def _suggest(word: str, candidates, fallback: str | None = None) -> str:
    """'; did you mean X?' for the nearest candidate, else the fallback or the full list."""
    close = difflib.get_close_matches(word, [str(c) for c in candidates], n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    return fallback if fallback is not None else "; valid: " + ", ".join(map(str, candidates))


def _load_yaml(path: str, fields: dict[str, dict[str, dataclasses.Field]],
               hints: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Read a config YAML into {section: {field: typed value}}, checking every key and type."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_Loader)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with sections {', '.join(_SECTIONS)}, "
                          f"got {type(raw).__name__}")
    values = {}
    for section, body in raw.items():
        line = raw.lines[section]
        if section not in _SECTIONS:
            raise ConfigError(f"{path}: unknown section {section!r}"
                              f"{_suggest(str(section), _SECTIONS)} (line {line})")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: section '{section}' must be a mapping of keys to values, "
                              f"got {type(body).__name__} (line {line})")
        values[section] = {}
        for key, value in body.items():
            line = body.lines[key]
            if key not in fields[section]:
                raise ConfigError(f"{path}: unknown key {key!r} in section '{section}'"
                                  f"{_suggest(str(key), fields[section])} (line {line})")
            tp = hints[section][key]
            if fields[section][key].metadata.get("words") and isinstance(value, list):
                value = " ".join(map(str, value))
            try:
                values[section][key] = _convert(value, tp, from_cli=False)
            except ValueError:
                raise ConfigError(f"{path}: key '{key}' in section '{section}' (line {line}): "
                                  f"expected {_type_name(tp)}, got {value!r}") from None
    return values


# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------

def flag_name(field_name: str) -> str:
    """Megatron's spelling of a field as a flag: num_layers -> --num-layers."""
    return "--" + field_name.replace("_", "-")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(f"command line: {message}")


# Flags of the launcher and of this module; no dataclass field may take their names.
_RESERVED = {"--config", "--deepspeed", "--deepspeed-config", "--deepspeed_config",
             "--local-rank", "--local_rank", "--help", "-h", "--model", "--model-module"}


def _build_parser(classes: dict[str, type], fields, hints
                  ) -> tuple[_Parser, dict[str, tuple[str, str]]]:
    """The argparse parser and {dest: (section, field)} for every dataclass field."""
    parser = _Parser(description="Values come from the dataclass defaults, then the --config "
                     "YAML, then these flags.", allow_abbrev=False)
    parser.add_argument("--config", help="YAML file with sections model:, data:, training:")
    parser.add_argument("--deepspeed", action="store_true", help="set by DeepSpeed recipes")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                        help="DeepSpeed JSON with engine choices only (ZeRO, offload, precision)")
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int,
                        help="passed by the deepspeed launcher")
    add_model_flags(parser)
    owners: dict[str, str] = {flag: "launcher" for flag in _RESERVED}
    dests = {}
    for section, cls in classes.items():
        group = parser.add_argument_group(section)
        docs = {}
        for base in reversed(cls.__mro__):  # a subclass's own docstrings cover only its fields
            if dataclasses.is_dataclass(base):
                docs.update(_field_docs(base))
        for field in fields[section].values():
            tp = hints[section][field.name]
            _check_supported(tp, f"{cls.__name__}.{field.name}")
            flag = flag_name(field.name)
            is_bool = _unwrap_optional(tp)[0] is bool
            names = [flag, "--no-" + flag[2:]] if is_bool else [flag]
            for name in names:
                if name in owners:
                    raise AssertionError(f"flag {name} of {section}.{field.name} is already taken "
                                         f"by {owners[name]}; rename one of the fields")
                owners[name] = f"{section}.{field.name}"
            dest = f"{section}.{field.name}"
            dests[dest] = (section, field.name)
            help_text = docs.get(field.name, "")
            if is_bool:
                # Two store_const flags, not BooleanOptionalAction: that one reads any flag
                # starting with --no- as False, which breaks fields like no_progress_bar.
                group.add_argument(flag, dest=dest, action="store_const", const=True,
                                   default=argparse.SUPPRESS, help=help_text)
                group.add_argument(names[1], dest=dest, action="store_const", const=False,
                                   default=argparse.SUPPRESS, help=f"set {field.name} false")
            else:
                words = {"nargs": "+"} if field.metadata.get("words") else {}
                group.add_argument(flag, dest=dest, default=argparse.SUPPRESS,
                                   metavar=field.name.upper(), **words,
                                   help=f"{help_text} ({_type_name(tp)})".strip())
    return parser, dests


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--model and --model-module: which registered architecture, and the modules (of your own)
    to import before looking it up."""
    parser.add_argument("--model", dest="model_name", default=None, metavar="NAME",
                        help="registered model to train (gpt, t5, ...; see README)")
    parser.add_argument("--model-module", dest="model_modules", action="append", default=[],
                        metavar="MODULE",
                        help="import MODULE (a dotted name, or a path to a .py file) before "
                             "looking the model up: a model defined outside megatron_lite "
                             "registers itself there (repeatable)")


def parse_model_choice(argv: list[str], default_model: str | None = None) -> tuple[str, list]:
    """(--model NAME, [--model-module ...]) of a command line, before the model's config classes
    are known (they decide the rest of the flags)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_model_flags(parser)
    args, _ = parser.parse_known_args(argv)
    name = args.model_name or default_model
    if name is None:
        raise ConfigError("command line: --model NAME is required (a registered model such as "
                          "gpt or t5; --model-module MODULE for one of your own)")
    return name, list(args.model_modules)


def _class_fields(classes):
    fields, hints = {}, {}
    for section, cls in classes.items():
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"the {section} config must be a dataclass, got {cls!r}")
        # init=False fields are derived by the class itself; they are neither keys nor flags.
        fields[section] = {f.name: f for f in dataclasses.fields(cls) if f.init}
        all_hints = typing.get_type_hints(cls)
        hints[section] = {name: all_hints[name] for name in fields[section]}
    return fields, hints


def parse_config(argv: list[str] | None, model_config_cls, *,
                 defaults_yaml: str | None = None, data_config_cls: type = DataConfig) -> RunConfig:
    """Build the run's configuration from defaults, YAML and flags (flags win over YAML).

    `defaults_yaml` is a YAML read beneath `--config` (an entry script's default preset); with no
    `--config` it alone configures the run. `data_config_cls` is DataConfig or a subclass adding
    a model family's data fields (e.g. T5's decoder length). Raises ConfigError for anything
    unknown or ill-typed.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not (isinstance(data_config_cls, type) and issubclass(data_config_cls, DataConfig)):
        raise TypeError(f"data_config_cls must be DataConfig or a subclass, got {data_config_cls!r}")
    classes = {"model": model_config_cls, "data": data_config_cls, "training": TrainingConfig}
    fields, hints = _class_fields(classes)
    parser, dests = _build_parser(classes, fields, hints)

    args, rest = parser.parse_known_args(argv)
    if rest:
        bad = rest[0]
        if bad.startswith("-"):
            known = [s for a in parser._actions for s in a.option_strings]
            name = bad.split("=", 1)[0]
            raise ConfigError(f"command line: unknown flag {name}"
                              f"{_suggest(name, known, fallback=' (see --help)')}")
        raise ConfigError(f"command line: unexpected argument {bad!r} (flags are --name VALUE)")

    values: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    sources = []
    for path in (defaults_yaml, args.config):
        if path is not None:
            for section, section_values in _load_yaml(path, fields, hints).items():
                values[section].update(section_values)
            sources.append(path)
    from_cli = False
    for dest, (section, name) in dests.items():
        if hasattr(args, dest):
            raw = getattr(args, dest)
            if isinstance(raw, list):  # a field of several words (nargs="+")
                raw = " ".join(raw)
            tp = hints[section][name]
            try:
                values[section][name] = raw if isinstance(raw, bool) else _convert(raw, tp, True)
            except ValueError:
                raise ConfigError(f"command line: {flag_name(name)} expects {_type_name(tp)}, "
                                  f"got {raw!r}") from None
            from_cli = True
    where = " + ".join(sources + (["command line"] if from_cli else [])) or "defaults"

    built = {}
    for section, cls in classes.items():
        missing = [f.name for f in fields[section].values() if f.name not in values[section]
                   and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{where}: section '{section}' needs {', '.join(missing)}: set "
                              f"them in the YAML or pass "
                              f"{', '.join(flag_name(m) for m in missing)}")
        try:
            built[section] = cls(**values[section])
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}: invalid {section} config: {e}") from None

    return RunConfig(model=built["model"], data=built["data"], training=built["training"],
                     deepspeed=args.deepspeed, deepspeed_config=args.deepspeed_config,
                     local_rank=args.local_rank, config_path=args.config or defaults_yaml,
                     model_name=args.model_name, model_modules=list(args.model_modules))


def check_batch_sizes(training: TrainingConfig, dp_size: int) -> int:
    """Gradient accumulation steps: global / (micro x dp); a clear error if that is not whole."""
    if dp_size < 1:
        raise ConfigError(f"data-parallel size must be at least 1, got {dp_size}")
    per_step = training.micro_batch_size * dp_size
    if training.global_batch_size % per_step:
        raise ConfigError(
            f"global batch size {training.global_batch_size} is not divisible by micro batch size "
            f"{training.micro_batch_size} x data-parallel size {dp_size} = {per_step}: change "
            f"--global-batch-size or --micro-batch-size (data-parallel size is world size / "
            f"(--tensor-model-parallel-size x --sequence-parallel-size))")
    return training.global_batch_size // per_step


# ---------------------------------------------------------------------------------------------
# The DeepSpeed engine config
# ---------------------------------------------------------------------------------------------

# Plain data parallelism in fp32: what a run gets without --deepspeed_config (= zero0.json).
DEFAULT_DEEPSPEED_CONFIG = {"zero_optimization": {"stage": 0}, "wall_clock_breakdown": False}

# Keys this module injects, and the flags that own them.
_OWNED_KEYS = {
    "train_batch_size": "--global-batch-size / training.global_batch_size",
    "train_micro_batch_size_per_gpu": "--micro-batch-size / training.micro_batch_size",
    "gradient_accumulation_steps":
        "--global-batch-size and --micro-batch-size (accumulation = global / (micro x dp)) / "
        "training.global_batch_size and training.micro_batch_size",
    "gradient_clipping": "--clip-grad / training.clip_grad",
    "optimizer": "--lr, --weight-decay, --adam-beta1, --adam-beta2, --adam-eps / training.lr, "
                 "training.weight_decay, training.adam_beta1, training.adam_beta2, "
                 "training.adam_eps",
    "scheduler": "--lr-decay-style, --lr-warmup-iters, --lr-decay-iters, --min-lr / "
                 "training.lr_decay_style, training.lr_warmup_iters, training.lr_decay_iters, "
                 "training.min_lr",
}

_OFFLOAD_FORM = ('"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", '
                 '"pin_memory": true}} (and, at stage 3, "offload_param": {"device": "cpu", '
                 '"pin_memory": true})')

# DeepSpeed's pre-0.6 spellings of offload; it still maps them with a deprecation warning, but
# configs should say what they mean in the current form.
_LEGACY_OFFLOAD_KEYS = ("cpu_offload", "cpu_offload_param", "cpu_offload_params",
                        "cpu_offload_use_pin_memory")


def _reject_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    dups = sorted({k for k in keys if keys.count(k) > 1})
    if dups:
        raise ValueError(f"duplicate key(s) {', '.join(map(repr, dups))}")
    return dict(pairs)


def _load_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f, object_pairs_hook=_reject_duplicate_keys)
    except OSError as e:
        raise ConfigError(f"cannot read DeepSpeed config {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _offload_device(block) -> str:
    if not isinstance(block, dict):
        return "none"
    return str(block.get("device", "none"))


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split()
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    return False


def _enabled(block) -> bool:
    return isinstance(block, dict) and bool(block.get("enabled", False))


def _validate_engine_config(cfg: dict, name: str):
    for key, owner in _OWNED_KEYS.items():
        if key in cfg:
            raise ConfigError(f"{name}: '{key}' is set by our training config, not the DeepSpeed "
                              f"JSON (which holds engine choices only): remove it and set "
                              f"{owner} instead")
    for key in ("offload_optimizer", "offload_param"):
        if key in cfg:
            raise ConfigError(f"{name}: a top-level '{key}' block is ignored by DeepSpeed; move "
                              f"it inside zero_optimization: {_OFFLOAD_FORM}")
    zero = cfg.get("zero_optimization", {})
    if isinstance(zero, bool):
        raise ConfigError(f"{name}: \"zero_optimization\": {str(zero).lower()} is DeepSpeed's "
                          f"legacy form; write \"zero_optimization\": {{\"stage\": N}}")
    if not isinstance(zero, dict):
        raise ConfigError(f"{name}: zero_optimization must be an object like {{\"stage\": 2}}")
    for key in _LEGACY_OFFLOAD_KEYS:
        if key in zero:
            raise ConfigError(f"{name}: zero_optimization.{key} is DeepSpeed's deprecated offload "
                              f"switch; use the current form: {_OFFLOAD_FORM}")
    stage = zero.get("stage", 0)
    if _offload_device(zero.get("offload_optimizer")) != "none" and stage < 1:
        raise ConfigError(f"{name}: zero_optimization.offload_optimizer needs ZeRO stage 1, 2 or "
                          f"3 (stage is {stage}); DeepSpeed would ignore it")
    if _offload_device(zero.get("offload_param")) != "none" and stage != 3:
        raise ConfigError(f"{name}: zero_optimization.offload_param needs ZeRO stage 3 (stage is "
                          f"{stage}); DeepSpeed would ignore it. Use offload_optimizer at stages "
                          f"1-2")

    cuda = _has_cuda()
    if _enabled(cfg.get("fp16")) and not cuda:
        raise ConfigError(f"{name}: fp16 needs a GPU (DeepSpeed refuses fp16 on CPU); use an fp32 "
                          f"config such as configs/deepspeed/zero0.json on this machine")
    if (_enabled(cfg.get("bf16")) or _enabled(cfg.get("bfloat16"))) and not cuda:
        if not _cpu_has_native_bf16():
            warnings.warn(f"{name}: bf16 on a CPU without native bf16 matmul (avx512_bf16 / "
                          f"amx_bf16) is emulated and much slower than fp32; prefer an fp32 "
                          f"config here", stacklevel=3)


def _scheduler(training: TrainingConfig) -> dict:
    """The LR schedule as one of DeepSpeed's schedulers (deepspeed/runtime/lr_schedules.py).

    DeepSpeed sets the rate of iteration -1 when the engine is built and steps the scheduler after
    every applied optimizer step, so optimizer step k (0-based) runs at lr(k - 1), with lr(-1) the
    warmup start. W = lr_warmup_iters, D = lr_decay_iters (default train_iters), i the iteration:
    - DeepSpeed rejects a 0-step warmup and floors it at 2, so W = 0 behaves as W = 2 for linear
      and cosine. For constant with W = 0 the warmup start is lr itself: exactly lr throughout.
    - constant -> WarmupLR: lr * i / W while i < W (from 0), then lr.
    - linear -> WarmupDecayLR: min_lr + (lr - min_lr) * i / W while i < W, then
      min_lr + (lr - min_lr) * max(0, (D - i) / (D - W)): min_lr from i = D on. DeepSpeed's linear
      schedule decays to its warmup start, so the start is min_lr: the decay ends at min_lr like
      Megatron's, but the warmup starts at min_lr rather than 0 (the same for min_lr = 0). There is
      no way to have both with WarmupDecayLR.
    - cosine -> WarmupCosineLR: lr * i / W while i < W, then
      lr * (r + (1 - r) * (1 + cos(pi * p)) / 2) with r = min_lr / lr and
      p = min(1, (i - W + 1) / (D - W)):
      min_lr from i = D - 1 on. Its lr(-1) is 0, and because of the + 1 it never reaches lr
      itself: the last warmup rate is lr * (W - 1) / W, the next already decayed.
    """
    warmup = max(1, training.lr_warmup_iters)
    decay_iters = training.lr_decay_iters if training.lr_decay_iters is not None \
        else training.train_iters
    style = training.lr_decay_style
    if style != "constant" and decay_iters < training.lr_warmup_iters:
        raise ConfigError(f"lr_decay_iters ({decay_iters}) must be at least lr_warmup_iters "
                          f"({training.lr_warmup_iters}) for {style} decay: raise "
                          f"--lr-decay-iters / --train-iters or lower --lr-warmup-iters")
    if style == "constant":
        start = 0.0 if training.lr_warmup_iters > 0 else training.lr
        return {"type": "WarmupLR",
                "params": {"warmup_min_lr": start, "warmup_max_lr": training.lr,
                           "warmup_num_steps": warmup, "warmup_type": "linear"}}
    if style == "linear":
        return {"type": "WarmupDecayLR",
                "params": {"total_num_steps": decay_iters, "warmup_min_lr": training.min_lr,
                           "warmup_max_lr": training.lr, "warmup_num_steps": warmup,
                           "warmup_type": "linear"}}
    ratio = training.min_lr / training.lr if training.lr > 0 else 0.0
    return {"type": "WarmupCosineLR",
            "params": {"total_num_steps": decay_iters, "warmup_min_ratio": 0.0,
                       "cos_min_ratio": ratio, "warmup_num_steps": warmup,
                       "warmup_type": "linear"}}


def zero_on_one_rank_note(cfg: dict, dp_size: int) -> str | None:
    """What the log says when ZeRO has nothing to partition (one data-parallel rank, nothing
    offloaded), or None. DeepSpeed still flattens every gradient into its partition buffers and
    copies the updated partition back into the weights each step."""
    zero = cfg.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    offloaded = any(_offload_device(zero.get(k)) != "none"
                    for k in ("offload_optimizer", "offload_param"))
    if dp_size > 1 or stage == 0 or offloaded:
        return None
    return (f"ZeRO stage {stage} at data-parallel size 1 has nothing to partition but still "
            "copies the gradients into its buffers and the weights back every step; "
            "configs/deepspeed/zero0.json trains the same model without those copies")


def build_deepspeed_config(training: TrainingConfig, dp_size: int, path: str | None) -> dict:
    """The engine config for deepspeed.initialize: the JSON's engine choices plus our training.

    Injects batch sizes, gradient clipping, AdamW and the LR schedule (see `_scheduler` for the
    exact curves). With ZeRO-Offload of the optimizer DeepSpeed itself picks its CPU Adam for
    "AdamW"; otherwise `torch_adam` selects torch.optim.AdamW, which needs no compiled op (
    DeepSpeed's FusedAdam would JIT-build one, about a minute on a CPU machine), with its fused
    kernel: one pass over the parameters and states instead of one per operation (on CPU, a step
    of 106M parameters took 0.063 s instead of 0.57 s).
    """
    name = path if path is not None else "default DeepSpeed config"
    cfg = _load_json(path) if path is not None else copy.deepcopy(DEFAULT_DEEPSPEED_CONFIG)
    _validate_engine_config(cfg, name)

    zero = cfg.get("zero_optimization", {})
    offloaded = _offload_device(zero.get("offload_optimizer")) in ("cpu", "nvme")
    if training.cpu_optimizer and not offloaded:
        raise ConfigError(f"{name}: --cpu-optimizer / training.cpu_optimizer needs ZeRO-Offload: "
                          f"DeepSpeed runs its CPU Adam only when the optimizer is offloaded "
                          f"({_OFFLOAD_FORM}); use configs/deepspeed/zero2_offload.json or drop "
                          f"--cpu-optimizer")

    grad_acc = check_batch_sizes(training, dp_size)
    params = {"lr": training.lr, "betas": [training.adam_beta1, training.adam_beta2],
              "eps": training.adam_eps, "weight_decay": training.weight_decay}
    if not offloaded:
        params.update(torch_adam=True, fused=True)
    cfg.update({
        "train_batch_size": training.global_batch_size,
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": grad_acc,
        "gradient_clipping": training.clip_grad,
        "optimizer": {"type": "AdamW", "params": params},
        "scheduler": _scheduler(training),
    })
    return cfg
