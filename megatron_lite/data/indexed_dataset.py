"""Memory-mapped token datasets: `P.bin` (all tokens back to back), `P.idx` (header + document
offsets) and optionally `P.ws` (one byte per token: 1 where a jieba word starts).

`P.idx` layout (little endian):
    8 bytes   magic b"MLTIDX\\x00\\x01"
    8 bytes   uint64 header length H
    H bytes   UTF-8 JSON: version, dtype, vocab_size, tokenizer_hash, num_docs, num_tokens,
              has_word_starts, tokenizer (where it was loaded from, for messages only)
    padding   to a multiple of 8
    8*(D+1)   int64 token offsets of the D documents (first 0, last num_tokens)
Token dtype: uint16 when every id fits (vocab_size <= 65,536), else uint32.

Writers put every file under a temporary name and rename at the end, the index last, so a failed
or interrupted run never leaves a dataset that looks complete.
"""
from __future__ import annotations

import json
import os
import struct
import uuid
from typing import Iterable

import numpy as np

MAGIC = b"MLTIDX\x00\x01"
VERSION = 1
_FIX = "rerun tools/preprocess_data.py to rebuild it"


class DatasetError(ValueError):
    """A missing, truncated or inconsistent dataset; the message names the file and the fix."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def dataset_paths(prefix: str) -> dict[str, str]:
    prefix = os.fspath(prefix)
    return {"bin": prefix + ".bin", "idx": prefix + ".idx", "ws": prefix + ".ws"}


def dataset_exists(prefix: str) -> bool:
    return os.path.isfile(dataset_paths(prefix)["idx"])


def check_documents(tokens: np.ndarray, sizes: np.ndarray, word_starts, vocab_size: int,
                    with_word_starts: bool, where: str) -> None:
    """Raise ValueError unless `tokens` (1-D integers below `vocab_size`) split into non-empty
    documents of `sizes` and `word_starts` is there exactly when `with_word_starts`, one flag per
    token. `where` starts the message."""
    if tokens.ndim != 1 or (sizes <= 0).any() or int(sizes.sum()) != tokens.size:
        raise ValueError(f"{where}: {tokens.size} tokens do not split into non-empty "
                         f"documents of sizes {sizes.tolist()}")
    if tokens.dtype.kind not in "iu":
        raise ValueError(f"{where}: token ids must be integers, got {tokens.dtype}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{where}: token id {lo if lo < 0 else hi} is outside the vocabulary "
                         f"(size {vocab_size}); was it tokenized with another tokenizer?")
    if with_word_starts:
        if word_starts is None:
            raise ValueError(f"{where}: this builder stores word starts, so every document "
                             f"needs them")
        if np.shape(word_starts) != tokens.shape:
            raise ValueError(f"{where}: {np.size(word_starts)} word-start flags for "
                             f"{tokens.size} tokens")
    elif word_starts is not None:
        raise ValueError(f"{where}: word starts given, but the builder was created with "
                         f"with_word_starts=False")


def write_document_files(stem: str, tokens: np.ndarray, sizes, word_starts, vocab_size: int,
                         with_word_starts: bool) -> tuple[str, str | None]:
    """Check documents as `add_documents` does and write them, in the dataset's byte layout, at
    the start of `stem.bin` (and `stem.ws`), for `IndexedDatasetBuilder.add_document_files` in
    another process; returns the paths. Existing files are overwritten but not truncated: bytes
    past the documents' may be left from earlier use (reusing the files is cheaper than
    freeing and allocating their pages)."""
    tokens, sizes = np.asarray(tokens), np.asarray(sizes, dtype=np.int64)
    check_documents(tokens, sizes, word_starts, vocab_size, with_word_starts, stem)
    paths = stem + ".bin", (stem + ".ws" if with_word_starts else None)
    arrays = [np.ascontiguousarray(tokens, dtype=dtype_for_vocab(vocab_size))]
    if with_word_starts:
        arrays.append(np.ascontiguousarray(word_starts, dtype=np.uint8))
    for path, array in zip(paths, arrays):
        with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644), "wb") as f:  # no O_TRUNC
            array.tofile(f)
    return paths


def _append_file(dst, src_path: str, nbytes: int, where: str) -> None:
    """Append the first `nbytes` bytes of file `src_path` to the open binary file `dst`."""
    with open(src_path, "rb") as src:
        size = os.fstat(src.fileno()).st_size
        if size < nbytes:
            raise ValueError(f"{where}: {src_path} holds {size} bytes, expected {nbytes}")
        dst.flush()
        left = nbytes
        try:
            # In-kernel copy: no pass through this process's memory.
            while left:
                done = os.copy_file_range(src.fileno(), dst.fileno(), left, nbytes - left)
                if done == 0:
                    raise OSError(f"{src_path}: copy_file_range stopped {left} bytes short")
                left -= done
        except (AttributeError, OSError):
            if left != nbytes:  # part copied: an I/O error, not a missing system call
                raise
            while left:  # e.g. another file system, or no copy_file_range on this OS
                block = src.read(min(left, 1 << 22))
                if not block:
                    raise ValueError(f"{where}: {src_path} ended {left} bytes short") from None
                dst.write(block)
                left -= len(block)
        else:
            dst.seek(0, os.SEEK_END)  # the buffered writer's idea of its position


class IndexedDatasetBuilder:
    """Append documents, then `finalize()`. As a context manager, an exception removes every
    temporary file and nothing appears under the final names."""

    def __init__(self, prefix: str, vocab_size: int, tokenizer_hash: str,
                 with_word_starts: bool = False, tokenizer: str | None = None):
        if vocab_size <= 0 or vocab_size > 2 ** 32:
            raise ValueError(f"vocab_size must be in 1..2**32, got {vocab_size}")
        self.prefix = os.fspath(prefix)
        self.vocab_size = int(vocab_size)
        self.tokenizer_hash = tokenizer_hash
        self.tokenizer = tokenizer
        self.with_word_starts = with_word_starts
        self.dtype = dtype_for_vocab(vocab_size)
        self.offsets = [0]
        self._final = dataset_paths(self.prefix)
        tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._tmp = {k: v + tag for k, v in self._final.items()}
        directory = os.path.dirname(self.prefix)
        if directory:
            os.makedirs(directory, exist_ok=True)
        self._bin = open(self._tmp["bin"], "wb")
        self._ws = open(self._tmp["ws"], "wb") if with_word_starts else None
        self._done = False

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    def add_document(self, tokens, word_starts=None) -> None:
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or tokens.size == 0:
            raise ValueError(f"document {self.num_docs} of {self.prefix}: expected a non-empty 1-D "
                             f"token array, got shape {tokens.shape}")
        self.add_documents(tokens, [tokens.size], word_starts)

    def add_documents(self, tokens: np.ndarray, sizes, word_starts=None) -> None:
        """Append several documents at once: `tokens` back to back, `sizes` tokens each; the same
        files as `add_document` per document, with one write per file (preprocessing's chunks)."""
        tokens, sizes = np.asarray(tokens), np.asarray(sizes, dtype=np.int64)
        if sizes.size == 0:
            return
        check_documents(tokens, sizes, word_starts, self.vocab_size, self.with_word_starts,
                        self._where(sizes.size))
        if self.with_word_starts:
            self._ws.write(np.ascontiguousarray(word_starts, dtype=np.uint8))
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype))
        self.offsets.extend((self.offsets[-1] + np.cumsum(sizes)).tolist())

    def add_document_files(self, sizes, bin_path: str, ws_path: str | None = None) -> None:
        """Append documents stored at the start of files in the dataset's byte layout (a
        preprocessing worker's chunk from `write_document_files`, or a whole dataset being
        merged): their bytes are copied file to file, in the kernel where it can, so the process
        that builds the dataset never loads the tokens. The files are left in place."""
        sizes = np.asarray(sizes, dtype=np.int64)
        if sizes.size == 0:
            return
        where = self._where(sizes.size)
        if sizes.ndim != 1 or (sizes <= 0).any():
            raise ValueError(f"{where}: document sizes must be positive, got {sizes.tolist()}")
        if (ws_path is not None) != self.with_word_starts:
            raise ValueError(f"{where}: word-start file {'given' if ws_path else 'missing'}, but "
                             f"the builder has with_word_starts={self.with_word_starts}")
        n = int(sizes.sum())
        _append_file(self._bin, bin_path, n * self.dtype.itemsize, where)
        if ws_path is not None:
            _append_file(self._ws, ws_path, n, where)
        self.offsets.extend((self.offsets[-1] + np.cumsum(sizes)).tolist())

    def _where(self, n: int) -> str:
        return (f"document {self.num_docs}" if n == 1
                else f"documents {self.num_docs}..{self.num_docs + n - 1}") + f" of {self.prefix}"

    def finalize(self) -> None:
        if self._done:
            raise RuntimeError(f"{self.prefix}: finalize() called twice")
        try:
            self._finalize()
        except BaseException:
            self.abort()
            raise

    def _finalize(self) -> None:
        if self.num_docs == 0:
            raise ValueError(f"{self.prefix}: no documents were added; nothing to write")
        self._bin.close()
        if self._ws is not None:
            self._ws.close()
        header = {"version": VERSION, "dtype": self.dtype.name, "vocab_size": self.vocab_size,
                  "tokenizer_hash": self.tokenizer_hash, "tokenizer": self.tokenizer,
                  "num_docs": self.num_docs, "num_tokens": self.offsets[-1],
                  "has_word_starts": self.with_word_starts}
        blob = json.dumps(header, sort_keys=True).encode()
        pad = (-(len(MAGIC) + 8 + len(blob))) % 8
        with open(self._tmp["idx"], "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(blob)) + blob + b"\0" * pad)
            f.write(np.asarray(self.offsets, dtype="<i8").tobytes())
        # A stale .ws from an older dataset under this prefix would be mistaken for ours.
        if not self.with_word_starts and os.path.exists(self._final["ws"]):
            os.remove(self._final["ws"])
        for kind in ("bin", "ws", "idx"):  # the index last: it is what makes a dataset exist
            if kind != "ws" or self.with_word_starts:
                os.replace(self._tmp[kind], self._final[kind])
        self._done = True

    def abort(self) -> None:
        for f in (self._bin, self._ws):
            if f is not None and not f.closed:
                f.close()
        for path in self._tmp.values():
            if os.path.exists(path):
                os.remove(path)
        self._done = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.finalize()
        return False


class IndexedDataset:
    """Read-only view of a dataset; `ds[i]` is a memory-mapped view of document i's tokens."""

    def __init__(self, prefix: str):
        self.prefix = os.fspath(prefix)
        self._open()

    def _open(self) -> None:
        paths = dataset_paths(self.prefix)
        idx = paths["idx"]
        if not os.path.isfile(idx):
            raise DatasetError(f"{idx}: no such index file; build the dataset with "
                               f"tools/preprocess_data.py --output-prefix {self.prefix}")
        with open(idx, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != MAGIC:
                raise DatasetError(f"{idx}: not a megatron_lite index (bad magic); {_FIX}")
            (n,) = struct.unpack("<Q", head[8:])
            try:
                header = json.loads(f.read(n))
            except ValueError:
                raise DatasetError(f"{idx}: corrupt header; {_FIX}") from None
        if header.get("version") != VERSION:
            raise DatasetError(f"{idx}: index version {header.get('version')}, this code reads "
                               f"{VERSION}; {_FIX}")
        self.header = header
        self.vocab_size = int(header["vocab_size"])
        self.tokenizer_hash = header["tokenizer_hash"]
        self.dtype = np.dtype(header["dtype"])
        self.num_tokens = int(header["num_tokens"])
        num_docs = int(header["num_docs"])
        start = 16 + n + (-(16 + n)) % 8
        expected = start + 8 * (num_docs + 1)
        if os.path.getsize(idx) != expected:
            raise DatasetError(f"{idx}: {os.path.getsize(idx)} bytes, expected {expected} for "
                               f"{num_docs} documents (truncated?); {_FIX}")
        self.doc_offsets = np.memmap(idx, dtype="<i8", mode="r", offset=start,
                                     shape=(num_docs + 1,))
        self.sizes = np.diff(self.doc_offsets)
        if self.doc_offsets[0] != 0 or self.doc_offsets[-1] != self.num_tokens \
                or (self.sizes < 0).any():
            raise DatasetError(f"{idx}: document offsets are inconsistent; {_FIX}")
        self._tokens = self._map(paths["bin"], self.dtype, "tokens")
        self.has_word_starts = bool(header["has_word_starts"])
        self._ws = self._map(paths["ws"], np.uint8, "word starts") if self.has_word_starts else None

    def _map(self, path: str, dtype, what: str) -> np.ndarray:
        if not os.path.isfile(path):
            raise DatasetError(f"{path}: missing ({what} of {self.prefix}.idx); {_FIX}")
        want = self.num_tokens * np.dtype(dtype).itemsize
        if os.path.getsize(path) != want:
            raise DatasetError(f"{path}: {os.path.getsize(path)} bytes, expected {want} for "
                               f"{self.num_tokens} {what} (truncated or from another run?); {_FIX}")
        return np.memmap(path, dtype=dtype, mode="r")

    # Memmaps would be pickled by value; DataLoader workers reopen the files instead.
    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.prefix = state["prefix"]
        self._open()

    def __len__(self) -> int:
        return len(self.sizes)

    def _doc(self, i: int) -> int:
        n = len(self.sizes)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for {self.prefix} ({n} documents)")
        return i % n

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `[offset, offset + length)` of document i (to its end when length is None)."""
        i = self._doc(i)
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for document {i} "
                             f"of {self.prefix} ({size} tokens)")
        start = int(self.doc_offsets[i]) + offset
        return self._tokens[start:start + length]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def word_starts(self, i: int) -> np.ndarray:
        if self._ws is None:
            raise DatasetError(f"{self.prefix} has no word boundaries; rebuild it with "
                               f"tools/preprocess_data.py --word-boundaries (character-level "
                               f"tokenizers only)")
        i = self._doc(i)
        start, end = int(self.doc_offsets[i]), int(self.doc_offsets[i + 1])
        return self._ws[start:end].view(np.bool_)

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}, docs={len(self)}, tokens={self.num_tokens}, "
                f"dtype={self.dtype.name})")


def merge_datasets(prefixes: Iterable[str], out_prefix: str) -> IndexedDataset:
    """Concatenate datasets made with the same tokenizer, documents in the order given."""
    datasets = [IndexedDataset(p) for p in prefixes]
    if not datasets:
        raise ValueError("merge_datasets: no input datasets given")
    first = datasets[0]
    for ds in datasets[1:]:
        if ds.tokenizer_hash != first.tokenizer_hash:
            raise DatasetError(f"cannot merge {ds.prefix} (tokenizer {ds.tokenizer_hash}) with "
                               f"{first.prefix} (tokenizer {first.tokenizer_hash}); rebuild them "
                               f"with the same tokenizer")
        if ds.vocab_size != first.vocab_size:
            raise DatasetError(f"cannot merge {ds.prefix} (vocab {ds.vocab_size}) with "
                               f"{first.prefix} (vocab {first.vocab_size})")
        if ds.has_word_starts != first.has_word_starts:
            raise DatasetError(f"cannot merge {ds.prefix} and {first.prefix}: only one has word "
                               f"boundaries; rebuild both with or without --word-boundaries")
    with IndexedDatasetBuilder(out_prefix, first.vocab_size, first.tokenizer_hash,
                               first.has_word_starts, first.header.get("tokenizer")) as builder:
        for ds in datasets:
            paths = dataset_paths(ds.prefix)
            builder.add_document_files(ds.sizes, paths["bin"],
                                       paths["ws"] if ds.has_word_starts else None)
    return IndexedDataset(out_prefix)


def split_by_document(prefix: str, out_prefixes: dict[str, float],
                      seed: int = 1234) -> dict[str, IndexedDataset]:
    """Split documents at random into datasets `{out_prefix: fraction}` (fractions sum to 1).
    Each output keeps its documents in their original order."""
    if not out_prefixes:
        raise ValueError("split_by_document: no outputs given")
    fractions = np.asarray(list(out_prefixes.values()), dtype=np.float64)
    if (fractions < 0).any() or abs(fractions.sum() - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be non-negative and sum to 1, got "
                         f"{dict(out_prefixes)}")
    ds = IndexedDataset(prefix)
    n = len(ds)
    order = np.random.default_rng(seed).permutation(n)
    bounds = np.round(np.cumsum(fractions) * n).astype(np.int64)
    bounds[-1] = n
    starts = np.concatenate([[0], bounds[:-1]])
    for name, a, b in zip(out_prefixes, starts, bounds):
        if b <= a:
            raise ValueError(f"split {name!r} ({out_prefixes[name]}) gets none of the {n} "
                             f"documents of {prefix}; give it a larger fraction or use more data")
    out = {}
    # Build every output before exposing any, so a failure leaves none of them behind.
    builders = []
    try:
        for name, a, b in zip(out_prefixes, starts, bounds):
            builder = IndexedDatasetBuilder(name, ds.vocab_size, ds.tokenizer_hash,
                                            ds.has_word_starts, ds.header.get("tokenizer"))
            builders.append(builder)
            for i in np.sort(order[a:b]):
                builder.add_document(ds[i], ds.word_starts(i) if ds.has_word_starts else None)
        for builder in builders:
            builder.finalize()
    except BaseException:
        for builder in builders:
            if not builder._done:
                builder.abort()
        raise
    for name in out_prefixes:
        out[name] = IndexedDataset(name)
    return out
