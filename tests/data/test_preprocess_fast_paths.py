"""The preprocessing fast paths give exactly what the straightforward code gives.

Cleaning skips work it can prove is a no-op, the char tokenizer encodes through a code point
table, word starts come from cumulative word lengths, and workers encode whole chunks at once:
each is checked against a plain reference on real sample-corpus lines plus awkward text.
"""
import itertools
import json
import random
import re
import unicodedata

import numpy as np
import pytest

from megatron_lite.data import cleaning
from megatron_lite.data.cleaning import clean_text
from megatron_lite.data.indexed_dataset import IndexedDatasetBuilder, dataset_paths
from megatron_lite.data.segmentation import Segmenter, starts_mask
from tools import preprocess_data

AWKWARD = [
    "Hello   world\t tabs\n\n\nnew para  ",
    "全角ＡＢＣ１２３　空格，标点：（括号）……省略",
    "emoji 😀👍🏽 家庭👨‍👩‍👧 旗🇨🇳 end",
    "control\x00\x01\x7f chars \u200b zero width \ufeff bom \ufffd repl",
    "combining e\u0301 vs é; ligature ﬁ; ½ ² ㍿ ｶﾀｶﾅ ｡､ ，\u0301 \u1100\u1161\u11a8",
    "\u2028line sep\u2029para sep\u3000ideo\u00a0nbsp \x1c\x1d\x85 end",
    "a\r\nb\rc\n \n d", "\n a \n", "ascii only, plain. 12345 !@#$%",
    "\U00020000\U0002A6D6 ext-B 𠀀 ｈｅｌｌｏ　ｗｏｒｌｄ！？ Ω Å K ℃ № ™ ㈱ ⑴ ① ⅷ",
]


def sample_lines(sample_data, n=120):
    with open(sample_data.valid, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line, _ in zip(f, range(n))]


def reference_clean(text, nfkc=True, fold_fullwidth=True, drop_control=True,
                    collapse_whitespace=True):
    """The cleaning steps written the plain way: regexes, NFKC between protected runs."""
    if drop_control:
        text = cleaning._control_pattern().sub("", text)
    if nfkc:
        protect = cleaning._PROTECT_PUNCT if fold_fullwidth else cleaning._PROTECT_ALL_FULLWIDTH
        out, pos = [], 0
        for m in protect.finditer(text):
            out += [unicodedata.normalize("NFKC", text[pos:m.start()]), m.group()]
            pos = m.end()
        text = "".join(out) + unicodedata.normalize("NFKC", text[pos:])
    if fold_fullwidth:
        text = text.translate(cleaning._FOLD_TABLE)
    if collapse_whitespace:
        text = re.sub(r" ?\n[\s]*", "\n", re.sub(r"[^\S\n]+", " ", text)).strip()
    return text


def test_cleaning_matches_reference_under_every_switch(sample_data):
    texts = sample_lines(sample_data, 40) + AWKWARD
    names = ("nfkc", "fold_fullwidth", "drop_control", "collapse_whitespace")
    for values in itertools.product((True, False), repeat=4):
        options = dict(zip(names, values))
        for text in texts:
            assert clean_text(text, **options) == reference_clean(text, **options), options


def test_nfkc_matches_reference_on_random_mixtures():
    # Characters whose normalisation depends on their neighbours: combining marks (reordered,
    # composed), Hangul jamo, Indic vowel signs, protected punctuation between them.
    pool = ("e\u0301\u0327\u0323\u0308aAo\u1100\u1161\u11a8가\u0b47\u0b3e\u0b4b，。：（）…"
            "ＡＢ１\u3000ﬁ①½ｶ\u3099\u309a か\u0344\u0f73\u0f71\u0f72 \n")
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choices(pool, k=rng.randint(1, 12)))
        for fold in (True, False):
            assert (clean_text(text, fold_fullwidth=fold, collapse_whitespace=False)
                    == reference_clean(text, fold_fullwidth=fold, collapse_whitespace=False))


def test_encode_array_matches_encode(sample_data):
    texts = [clean_text(t) for t in sample_lines(sample_data)] + AWKWARD + ["\ud800 lone"]
    for tok in (sample_data.bert_tokenizer, sample_data.char_tokenizer):
        for text in texts:
            assert tok.encode_array(text, np.uint16).tolist() == tok.encode(text)
        joined = "".join(texts)
        assert tok.encode_array(joined).tolist() == tok.encode(joined)


def per_word_mask(words):
    mask, pos = [False] * sum(map(len, words)), 0
    for word in words:
        if word:
            mask[pos] = True
        pos += len(word)
    return mask


def test_word_starts_match_per_word_reference(sample_data):
    seg, tok = Segmenter(), sample_data.bert_tokenizer
    texts = [clean_text(t) for t in sample_lines(sample_data)] + AWKWARD + [clean_text(AWKWARD[4])]
    lengths = []
    for text in texts:
        words = seg.segment(text)
        assert seg.word_start_mask(text, tok).tolist() == per_word_mask(words)
        lengths += seg.word_lengths(text)
    # Several documents at once, as the workers compute them.
    everything = [w for text in texts for w in seg.segment(text)]
    assert starts_mask(lengths, sum(map(len, texts))).tolist() == per_word_mask(everything)
    assert starts_mask([0, 2, 0, 1], 3).tolist() == [True, False, True]


def test_two_workers_write_what_one_document_at_a_time_writes(sample_data, tmp_path, capsys):
    lines = sample_lines(sample_data, 150)
    rows = [{"text": t} for t in lines[:70]] + [{"text": t} for t in AWKWARD]
    rows += [{"text": "\u200b\x00"}, {"text": " "}] + [{"text": t} for t in lines[70:]]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r, ensure_ascii=i % 2 == 0) + "\n"
                              for i, r in enumerate(rows)), encoding="utf-8")
    tok_dir, tok, seg = sample_data.bert_tokenizer_dir, sample_data.bert_tokenizer, Segmenter()
    summaries = []
    for w in (1, 2):
        preprocess_data.main(["--input", str(corpus), "--output-prefix", str(tmp_path / f"w{w}"),
                              "--tokenizer", tok_dir, "--workers", str(w), "--append-eod",
                              "--word-boundaries", "--skip-bad-lines", "--chunk-size", "16",
                              "--quiet"])
        summaries.append(capsys.readouterr().err)
    assert summaries[0] == summaries[1] and "empty after cleaning: 1" in summaries[0]
    # The reference: one document at a time, through the per-document API.
    with IndexedDatasetBuilder(tmp_path / "ref", tok.vocab_size, tok.hash, True) as ref:
        for row in rows:
            text = clean_text(row["text"])
            if text:
                ref.add_document(tok.encode(text) + [tok.eod_id],
                                 np.append(seg.word_start_mask(text, tok), True))
    w1, w2, reference = (dataset_paths(tmp_path / name) for name in ("w1", "w2", "ref"))
    for ext in ("bin", "idx", "ws"):
        assert open(w1[ext], "rb").read() == open(w2[ext], "rb").read(), ext
    for ext in ("bin", "ws"):
        assert open(w1[ext], "rb").read() == open(reference[ext], "rb").read(), ext


@pytest.mark.parametrize("text", ["", "a", "\n", "a\n\nb", " a  b ", "\t\u3000x\n \ny\u2028"])
def test_collapse_whitespace_edge_cases(text):
    assert cleaning._collapse_whitespace(text) == reference_clean(
        text, nfkc=False, fold_fullwidth=False, drop_control=False)
