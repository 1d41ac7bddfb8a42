"""What the data side hands to models and to the trainer, whatever the architecture.

- `Datasets`: the training and validation data of a run. Each is either a map-style dataset
  (`len()`, and `dataset[i]` for any global sample index i >= 0, as every objective in
  `objectives/` is), which the trainer walks with `TrainingSampler`; or a `BatchStream`, which
  yields this rank's micro-batches itself and whose position the trainer saves and restores.
  A map-style dataset whose indices are already the training order sets `ordered = True` (a
  blend of corpora, data.blend): the trainer then walks 0, 1, 2, ... without shuffling.
  Optional, for logs: `corpus_epochs(consumed_samples) -> {corpus: epochs}` and `describe()`.
- `predicted_targets(batch)`: the label ids a batch predicts, under either masking convention of
  the batch contract (`loss_mask`, or -100 labels for masked LM).
- `bits_per_character`: the one definition of BPC every report uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

IGNORE_INDEX = -100
"""A label that is not predicted (masked-LM batches carry no loss_mask)."""


@runtime_checkable
class BatchStream(Protocol):
    """Stateful data: `next(stream)` is this rank's next micro-batch (a dict of tensors).

    `state_dict()` is its position and must be the same on every rank (a global step count, say):
    the trainer keeps it in the checkpoint's metadata, written once, and gives it back through
    `load_state_dict` on resume, at any rank. Transformer-XL's contiguous streams are one.

    A stream feeding a model with per-stream state (`ModelSpec.stream_state`) also says which
    streams each micro-batch continues: `global_rows` (G, the number of streams of the whole
    run), `slots` (micro-batches per optimizer step; slot m of every step continues the rows of
    slot m of the step before) and `rows(slot)` (the global rows, 0..G-1, of this rank's
    micro-batch `slot`, in batch order). The trainer keys the model's state by those rows, so it
    re-splits at another DP size or micro-batch size of the same G. When G itself changed and
    the state is dropped (--reset-stream-state), it calls `load_state_dict(state, regroup=True)`:
    the stream then maps the old position onto its new streams as best it can."""

    def __next__(self) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def is_stream(data: Any) -> bool:
    return isinstance(data, BatchStream)


@dataclass
class Datasets:
    """A model's training data and, optionally, its validation data (see the module docstring)."""
    train: Any
    valid: Any | None = None

    def __post_init__(self):
        for name in ("train", "valid"):
            data = getattr(self, name)
            if data is None and name == "valid":
                continue
            map_style = hasattr(data, "__getitem__") and hasattr(data, "__len__")
            if not is_stream(data) and not map_style:
                raise TypeError(f"Datasets.{name} must be a map-style dataset (len and [index]) "
                                f"or a BatchStream (next, state_dict, load_state_dict); got "
                                f"{type(data).__name__}")


def predicted_targets(batch: dict) -> torch.Tensor:
    """1-D tensor of the label ids `batch` predicts: where `loss_mask` is set, or, in a batch
    without one (masked LM), wherever the label is not IGNORE_INDEX."""
    labels = batch["labels"]
    if "loss_mask" in batch:
        return labels[batch["loss_mask"].bool()]
    return labels[labels != IGNORE_INDEX]


def bits_per_character(total_nats: float, num_characters: float) -> float:
    """Summed cross entropy in nats / (ln 2 x number of predicted characters).

    Characters, not tokens: a sentencepiece token spells several, a character-vocabulary token
    one, special tokens none (`Tokenizer.char_lengths`), so the figure compares across
    tokenizers. NaN when nothing predicted spells a character."""
    if num_characters <= 0:
        return float("nan")
    return total_nats / (math.log(2) * num_characters)
