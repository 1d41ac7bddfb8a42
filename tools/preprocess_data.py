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
import multiprocessing
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.data.cleaning import (CleaningOptions, add_cleaning_args,  # noqa: E402
                                         cleaning_options_from_args)
from megatron_lite.data.indexed_dataset import (DatasetError, IndexedDatasetBuilder,  # noqa: E402
                                                dtype_for_vocab, merge_datasets,
                                                split_by_document)
from megatron_lite.data.readers import (SKIP_HINT, BadLineCounter, DataError,  # noqa: E402
                                        is_jsonl, read_documents)
from megatron_lite.data.segmentation import Segmenter  # noqa: E402
from megatron_lite.data.tokenizer import TokenizerError, load_tokenizer  # noqa: E402

# Per-process state of the tokenizing workers (set once by _init_worker, not shipped per task).
_WORKER: dict = {}


def _init_worker(tokenizer_path: str, clean: CleaningOptions, word_boundaries: bool,
                 append_eod: bool) -> None:
    tok = load_tokenizer(tokenizer_path)
    _WORKER.update(tok=tok, clean=clean, append_eod=append_eod,
                   segmenter=Segmenter() if word_boundaries else None,
                   dtype=dtype_for_vocab(tok.vocab_size))


def _encode(item):
    """(text, path, line, key) -> (ids or None if empty, word starts, input bytes, path, line,
    key). A reader error travels through unchanged so it is raised in input order."""
    if isinstance(item, DataError):
        return item
    text, path, line, key = item
    nbytes = len(text.encode("utf-8"))
    w = _WORKER
    text = w["clean"](text)
    ids = w["tok"].encode(text) if text else []
    if not ids:
        return None, None, nbytes, path, line, key
    ws = w["segmenter"].word_start_mask(text, w["tok"]) if w["segmenter"] else None
    if w["append_eod"]:
        ids.append(w["tok"].eod_id)
        if ws is not None:
            ws = np.append(ws, True)
    return np.asarray(ids, dtype=w["dtype"]), ws, nbytes, path, line, key


def _items(args, counter: BadLineCounter):
    try:
        for doc in read_documents(args.input, json_keys=args.json_keys,
                                  blank_line_docs=args.blank_line_docs,
                                  skip_bad_lines=args.skip_bad_lines, counter=counter):
            yield doc.text, doc.path, doc.line, doc.key
    except DataError as e:
        yield e


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
        init = (args.tokenizer, clean, args.word_boundaries, args.append_eod)
        if args.workers > 1:
            # fork: workers inherit the loaded modules, and the tool need not be importable.
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
            pool = stack.enter_context(ctx.Pool(args.workers, _init_worker, init))
            results = pool.imap(_encode, _items(args, counter), chunksize=args.chunk_size)
        else:
            _init_worker(*init)
            results = map(_encode, _items(args, counter))
        from tqdm import tqdm
        bar = stack.enter_context(tqdm(unit=" docs", file=sys.stderr, mininterval=1.0,
                                       disable=args.quiet, desc="tokenizing"))
        for result in results:
            if isinstance(result, DataError):
                raise result
            ids, ws, n, path, line, key = result
            nbytes += n
            bar.update(1)
            if ids is None:
                msg = (f"{path}:{line}" + (f" (key {key!r})" if key else "") + ": the document is "
                       f"empty after cleaning/tokenization; remove it, {SKIP_HINT}")
                if not args.skip_bad_lines:
                    raise DataError(msg)
                counter.add("empty after cleaning", msg)
                continue
            # Plain-text documents have no key: they go to the only output.
            builders[key if key is not None else args.json_keys[0]].add_document(ids, ws)
            docs += 1
            tokens += len(ids)
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
    p.add_argument("--chunk-size", type=int, default=32, help="documents per worker task")
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
    return preprocess(args)


if __name__ == "__main__":
    try:
        main()
    except (DataError, DatasetError, TokenizerError, ImportError) as e:
        sys.exit(f"error: {e}")
