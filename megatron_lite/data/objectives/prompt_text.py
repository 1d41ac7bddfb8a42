"""Prompt/text fine-tuning (the format Chinese-Transformer-XL fine-tunes on).

Each jsonl line is {"prompt": str, "text": str}. Tokens = encode(prompt) + encode(text) + [eod];
inputs are tokens[:-1] and labels tokens[1:], right-padded to seq_length with the pad id. Only the
labels that are text tokens or the final eod carry loss: the prompt is context.

A pair longer than seq_length + 1 tokens either loses tokens from the left of its prompt
(truncate="left"; the text itself is never cut, so a text that alone exceeds the length is an
error) or is an error (truncate="reject"). Errors name file:line. The file is read and tokenized
once, at construction (fine-tuning sets are small); blank lines are skipped.
"""
from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from megatron_lite.data.objectives import jsonl_records, pad_to, split_index, to_tensors


class PromptTextDataset(Dataset):
    """One fine-tuning sample per jsonl line; deterministic, no randomness."""

    def __init__(self, path_jsonl, tokenizer, seq_length: int, *, truncate: str = "left",
                 eod_id: int | None = None, return_source: bool = False):
        if truncate not in ("left", "reject"):
            raise ValueError(f"truncate must be 'left' or 'reject', got {truncate!r}")
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        self.path = str(path_jsonl)
        self.truncate = truncate
        self.seq_length = int(seq_length)
        self.eod_id = int(tokenizer.eod_id if eod_id is None else eod_id)
        if tokenizer.pad_id is None:
            raise ValueError("prompt/text fine-tuning pads with the tokenizer's pad token, but it "
                             "has none")
        self.pad_id = int(tokenizer.pad_id)
        self.return_source = return_source
        self.examples = []  # (tokens, number of prompt tokens kept)
        for where, record in jsonl_records(self.path, '{"prompt": ..., "text": ...}'):
            for key in ("prompt", "text"):
                if not isinstance(record.get(key), str):
                    problem = "missing" if key not in record else "not a string"
                    raise ValueError(f"{where}: key '{key}' is {problem}; each line must be "
                                     '{"prompt": "...", "text": "..."}')
            self.examples.append(self._tokenize(tokenizer, record, where))
        if not self.examples:
            raise ValueError(f"{self.path}: no examples; the file is empty")

    def _tokenize(self, tokenizer, record: dict, where: str):
        if not record["text"]:
            raise ValueError(f"{where}: empty 'text'; there is nothing to learn from this line")
        prompt = tokenizer.encode(record["prompt"])
        text = tokenizer.encode(record["text"]) + [self.eod_id]
        limit = self.seq_length + 1
        excess = len(prompt) + len(text) - limit
        if excess > 0:
            if self.truncate == "reject":
                raise ValueError(f"{where}: prompt + text + eod is {len(prompt) + len(text)} "
                                 f"tokens, more than seq_length + 1 = {limit}; shorten the pair, "
                                 "raise --seq-length or truncate the prompt from the left")
            if len(text) > limit:
                raise ValueError(f"{where}: the text alone (+ eod) is {len(text)} tokens, more "
                                 f"than seq_length + 1 = {limit}; only prompts are truncated, so "
                                 "shorten the text or raise --seq-length")
            prompt = prompt[excess:]
        return np.array(prompt + text, dtype=np.int64), len(prompt)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, idx: int) -> dict:
        _, i = split_index(idx, len(self.examples))
        tokens, num_prompt = self.examples[i]
        n = len(tokens) - 1
        # Label t is token t+1: it is text (or the eod) from label index num_prompt - 1 on.
        loss_mask = np.zeros(self.seq_length, dtype=np.float32)
        loss_mask[max(num_prompt - 1, 0):n] = 1.0
        sample = {
            "input_ids": pad_to(tokens[:-1], self.seq_length, self.pad_id, "input"),
            "labels": pad_to(tokens[1:], self.seq_length, self.pad_id, "labels"),
            "loss_mask": loss_mask,
            "position_ids": np.arange(self.seq_length, dtype=np.int64),
        }
        if self.return_source:
            sample["source_ids"] = tokens
        return to_tensors(sample)
