"""Global sample order and data-parallel slicing, Megatron style.

All ranks agree on one global sequence of sample indices: position p (counted over the whole run)
is in epoch e = p // N at offset o = p % N, and its global sample index is e * N + perm_e[o], with
perm_e a permutation seeded by (seed, e, "sample_order") (identity without shuffle). Objective datasets take such
global indices directly (epoch = index // len). Each micro-step consumes micro_batch_size *
dp_size consecutive positions; DP rank r takes the r-th block of micro_batch_size.

The only state is consumed_samples (global positions already used), which the trainer saves in
the checkpoint: a run resumed from it, at any DP size or micro-batch size, continues the very same
global sequence. The trainer, not this sampler, advances it (a DataLoader prefetches ahead).

Usage: DataLoader(dataset, batch_sampler=TrainingSampler(...), collate_fn=collate,
num_workers=k): samples are pure functions of their index, so k does not change the batches.
"""
from __future__ import annotations

import numpy as np
import torch

from megatron_lite.data.objectives import shuffle_rng


class TrainingSampler:
    """Yields, forever, lists of global sample indices: this DP rank's micro-batches."""

    def __init__(self, num_samples_per_epoch: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, consumed_samples: int = 0, seed: int = 0, shuffle: bool = True):
        if num_samples_per_epoch < 1:
            raise ValueError(f"num_samples_per_epoch must be >= 1, got {num_samples_per_epoch}; "
                             "is the dataset empty?")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.num_samples = int(num_samples_per_epoch)
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.consumed_samples = int(consumed_samples)
        self.seed = int(seed)
        self.shuffle = shuffle
        self._perm = (None, None)

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm[0] != epoch:
            self._perm = (epoch, shuffle_rng(self.seed, epoch, "sample_order").permutation(
                self.num_samples))
        return self._perm[1]

    def global_indices(self, start: int, count: int) -> list[int]:
        """Global sample indices at global positions [start, start + count)."""
        out = []
        for p in range(start, start + count):
            epoch, offset = divmod(p, self.num_samples)
            local = int(self._permutation(epoch)[offset]) if self.shuffle else offset
            out.append(epoch * self.num_samples + local)
        return out

    def __iter__(self):
        position = self.consumed_samples
        step = self.micro_batch_size * self.dp_size
        while True:
            yield self.global_indices(position + self.dp_rank * self.micro_batch_size,
                                      self.micro_batch_size)
            position += step


def collate(samples: list[dict]) -> dict:
    """Stack per-sample dicts of tensors into a batch; keys and shapes must agree."""
    if not samples:
        raise ValueError("collate got no samples")
    keys = list(samples[0])
    batch = {}
    for i, s in enumerate(samples):
        if list(s) != keys:
            raise ValueError(f"sample {i} has keys {sorted(s)}, sample 0 has {sorted(keys)}")
    for key in keys:
        shapes = {tuple(s[key].shape) for s in samples}
        if len(shapes) > 1:
            raise ValueError(f"cannot stack key '{key}': shapes {sorted(shapes)} differ (is "
                             "return_source on? source_ids vary in length and are for previews)")
        batch[key] = torch.stack([s[key] for s in samples])
    return batch
