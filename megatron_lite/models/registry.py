"""The model contract: one `ModelSpec` record per architecture, looked up by name.

Everything outside a model's own file learns what the model is from its record and never
compares a model's name: the pretraining driver (`pretrain.py --model NAME`), generation,
resharding, Hugging Face conversion, checkpoint metadata and the benchmarks. Adding an
architecture means writing its file under `models/` (ending in one `register(ModelSpec(...))`),
its configs and its tests; see README, "Adding an architecture".

A model defined outside the package registers itself the same way from its own module, which
every tool imports when given `--model-module MODULE` (`import_model_modules`).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from megatron_lite.data.config import DataConfig
from megatron_lite.parallel import ParallelState, RNGContext, is_sharded

_REGISTRY: dict[str, "ModelSpec"] = {}

GENERATION_STRATEGIES = ("causal", "seq2seq", "recurrent", "none")
"""How `generate.py` drives a model: a decoder continuing a prompt (`causal`), an encoder-decoder
writing a target for a source (`seq2seq`), a decoder carrying segment memory (`recurrent`, for
Transformer-XL: its module has `forward(ids, memory=...) -> (logits, memory)`, and
`generation_cache()` / `forward_cached(ids, cache) -> logits` to roll the memory as cached keys and
values), or not at all (`none`: an encoder, for which generate.py says so and exits 1)."""


class ConversionError(ValueError):
    """A Hugging Face directory or checkpoint that cannot be converted; says why and what to do."""


@dataclass(frozen=True)
class HFConverter:
    """How a model maps onto a Hugging Face transformers architecture (`tools/convert_hf.py`).

    State dicts here are full (TP=1) ones; the tool shards and merges them by the model's
    partition tags."""
    model_types: tuple[str, ...]
    """config.json `model_type` values this converter imports (e.g. ("t5",))."""
    config_from_hf: Callable[[dict, dict, Any], Any]
    """`(hf config dict, hf state dict, tokenizer) -> our config`; ConversionError if unsupported."""
    state_from_hf: Callable[[dict, Any], dict]
    """`(hf state dict, our config) -> our full state dict`."""
    config_to_hf: Callable[[Any, Any], dict]
    """`(our config, tokenizer) -> config.json dict`."""
    state_to_hf: Callable[[dict, Any, Any], dict]
    """`(our full state dict, our config, tokenizer) -> hf state dict`."""
    save_tokenizer: Callable[[Any, str], None]
    """`(tokenizer, hf dir)`: write the tokenizer in the form transformers loads."""
    tokenizer_convention: str = ""
    """How the HF tokenizer's conventions map onto ours (special ids, appended tokens), for docs
    and error messages."""


@dataclass(frozen=True)
class Layout:
    """A model's parameters at one TP size, built on the meta device (no memory)."""
    shapes: dict
    """state-dict key -> shape on one rank."""
    tags: dict
    """state-dict key -> (partition_dim, partition_stride), or None when replicated / a buffer."""
    alias: dict
    """state-dict key -> the first key holding the same tensor (tied weights)."""
    param_order: list
    """parameter names in `named_parameters()` order (the optimizer's order; tied weights once)."""

    @property
    def partition_spec(self) -> dict:
        """name -> [partition_dim, partition_stride] of every sharded parameter (the checkpoint's
        record, which resharding follows)."""
        return {n: list(self.tags[n]) for n in self.param_order if self.tags[n] is not None}


@dataclass(frozen=True)
class ModelSpec:
    """What a model is, in one place. Fields with defaults are optional capabilities."""
    name: str
    """Registry key: the `--model` flag and the checkpoint's `model`."""
    config_cls: type
    """Config dataclass; the YAML `model:` section and the CLI flags fill it. It must have
    `vocab_size` (None until the trainer fills it from the tokenizer) and `padded_vocab_size`."""
    build: Callable[[Any, ParallelState, RNGContext], torch.nn.Module]
    """`build(config, ps, rng) -> nn.Module` with TP-sharded layers on `ps`. The module's
    `loss(batch)` returns (mean loss, number of predicted tokens); with `stream_state`,
    `loss(batch, state)` returns (mean loss, number of predicted tokens, next state)."""
    build_data: Callable[[Any, Any, Any, ParallelState], Any]
    """`build_data(run, tokenizer, config, ps) -> data.contract.Datasets`: training and validation
    data, map-style datasets or `BatchStream`s (run: the parsed run config, with `.data` and
    `.training`)."""
    objective: str
    """Name of the data objective `build_data` uses (`data.objectives.OBJECTIVES`)."""
    batch_keys: tuple[str, ...]
    """The batch keys the loss reads; a batch without one is an error naming it."""
    flops_per_sample: Callable[[Any, Any], float]
    """`flops_per_sample(config, data_config)`: model FLOPs (forward + backward) of one training
    sample, for MFU (PaLM's 6N + attention; each model documents its count)."""
    data_config_cls: type = DataConfig
    """The `data:` section's dataclass: DataConfig or a subclass adding the objective's fields."""
    tokens_per_sample: Callable[[Any, Any], int] | None = None
    """`tokens_per_sample(config, data_config)`: tokens one sample feeds the model, for tokens/s.
    None: data_config.seq_length. (An encoder-decoder counts both stacks' tokens.)"""
    generation: str = "none"
    """One of GENERATION_STRATEGIES."""
    predicts_text: bool = True
    """Its targets are text tokens, so validation reports bits per character beside the loss."""
    stream_state: bool = False
    """The model carries per-stream state from one step to the next (Transformer-XL's memory):
    the trainer keeps one state per micro-batch slot, passes it to `loss(batch, state)` (None at
    the start) and keeps the (detached) state it returns. Every tensor of a state has the batch
    row first: `build_data` gives a training `BatchStream` that says which global stream rows each
    slot holds (`global_rows`, `slots`, `rows(slot)`), so checkpoints save the state by global
    row and a resume at another DP or micro-batch size of the same global batch re-splits it. A
    resume with another number of streams is refused unless --reset-stream-state."""
    splits_sequence: bool = False
    """It splits each sequence across sequence-parallel ranks (LongNet); others refuse
    --sequence-parallel-size > 1. Each SP rank of a replica gets the same batch (data is handed
    out by DP rank) and takes its part of the sequence; its `loss(batch)` returns (its part of the
    loss, so that the SP ranks' losses sum to the replica's mean loss, the replica's number of
    predicted tokens). DeepSpeed then sums gradients over SP and averages them over DP, and the
    trainer's reported losses are the whole sequence's."""
    hf: HFConverter | None = None
    """Hugging Face import/export, when the architecture has a transformers twin."""
    benchmark_peer: Callable[[Any], torch.nn.Module] | None = None
    """`benchmark_peer(config)`: a reference implementation of the same shape (transformers'),
    as a module whose `loss(batch)` takes our batches, for the throughput benchmarks."""
    complete_config: Callable[[Any, Any, Any], Any] | None = None
    """`complete_config(config, run, tokenizer) -> config`: fills in what only the data can tell
    (a classifier's label set), after the trainer has filled vocab_size. Its ValueErrors are
    reported as data errors."""
    finetunes_from: tuple[str, ...] = ()
    """Models whose checkpoints `--load CKPT --finetune` may start this one from (a classifier
    from the masked LM it was pretrained as): the parameters both have are loaded, the source's
    others (its head) are dropped, this model's others (its new head) start from their init, and
    the log names both. Only the config fields both have must agree."""
    eval_metrics: Callable[[torch.nn.Module, dict], dict] | None = None
    """`eval_metrics(module, batch) -> {name: (numerator, denominator)}`: summed over the
    validation batches and ranks, reported as numerator / denominator (`valid_<name>`) at each
    evaluation beside the loss (a classifier's accuracy)."""
    objectives: dict = field(default_factory=dict, compare=False)
    """Objectives `build_data` can make besides `objective`, which `tools/evaluate.py
    --objective NAME` selects: name -> `(data config, input jsonl path) -> data config` (T5's
    span corruption alone: the continuation weight set to 0)."""
    module: str | None = field(default=None, compare=False)
    """The `--model-module` that registered it (None for the package's own models)."""

    def __post_init__(self):
        if self.generation not in GENERATION_STRATEGIES:
            raise ValueError(f"ModelSpec {self.name!r}: generation must be one of "
                             f"{GENERATION_STRATEGIES}, got {self.generation!r}")
        if not (isinstance(self.data_config_cls, type) and issubclass(self.data_config_cls,
                                                                      DataConfig)):
            raise TypeError(f"ModelSpec {self.name!r}: data_config_cls must be DataConfig or a "
                            f"subclass, got {self.data_config_cls!r}")

    def sample_cost(self, config, data_config) -> tuple[int, float]:
        """(tokens, model FLOPs) of one training sample under `data_config`."""
        tokens = (self.tokens_per_sample(config, data_config) if self.tokens_per_sample
                  else data_config.seq_length)
        return tokens, self.flops_per_sample(config, data_config)

    def make_config(self, values: dict):
        """The config dataclass from a checkpoint's recorded `model_config` dict."""
        return self.config_cls(**values)

    def layout(self, config, tp_size: int) -> Layout:
        """Names, shapes and partition tags of the model at `tp_size` (cached; the model's own
        checks reject a TP size that does not divide what it must)."""
        key = (self.name, _config_key(config), tp_size)
        if key not in _LAYOUTS:
            with torch.device("meta"):
                model = self.build(config, ParallelState.virtual(tp_size, 0), RNGContext(0))
            shapes, tags, alias, first_key = {}, {}, {}, {}
            for k, t in model.state_dict(keep_vars=True).items():
                shapes[k] = tuple(t.shape)
                tags[k] = (t.partition_dim, t.partition_stride) if is_sharded(t) else None
                alias[k] = first_key.setdefault(id(t), k)
            _LAYOUTS[key] = Layout(shapes, tags, alias, [n for n, _ in model.named_parameters()])
        return _LAYOUTS[key]

    def check_batch(self, batch: dict) -> None:
        missing = [k for k in self.batch_keys if k not in batch]
        if missing:
            raise KeyError(f"a '{self.name}' batch needs {list(self.batch_keys)}; this one lacks "
                           f"{missing} (is the data built for another objective than "
                           f"'{self.objective}'?)")


_LAYOUTS: dict[tuple, Layout] = {}


def _config_key(config) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)


# ---------------------------------------------------------------------------------------------
# The registry

_IMPORTING: list[str] = []  # the --model-module being imported, to record it on its specs


def register(spec: ModelSpec) -> ModelSpec:
    """Add `spec` under `spec.name`. Registering a different spec under a taken name is an error."""
    if _IMPORTING and spec.module is None:
        spec = dataclasses.replace(spec, module=_IMPORTING[-1])
    existing = _REGISTRY.get(spec.name)
    if existing is not None and existing != spec and _defined_in(existing) != _defined_in(spec):
        raise ValueError(f"model '{spec.name}' is already registered (by "
                         f"{_defined_in(existing)[0]}); pick another name")
    _REGISTRY[spec.name] = spec
    return spec


def _defined_in(spec: ModelSpec) -> tuple:
    """(source file, builder) of a spec: the same definition imported twice (a file given by
    path and by module name) registers once, a different one under a taken name is an error."""
    return inspect.getsourcefile(spec.build), spec.build.__qualname__


def get_model_spec(name: str, *, where: str = "", module: str | None = None) -> ModelSpec:
    """The spec registered as `name`. An unknown name is an error listing the known ones; with
    `module` (what a checkpoint recorded as its --model-module), the error says to pass it."""
    try:
        return _REGISTRY[name]
    except KeyError:
        prefix = f"{where}: " if where else ""
        if module:
            raise KeyError(f"{prefix}model '{name}' was defined outside megatron_lite, in "
                           f"--model-module {module}; pass --model-module {module} (it is never "
                           f"imported just because a checkpoint names it)") from None
        known = ", ".join(sorted(_REGISTRY)) or "(none registered)"
        raise KeyError(f"{prefix}unknown model '{name}'; known models: {known} (a model defined "
                       f"in your own module needs --model-module MODULE)") from None


def model_names() -> list[str]:
    """Sorted names of the registered models."""
    return sorted(_REGISTRY)


def import_model_modules(modules) -> None:
    """Import each `--model-module`: a dotted module name on sys.path, or a path to a .py file.
    Importing it runs its `register(...)` calls. A module that cannot be found is an error naming
    it."""
    for name in modules or ():
        _IMPORTING.append(name)
        try:
            if name.endswith(".py") or os.sep in name:
                path = os.path.abspath(name)
                if not os.path.isfile(path):
                    raise ImportError(f"--model-module {name}: no such file")
                mod_name = "megatron_lite_user_model_" + os.path.splitext(
                    os.path.basename(path))[0]
                if mod_name in sys.modules:
                    continue
                spec = importlib.util.spec_from_file_location(mod_name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[mod_name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[mod_name]
                    raise
            else:
                try:
                    importlib.import_module(name)
                except ModuleNotFoundError as e:
                    if e.name and name.startswith(e.name):
                        raise ImportError(f"--model-module {name}: no module named {e.name!r} on "
                                          f"the Python path (give a dotted module name importable "
                                          f"here, or a path to a .py file)") from None
                    raise
        finally:
            _IMPORTING.pop()
