"""The `data:` section of a run's configuration (the training package builds the rest).

It lives beside the data code because models extend it: an architecture whose objective needs
more knobs subclasses it (T5's decoder length and span-corruption settings) and names the
subclass in its `ModelSpec`. Field docstrings become the flags' help (`--seq-length`, ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from megatron_lite.data.blend import parse_blend

# A field taking several words: its flag takes one or more values, its YAML key a string or a
# list, and the words are joined by spaces (Megatron's `--train-data-prefix 0.3 A 0.7 B`).
WORDS = {"words": True}


def _check(condition: bool, message: str):
    # Plain ValueError: the config parser wraps it with the file the values came from.
    if not condition:
        raise ValueError(message)


@dataclass
class DataConfig:
    train_data_prefix: Optional[str] = field(default=None, metadata=WORDS)
    """Indexed dataset prefix of the training split (P.bin / P.idx), or a weighted blend of
    several: WEIGHT PREFIX pairs, e.g. `0.3 data/a 0.7 data/b`."""
    valid_data_prefix: Optional[str] = field(default=None, metadata=WORDS)
    """Indexed dataset prefix of the validation split, or WEIGHT PREFIX pairs; None disables
    evaluation."""
    tokenizer: Optional[str] = None
    """Tokenizer directory (as written by tools/train_tokenizer.py)."""
    seq_length: int = 256
    """Tokens per training sample."""
    reset_position_ids: bool = False
    """Restart position ids at every document boundary inside a packed sample."""
    reset_attention_mask: bool = False
    """Stop attention across document boundaries inside a packed sample."""
    eod_mask_loss: bool = False
    """Give the end-of-document token no loss."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0: load in the training process)."""
    finetune_data: Optional[str] = None
    """Fine-tuning jsonl, one {"prompt": ..., "text": ...} per line; the loss is on text only."""
    truncate: Literal["left", "reject"] = "left"
    """An over-long prompt/text pair: `left` cuts the start of the prompt (never the text),
    `reject` stops with an error naming the file and line."""

    def __post_init__(self):
        _check(self.seq_length >= 1, f"seq_length must be at least 1, got {self.seq_length}")
        _check(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        _check(self.truncate in ("left", "reject"),
               f"truncate must be 'left' or 'reject', got {self.truncate!r}")
        parse_blend(self.train_data_prefix, "train_data_prefix")  # bad weights fail here
        parse_blend(self.valid_data_prefix, "valid_data_prefix")
