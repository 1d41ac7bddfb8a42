#!/usr/bin/env python
"""Tokenize corpora into memory-mapped indexed datasets (P.bin / P.idx [/ P.ws]).

    # tokenize (clean -> tokenize [-> jieba word starts]) with 2 worker processes
    python tools/preprocess_data.py --input data/sample/train.jsonl \\
        --output-prefix runs/data/train --tokenizer runs/tok_char --workers 2 \\
        --append-eod --word-boundaries
    # merge several datasets made with the same tokenizer
    python tools/preprocess_data.py --merge runs/data/a runs/data/b --output-prefix runs/data/ab
    # split one dataset by document into P_train / P_valid / P_test
    python tools/preprocess_data.py --split train=0.98,valid=0.01,test=0.01 --input runs/data/ab \\
        --output-prefix runs/data/ab

With several --json-keys, each key becomes its own dataset `P_<key>` (as Megatron does). The
tokenizer's hash goes into the index, so training with another tokenizer is an error. Output is
written under temporary names and renamed at the end: a failed run leaves nothing behind. The last
line printed is `documents: D, tokens: T, MB/s: X` (MB of input text per second).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import multiprocessing
import multiprocessing.connection
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.data.cleaning import (CleaningOptions, add_cleaning_args,  # noqa: E402
                                         cleaning_options_from_args)
from megatron_lite.data.indexed_dataset import (DatasetError, IndexedDatasetBuilder,  # noqa: E402
                                                dtype_for_vocab, merge_datasets,
                                                split_by_document, write_document_files)
from megatron_lite.data.readers import (SKIP_HINT, BadLineCounter, DataError,  # noqa: E402
                                        empty_corpus_error, is_jsonl, jsonl_line_documents,
                                        line_ranges, raw_line_blocks, read_line_block,
                                        text_documents)
from megatron_lite.data.segmentation import Segmenter, starts_mask  # noqa: E402
from megatron_lite.data.tokenizer import TokenizerError, load_tokenizer  # noqa: E402

# Per-process state of the tokenizing workers (set once by _init_worker, not shipped per task).
_WORKER: dict = {}


def _init_worker(tokenizer_path: str, clean: CleaningOptions, word_boundaries: bool,
                 append_eod: bool, json_keys: list, skip_bad_lines: bool,
                 parts: str | None = None) -> None:
    """`parts`: a directory where pool workers write each task's output (see `_spill`)."""
    tok = load_tokenizer(tokenizer_path)
    dtype = dtype_for_vocab(tok.vocab_size)
    if tok.is_char_level:
        tok.encode_array("", dtype)  # builds its lookup table now, before workers fork
    _WORKER.update(tok=tok, clean=clean, append_eod=append_eod, json_keys=json_keys,
                   skip=skip_bad_lines, segmenter=Segmenter() if word_boundaries else None,
                   dtype=dtype, parts=parts)


def _tasks(args):
    """Work for the workers, in input order: ("range", path, byte offset, length) of a jsonl
    file, ("jsonl", path, first line number, raw lines) of a gzipped one, or ("docs",
    documents, skipped bad lines) of plain text. Workers read and parse jsonl lines themselves,
    so this process only finds blocks of lines. A reader error is yielded (not raised) so it
    surfaces in input order."""
    skipped: list = []  # plain text's bad lines, passed on with the next task: only the main
    # thread counts them, in the order the workers' results arrive

    def bad(reason: str, error: DataError) -> None:
        if not args.skip_bad_lines:
            raise error
        skipped.append((reason, str(error)))

    n = args.chunk_size
    try:
        for path in args.input:
            if is_jsonl(path) and not path.endswith(".gz"):
                # Workers read the lines themselves: only offsets go through the pipe, and this
                # process does not even read the file (the workers count the lines).
                for offset, length in line_ranges(path, n):
                    yield "range", path, offset, length
            elif is_jsonl(path):
                for first, lines in raw_line_blocks(path, n):
                    yield "jsonl", path, first, [line.rstrip(b"\r\n") for line in lines]
            else:
                docs: list = []
                for doc in text_documents(path, args.blank_line_docs, bad):
                    docs.append(doc)
                    if len(docs) == n:
                        yield "docs", docs, skipped[:]
                        docs, skipped[:] = [], []
                if docs or skipped:
                    yield "docs", docs, skipped[:]
                    skipped[:] = []
    except DataError as e:
        yield e


def _encode(task, slot: int | None = None):
    """One task -> (outputs, documents read, input bytes, bad-line events, error, span).

    outputs: key -> (token ids, word starts or None, tokens per document), the documents back
    to back, so the main process writes a task with one call per file; in a pool (`slot`
    given), key -> `_spill`'s (tokens per document, file of ids, file of word starts or None)
    instead. Events (reason, message) and the error (the first bad line when not skipping) keep
    input order. A "range" task does not know where in its file it starts: its messages number
    lines from 1 at the range's start, and span, (path, byte offset, lines read) of a range
    task else None, lets the main process, which takes results in order, renumber them."""
    if isinstance(task, DataError):
        return {}, 0, 0, [], task, None
    w = _WORKER
    tok, clean, skip = w["tok"], w["clean"], w["skip"]
    events: list = task[2] if task[0] == "docs" else []

    def bad(reason: str, error: DataError) -> None:
        if not skip:
            raise error
        events.append((reason, str(error)))

    texts: dict = {}  # output key -> cleaned non-empty texts (ids, if not char-level)
    found = nbytes = 0
    span = None
    try:
        if task[0] == "docs":
            docs = task[1]
        else:
            if task[0] == "range":
                path, first, lines = task[1], 1, read_line_block(*task[1:])
                span = path, task[2], len(lines)
            else:
                _, path, first, lines = task
            keys = w["json_keys"]
            docs = (doc for i, raw in enumerate(lines)
                    for doc in jsonl_line_documents(path, first + i, raw, keys, bad))
        for doc in docs:
            found += 1
            nbytes += len(doc.text.encode("utf-8"))
            text = clean(doc.text)
            if text and not tok.is_char_level:
                text = tok.encode(text)  # the ids stand in for the text from here on
            if not text:
                key = doc.key
                bad("empty after cleaning", DataError(
                    f"{doc.path}:{doc.line}" + (f" (key {key!r})" if key else "")
                    + f": the document is empty after cleaning/tokenization; remove it, "
                    f"{SKIP_HINT}"))
                continue
            # Plain-text documents have no key: they go to the only output.
            texts.setdefault(doc.key if doc.key is not None else w["json_keys"][0],
                             []).append(text)
    except DataError as e:
        return {}, found, nbytes, events, e, span
    outputs = {key: _encode_texts(docs) for key, docs in texts.items()}
    if slot is not None:
        outputs = {key: _spill(slot, key, *out) for key, out in outputs.items()}
    return outputs, found, nbytes, events, None, span


def _renumber(message: str, path: str, before: int) -> str:
    """A "range" task's message with its leading `path:line` (counted from the range's start)
    made absolute: `before` lines of the file precede the range. Other messages are kept."""
    match = re.match(re.escape(path) + r":(\d+)", message) if before else None
    if match is None:
        return message
    return f"{path}:{int(match[1]) + before}{message[match.end():]}"


def _spill(slot: int, key: str, ids, ws, sizes):
    """Write a task's arrays to the files of its slot in the parts directory, for the main
    process to append in the kernel: megabytes pickled back through a pipe cost the main
    process CPU that the workers need, and made them wait on the pipe. A slot's files are
    reused, overwritten from the start (never truncated or removed: cheaper), once the main
    process has appended the slot's previous task."""
    w = _WORKER
    stem = os.path.join(w["parts"], f"{slot}-{w['json_keys'].index(key)}")
    bin_path, ws_path = write_document_files(stem, ids, sizes, ws, w["tok"].vocab_size,
                                             ws is not None)
    return sizes, bin_path, ws_path


def _encode_texts(texts: list):
    """Token ids (and word starts) of several documents, back to back, and their sizes.
    `texts`: the documents' texts for a char tokenizer, else their token id lists."""
    w = _WORKER
    tok, dtype = w["tok"], w["dtype"]
    sizes = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    if tok.is_char_level:
        # One token per character: encode all documents with one table lookup.
        ids = tok.encode_array("".join(texts), dtype)
    else:
        ids = np.fromiter(itertools.chain.from_iterable(texts), dtype=np.int64,
                          count=int(sizes.sum())).astype(dtype)
    ws = None
    if w["segmenter"] is not None:
        lengths: list = []
        for text in texts:
            lengths += w["segmenter"].word_lengths(text)
        ws = starts_mask(lengths, ids.size)
    if w["append_eod"]:
        ends = np.cumsum(sizes)
        ids = np.insert(ids, ends, tok.eod_id)
        if ws is not None:
            ws = np.insert(ws, ends, True)
        sizes += 1
    return ids, ws, sizes


class _Crash:
    """A worker's unexpected exception, with its traceback, for the main process to raise."""

    def __init__(self, error: BaseException):
        self.text = traceback.format_exc()
        try:
            pickle.loads(pickle.dumps(error))  # not every exception survives the trip
            self.error = error
        except Exception:
            self.error = RuntimeError(repr(error))


def _worker_loop(conn, init) -> None:
    """A pool worker: (slot, task) -> `_encode`'s result, until None or the pipe closes."""
    if init is not None:
        _init_worker(*init)
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        try:
            result = _encode(item[1], item[0])
        except Exception as e:
            result = _Crash(e)
        conn.send(result)


class _Pool:
    """Worker processes running `_encode`, results in input order.

    Not multiprocessing.Pool: its three helper threads cost this process CPU the workers need
    (one of them wakes on every read of the result pipe), and with two workers on two cores
    every CPU-second here is taken from a worker. Here the main thread alone sends tasks and
    receives results, over one pipe per worker. A worker holds at most two tasks, so it never
    waits for its next one: the second only if small (a send never waits on a worker that
    waits to send its result) and not near the end (the last tasks go to whichever worker is
    free first). At most `n_slots` tasks are in flight or waiting to be consumed, which bounds
    memory, and task i gets the files of slot i % n_slots (`_spill`), free again once task
    i - n_slots was consumed.
    """

    QUEUED_MAX_BYTES = 4096  # a second queued task must fit the pipe's buffer with room to spare

    def __init__(self, n: int, init: tuple, n_slots: int):
        # fork: workers inherit the loaded tokenizer and jieba instead of loading their own, and
        # the tool need not be importable.
        fork = "fork" in multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if fork else None)
        self.n_slots = n_slots
        self.procs, self.conns = [], []
        try:
            for _ in range(n):
                here, there = ctx.Pipe()
                proc = ctx.Process(target=_worker_loop, args=(there, None if fork else init),
                                   daemon=True)
                proc.start()
                there.close()
                self.procs.append(proc)
                self.conns.append(here)
        except BaseException:
            self.close(failed=True)
            raise

    def imap(self, tasks):
        tasks = enumerate(tasks)
        n = len(self.conns)
        ahead: collections.deque = collections.deque()  # the next tasks: (index, pickled)
        queued = [collections.deque() for _ in self.conns]  # per worker: its tasks' indices
        done: dict = {}
        consumed = sent = 0
        while True:
            for depth in (0, 1):  # idle workers first
                for j, conn in enumerate(self.conns):
                    while len(queued[j]) == depth and sent - consumed < self.n_slots:
                        for i, task in itertools.islice(tasks, n + 1 - len(ahead)):
                            ahead.append((i, pickle.dumps((i % self.n_slots, task),
                                                          pickle.HIGHEST_PROTOCOL)))
                        if not ahead or depth and (len(ahead) <= n or
                                                   len(ahead[0][1]) > self.QUEUED_MAX_BYTES):
                            break
                        i, data = ahead.popleft()
                        conn.send_bytes(data)
                        queued[j].append(i)
                        sent += 1
            while consumed in done:
                yield done.pop(consumed)
                consumed += 1  # only now: the consumer is done with the slot's files
            if not ahead and consumed == sent:
                return
            busy = [conn for j, conn in enumerate(self.conns) if queued[j]]
            if not busy:  # every result was in, the slots were full: feed the workers again
                continue
            for conn in multiprocessing.connection.wait(busy):
                j = self.conns.index(conn)
                try:
                    result = conn.recv()
                except (EOFError, OSError):
                    self.procs[j].join(1)
                    raise RuntimeError(f"preprocessing worker {j} died (exit code "
                                       f"{self.procs[j].exitcode}; killed, out of memory?)"
                                       ) from None
                if isinstance(result, _Crash):
                    raise result.error from RuntimeError(f"in worker {j}:\n{result.text}")
                done[queued[j].popleft()] = result

    def close(self, failed: bool = False) -> None:
        """Stop the workers: at once after a failure, else once they have read their None."""
        for proc, conn in zip(self.procs, self.conns):
            if failed:
                proc.terminate()
            else:
                with contextlib.suppress(OSError):
                    conn.send(None)
        for proc, conn in zip(self.procs, self.conns):
            proc.join(None if failed else 5)
            if proc.exitcode is None:
                proc.terminate()
                proc.join()
            conn.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(failed=exc_type is not None)
        return False


def output_prefixes(prefix: str, json_keys) -> dict[str, str]:
    if len(json_keys) == 1:
        return {json_keys[0]: prefix}
    return {key: f"{prefix}_{key}" for key in json_keys}


def preprocess(args) -> dict:
    tok = load_tokenizer(args.tokenizer)
    if args.word_boundaries and not tok.is_char_level:
        raise TokenizerError(f"--word-boundaries needs a character-level tokenizer (whole-word "
                             f"masking is for char vocabularies); {args.tokenizer} is "
                             f"{tok.kind}: drop the flag or use a --type char tokenizer")
    if args.append_eod and tok.eod_id is None:
        raise TokenizerError(f"--append-eod: {args.tokenizer} has no end-of-document token")
    if len(args.json_keys) > 1 and not all(is_jsonl(path) for path in args.input):
        raise DataError(f"several --json-keys ({' '.join(args.json_keys)}) need jsonl inputs; "
                        f"plain-text inputs have no keys: preprocess them separately")
    clean = cleaning_options_from_args(args)
    clean.check_available()
    counter = BadLineCounter()
    prefixes = output_prefixes(args.output_prefix, args.json_keys)
    docs = tokens = nbytes = 0
    start = time.time()
    with contextlib.ExitStack() as stack:
        # Entered builders abort (remove their temporary files) on any exception below.
        builders = {key: stack.enter_context(IndexedDatasetBuilder(
            prefix, tok.vocab_size, tok.hash, with_word_starts=args.word_boundaries,
            tokenizer=os.path.abspath(args.tokenizer))) for key, prefix in prefixes.items()}
        parts = None
        if args.workers > 1:
            # Beside the output (same file system, for in-kernel copies); removed after the
            # pool has stopped (callbacks run last-in first-out), whatever happens.
            first = next(iter(prefixes.values()))
            parts = tempfile.mkdtemp(prefix=os.path.basename(first) + ".parts.tmp-",
                                     dir=os.path.dirname(os.path.abspath(first)))
            stack.callback(shutil.rmtree, parts, ignore_errors=True)
        init = (args.tokenizer, clean, args.word_boundaries, args.append_eod,
                list(args.json_keys), args.skip_bad_lines, parts)
        tasks = _tasks(args)
        # Set up here once: forked workers inherit the tokenizer and jieba's dictionary instead
        # of each loading them (~0.3 s of CPU per worker).
        _init_worker(*init)
        if args.workers > 1:
            pool = stack.enter_context(_Pool(args.workers, init, 4 * args.workers))
            results = pool.imap(tasks)
        else:
            results = map(_encode, tasks)
        from tqdm import tqdm
        bar = stack.enter_context(tqdm(unit=" docs", file=sys.stderr, mininterval=1.0,
                                       disable=args.quiet, desc="tokenizing"))
        found = before = 0  # before: lines of the current file that precede a range task
        for outputs, n_docs, n_bytes, events, error, span in results:
            if span is not None:
                path, offset, n_lines = span
                before = before if offset else 0
                events = [(reason, _renumber(message, path, before))
                          for reason, message in events]
                if error is not None:
                    error = DataError(_renumber(str(error), path, before))
                before += n_lines
            for reason, message in events:
                counter.add(reason, message)
            if error is not None:
                raise error
            found += n_docs
            nbytes += n_bytes
            bar.update(n_docs)
            for key, out in outputs.items():
                if parts is None:
                    ids, ws, sizes = out
                    builders[key].add_documents(ids, sizes, ws)
                else:
                    sizes = out[0]
                    builders[key].add_document_files(*out)
                docs += sizes.size
                tokens += int(sizes.sum())
        if not found:
            raise empty_corpus_error(args.input, args.json_keys, counter)
        for key, builder in builders.items():
            if builder.num_docs == 0:
                raise DataError(f"empty corpus: no document of key {key!r} in "
                                f"{', '.join(args.input)} survived ({counter.total} bad lines "
                                f"skipped); check the input and the cleaning switches")
        for builder in builders.values():
            builder.finalize()
    elapsed = max(time.time() - start, 1e-9)
    if counter.total or args.skip_bad_lines:
        print(counter.summary(), file=sys.stderr)
    files = ".bin/.idx/.ws" if args.word_boundaries else ".bin/.idx"
    print(f"wrote {', '.join(prefixes.values())} ({files})")
    print(f"documents: {docs}, tokens: {tokens}, MB/s: {nbytes / 1e6 / elapsed:.2f}", flush=True)
    return {"outputs": prefixes, "documents": docs, "tokens": tokens, "bytes": nbytes,
            "seconds": elapsed, "skipped": counter.total}


def parse_split(spec: str, prefix: str) -> dict[str, float]:
    out = {}
    for item in spec.split(","):
        name, _, frac = item.partition("=")
        try:
            value = float(frac)
        except ValueError:
            value = None
        if value is None or not name.strip():
            raise ValueError(f"--split: bad item {item!r}; write name=fraction pairs, e.g. "
                             f"train=0.98,valid=0.01,test=0.01")
        out[f"{prefix}_{name.strip()}"] = value
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", default=[],
                   help="jsonl / txt files (optionally .gz); with --split, one dataset prefix")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer", help="tokenizer directory (tools/train_tokenizer.py)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=256,
                   help="input lines (plain text: documents) per worker task; uncompressed "
                        "jsonl: blocks of about the bytes of the first N lines")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--append-eod", action="store_true",
                   help="end every document with the tokenizer's end-of-document token")
    p.add_argument("--word-boundaries", action="store_true",
                   help="store jieba word starts (P.ws) for whole-word masking; char tokenizers")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip and count bad input instead of stopping at the first")
    p.add_argument("--blank-line-docs", action="store_true",
                   help="plain text: documents are separated by blank lines, not one per line")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--merge", nargs="+", metavar="PREFIX", help="merge these datasets")
    p.add_argument("--split", metavar="NAME=FRAC,...", help="split --input by document")
    p.add_argument("--seed", type=int, default=1234, help="--split: shuffling seed")
    add_cleaning_args(p)
    args = p.parse_args(argv)

    if args.merge:
        ds = merge_datasets(args.merge, args.output_prefix)
        print(f"merged {len(args.merge)} datasets into {args.output_prefix}: "
              f"documents: {len(ds)}, tokens: {ds.num_tokens}")
        return {"outputs": {"merged": args.output_prefix}, "documents": len(ds),
                "tokens": ds.num_tokens}
    if args.split:
        if len(args.input) != 1:
            p.error("--split takes exactly one dataset prefix as --input")
        parts = split_by_document(args.input[0], parse_split(args.split, args.output_prefix),
                                  seed=args.seed)
        for name, ds in parts.items():
            print(f"{name}: documents: {len(ds)}, tokens: {ds.num_tokens}")
        return {"outputs": {name: name for name in parts},
                "documents": sum(len(d) for d in parts.values())}
    if not args.input or not args.tokenizer:
        p.error("--input and --tokenizer are required (unless --merge)")
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if args.chunk_size < 1:
        p.error("--chunk-size must be at least 1")
    return preprocess(args)


if __name__ == "__main__":
    try:
        main()
    except (DataError, DatasetError, TokenizerError, ImportError) as e:
        sys.exit(f"error: {e}")
