"""Corpus readers: stream documents out of jsonl / plain text / gzip files, one line at a time.

Formats, chosen by suffix (a trailing `.gz` is decompressed on the fly):
- `.jsonl`, `.json`, `.ndjson`: one JSON object per line; each key of `json_keys` holds one
  document (Megatron's `--json-keys`: several keys give several parallel document streams).
- anything else: plain text, one document per line, or with `blank_line_docs=True` paragraphs
  separated by blank lines, the lines of a paragraph joined with "\\n".

Blank lines are separators, never documents. Every document carries its file and 1-based line so
an error later in the pipeline (e.g. a document that cleaning leaves empty) can still name them.
Bad input raises `DataError`, or with `skip_bad_lines=True` is skipped and counted in a
`BadLineCounter`.
"""
from __future__ import annotations

import collections
import dataclasses
import gzip
import itertools
import json
import os
import zlib
from typing import Iterable, Iterator, Sequence

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
SKIP_HINT = "or pass --skip-bad-lines to skip and count such lines"


class DataError(ValueError):
    """Bad input data; the message names the file, line (and key) and what to do."""


@dataclasses.dataclass
class Document:
    text: str
    path: str
    line: int
    key: str | None = None  # the JSON key it came from; None for plain text


class BadLineCounter:
    """Counts what `skip_bad_lines` skipped, by reason, keeping the first few messages."""

    def __init__(self, keep: int = 5):
        self.by_reason: collections.Counter = collections.Counter()
        self.examples: list[str] = []
        self.keep = keep

    def add(self, reason: str, message: str) -> None:
        self.by_reason[reason] += 1
        if len(self.examples) < self.keep:
            self.examples.append(message)

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def summary(self) -> str:
        if not self.total:
            return "bad lines skipped: 0"
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.by_reason.items()))
        lines = [f"bad lines skipped: {self.total} ({reasons})"]
        lines += [f"  e.g. {m}" for m in self.examples]
        return "\n".join(lines)


def is_jsonl(path: str) -> bool:
    name = path[:-3] if path.endswith(".gz") else path
    return name.endswith(JSON_SUFFIXES)


def raw_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes without the line ending), streamed; gzip errors name the file."""
    for first, lines in raw_line_blocks(path, 1024):
        for n, raw in enumerate(lines, start=first):
            yield n, raw.rstrip(b"\r\n")


def raw_line_blocks(path: str, n: int,
                    strip_bom: bool = True) -> Iterator[tuple[int, list[bytes]]]:
    """(number of the first line, the next `n` lines *with* their line endings), streamed: a
    block is read at C speed, so preprocessing's main process stays light and its workers strip
    and parse the lines. gzip errors name the file. With `strip_bom=False` a block's offset in
    the file is the sum of the previous blocks' lengths, where `read_line_block` reads it again
    (uncompressed files)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file; check the --input path")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            first = 1
            while True:
                lines = list(itertools.islice(f, n))
                if not lines:
                    return
                if strip_bom and first == 1 and lines[0].startswith(b"\xef\xbb\xbf"):
                    lines[0] = lines[0][3:]  # UTF-8 byte order mark, as Windows editors write it
                yield first, lines
                first += len(lines)
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}: cannot read the gzip stream ({e}); the file is truncated or not "
                        f"gzip: recompress it or drop the .gz suffix") from e


def line_ranges(path: str, n: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of consecutive blocks of whole lines that cover an uncompressed file, for
    `read_line_block`: the first `n` lines, then blocks of about as many bytes, each ending at
    the first line end past that size. Only the first block is read (and a line per block):
    preprocessing's main process finds blocks for its workers without reading the file, and
    whoever reads a block counts its lines."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file; check the --input path")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        target = sum(map(len, itertools.islice(f, n)))
        offset = 0
        while offset < size:
            f.seek(offset + target - 1)  # the block's last byte if it ends a line
            f.readline()
            end = min(f.tell(), size)
            yield offset, end - offset
            offset = end


def read_line_block(path: str, offset: int, length: int) -> list[bytes]:
    """The lines (without endings) of `length` bytes at `offset` of an uncompressed file, a block
    of `line_ranges` (or `raw_line_blocks`): the same bytes `raw_lines` gives, read where they
    are needed."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise DataError(f"{path}: changed while it was read (expected {length} bytes at offset "
                        f"{offset}); do not modify the input during preprocessing")
    if offset == 0 and data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()  # the split's empty tail, not a line
    return [line.rstrip(b"\r") for line in lines]


def _decode(path: str, n: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{n}: invalid UTF-8 at byte {e.start} of the line; convert the "
                        f"file to UTF-8 (e.g. `iconv -f GBK -t UTF-8`), {SKIP_HINT}") from None


def jsonl_line_documents(path: str, n: int, raw: bytes, json_keys: Sequence[str],
                         bad) -> list[Document]:
    """The documents of one jsonl line (`raw` without its line ending); a bad line goes to
    `bad(reason, DataError)` and gives none. Preprocessing workers parse lines with this."""
    if not raw.strip():
        return []
    try:
        line = _decode(path, n, raw)
    except DataError as e:
        bad("invalid UTF-8", e)
        return []
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        bad("malformed JSON", DataError(
            f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno}); fix the line, "
            f"{SKIP_HINT}"))
        return []
    if not isinstance(obj, dict):
        bad("malformed JSON", DataError(
            f"{path}:{n}: expected a JSON object like {{\"{json_keys[0]}\": \"...\"}}, got "
            f"{type(obj).__name__}; fix the line, {SKIP_HINT}"))
        return []
    # A line with a missing or empty key is bad as a whole: dropping only that key would
    # misalign the parallel per-key streams.
    docs = []
    for key in json_keys:
        if key not in obj:
            bad("missing key", DataError(
                f"{path}:{n}: missing key {key!r} (the line has {sorted(obj)}); choose the key "
                f"with --json-keys, {SKIP_HINT}"))
            return []
        value = obj[key]
        if not isinstance(value, str):
            bad("non-string value", DataError(
                f"{path}:{n}: key {key!r} holds {type(value).__name__}, expected a string; fix "
                f"the line, {SKIP_HINT}"))
            return []
        if not value.strip():
            bad("empty document", DataError(
                f"{path}:{n}: key {key!r} holds an empty document; remove the line, "
                f"{SKIP_HINT}"))
            return []
        docs.append(Document(value, path, n, key))
    return docs


def _jsonl_documents(path: str, json_keys: Sequence[str], bad) -> Iterator[Document]:
    for n, raw in raw_lines(path):
        yield from jsonl_line_documents(path, n, raw, json_keys, bad)


def text_documents(path: str, blank_line_docs: bool, bad) -> Iterator[Document]:
    para: list[str] = []
    start = 0
    for n, raw in raw_lines(path):
        try:
            line = _decode(path, n, raw)
        except DataError as e:
            bad("invalid UTF-8", e)
            continue
        if not line.strip():
            if para:
                yield Document("\n".join(para), path, start)
                para = []
            continue
        if not blank_line_docs:
            yield Document(line, path, n)
        else:
            if not para:
                start = n
            para.append(line)
    if para:
        yield Document("\n".join(para), path, start)


def read_documents(paths: str | Iterable[str], json_keys: Sequence[str] = ("text",),
                   blank_line_docs: bool = False, skip_bad_lines: bool = False,
                   counter: BadLineCounter | None = None) -> Iterator[Document]:
    """Yield every document of `paths` in order. Raises `DataError` on bad input (unless
    `skip_bad_lines`, which counts it in `counter`) and, once exhausted, if there was none."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise DataError("no input files given; pass at least one --input")
    json_keys = list(json_keys)
    if not json_keys:
        raise DataError("json_keys is empty; pass e.g. --json-keys text")
    counter = counter if counter is not None else BadLineCounter()

    def bad(reason: str, error: DataError) -> None:
        if not skip_bad_lines:
            raise error
        counter.add(reason, str(error))

    found = 0
    for path in paths:
        docs = (_jsonl_documents(path, json_keys, bad) if is_jsonl(path)
                else text_documents(path, blank_line_docs, bad))
        for doc in docs:
            found += 1
            yield doc
    if not found:
        raise empty_corpus_error(paths, json_keys, counter)


def empty_corpus_error(paths: Sequence[str], json_keys: Sequence[str],
                       counter: BadLineCounter) -> DataError:
    what = f"key(s) {list(json_keys)} of " if any(is_jsonl(p) for p in paths) else ""
    skipped = f" ({counter.total} bad lines skipped)" if counter.total else ""
    return DataError(f"empty corpus: no documents in {what}{', '.join(paths)}{skipped}; check "
                     f"the input files and --json-keys")
