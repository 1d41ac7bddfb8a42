"""Sequence classification fine-tuning (Longformer's `classify` task): one jsonl line per example,
{"text": str, "label": str or int}.

An example is [CLS] text [SEP] (the text cut at seq_length - 2 tokens), padded; [CLS], whose
final hidden state the classification head reads, is a global token. Labels are names: the
label set is fixed by the training file (sorted), recorded in the model's config, and a held-out
line with a label outside it is an error, as is a line without one. A file can also be split
deterministically into training and held-out parts by a hash of each line's position and the
seed (`split_lines`), so one DATA.jsonl serves both.

Keys: `input_ids`, `attention_mask` (1 on real tokens), `global_attention_mask` (1 at [CLS]),
`token_type_ids` (zeros), `labels` (the class index, a scalar).
"""
from __future__ import annotations

import zlib

import numpy as np
import torch
from torch.utils.data import Dataset

from megatron_lite.data.objectives import (jsonl_records, pad_to, require_token, split_index,
                                           to_tensors)


def read_examples(path: str) -> list[tuple[str, str, str]]:
    """(where, text, label) of every non-blank line; errors name file:line and what to fix."""
    out = []
    for where, record in jsonl_records(path, '{"text": ..., "label": ...}'):
        if not isinstance(record.get("text"), str):
            raise ValueError(f'{where}: expected {{"text": "...", "label": ...}} with a string '
                             f"text")
        label = record.get("label")
        if label is None or isinstance(label, (dict, list, float)):
            raise ValueError(f"{where}: no label (or not a string or integer): classification "
                             'data needs {"text": ..., "label": ...} on every line')
        out.append((where, record["text"], str(label)))
    if not out:
        raise ValueError(f"{path}: no examples; the file is empty")
    return out


def split_lines(examples: list, valid_fraction: float, seed: int) -> tuple[list, list]:
    """(training, held-out) examples: each goes to the held-out part with probability
    `valid_fraction`, decided by a hash of (seed, its index), so the split is fixed."""
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    train, valid = [], []
    for i, example in enumerate(examples):
        h = zlib.crc32(f"{seed}:{i}".encode()) / 2**32
        (valid if h < valid_fraction else train).append(example)
    return train, valid


def label_names(examples: list) -> list[str]:
    """The sorted label set of the training examples."""
    return sorted({label for _, _, label in examples})


class ClassificationDataset(Dataset):
    """One example per line (no randomness); `labels` maps names to indices."""

    def __init__(self, examples: list, tokenizer, seq_length: int, labels: list[str], *,
                 global_cls: bool = True):
        if seq_length < 3:
            raise ValueError(f"seq_length must be >= 3 ([CLS] + a token + [SEP]), got {seq_length}")
        self.cls_id = require_token(tokenizer, "cls_id", "classification")
        self.sep_id = require_token(tokenizer, "sep_id", "classification")
        self.pad_id = require_token(tokenizer, "pad_id", "classification")
        self.seq_length, self.global_cls = int(seq_length), bool(global_cls)
        self.labels = list(labels)
        index = {name: i for i, name in enumerate(labels)}
        self.examples = []
        for where, text, label in examples:
            if label not in index:
                raise ValueError(f"{where}: label {label!r} is not one of the model's classes "
                                 f"({', '.join(labels)}: the labels of its training data); fix "
                                 f"the line, or add examples of it to the training data")
            ids = tokenizer.encode(text)[:self.seq_length - 2]
            self.examples.append((np.array([self.cls_id, *ids, self.sep_id], dtype=np.int64),
                                  index[label]))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, idx: int) -> dict:
        _, i = split_index(idx, len(self.examples))
        ids, label = self.examples[i]
        n = self.seq_length
        attention = np.zeros(n, dtype=np.int64)
        attention[:len(ids)] = 1
        glob = np.zeros(n, dtype=np.int64)
        glob[0] = int(self.global_cls)
        sample = to_tensors({"input_ids": pad_to(ids, n, self.pad_id, "input"),
                             "attention_mask": attention, "global_attention_mask": glob,
                             "token_type_ids": np.zeros(n, dtype=np.int64)})
        sample["labels"] = torch.tensor(label, dtype=torch.long)  # a scalar: [b] once batched
        return sample
