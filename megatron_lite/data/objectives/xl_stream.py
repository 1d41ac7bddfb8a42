"""Contiguous streams for Transformer-XL: each batch row continues the text of the previous batch.

The epoch's token stream (documents shuffled with (seed, epoch), eod after each; see causal_lm)
is cut into G = batch_size * dp_size equal contiguous slices, one per global batch row. Global row
g = dp_rank * batch_size + b. At step t of an epoch, row g holds slice tokens
[t*S, t*S + S + 1) (inputs the first S, labels the last S), so row g of step t+1 starts exactly
where row g of step t ended and the XL memory always holds the true preceding text. A new epoch
starts every stream afresh in a new document order.

The position is one number, the global step; `state_dict()` saves it with the global row count
and sequence length, so a run resumes at the same global batch size with any split into
batch_size x dp_size.
"""
from __future__ import annotations

import numpy as np
import torch

from megatron_lite.data.objectives import dataset_name
from megatron_lite.data.objectives.causal_lm import TokenStream


class XLStreamBatcher:
    """Yields batches [batch_size, seq_length] of this DP rank's rows, step after step, forever."""

    def __init__(self, ds, batch_size: int, seq_length: int, eod_id: int, seed: int,
                 dp_rank: int = 0, dp_size: int = 1, *, append_eod: bool = True):
        if batch_size < 1 or seq_length < 1:
            raise ValueError(f"batch_size and seq_length must be >= 1, got {batch_size}, "
                             f"{seq_length}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
        self.batch_size = int(batch_size)
        self.seq_length = int(seq_length)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.seed = int(seed)
        self.stream = TokenStream(ds, eod_id, seed, append_eod=append_eod)
        self.global_rows = self.batch_size * self.dp_size
        self.row_length = self.stream.tokens_per_epoch // self.global_rows
        self.steps_per_epoch = (self.row_length - 1) // self.seq_length
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"dataset {dataset_name(ds)} holds {self.stream.tokens_per_epoch} tokens: split "
                f"into {self.global_rows} streams (batch_size x dp_size) that is {self.row_length}"
                f" each, less than one step of seq_length + 1 = {self.seq_length + 1}; lower the "
                "batch size or --seq-length, or add data")
        self.step = 0

    def __len__(self) -> int:
        return self.steps_per_epoch

    def batch(self, step: int) -> dict:
        """The batch of global step `step` for this rank (a pure function of the step)."""
        epoch, t = divmod(int(step), self.steps_per_epoch)
        rows = []
        for b in range(self.batch_size):
            g = self.dp_rank * self.batch_size + b
            rows.append(self.stream.tokens(epoch, g * self.row_length + t * self.seq_length,
                                           self.seq_length + 1))
        x = torch.from_numpy(np.stack(rows))
        return {
            "input_ids": x[:, :-1].contiguous(),
            "labels": x[:, 1:].contiguous(),
            "loss_mask": torch.ones(self.batch_size, self.seq_length, dtype=torch.float32),
            # XL attends with relative positions; absolute ones are given for the contract only.
            "position_ids": torch.arange(self.seq_length).expand(self.batch_size, -1).clone(),
        }

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        """The next step's batch: with `state_dict`, this makes it a `BatchStream` the trainer
        drives and checkpoints."""
        batch = self.batch(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        return {"step": self.step, "global_rows": self.global_rows,
                "seq_length": self.seq_length, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        for key in ("global_rows", "seq_length", "seed"):
            if key not in state:
                raise KeyError(f"XL stream state lacks '{key}'; it was not saved by "
                               "XLStreamBatcher.state_dict()")
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"XL stream state was saved with {key}={state[key]} but this run has "
                    f"{key}={getattr(self, key)}; the streams are defined by the global batch size"
                    " (batch_size x dp_size), the sequence length and the seed, so resume with the "
                    "same values")
        self.step = int(state["step"])
