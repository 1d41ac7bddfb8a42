"""Span corruption (LongLM text infilling) for T5.

One example is a window of one document (n tokens). The process:
1. num_mask = round(noise_density * n) (halves up), clipped to [1, n - 1] as T5 does, so that
   every example has something to predict and something to read.
2. Span lengths are drawn from Poisson(mean_span_length) with zeros redrawn, until their sum
   reaches num_mask; the last span is cut to fit. Lengths are drawn before any placement, so
   placement cannot bias them.
3. The spans, in random order, are placed left to right with a uniformly random composition of
   the n - num_mask unmasked tokens into gaps: the gap before the first span and after the last
   may be empty (a span may start or end the window), every interior gap has >= 1 token, so spans
   are never adjacent.
4. Span k (left to right) becomes sentinel `<extra_id_{first_sentinel + k}>` in the encoder input
   (LongLM numbers from 1); the target is, for each span, its sentinel then its tokens, then EOS.

Windowing: with m spans an example needs m sentinels, and m <= num_mask. Documents are cut into
windows of at most W tokens (see `document_windows`), W the largest length <= max_source_length
whose num_mask fits the available sentinels (num_sentinels - first_sentinel) and whose worst-case
target (2 * num_mask + 1) fits max_target_length; so no example ever runs out of sentinels.

Shapes (so batches stack): `encoder_input_ids` [max_source_length] (the encoder input is never
longer than its window), `decoder_input_ids`, `labels`, `loss_mask` [max_target_length]
(default 2 * num_mask(W) + 1, the worst case). `source_eos` ends the encoder input with EOS
(transformers' T5Tokenizer convention, for imported checkpoints; the window shrinks by one to
make room). Padding is the pad id with loss_mask 0;
`decoder_input_ids` is the target shifted right behind `decoder_start_token_id` (default: pad, the
T5 convention). The encoder's padding is recognised by the pad id.
"""
from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from megatron_lite.data.objectives import (check_dataset_tokenizer, document_windows, pad_to,
                                           require_token, round_half_up, sample_rng, split_index,
                                           to_tensors)


def num_noise_tokens(n: int, noise_density: float) -> int:
    """How many of an n-token example's tokens are masked."""
    return min(max(round_half_up(noise_density * n), 1), n - 1)


def draw_span_lengths(num_mask: int, mean_span_length: float,
                      rng: np.random.Generator) -> np.ndarray:
    """Zero-truncated Poisson lengths drawn until they cover num_mask, the last one cut.

    Drawn as a block of num_mask values (each >= 1, so their sum always reaches the budget) and
    cut where the running sum first reaches num_mask: the same distribution as drawing one at a
    time, without a Python loop per span.
    """
    lengths = rng.poisson(mean_span_length, size=num_mask)
    zeros = np.flatnonzero(lengths == 0)
    while len(zeros):
        lengths[zeros] = rng.poisson(mean_span_length, size=len(zeros))
        zeros = zeros[lengths[zeros] == 0]
    total = np.cumsum(lengths)
    m = int(np.searchsorted(total, num_mask, side="left")) + 1
    lengths = lengths[:m]
    lengths[-1] -= total[m - 1] - num_mask
    return lengths


def place_spans(n: int, lengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Start of each span (in the given order) for a random composition of the gaps.

    The m+1 gaps sum to u = n - sum(lengths); interior gaps are >= 1, the outer two >= 0. Taking
    one token off each interior gap leaves u - (m-1) tokens to split into m+1 parts >= 0, and
    choosing m bar positions among (u - m + 1) + m slots (stars and bars) picks such a split
    uniformly.
    """
    m = len(lengths)
    free = n - int(lengths.sum()) - (m - 1)
    if free < 0:
        raise ValueError(f"{m} spans covering {int(lengths.sum())} of {n} tokens cannot all be "
                         "separated by unmasked tokens")
    bars = np.sort(rng.choice(free + m, size=m, replace=False))
    gaps_before = np.diff(bars, prepend=-1) - 1
    gaps_before[1:] += 1
    return np.cumsum(gaps_before) + np.concatenate([[0], np.cumsum(lengths[:-1])])


def random_spans(n: int, noise_density: float, mean_span_length: float,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the masked spans of an n-token example, sorted by start."""
    lengths = draw_span_lengths(num_noise_tokens(n, noise_density), mean_span_length, rng)
    # The cut span would otherwise always be last; shuffling keeps the layout symmetric.
    lengths = rng.permutation(lengths)
    return place_spans(n, lengths, rng), lengths


def t5_target_arrays(target: np.ndarray, max_target_length: int, pad_id: int,
                     decoder_start_token_id: int) -> dict:
    """Target -> padded labels, decoder inputs (shifted right) and loss mask."""
    decoder_input = np.concatenate([[decoder_start_token_id], target[:-1]])
    loss_mask = np.zeros(max_target_length, dtype=np.float32)
    loss_mask[:len(target)] = 1.0
    return {"decoder_input_ids": pad_to(decoder_input, max_target_length, pad_id, "decoder input"),
            "labels": pad_to(target, max_target_length, pad_id, "target"),
            "loss_mask": loss_mask}


class SpanCorruptionDataset(Dataset):
    """LongLM text infilling examples, one per document window; `len()` = windows per epoch."""

    def __init__(self, ds, tokenizer, seed: int, *, max_source_length: int = 512,
                 max_target_length: int | None = None, noise_density: float = 0.15,
                 mean_span_length: float = 3.0, first_sentinel: int = 1,
                 decoder_start_token_id: int | None = None, return_source: bool = False,
                 source_eos: bool = False):
        if not 0.0 < noise_density <= 0.5:
            # Above 0.5 there can be more spans than gaps to separate them.
            raise ValueError(f"noise_density must be in (0, 0.5], got {noise_density}")
        if mean_span_length <= 0:
            raise ValueError(f"mean_span_length must be > 0, got {mean_span_length}")
        check_dataset_tokenizer(ds, tokenizer)
        self.ds = ds
        self.seed = int(seed)
        self.noise_density = float(noise_density)
        self.mean_span_length = float(mean_span_length)
        self.return_source = return_source
        self.pad_id = require_token(tokenizer, "pad_id", "span corruption")
        self.eos_id = require_token(tokenizer, "eos_id", "span corruption")
        self.decoder_start_token_id = (self.pad_id if decoder_start_token_id is None
                                       else int(decoder_start_token_id))
        available = int(tokenizer.num_sentinels) - int(first_sentinel)
        if first_sentinel < 0 or available < 1:
            raise ValueError(f"first_sentinel={first_sentinel} leaves no sentinel: the tokenizer "
                             f"has {tokenizer.num_sentinels} (<extra_id_0> ...); train it with "
                             "sentinels or lower first_sentinel")
        self.sentinels = np.array([tokenizer.sentinel_id(first_sentinel + k)
                                   for k in range(available)], dtype=np.int64)

        def fits(n):
            k = num_noise_tokens(n, noise_density)
            return k <= available and (max_target_length is None or 2 * k + 1 <= max_target_length)

        self.source_eos = bool(source_eos)
        window = int(max_source_length) - self.source_eos  # the encoder input is <= the window
        while window >= 2 and not fits(window):
            window -= 1
        if window < 2:
            raise ValueError(f"no window fits: max_source_length={max_source_length}, "
                             f"max_target_length={max_target_length}, {available} sentinels; "
                             "raise the lengths")
        self.window = window
        self.max_source_length = int(max_source_length)
        self.max_target_length = (2 * num_noise_tokens(window, noise_density) + 1
                                  if max_target_length is None else int(max_target_length))
        # A one-token document has nothing to keep once something is masked.
        self.doc, self.start, self.length = document_windows(ds.sizes, window, min_length=2)
        if len(self.doc) == 0:
            raise ValueError("no document has 2 or more tokens; span corruption has nothing to do")

    def __len__(self) -> int:
        return len(self.doc)

    def __getitem__(self, idx: int) -> dict:
        epoch, i = split_index(idx, len(self.doc))
        n = int(self.length[i])
        tokens = np.asarray(self.ds.get(int(self.doc[i]), int(self.start[i]), n), dtype=np.int64)
        starts, lengths = random_spans(n, self.noise_density, self.mean_span_length,
                                       sample_rng(self.seed, epoch, i))
        sentinels = self.sentinels[:len(starts)]

        masked = np.zeros(n, dtype=bool)
        for s, l in zip(starts, lengths):
            masked[s:s + l] = True
        encoder = tokens.copy()
        encoder[starts] = sentinels
        keep = ~masked
        keep[starts] = True
        pieces = [np.concatenate([[sen], tokens[s:s + l]])
                  for sen, s, l in zip(sentinels, starts, lengths)]
        target = np.concatenate(pieces + [[self.eos_id]]).astype(np.int64)

        encoder = encoder[keep]
        if self.source_eos:
            encoder = np.append(encoder, self.eos_id)
        sample = {"encoder_input_ids": pad_to(encoder, self.max_source_length, self.pad_id,
                                              "encoder input")}
        sample.update(t5_target_arrays(target, self.max_target_length, self.pad_id,
                                       self.decoder_start_token_id))
        if self.return_source:
            sample["source_ids"] = tokens
        return to_tensors(sample)
