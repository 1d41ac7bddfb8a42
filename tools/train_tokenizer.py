#!/usr/bin/env python
"""Train a tokenizer on jsonl / txt / .gz corpora (the same readers and cleaning as preprocessing).

    # sentencepiece (T5 / LongLM): fixed ids pad=0 eos=1 unk=2 bos=3, sentinels at 4..103
    python tools/train_tokenizer.py --input data/sample/train.jsonl --output-dir runs/tok_sp \\
        --type sentencepiece --model-type unigram --vocab-size 8000
    # character vocabulary (LingLong preset; --preset bert for Longformer_ZH)
    python tools/train_tokenizer.py --input data/sample/train.jsonl --output-dir runs/tok_char \\
        --type char --preset linglong --min-count 2
    # character vocabulary from an existing vocab.txt
    python tools/train_tokenizer.py --from-vocab bert-base-chinese/vocab.txt --type char \\
        --preset bert --output-dir runs/tok_bert

Sentencepiece runs with identity normalisation (the cleaning step already normalised the text, and
sentencepiece's default NFKC would fold Chinese punctuation), keeps whitespace as it is, adds no
dummy "▁" prefix (Chinese has no word spaces), and learns each line of a document as one sentence;
"\\n" is a user-defined symbol so paragraph breaks survive a round trip.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.data.cleaning import add_cleaning_args, cleaning_options_from_args  # noqa: E402
from megatron_lite.data.readers import BadLineCounter, DataError, read_documents  # noqa: E402
from megatron_lite.data.tokenizer import (PRESETS, ROLES, SP_SENTINELS, CharTokenizer,  # noqa: E402
                                          SentencePieceTokenizer, TokenizerError,
                                          sentinel_token)


def parse_special_tokens(spec: str | None) -> dict[str, str] | None:
    if not spec:
        return None
    out = {}
    for item in spec.split(","):
        role, sep, token = item.partition("=")
        if not sep or role not in ROLES or not token:
            raise SystemExit(f"--special-tokens: bad item {item!r}; write role=TOKEN pairs "
                             f"separated by commas, roles: {', '.join(ROLES)}")
        out[role] = token
    return out


def corpus_texts(args, counter: BadLineCounter):
    clean = cleaning_options_from_args(args)
    clean.check_available()
    for doc in read_documents(args.input, json_keys=args.json_keys,
                              blank_line_docs=args.blank_line_docs,
                              skip_bad_lines=args.skip_bad_lines, counter=counter):
        text = clean(doc.text)
        if text:
            yield text


def train_sentencepiece(args, counter: BadLineCounter) -> SentencePieceTokenizer:
    import sentencepiece as spm

    failure = []  # an exception raised inside the iterator reaches us wrapped by sentencepiece

    def sentences():
        try:
            for text in corpus_texts(args, counter):
                for line in text.split("\n"):
                    if line.strip():
                        yield line
        except Exception as e:
            failure.append(e)
            raise

    num_sentinels = SP_SENTINELS if args.num_sentinels is None else args.num_sentinels
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model,
            model_type=args.model_type, vocab_size=args.vocab_size,
            character_coverage=args.character_coverage, byte_fallback=args.byte_fallback,
            pad_id=0, eos_id=1, unk_id=2, bos_id=3,
            pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", bos_piece="<s>",
            user_defined_symbols=[sentinel_token(k) for k in range(num_sentinels)] + ["\n"],
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, split_digits=False,
            input_sentence_size=args.input_sentence_size, shuffle_input_sentence=True,
            max_sentence_length=1 << 16, num_threads=args.num_threads, seed_sentencepiece_size=
            max(100_000, 10 * args.vocab_size), minloglevel=2)
    except RuntimeError as e:
        if failure:
            raise failure[0] from None
        # e.g. "Vocabulary size too high (8000). Please set it to a value <= 3517."
        raise TokenizerError(f"sentencepiece training failed: {e}") from None
    return SentencePieceTokenizer(model.getvalue(), source="trained")


def build_char(args, counter: BadLineCounter) -> CharTokenizer:
    specials = parse_special_tokens(args.special_tokens)
    preset = args.preset
    if args.from_vocab:
        return CharTokenizer.from_vocab_file(args.from_vocab, preset=preset,
                                             special_tokens=specials,
                                             num_sentinels=args.num_sentinels)
    return CharTokenizer.train(corpus_texts(args, counter), preset=preset, special_tokens=specials,
                               num_sentinels=args.num_sentinels, min_count=args.min_count,
                               max_vocab=args.vocab_size)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", default=[], help="jsonl / txt files, optionally .gz")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--type", choices=["sentencepiece", "char"], required=True)
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--blank-line-docs", action="store_true",
                   help="plain text: documents are separated by blank lines")
    p.add_argument("--skip-bad-lines", action="store_true")
    p.add_argument("--num-sentinels", type=int, default=None,
                   help="sentinels <extra_id_k> (default: 100 for sentencepiece and the linglong "
                        "preset, 0 for bert)")
    sp = p.add_argument_group("sentencepiece")
    sp.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    sp.add_argument("--vocab-size", type=int, default=None,
                    help="sentencepiece: the vocabulary size (default 32000); char: a cap")
    sp.add_argument("--character-coverage", type=float, default=0.9995)
    sp.add_argument("--byte-fallback", action="store_true")
    sp.add_argument("--input-sentence-size", type=int, default=2_000_000,
                    help="sample at most this many sentences (lines) for training")
    sp.add_argument("--num-threads", type=int, default=min(4, os.cpu_count() or 1))
    ch = p.add_argument_group("char")
    ch.add_argument("--preset", choices=sorted(PRESETS), default="linglong")
    ch.add_argument("--special-tokens", default=None,
                    help="override preset tokens: role=TOKEN,... (roles: " + ", ".join(ROLES) + ")")
    ch.add_argument("--min-count", type=int, default=1)
    ch.add_argument("--from-vocab", default=None, help="load this vocab.txt instead of counting")
    add_cleaning_args(p)
    args = p.parse_args(argv)

    if args.type == "sentencepiece":
        args.vocab_size = args.vocab_size or 32000
        if args.from_vocab:
            p.error("--from-vocab is for --type char")
    if not args.input and not (args.type == "char" and args.from_vocab):
        p.error("--input is required (except for --type char --from-vocab)")

    start = time.time()
    counter = BadLineCounter()
    tok = (train_sentencepiece if args.type == "sentencepiece" else build_char)(args, counter)
    tok.save(args.output_dir)
    if counter.total:
        print(counter.summary(), file=sys.stderr)
    print(f"{args.type} tokenizer: vocab {tok.vocab_size}, sentinels {tok.num_sentinels}, "
          f"hash {tok.hash[:12]}, saved to {args.output_dir} in {time.time() - start:.1f}s")
    return tok


if __name__ == "__main__":
    try:
        main()
    except (DataError, TokenizerError, ImportError) as e:
        sys.exit(f"error: {e}")
