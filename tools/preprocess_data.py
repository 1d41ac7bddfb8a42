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
import contextlib
import itertools
import multiprocessing
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.data.cleaning import (CleaningOptions, add_cleaning_args,  # noqa: E402
                                         cleaning_options_from_args)
from megatron_lite.data.indexed_dataset import (DatasetError, IndexedDatasetBuilder,  # noqa: E402
                                                dtype_for_vocab, merge_datasets,
                                                split_by_document)
from megatron_lite.data.readers import (SKIP_HINT, BadLineCounter, DataError,  # noqa: E402
                                        empty_corpus_error, is_jsonl, jsonl_line_documents,
                                        raw_line_blocks, read_line_block,
                                        text_documents)
from megatron_lite.data.segmentation import Segmenter, starts_mask  # noqa: E402
from megatron_lite.data.tokenizer import TokenizerError, load_tokenizer  # noqa: E402

# Per-process state of the tokenizing workers (set once by _init_worker, not shipped per task).
_WORKER: dict = {}


def _init_worker(tokenizer_path: str, clean: CleaningOptions, word_boundaries: bool,
                 append_eod: bool, json_keys: list, skip_bad_lines: bool) -> None:
    tok = load_tokenizer(tokenizer_path)
    dtype = dtype_for_vocab(tok.vocab_size)
    if tok.is_char_level:
        tok.encode_array("", dtype)  # builds its lookup table now, before workers fork
    _WORKER.update(tok=tok, clean=clean, append_eod=append_eod, json_keys=json_keys,
                   skip=skip_bad_lines, segmenter=Segmenter() if word_boundaries else None,
                   dtype=dtype)


def _tasks(args):
    """Work for the workers, in input order: ("range", path, first line number, byte offset,
    length) of a jsonl file, ("jsonl", path, first line number, raw lines) of a gzipped one, or
    ("docs", documents, skipped bad lines) of plain text. Workers read and parse jsonl lines
    themselves, so this process only finds line boundaries. A reader error is yielded (not
    raised) so it surfaces in input order."""
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
                # Workers read the lines themselves: only offsets go through the pipe.
                offset = 0
                for first, lines in raw_line_blocks(path, n, strip_bom=False):
                    length = sum(map(len, lines))
                    yield "range", path, first, offset, length
                    offset += length
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


def _encode(task):
    """One task -> (outputs, documents read, input bytes, bad-line events, error).

    outputs: key -> (token ids, word starts or None, tokens per document), the documents back
    to back, so the main process writes a task with one call per file. Events (reason, message)
    and the error (the first bad line when not skipping) keep input order."""
    if isinstance(task, DataError):
        return {}, 0, 0, [], task
    w = _WORKER
    tok, clean, skip = w["tok"], w["clean"], w["skip"]
    events: list = task[2] if task[0] == "docs" else []

    def bad(reason: str, error: DataError) -> None:
        if not skip:
            raise error
        events.append((reason, str(error)))

    texts: dict = {}  # output key -> cleaned non-empty texts (ids, if not char-level)
    found = nbytes = 0
    try:
        if task[0] == "docs":
            docs = task[1]
        else:
            kind, path, first, *rest = task
            lines = read_line_block(path, *rest) if kind == "range" else rest[0]
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
        return {}, found, nbytes, events, e
    return {key: _encode_texts(docs) for key, docs in texts.items()}, found, nbytes, events, None


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


def _bounded(tasks, slots: threading.Semaphore, stop: threading.Event):
    """`tasks`, each once a slot is free (the main loop frees one per result); ends at `stop`."""
    for task in tasks:
        slots.acquire()
        if stop.is_set():
            return
        yield task


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
        init = (args.tokenizer, clean, args.word_boundaries, args.append_eod,
                list(args.json_keys), args.skip_bad_lines)
        tasks = _tasks(args)
        # Set up here once: forked workers inherit the tokenizer and jieba's dictionary instead
        # of each loading them (~0.3 s of CPU per worker).
        _init_worker(*init)
        if args.workers > 1:
            # fork: workers inherit the loaded modules, and the tool need not be importable.
            methods = multiprocessing.get_all_start_methods()
            fork = "fork" in methods
            ctx = multiprocessing.get_context("fork" if fork else None)
            pool = stack.enter_context(ctx.Pool(args.workers, None if fork else _init_worker,
                                                init))
            # Pool.imap reads its input as fast as it can: bound the tasks in flight so a large
            # corpus is not pulled into memory ahead of the workers.
            slots, stop = threading.Semaphore(4 * args.workers), threading.Event()

            def unblock():  # before the pool's exit, whose terminate() joins the feeder thread
                stop.set()
                slots.release()
            stack.callback(unblock)
            results = pool.imap(_encode, _bounded(tasks, slots, stop))
        else:
            slots = None
            results = map(_encode, tasks)
        from tqdm import tqdm
        bar = stack.enter_context(tqdm(unit=" docs", file=sys.stderr, mininterval=1.0,
                                       disable=args.quiet, desc="tokenizing"))
        found = 0
        for outputs, n_docs, n_bytes, events, error in results:
            if slots is not None:
                slots.release()
            for reason, message in events:
                counter.add(reason, message)
            if error is not None:
                raise error
            found += n_docs
            nbytes += n_bytes
            bar.update(n_docs)
            for key, (ids, ws, sizes) in outputs.items():
                builders[key].add_documents(ids, sizes, ws)
                docs += sizes.size
                tokens += ids.size
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
                   help="input lines (plain text: documents) per worker task")
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
