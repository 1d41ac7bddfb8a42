"""Conditional continuation (LongLM) for T5, and the span-corruption / continuation mixture.

An example is a window of one document (n tokens) split at a point p drawn uniformly from the
integers in [ceil(lo * n), floor(hi * n)], clipped to [1, n - 1] so both halves are non-empty:
input = front + `<extra_id_{sentinel}>`, target = `<extra_id_{sentinel}>` + back + EOS.

Windowing: documents are cut into windows of at most W tokens (see `document_windows`), W the
largest length for which every allowed split fits: p + 1 <= max_source_length and
(n - p) + 2 <= max_target_length (p + 2 with `source_eos`, which ends the input with EOS as
transformers' T5Tokenizer does). Output keys and padding are those of span corruption.
"""
from __future__ import annotations

import math

import numpy as np
from torch.utils.data import Dataset

from megatron_lite.data.objectives import (check_dataset_tokenizer, document_windows, pad_to,
                                           require_token, sample_rng, split_index, to_tensors)
from megatron_lite.data.objectives.span_corruption import t5_target_arrays


def split_range(n: int, bounds: tuple[float, float]) -> tuple[int, int]:
    """Inclusive range of split points of an n-token window."""
    lo = max(1, math.ceil(bounds[0] * n))
    hi = min(n - 1, math.floor(bounds[1] * n))
    return lo, max(lo, hi)


class ContinuationDataset(Dataset):
    """LongLM continuation examples, one per document window; `len()` = windows per epoch."""

    def __init__(self, ds, tokenizer, seed: int, *, max_source_length: int = 512,
                 max_target_length: int = 512, split_bounds: tuple[float, float] = (0.1, 0.9),
                 sentinel: int = 1, decoder_start_token_id: int | None = None,
                 return_source: bool = False, source_eos: bool = False):
        lo, hi = split_bounds
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"split_bounds must satisfy 0 <= lo <= hi <= 1, got {split_bounds}")
        check_dataset_tokenizer(ds, tokenizer)
        self.ds = ds
        self.seed = int(seed)
        self.split_bounds = (float(lo), float(hi))
        self.return_source = return_source
        self.pad_id = require_token(tokenizer, "pad_id", "continuation")
        self.eos_id = require_token(tokenizer, "eos_id", "continuation")
        self.sentinel_id = int(tokenizer.sentinel_id(sentinel))
        self.decoder_start_token_id = (self.pad_id if decoder_start_token_id is None
                                       else int(decoder_start_token_id))
        self.max_source_length = int(max_source_length)
        self.max_target_length = int(max_target_length)
        self.source_eos = bool(source_eos)

        def fits(n):
            p_lo, p_hi = split_range(n, self.split_bounds)
            return (p_hi + 1 + self.source_eos <= self.max_source_length
                    and n - p_lo + 2 <= self.max_target_length)

        window = self.max_source_length + self.max_target_length
        while window >= 2 and not fits(window):
            window -= 1
        if window < 2:
            raise ValueError(f"no window fits max_source_length={max_source_length} and "
                             f"max_target_length={max_target_length}; raise them")
        self.window = window
        self.doc, self.start, self.length = document_windows(ds.sizes, window, min_length=2)
        if len(self.doc) == 0:
            raise ValueError("no document has 2 or more tokens; continuation has nothing to split")

    def __len__(self) -> int:
        return len(self.doc)

    def __getitem__(self, idx: int) -> dict:
        epoch, i = split_index(idx, len(self.doc))
        n = int(self.length[i])
        tokens = np.asarray(self.ds.get(int(self.doc[i]), int(self.start[i]), n), dtype=np.int64)
        p_lo, p_hi = split_range(n, self.split_bounds)
        p = int(sample_rng(self.seed, epoch, i).integers(p_lo, p_hi + 1))
        encoder = np.concatenate([tokens[:p], [self.sentinel_id]]
                                 + ([[self.eos_id]] if self.source_eos else []))
        target = np.concatenate([[self.sentinel_id], tokens[p:], [self.eos_id]]).astype(np.int64)
        sample = {"encoder_input_ids": pad_to(encoder, self.max_source_length, self.pad_id,
                                              "encoder input")}
        sample.update(t5_target_arrays(target, self.max_target_length, self.pad_id,
                                       self.decoder_start_token_id))
        if self.return_source:
            sample["source_ids"] = tokens
        return to_tensors(sample)


class MixedT5Dataset(Dataset):
    """Several T5 objectives in fixed proportions (default span corruption : continuation = 1:1).

    An epoch has L = sum of the children's lengths slots; child k gets c_k of them (largest
    remainder of ratio_k * L), laid out in an order permuted once with `seed`. The j-th slot of
    child k in mixed epoch e reads the child's global index e * c_k + j, so every child walks its
    own epochs in order and the mixture is a pure function of (seed, index).
    """

    def __init__(self, datasets, ratios=None, seed: int = 0):
        if len(datasets) == 0:
            raise ValueError("MixedT5Dataset needs at least one dataset")
        ratios = [1.0] * len(datasets) if ratios is None else [float(r) for r in ratios]
        if len(ratios) != len(datasets) or min(ratios) < 0 or sum(ratios) <= 0:
            raise ValueError(f"ratios {ratios} must be one non-negative weight per dataset "
                             f"({len(datasets)}), not all zero")
        for key in ("max_source_length", "max_target_length"):
            values = {getattr(d, key, None) for d in datasets}
            if len(values) > 1:
                raise ValueError(f"mixed T5 datasets must share {key} so batches stack; got "
                                 f"{sorted(v for v in values if v is not None)}")
        self.datasets = list(datasets)
        self.max_source_length = getattr(datasets[0], "max_source_length", None)
        self.max_target_length = getattr(datasets[0], "max_target_length", None)
        total = sum(len(d) for d in datasets)
        weights = np.array(ratios) / sum(ratios)
        counts = np.floor(weights * total).astype(np.int64)
        remainder = weights * total - counts
        counts[np.argsort(-remainder, kind="stable")[:total - counts.sum()]] += 1
        self.counts = counts
        owner = np.random.default_rng([int(seed)]).permutation(np.repeat(np.arange(len(counts)),
                                                                          counts))
        rank = np.empty(total, dtype=np.int64)
        for k in range(len(counts)):
            rank[owner == k] = np.arange(counts[k])
        self.owner, self.rank = owner, rank

    def __len__(self) -> int:
        return len(self.owner)

    def __getitem__(self, idx: int) -> dict:
        epoch, i = split_index(idx, len(self.owner))
        k = int(self.owner[i])
        return self.datasets[k][epoch * int(self.counts[k]) + int(self.rank[i])]
