"""Our checkpoint metadata: one schema, one writer, versioned.

It travels in every model-state file (`mp_rank_XX_model_states.pt`, under META_KEY, in
DeepSpeed's client state) as a dict of plain types, so every tool reads it with
`torch.load(weights_only=True)`. `CheckpointMeta.from_dict` is the only reader: a checkpoint whose
`version` is newer than this code knows is refused with a message, never half-understood.

Versions: 1 (no `version` key) is what the trainer wrote before the model contract; 2 adds
`version`, `model_module`, `sp_size`, `data_state` and `stream_state`. Version 1 reads as 2 with
those at their defaults.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

META_KEY = "megatron_lite"
METADATA_VERSION = 2


class MetadataError(ValueError):
    """Metadata this code cannot use; the message names the file and what to do."""


@dataclass(frozen=True)
class CheckpointMeta:
    model: str
    """Registry name of the model (`ModelSpec.name`)."""
    model_config: dict
    """The model's config dataclass as a dict (`spec.make_config` rebuilds it)."""
    tp_size: int
    """Tensor-parallel size of the model-state files."""
    padded_vocab_size: int
    """Embedding rows, padded independently of TP (resharding never re-pads)."""
    partition_spec: dict
    """name -> [partition_dim, partition_stride] of every sharded parameter: what resharding
    follows."""
    vocab_size: Optional[int] = None
    """The tokenizer's vocabulary size."""
    model_module: Optional[str] = None
    """The --model-module that defines `model`, for a model outside the package. Tools never
    import it on their own; the user passes it."""
    tokenizer_hash: Optional[str] = None
    """Hash of the tokenizer saved beside the weights."""
    dp_size: int = 1
    sp_size: int = 1
    step: int = 0
    """Optimizer steps taken."""
    consumed_samples: int = 0
    """Global samples consumed: where a map-style dataset's sampler resumes."""
    seed: int = 0
    skipped_steps: int = 0
    """Steps skipped for a non-finite loss."""
    data_state: Optional[dict] = None
    """A BatchStream's position (`state_dict()`), the same on every rank."""
    stream_state: Optional[dict] = None
    """Where the per-stream model state is: {"tp_size", "sp_size", "dp_size", "streams"} of the
    run that wrote one file per rank (`checkpointing.stream_state_path`), each holding its
    micro-batch slots' states with their global stream rows, so a run with the same number of
    streams re-splits them at any DP or micro-batch size; None when the model carries none or it
    was dropped (resharding). (Before per-row files, "slots" stood where "streams" is.)"""
    weights_only: bool = False
    """Written by a converter: weights without optimizer state (load with --finetune)."""
    converted_from: Optional[str] = None
    """The source a converter read."""
    reshard: Optional[dict] = None
    """What change_mp.py did: {"source_tp", "optimizer": none | native | universal}."""
    version: int = METADATA_VERSION

    @classmethod
    def for_model(cls, spec, config, tp_size: int, tokenizer=None, **run) -> "CheckpointMeta":
        """The metadata of `spec`'s model with `config` at `tp_size`; `run` sets the other fields
        (step, consumed_samples, ...)."""
        return cls(model=spec.name, model_config=dataclasses.asdict(config), tp_size=tp_size,
                   padded_vocab_size=config.padded_vocab_size,
                   partition_spec=spec.layout(config, tp_size).partition_spec,
                   vocab_size=config.vocab_size, model_module=spec.module,
                   tokenizer_hash=tokenizer.hash if tokenizer is not None else None, **run)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw, where: str) -> "CheckpointMeta":
        """Read metadata written by any version up to this one; `where` names the file."""
        if not isinstance(raw, dict):
            raise MetadataError(f"{where}: the '{META_KEY}' metadata is a "
                                f"{type(raw).__name__}, not a mapping: not a megatron_lite "
                                f"checkpoint")
        version = raw.get("version", 1)
        if not isinstance(version, int) or version < 1:
            raise MetadataError(f"{where}: metadata version {version!r} is not valid")
        if version > METADATA_VERSION:
            raise MetadataError(
                f"{where} was written by a newer megatron_lite (checkpoint metadata version "
                f"{version}; this code reads up to {METADATA_VERSION}): upgrade megatron_lite to "
                f"read it")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise MetadataError(f"{where}: metadata version {version} has unexpected keys "
                                f"{unknown}: it was written by an incompatible version")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.name not in raw]
        if required:
            raise MetadataError(f"{where}: the '{META_KEY}' metadata lacks {required}; it was "
                                f"written by an incompatible version")
        return cls(**{**raw, "version": METADATA_VERSION})

    def replace(self, **changes) -> "CheckpointMeta":
        return dataclasses.replace(self, **changes)
