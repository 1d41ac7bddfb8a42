"""Shared fixtures of the data tests.

- `sample_data` (session, in tests/conftest.py so every test directory shares one build): the
  real pipeline on the sample corpus. Objectives' acceptance tests run on it.
- `ListDataset`: an in-memory stand-in for IndexedDataset (a list of arrays) for synthetic
  statistics and edge cases, where real text is not the point.
"""
from __future__ import annotations

import numpy as np

from megatron_lite.data.tokenizer import CharTokenizer


class ListDataset:
    """The read side of IndexedDataset over in-memory documents."""

    def __init__(self, docs, word_starts=None, tokenizer_hash=None, prefix="<list>"):
        self.docs = [np.asarray(d, dtype=np.int64) for d in docs]
        self.sizes = np.array([len(d) for d in self.docs], dtype=np.int64)
        self._word_starts = (None if word_starts is None
                             else [np.asarray(w, dtype=bool) for w in word_starts])
        self.tokenizer_hash = tokenizer_hash
        self.prefix = prefix

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, i):
        return self.docs[i]

    def get(self, i, offset=0, length=None):
        end = len(self.docs[i]) if length is None else offset + length
        return self.docs[i][offset:end]

    @property
    def has_word_starts(self):
        return self._word_starts is not None

    def word_starts(self, i):
        if self._word_starts is None:
            raise ValueError("no word starts")
        return self._word_starts[i]


def tiny_char_tokenizer(preset="linglong", num_sentinels=None) -> CharTokenizer:
    """A char tokenizer over a few hundred CJK characters, for synthetic tests."""
    chars = [chr(0x4E00 + i) for i in range(300)]
    return CharTokenizer.train(["".join(chars)], preset=preset, num_sentinels=num_sentinels)


def random_docs(rng, lengths, tokenizer):
    """Documents of ordinary (non-special) token ids with the given lengths."""
    pool = np.array(sorted(set(range(tokenizer.vocab_size)) - tokenizer.special_ids()))
    return [pool[rng.integers(0, len(pool), size=int(n))] for n in lengths]
