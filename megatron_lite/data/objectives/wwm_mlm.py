"""Whole-word-masked MLM for Longformer_ZH on a character vocabulary.

Words come from the jieba boundaries stored at preprocessing time (`--word-boundaries`): a word
is a run of tokens from one word start to the next. An example is a window of seq_length - 2
tokens framed as [CLS] window [SEP], cut either
- from one document (`pack=False`): at most seq_length - 2 tokens of it (see
  `document_windows`), padded; or
- from the epoch's stream of documents (`pack=True`, Longformer_ZH's blocks): every document,
  in an order shuffled per epoch, followed by [SEP] (the BERT vocabulary's end of document), cut
  into full windows, so no block is padded. A separator is never selected for prediction.
A window's first token always starts a word (a word cut by the window edge is two words), as does
a document's.

Selection, as in Google BERT's create_pretraining_data with whole words: target = round(
masked_lm_prob * n) (halves up, n the window's tokens but separators), at least 1 and at most
`max_predictions` when one is given (BERT's 80 is sized for 512 tokens; by default the cap is
none, so it scales with the length); words are visited in random order and a word is chosen
unless it would take the selection past the target, in which case it is skipped and the next one
tried. Every token of a chosen word is then, independently, [MASK] (80%), a random non-special
token (10%) or left unchanged (10%). Each window draws from its own generator, seeded by (seed,
epoch, index): no two windows share a random stream.

Keys (padded to seq_length with the pad id): `input_ids`, `labels` (the original token where
selected, -100 elsewhere), `attention_mask` (1 on real tokens), `global_attention_mask` (1 at the
[CLS] position with `global_cls`, the default: Longformer's global token; zeros otherwise),
`token_type_ids` (zeros).
"""
from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from megatron_lite.data.objectives import (check_dataset_tokenizer, dataset_name,
                                           document_windows, pad_to, require_token,
                                           round_half_up, sample_rng, split_index, to_tensors)
from megatron_lite.data.objectives.causal_lm import TokenStream

IGNORE_INDEX = -100


def choose_words(word_starts: np.ndarray, target: int, rng: np.random.Generator,
                 selectable: np.ndarray | None = None) -> np.ndarray:
    """Bool mask of the selected tokens: whole words in random order, skipping overshoots and
    words starting at a token that is not `selectable` (a separator, which is a word alone)."""
    n = len(word_starts)
    starts = np.flatnonzero(word_starts)
    ends = np.append(starts[1:], n)
    selected = np.zeros(n, dtype=bool)
    count = 0
    for w in rng.permutation(len(starts)):
        if count >= target:
            break
        size = int(ends[w] - starts[w])
        if count + size > target or (selectable is not None and not selectable[starts[w]]):
            continue
        selected[starts[w]:ends[w]] = True
        count += size
    return selected


class WholeWordMaskDataset(Dataset):
    """Whole-word-masked MLM examples; `len()` = windows per epoch (see the module docstring)."""

    def __init__(self, ds, tokenizer, seed: int, *, seq_length: int = 512,
                 masked_lm_prob: float = 0.15, max_predictions: int | None = None,
                 global_cls: bool = True, pack: bool = False, return_source: bool = False):
        if not getattr(tokenizer, "is_char_level", False):
            raise ValueError(
                f"whole-word masking needs a character-level tokenizer (one token per CJK "
                f"character, words from stored jieba boundaries); got {type(tokenizer).__name__}."
                " Train one with tools/train_tokenizer.py's character mode")
        if not getattr(ds, "has_word_starts", False):
            raise ValueError(f"dataset {dataset_name(ds)} has no word boundaries; rerun "
                             "tools/preprocess_data.py with --word-boundaries")
        if seq_length < 3:
            raise ValueError(f"seq_length must be >= 3 ([CLS] + a token + [SEP]), got {seq_length}")
        if not 0.0 < masked_lm_prob < 1.0 or (max_predictions is not None and max_predictions < 1):
            raise ValueError(f"need 0 < masked_lm_prob < 1 and max_predictions >= 1 (or none), got "
                             f"{masked_lm_prob}, {max_predictions}")
        check_dataset_tokenizer(ds, tokenizer)
        self.ds = ds
        self.seed = int(seed)
        self.seq_length = int(seq_length)
        self.masked_lm_prob = float(masked_lm_prob)
        self.max_predictions = None if max_predictions is None else int(max_predictions)
        self.global_cls = bool(global_cls)
        self.return_source = return_source
        self.cls_id = require_token(tokenizer, "cls_id", "whole-word masking")
        self.sep_id = require_token(tokenizer, "sep_id", "whole-word masking")
        self.mask_id = require_token(tokenizer, "mask_id", "whole-word masking")
        self.pad_id = require_token(tokenizer, "pad_id", "whole-word masking")
        # Random replacements are ordinary characters: never special tokens, sentinels, or the
        # `##x` continuation forms that encode() never emits.
        special = set(tokenizer.special_ids())
        # Tokens that frame text rather than spell it are never predicted.
        self.framing = np.array(sorted({self.cls_id, self.sep_id, self.pad_id}), dtype=np.int64)
        self.random_pool = np.array(
            [i for i in range(tokenizer.vocab_size)
             if i not in special and not str(tokenizer.id_to_token(i)).startswith("##")],
            dtype=np.int64)
        if len(self.random_pool) == 0:
            raise ValueError("the tokenizer has no ordinary tokens to draw random replacements "
                             "from")
        window = self.seq_length - 2
        if pack:
            # Documents end with [SEP] (the BERT vocabulary's end of document) in the stream.
            self.stream = TokenStream(ds, self.sep_id, self.seed)
            self.num_windows = self.stream.tokens_per_epoch // window
            if self.num_windows == 0:
                raise ValueError(f"dataset {dataset_name(ds)} holds {self.stream.tokens_per_epoch}"
                                 f" tokens with separators, fewer than one block of seq_length - 2"
                                 f" = {window}; lower --seq-length or add data")
        else:
            self.stream = None
            self.doc, self.start, self.length = document_windows(ds.sizes, window)
            self.num_windows = len(self.doc)
            if self.num_windows == 0:
                raise ValueError(f"dataset {dataset_name(ds)} has no non-empty document")

    def __len__(self) -> int:
        return self.num_windows

    def window(self, i: int, epoch: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and word starts of window i of `epoch` (the first token always starts a word)."""
        if self.stream is not None:
            n = self.seq_length - 2
            tokens = self.stream.tokens(epoch, i * n, n)
            word_starts = self.stream.word_starts(epoch, i * n, n)
        else:
            doc, start, n = int(self.doc[i]), int(self.start[i]), int(self.length[i])
            tokens = np.asarray(self.ds.get(doc, start, n), dtype=np.int64)
            word_starts = np.asarray(self.ds.word_starts(doc)[start:start + n], dtype=bool).copy()
        word_starts[0] = True
        return tokens, word_starts

    def __getitem__(self, idx: int) -> dict:
        epoch, i = split_index(idx, self.num_windows)
        tokens, word_starts = self.window(i, epoch)
        n = len(tokens)
        selectable = ~np.isin(tokens, self.framing)
        rng = sample_rng(self.seed, epoch, i)
        target = max(1, round_half_up(self.masked_lm_prob * int(selectable.sum())))
        if self.max_predictions is not None:
            target = min(self.max_predictions, target)
        selected = choose_words(word_starts, target, rng, selectable)

        masked = tokens.copy()
        pos = np.flatnonzero(selected)
        r = rng.random(len(pos))
        masked[pos[r < 0.8]] = self.mask_id
        swap = pos[(r >= 0.8) & (r < 0.9)]
        masked[swap] = self.random_pool[rng.integers(0, len(self.random_pool), size=len(swap))]

        input_ids = np.concatenate([[self.cls_id], masked, [self.sep_id]])
        labels = np.full(n + 2, IGNORE_INDEX, dtype=np.int64)
        labels[1 + pos] = tokens[pos]
        length = self.seq_length
        attention_mask = np.zeros(length, dtype=np.int64)
        attention_mask[:n + 2] = 1
        global_attention_mask = np.zeros(length, dtype=np.int64)
        global_attention_mask[0] = int(self.global_cls)
        sample = {
            "input_ids": pad_to(input_ids, length, self.pad_id, "input"),
            "labels": pad_to(labels, length, IGNORE_INDEX, "labels"),
            "attention_mask": attention_mask,
            "global_attention_mask": global_attention_mask,
            "token_type_ids": np.zeros(length, dtype=np.int64),
        }
        if self.return_source:
            sample["source_ids"] = tokens
        return to_tensors(sample)
