"""Chinese word segmentation for whole-word masking: jieba's dictionary and algorithm.

rjieba (the jieba-rs binding) runs the same dictionary and the same DAG + HMM algorithm about 19x
faster, so it is used when installed; jieba itself is the fallback, and the only choice when a user
dictionary is given (rjieba's Python binding cannot load one). tests/data/test_segmentation.py
checks that both give the same boundaries on the sample corpus.

Word boundaries are computed once at preprocessing time (tools/preprocess_data.py
--word-boundaries) and stored beside the tokens, so training never runs jieba.
"""
from __future__ import annotations

import importlib.util
import logging

import numpy as np

BACKENDS = ("auto", "rjieba", "jieba")


class Segmenter:
    """`segment(text)` -> words whose concatenation is `text` (whitespace included)."""

    def __init__(self, backend: str = "auto", user_dict: str | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown segmentation backend {backend!r}; choose one of {BACKENDS}")
        if backend == "auto":
            has_rjieba = importlib.util.find_spec("rjieba") is not None
            backend = "rjieba" if has_rjieba and user_dict is None else "jieba"
        if backend == "rjieba" and user_dict is not None:
            raise ValueError("rjieba cannot load a user dictionary; use backend='jieba' (or "
                             "'auto', which picks jieba when a user dictionary is given)")
        self.backend = backend
        self.user_dict = user_dict
        if backend == "rjieba":
            try:
                import rjieba
            except ImportError as e:
                raise ImportError("backend 'rjieba' needs `pip install rjieba`; or use "
                                  "backend='jieba'") from e
            self._cut = rjieba.Jieba().cut
        else:
            import jieba
            jieba.setLogLevel(logging.WARNING)  # silence "Building prefix dict..." on every worker
            tk = jieba.Tokenizer()
            if user_dict is not None:
                tk.load_userdict(user_dict)
            self._cut = lambda text: list(tk.cut(text, HMM=True))

    def segment(self, text: str) -> list[str]:
        return list(self._cut(text))

    def word_lengths(self, text: str) -> list[int]:
        """Lengths of `segment(text)`'s words, in characters; they add up to len(text)."""
        words = self._cut(text)
        if "".join(words) != text:
            raise RuntimeError(f"{self.backend} segmentation does not reproduce the text "
                               f"{text[:40]!r}...; word starts would be misaligned")
        return list(map(len, words))

    def word_start_mask(self, text: str, tokenizer) -> np.ndarray:
        """One flag per token of `tokenizer.encode(text)`: True where a word starts. Needs a
        character-level tokenizer, whose tokens are exactly the characters of the text."""
        if not getattr(tokenizer, "is_char_level", False):
            raise ValueError(f"word boundaries need a character-level tokenizer (one token per "
                             f"character); {type(tokenizer).__name__} is not: train one with "
                             f"tools/train_tokenizer.py --type char, or drop --word-boundaries")
        return starts_mask(self.word_lengths(text), len(text))


def starts_mask(lengths, total: int) -> np.ndarray:
    """Flags over `total` characters, True where one of the consecutive words of `lengths`
    (empty words allowed) starts. Several documents' words may be given at once."""
    lengths = np.asarray(lengths, dtype=np.int64)
    mask = np.zeros(total, dtype=np.bool_)
    starts = np.cumsum(lengths) - lengths
    mask[starts[lengths > 0]] = True
    return mask


_DEFAULT: dict[tuple, Segmenter] = {}


def _default(backend: str = "auto", user_dict: str | None = None) -> Segmenter:
    key = (backend, user_dict)
    if key not in _DEFAULT:
        _DEFAULT[key] = Segmenter(backend, user_dict)
    return _DEFAULT[key]


def segment(text: str, backend: str = "auto", user_dict: str | None = None) -> list[str]:
    return _default(backend, user_dict).segment(text)


def word_start_mask(text: str, tokenizer, backend: str = "auto",
                    user_dict: str | None = None) -> np.ndarray:
    return _default(backend, user_dict).word_start_mask(text, tokenizer)
