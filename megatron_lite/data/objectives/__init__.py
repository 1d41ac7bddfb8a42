"""Pretraining objectives: map-style datasets over an `IndexedDataset`, one module each.

Every objective follows the batch contract (docs/ARCHITECTURE.md) and is a pure function of
(seed, epoch, sample index): per-sample randomness comes from
`np.random.default_rng([seed, epoch, local_index])`, never from global state, so any number of data
workers or ranks sees the same samples and a resumed run sees exactly the batches it would have
seen.

Epochs: `dataset[i]` accepts any global index i >= 0; epoch = i // len(dataset) and the local index
is i % len(dataset). `TrainingSampler` (megatron_lite/data/sampler.py) yields such global indices,
so a dataset never needs to be told which epoch it is in.
"""
from __future__ import annotations

import json
import math
import zlib

import numpy as np
import torch

OBJECTIVES = ("causal_lm", "xl_stream", "span_corruption", "continuation", "t5_mixed", "wwm_mlm",
              "prompt_text", "classify")


def round_half_up(x: float) -> int:
    """Round to nearest, halves up (Python's round() rounds halves to even, which is surprising)."""
    return int(math.floor(x + 0.5))


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample: depends only on (seed, epoch, index within the epoch)."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def shuffle_rng(seed: int, epoch: int, purpose: str) -> np.random.Generator:
    """The generator of an epoch-wide shuffle (document order, sample order).

    The purpose enters the seed (crc32, stable across runs), so shuffles of different things drawn
    with one global seed are independent. Four words, the last non-zero, never coincide with a
    sample's three ([s, e, i] seeds like [s, e, i, 0]).
    """
    return np.random.default_rng([int(seed), int(epoch), 0, zlib.crc32(purpose.encode()) or 1])


def split_index(idx: int, length: int) -> tuple[int, int]:
    """Global sample index -> (epoch, index within the epoch)."""
    idx = int(idx)
    if idx < 0:
        raise IndexError(f"sample index {idx} is negative; objectives take global indices >= 0")
    return divmod(idx, length)


def dataset_name(ds) -> str:
    """How error messages name an indexed dataset (its path prefix when it has one)."""
    for attr in ("prefix", "path"):
        value = getattr(ds, attr, None)
        if value:
            return str(value)
    return type(ds).__name__


def document_windows(sizes, max_length: int, min_length: int = 1):
    """Cut every document into the fewest windows of at most `max_length` tokens.

    A document of n tokens becomes k = ceil(n / max_length) windows of near-equal length
    (boundaries at floor(j * n / k)), so no tiny trailing window is produced. Documents shorter
    than `min_length` are skipped. Returns int64 arrays (doc, start, length), one row per window.
    """
    if max_length < 1:
        raise ValueError(f"window length must be >= 1, got {max_length}")
    sizes = np.asarray(sizes, dtype=np.int64)
    docs = np.flatnonzero(sizes >= max(min_length, 1))
    n = sizes[docs]
    k = -(-n // max_length)
    doc = np.repeat(docs, k)
    n_rep = np.repeat(n, k)
    k_rep = np.repeat(k, k)
    # j = position of each window inside its document: 0..k-1.
    first = np.repeat(np.cumsum(k) - k, k)
    j = np.arange(len(doc), dtype=np.int64) - first
    start = j * n_rep // k_rep
    end = (j + 1) * n_rep // k_rep
    return doc, start, end - start


def pad_to(ids, length: int, pad_id: int, what: str) -> np.ndarray:
    """Right-pad a 1-D id array to `length`; longer input is a bug in the caller's windowing."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) > length:
        raise AssertionError(f"{what} has {len(ids)} tokens, more than its padded length {length}")
    out = np.full(length, pad_id, dtype=np.int64)
    out[:len(ids)] = ids
    return out


def check_dataset_tokenizer(ds, tokenizer) -> None:
    """A dataset tokenized with another vocabulary would train on garbage: refuse it loudly."""
    expected = getattr(ds, "tokenizer_hash", None)
    if not expected:
        return
    from megatron_lite.data.tokenizer import check_tokenizer_hash
    check_tokenizer_hash(expected, tokenizer, dataset_name(ds))


def require_token(tokenizer, attr: str, objective: str) -> int:
    """A special token the objective cannot work without, or a clear error."""
    value = getattr(tokenizer, attr, None)
    if value is None:
        raise ValueError(f"{objective} needs the tokenizer's {attr.replace('_id', '')} token, but "
                         f"this {type(tokenizer).__name__} has none; use a tokenizer whose "
                         "special tokens include it")
    return int(value)


def to_tensors(sample: dict) -> dict:
    """numpy arrays -> torch tensors, keeping each array's dtype."""
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sample.items()}


def jsonl_records(path: str, form: str):
    """(where, record) of every non-blank line of a jsonl file, where = "path:line"; a line that
    is not UTF-8, not JSON or not an object is a ValueError naming it and the expected `form`
    (e.g. '{"prompt": ..., "text": ...}')."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: invalid UTF-8 ({e.reason} at byte {e.start}); "
                                 "re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg}, column {e.colno}); each "
                                 f"line must be {form}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected an object {form}, got "
                                 f"{type(record).__name__}")
            yield where, record
