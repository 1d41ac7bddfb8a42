"""Weighted blends of corpora, in Megatron's form: `--train-data-prefix 0.3 PREFIX_A 0.7 PREFIX_B`.

A data prefix is either one indexed-dataset prefix (unchanged behaviour) or WEIGHT PREFIX pairs.
`build_datasets` turns a blend into data by calling the model's own `build_data` once per corpus
(with that corpus as a single prefix) and blending what it returns, so every objective read from
indexed prefixes blends without knowing about it:

- map-style datasets -> `BlendedDataset`: sample n of the blend is the next sample of the corpus
  `BlendingIndex` assigns to position n, each corpus walked in its own shuffled epochs. Its order
  is the training order (`ordered`), so the trainer's sampler does not reshuffle it and a resume
  from consumed samples is exact;
- `BatchStream`s -> the stream class's own `blend` (XLStreamBatcher: whole stream rows are
  assigned to corpora in proportion, so documents never mix inside a stream).

The blending index is deterministic: after n samples each corpus's count is within 1 of
weight x n. Megatron's greedy "largest deficit" rule can miss that bound with three or more
corpora (1.18 seen with 8), so the index is Tijdeman's earliest-deadline rule ("The chairman
assignment problem", 1980), which keeps every count within 1 - 1/(2k - 2) of weight x n for k
corpora.
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from megatron_lite.data.contract import Datasets, is_stream
from megatron_lite.data.objectives import shuffle_rng

_FORM = "PREFIX, or WEIGHT PREFIX pairs such as '0.3 data/a 0.7 data/b'"


def _where(key: str) -> str:
    return f"--{key.replace('_', '-')} / data.{key}"


def parse_blend(value: str | None, key: str) -> list[tuple[float, str]] | None:
    """[(normalised weight, prefix), ...] of a blend; None for no prefix or a single plain one.
    ValueError (one line naming `key`) for weights that do not parse, are negative or all zero."""
    if value is None:
        return None
    words = value.split()
    # A plain prefix (even one with spaces in its path), or none for the model to refuse.
    if len(words) <= 1 or os.path.isfile(value + ".idx"):
        return None
    if len(words) % 2:
        raise ValueError(f"{_where(key)}: {value!r} has {len(words)} words, not WEIGHT PREFIX "
                         f"pairs; give {_FORM}")
    pairs = []
    for i in range(0, len(words), 2):
        word, prefix = words[i], words[i + 1]
        try:
            weight = float(word)
        except ValueError:
            raise ValueError(f"{_where(key)}: weight {word!r} (before {prefix!r}) does not parse "
                             f"as a number; give {_FORM}") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{_where(key)}: weight {word} of {prefix!r} must be a finite "
                             f"number >= 0")
        pairs.append((weight, prefix))
    total = sum(w for w, _ in pairs)
    if total <= 0:
        raise ValueError(f"{_where(key)}: every weight is zero; give at least one corpus a "
                         f"positive weight")
    return [(w / total, p) for w, p in pairs]


class BlendingIndex:
    """Which corpus each blended position n = 0, 1, ... comes from, and its count within it.

    Built lazily up to the furthest position asked for (about 2-3 M positions/s), one byte per
    position plus the counts at every BLOCK-th position."""

    BLOCK = 4096

    def __init__(self, weights):
        self.weights = [float(w) for w in weights]
        if not 1 <= len(self.weights) <= 255:
            raise ValueError(f"a blend has 1 to 255 corpora, got {len(self.weights)}")
        k = len(self.weights)
        self._eps = 1.0 / (2 * k - 2) if k > 1 else 0.0
        self._owner = bytearray()
        self._counts = [0] * k                       # at position len(self._owner)
        self._snapshots = np.zeros((0, k), np.int64)  # counts at every BLOCK-th position

    def _grow(self, n: int) -> None:
        if n <= len(self._owner):
            return
        block = self.BLOCK
        target = -(-max(n, 2 * len(self._owner)) // block) * block
        w, counts, eps, corpora = self.weights, self._counts, self._eps, range(len(self.weights))
        owner, snaps = self._owner, []
        for position in range(len(owner), target):
            if position % block == 0:
                snaps.append(list(counts))
            t = position + 1
            # Earliest deadline among the corpora whose count may grow: the count stays within
            # (-1 + eps, 1 - eps) of weight x t (Tijdeman), and ties go to the first corpus.
            best, chosen = math.inf, 0
            for c in corpora:
                if w[c] * t - counts[c] >= eps:
                    deadline = (counts[c] + 1 - eps) / w[c]
                    if deadline < best:
                        best, chosen = deadline, c
            counts[chosen] += 1
            owner.append(chosen)
        self._snapshots = np.concatenate([self._snapshots, np.array(snaps, np.int64)])

    def owners(self, start: int, stop: int) -> np.ndarray:
        """Corpus of each position in [start, stop)."""
        self._grow(stop)
        # Slicing the bytearray copies: a view would pin it and stop it from growing.
        return np.frombuffer(self._owner[start:stop], np.uint8)

    def counts(self, n: int) -> np.ndarray:
        """Samples each corpus has given after the first n positions."""
        self._grow(n + 1)
        block = n // self.BLOCK
        tail = np.frombuffer(self._owner[block * self.BLOCK:n], np.uint8)
        return self._snapshots[block] + np.bincount(tail, minlength=len(self.weights))

    def locate(self, n: int) -> tuple[int, int]:
        """(corpus, index of the sample within that corpus) of position n."""
        self._grow(n + 1)
        corpus = self._owner[n]
        return corpus, int(self.counts(n)[corpus])


def corpus_names(prefixes) -> list[str]:
    """Distinct names for logs: the prefixes' file names, else the whole prefixes, else those
    numbered (one prefix given twice)."""
    for names in ([os.path.basename(os.path.normpath(p)) or p for p in prefixes], list(prefixes)):
        if len(set(names)) == len(names):
            return names
    return [f"{p}#{i}" for i, p in enumerate(prefixes)]


class BlendedDataset:
    """A map-style blend of map-style datasets (each taking any global index >= 0, as every
    objective does). Position n is sample k of corpus c (`BlendingIndex.locate`); corpus c's
    samples go in epochs of len(part), each epoch in an order shuffled with (seed, epoch, c)."""

    ordered = True
    """Its indices are already the training order: the trainer's sampler must not shuffle them
    (that would break the per-position blend), it walks 0, 1, 2, ..."""

    def __init__(self, parts, weights, names, seed: int):
        self.parts, self.names, self.seed = list(parts), list(names), int(seed)
        self.lengths = [len(p) for p in self.parts]
        for name, n, w in zip(self.names, self.lengths, weights):
            if n < 1 and w > 0:
                raise ValueError(f"corpus {name} of the blend yields no samples; drop it or "
                                 "give it more data")
        self.index = BlendingIndex(weights)
        self._perm: dict[int, tuple[int, np.ndarray]] = {}  # corpus -> (epoch, order)

    def __len__(self) -> int:
        # A nominal epoch (the sampler needs one); the blend itself never repeats.
        return max(1, sum(self.lengths))

    def __getitem__(self, n: int):
        corpus, k = self.index.locate(int(n))
        length = self.lengths[corpus]
        epoch, offset = divmod(k, length)
        cached = self._perm.get(corpus)
        if cached is None or cached[0] != epoch:
            order = shuffle_rng(self.seed, epoch, f"blend corpus {corpus}").permutation(length)
            self._perm[corpus] = cached = (epoch, order)
        return self.parts[corpus][epoch * length + int(cached[1][offset])]

    def corpus_epochs(self, consumed_samples: int) -> dict[str, float]:
        """Epochs each corpus has gone through after `consumed_samples` positions."""
        counts = self.index.counts(int(consumed_samples))
        return {name: float(c) / n for name, c, n in zip(self.names, counts, self.lengths)}

    def describe(self) -> str:
        return ", ".join(f"{w:.4g} x {name} ({n} samples per epoch)"
                         for w, name, n in zip(self.index.weights, self.names, self.lengths))


def check_same_tokenizer(prefixes, key: str) -> None:
    """Every corpus of a blend must be tokenized alike (their indexes record the hash)."""
    from megatron_lite.data.indexed_dataset import IndexedDataset
    first = None
    for prefix in prefixes:
        try:
            ds = IndexedDataset(prefix)
        except ValueError as e:  # a missing or broken prefix names its file and the fix
            raise ValueError(f"{_where(key)}: {e}") from None
        if first is None:
            first = ds
        elif ds.tokenizer_hash != first.tokenizer_hash:
            def made_by(d):  # the index records where its tokenizer was loaded from
                return f"{d.tokenizer_hash} ({d.header.get('tokenizer') or 'path not recorded'})"
            raise ValueError(
                f"{_where(key)}: {prefix} was built with tokenizer {made_by(ds)} but "
                f"{first.prefix} with {made_by(first)}; a blend needs one tokenizer: rebuild "
                f"one with tools/preprocess_data.py --tokenizer")


def _blend(parts, blend, seed: int, key: str):
    weights = [w for w, _ in blend]
    names = corpus_names([p for _, p in blend])
    if all(is_stream(p) for p in parts):
        combine = getattr(type(parts[0]), "blend", None)
        if combine is None:
            raise ValueError(f"{_where(key)}: this model's data is a {type(parts[0]).__name__} "
                             f"stream, which has no `blend`; give a single prefix")
        return combine(parts, weights, names)
    return BlendedDataset(parts, weights, names, seed)


def build_datasets(build_data, run, tokenizer, config, ps) -> Datasets:
    """A model's `build_data(run, tokenizer, config, ps)` over blended prefixes: called as it
    is for single prefixes, else once per corpus, and the corpora blended."""
    data = run.data
    train_blend = parse_blend(data.train_data_prefix, "train_data_prefix")
    valid_blend = parse_blend(data.valid_data_prefix, "valid_data_prefix")
    if train_blend is None and valid_blend is None:
        return build_data(run, tokenizer, config, ps)
    if data.finetune_data:
        raise ValueError("a weighted --train-data-prefix / --valid-data-prefix blends "
                         "pretraining corpora; it does not apply with --finetune-data")

    def one(train_prefix, valid_prefix) -> Datasets:
        d = dataclasses.replace(data, train_data_prefix=train_prefix,
                                valid_data_prefix=valid_prefix)
        return build_data(dataclasses.replace(run, data=d), tokenizer, config, ps)

    seed = run.training.seed
    for blend, key in ((train_blend, "train_data_prefix"), (valid_blend, "valid_data_prefix")):
        if blend is not None:
            check_same_tokenizer([p for _, p in blend], key)
    if train_blend is None:
        first_train = data.train_data_prefix
        train = one(first_train, None).train
    else:
        first_train = train_blend[0][1]
        train = _blend([one(p, None).train for _, p in train_blend], train_blend, seed,
                       "train_data_prefix")
    if valid_blend is None:
        valid = one(first_train, data.valid_data_prefix).valid if data.valid_data_prefix \
            else None
    else:
        valid = _blend([one(first_train, p).valid for _, p in valid_blend], valid_blend, seed,
                       "valid_data_prefix")
    return Datasets(train=train, valid=valid)
