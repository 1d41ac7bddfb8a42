import gzip
import json
import os
import random
import re
import sys
import threading
import time

import numpy as np
import pytest

from megatron_lite.data import cleaning
from megatron_lite.data.cleaning import clean_text
from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.readers import DataError
from megatron_lite.data.segmentation import Segmenter
from megatron_lite.data.tokenizer import (CharTokenizer, TokenizerError, check_tokenizer_hash,
                                          load_tokenizer)
from tools import preprocess_data, train_tokenizer

CJK = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产"


def make_texts(n, seed=0):
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        paras = ["".join(rng.choices(CJK, k=rng.randint(5, 30))) + "，我们ＡＢ１２。"
                 for _ in range(rng.randint(1, 3))]
        texts.append("\n".join(paras) + ("  hello　world" if i % 3 == 0 else ""))
    return texts


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    texts = make_texts(120)
    corpus = write_jsonl(root / "corpus.jsonl", [{"text": t} for t in texts])
    char = str(root / "tok_char")
    CharTokenizer.train([clean_text(t) for t in texts], preset="linglong").save(char)
    sp = str(root / "tok_sp")
    train_tokenizer.main(["--input", corpus, "--output-dir", sp, "--type", "sentencepiece",
                          "--vocab-size", "500", "--byte-fallback", "--num-threads", "1"])
    return root, texts, corpus, char, sp


def run(argv):
    return preprocess_data.main(argv + ["--quiet"])


def outputs(directory, prefix="out"):
    return sorted(n for n in os.listdir(directory) if n.startswith(prefix))


@pytest.mark.parametrize("workers", [1, 2])
def test_char_round_trip_with_word_starts(workdir, tmp_path, capsys, workers):
    root, texts, corpus, char, _ = workdir
    prefix = str(tmp_path / "out")
    stats = run(["--input", corpus, "--output-prefix", prefix, "--tokenizer", char,
                 "--workers", str(workers), "--append-eod", "--word-boundaries",
                 "--chunk-size", "7"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"documents: 120, tokens: \d+, MB/s: [\d.]+", last)
    tok, seg = load_tokenizer(char), Segmenter()
    ds = IndexedDataset(prefix)
    assert len(ds) == 120 and ds.dtype == np.uint16 and ds.tokenizer_hash == tok.hash
    assert stats["tokens"] == ds.num_tokens
    for i, text in enumerate(texts):
        clean = clean_text(text)
        assert ds[i].tolist() == tok.encode(clean) + [tok.eod_id]
        assert ds.word_starts(i).tolist() == seg.word_start_mask(clean, tok).tolist() + [True]
    assert tok.decode(ds[0][:-1]) == clean_text(texts[0])
    assert outputs(tmp_path) == ["out.bin", "out.idx", "out.ws"]


def test_workers_give_identical_files(workdir, tmp_path):
    root, texts, corpus, char, _ = workdir
    for w in (1, 2):
        run(["--input", corpus, "--output-prefix", str(tmp_path / f"w{w}"), "--tokenizer", char,
             "--workers", str(w), "--word-boundaries", "--chunk-size", "5"])
    for ext in ("bin", "idx", "ws"):
        assert (tmp_path / f"w1.{ext}").read_bytes() == (tmp_path / f"w2.{ext}").read_bytes()


def test_sentencepiece_round_trip(workdir, tmp_path):
    root, texts, corpus, _, sp = workdir
    prefix = str(tmp_path / "out")
    run(["--input", corpus, "--output-prefix", prefix, "--tokenizer", sp])
    tok, ds = load_tokenizer(sp), IndexedDataset(prefix)
    assert ds.dtype == np.uint16 and not ds.has_word_starts
    for i, text in enumerate(texts):
        assert ds[i].tolist() == tok.encode(clean_text(text))
        assert tok.decode(ds[i]) == clean_text(text)


def test_uint32_round_trip_with_a_large_vocabulary(tmp_path):
    # 70,000 distinct characters: ids above 65,535 need the uint32 token file.
    chars = [chr(0x20000 + i) for i in range(70000)]
    tok = CharTokenizer.train(["".join(chars)], preset="bert")
    tok.save(str(tmp_path / "tok"))
    docs = ["".join(chars[j:j + 900]) for j in range(0, 70000, 7000)] + ["".join(chars[-50:])]
    corpus = write_jsonl(tmp_path / "big.jsonl", [{"text": d} for d in docs])
    prefix = str(tmp_path / "out")
    # --no-clean: NFKC would map the CJK compatibility ideographs (U+2F800..) to other chars.
    run(["--input", corpus, "--output-prefix", prefix, "--tokenizer", str(tmp_path / "tok"),
         "--no-clean"])
    ds = IndexedDataset(prefix)
    assert tok.vocab_size > 65536 and ds.dtype == np.uint32 and ds.vocab_size == tok.vocab_size
    assert int(ds[len(docs) - 1].max()) == tok.vocab_size - 1
    for i, d in enumerate(docs):
        assert ds[i].tolist() == tok.encode(d)


@pytest.mark.parametrize("workers", [1, 2])
def test_several_json_keys_give_one_dataset_each(workdir, tmp_path, workers):
    root, _, _, char, _ = workdir
    corpus = write_jsonl(tmp_path / "kv.jsonl", [{"title": "我们", "body": "大中国"},
                                                 {"title": "人", "body": "说"}] * 3)
    run(["--input", corpus, "--output-prefix", str(tmp_path / "out"), "--tokenizer", char,
         "--json-keys", "title", "body", "--workers", str(workers), "--chunk-size", "1"])
    tok = load_tokenizer(char)
    title, body = IndexedDataset(str(tmp_path / "out_title")), IndexedDataset(str(tmp_path /
                                                                                  "out_body"))
    assert [tok.decode(title[i]) for i in range(6)] == ["我们", "人"] * 3
    assert [tok.decode(body[i]) for i in range(6)] == ["大中国", "说"] * 3
    assert outputs(tmp_path) == ["out_body.bin", "out_body.idx", "out_title.bin",
                                 "out_title.idx"]


def test_workers_give_identical_files_without_word_starts(workdir, tmp_path):
    root, texts, corpus, char, sp = workdir
    for name, tok in (("char", char), ("sp", sp)):
        for w in (1, 2):
            run(["--input", corpus, "--output-prefix", str(tmp_path / f"{name}{w}"),
                 "--tokenizer", tok, "--workers", str(w), "--append-eod", "--chunk-size", "9"])
        for ext in ("bin", "idx"):
            assert ((tmp_path / f"{name}1.{ext}").read_bytes()
                    == (tmp_path / f"{name}2.{ext}").read_bytes()), (name, ext)


def test_gzip_text_with_blank_line_documents(workdir, tmp_path):
    root, _, _, char, _ = workdir
    path = tmp_path / "c.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("我们\n大中国\n\n\n人说\n")
    run(["--input", str(path), "--output-prefix", str(tmp_path / "out"), "--tokenizer", char,
         "--blank-line-docs"])
    tok, ds = load_tokenizer(char), IndexedDataset(str(tmp_path / "out"))
    assert [tok.decode(ds[i]) for i in range(len(ds))] == ["我们\n大中国", "人说"]


def test_workers_give_identical_files_from_gzip_and_plain_text(workdir, tmp_path):
    # Those tasks carry their lines or documents (kilobytes each, not byte offsets).
    root, texts, _, char, _ = workdir
    rows = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts) * 20
    inputs = [tmp_path / "c.jsonl.gz", tmp_path / "c.txt"]
    with gzip.open(inputs[0], "wt", encoding="utf-8") as f:
        f.write(rows)
    inputs[1].write_text("\n".join(t.replace("\n", " ") for t in texts * 20) + "\n",
                         encoding="utf-8")
    for w in (1, 2):
        run(["--input", *map(str, inputs), "--output-prefix", str(tmp_path / f"w{w}"),
             "--tokenizer", char, "--workers", str(w), "--word-boundaries", "--chunk-size", "200"])
    for ext in ("bin", "idx", "ws"):
        assert (tmp_path / f"w1.{ext}").read_bytes() == (tmp_path / f"w2.{ext}").read_bytes()
    assert len(IndexedDataset(str(tmp_path / "w2"))) == 2 * 20 * len(texts)


def bad_corpus(tmp_path):
    return write_jsonl(tmp_path / "bad.jsonl", [
        {"text": "我们"}, {"text": "大"}, '{"text": "broken\n', {"text": "人"},
        {"body": "no text key"}, {"text": "说"}])


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_line_stops_the_run_and_leaves_nothing(workdir, tmp_path, workers):
    root, _, _, char, _ = workdir
    corpus = bad_corpus(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match=rf"{re.escape(corpus)}:3: malformed JSON"):
        run(["--input", corpus, "--output-prefix", str(out / "d"), "--tokenizer", char,
             "--workers", str(workers), "--word-boundaries", "--chunk-size", "1"])
    assert os.listdir(out) == []  # neither final files nor temporary ones


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("chunk", [1, 2, 3, 50])
def test_line_numbers_are_exact_in_every_block(workdir, tmp_path, capsys, workers, chunk):
    # Workers number a block's lines from its start; the main process makes them absolute.
    root, _, _, char, _ = workdir
    rows = [{"text": "我们"}] * 12
    bad = {3: '{"text": "broken\n', 8: '{"body": "x"}\n', 11: '{"text": "\u200b"}\n'}
    corpus = write_jsonl(tmp_path / "c.jsonl", [bad.get(i + 1, row) for i, row in enumerate(rows)])
    first = write_jsonl(tmp_path / "first.jsonl", [{"text": "人"}] * 5)  # a file before it
    argv = ["--input", first, corpus, "--tokenizer", char, "--workers", str(workers),
            "--chunk-size", str(chunk)]
    capsys.readouterr()
    stats = run(argv + ["--output-prefix", str(tmp_path / "out"), "--skip-bad-lines"])
    assert stats["documents"] == 5 + 9 and stats["skipped"] == 3
    err = capsys.readouterr().err
    for line in (3, 8, 11):
        assert f"e.g. {corpus}:{line}" in err, err
    del bad[3]
    write_jsonl(tmp_path / "c.jsonl", [bad.get(i + 1, row) for i, row in enumerate(rows)])
    with pytest.raises(DataError, match=rf"{re.escape(corpus)}:8: missing key 'text'"):
        run(argv + ["--output-prefix", str(tmp_path / "no" / "out")])
    assert os.listdir(tmp_path / "no") == []


def test_a_crashing_worker_stops_the_run_and_leaves_nothing(workdir, tmp_path, monkeypatch):
    # Forked workers inherit the patch.
    root, _, corpus, char, _ = workdir

    def boom(texts):
        raise ZeroDivisionError("boom")
    monkeypatch.setattr(preprocess_data, "_encode_texts", boom)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ZeroDivisionError, match="boom"):
        run(["--input", corpus, "--output-prefix", str(out / "d"), "--tokenizer", char,
             "--workers", "2", "--chunk-size", "4"])
    assert os.listdir(out) == []


def test_pool_keeps_order_and_slots_when_a_worker_lags(monkeypatch):
    # One worker stuck on the first task while the other has done all the slots allow: once it is
    # done, the pool must feed the (now all idle) workers again, not wait for results.
    def encode(task, slot):
        time.sleep(0.5 if task == 0 else 0.001)
        return task, slot
    monkeypatch.setattr(preprocess_data, "_encode", encode)  # forked workers inherit it
    got = []
    with preprocess_data._Pool(2, None, 2) as pool:
        reader = threading.Thread(target=lambda: got.extend(pool.imap(range(20))), daemon=True)
        reader.start()
        reader.join(30)
        assert not reader.is_alive(), f"the pool stalled after {len(got)} results"
    assert got == [(i, i % 2) for i in range(20)]


def test_skip_bad_lines_counts_and_reports(workdir, tmp_path, capsys):
    root, _, _, char, _ = workdir
    corpus = bad_corpus(tmp_path)
    stats = run(["--input", corpus, "--output-prefix", str(tmp_path / "out"), "--tokenizer",
                 char, "--skip-bad-lines"])
    captured = capsys.readouterr()
    assert stats["skipped"] == 2 and stats["documents"] == 4
    assert "bad lines skipped: 2 (malformed JSON: 1, missing key: 1)" in captured.err
    assert "documents: 4," in captured.out.splitlines()[-1]
    tok = load_tokenizer(char)
    ds = IndexedDataset(str(tmp_path / "out"))
    assert [tok.decode(ds[i]) for i in range(len(ds))] == ["我们", "大", "人", "说"]


def test_document_empty_after_cleaning(workdir, tmp_path):
    root, _, _, char, _ = workdir
    corpus = write_jsonl(tmp_path / "e.jsonl", [{"text": "我们"}, {"text": "\u200b\x00\u200b"},
                                                {"text": "人"}])
    with pytest.raises(DataError, match=rf"{re.escape(corpus)}:2 \(key 'text'\): the document is "
                                        r"empty after cleaning"):
        run(["--input", corpus, "--output-prefix", str(tmp_path / "out"), "--tokenizer", char])
    assert outputs(tmp_path) == []
    stats = run(["--input", corpus, "--output-prefix", str(tmp_path / "out"), "--tokenizer", char,
                 "--skip-bad-lines"])
    assert stats["documents"] == 2 and stats["skipped"] == 1


def test_empty_corpus(workdir, tmp_path):
    root, _, _, char, _ = workdir
    all_bad = write_jsonl(tmp_path / "bad.jsonl", ['{"x": 1}\n', {"text": "\u200b"}])
    with pytest.raises(DataError, match="empty corpus"):
        run(["--input", all_bad, "--output-prefix", str(tmp_path / "out"), "--tokenizer", char,
             "--skip-bad-lines"])
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match="empty corpus.*empty.jsonl"):
        run(["--input", empty, "--output-prefix", str(tmp_path / "out"), "--tokenizer", char])
    assert outputs(tmp_path) == []


def test_word_boundaries_need_a_char_tokenizer(workdir, tmp_path):
    root, _, corpus, _, sp = workdir
    with pytest.raises(TokenizerError, match="--word-boundaries needs a character-level"):
        run(["--input", corpus, "--output-prefix", str(tmp_path / "out"), "--tokenizer", sp,
             "--word-boundaries"])
    assert outputs(tmp_path) == []


def test_t2s_without_opencc_fails_before_writing(workdir, tmp_path, monkeypatch):
    root, _, corpus, char, _ = workdir
    monkeypatch.setitem(sys.modules, "opencc", None)
    monkeypatch.setattr(cleaning, "_OPENCC", None)
    with pytest.raises(ImportError, match="pip install opencc"):
        run(["--input", corpus, "--output-prefix", str(tmp_path / "out"), "--tokenizer", char,
             "--t2s"])
    assert outputs(tmp_path) == []


def test_no_clean_keeps_text(workdir, tmp_path):
    root, _, _, char, _ = workdir
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "我们１２"}])
    run(["--input", corpus, "--output-prefix", str(tmp_path / "raw"), "--tokenizer", char,
         "--no-clean"])
    run(["--input", corpus, "--output-prefix", str(tmp_path / "clean"), "--tokenizer", char])
    tok = load_tokenizer(char)
    assert IndexedDataset(str(tmp_path / "raw"))[0].tolist() == tok.encode("我们１２")
    assert IndexedDataset(str(tmp_path / "clean"))[0].tolist() == tok.encode("我们12")
    assert tok.encode("我们１２") != tok.encode("我们12")


def test_merge_split_and_tokenizer_mismatch(workdir, tmp_path):
    root, texts, corpus, char, sp = workdir
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run(["--input", corpus, "--output-prefix", a, "--tokenizer", char])
    run(["--input", corpus, "--output-prefix", b, "--tokenizer", char])
    preprocess_data.main(["--merge", a, b, "--output-prefix", str(tmp_path / "ab")])
    ab = IndexedDataset(str(tmp_path / "ab"))
    assert len(ab) == 2 * len(texts) and ab[len(texts)].tolist() == ab[0].tolist()

    preprocess_data.main(["--split", "train=0.9,valid=0.05,test=0.05", "--input",
                          str(tmp_path / "ab"), "--output-prefix", str(tmp_path / "ab")])
    sizes = [len(IndexedDataset(str(tmp_path / f"ab_{n}"))) for n in ("train", "valid", "test")]
    assert sizes == [216, 12, 12]
    with pytest.raises(ValueError, match="--split: bad item 'valid'"):
        preprocess_data.main(["--split", "train=0.9,valid", "--input", str(tmp_path / "ab"),
                              "--output-prefix", str(tmp_path / "x")])

    sp_ds = str(tmp_path / "sp")
    run(["--input", corpus, "--output-prefix", sp_ds, "--tokenizer", sp])
    with pytest.raises(ValueError, match="cannot merge"):
        preprocess_data.main(["--merge", a, sp_ds, "--output-prefix", str(tmp_path / "bad")])
    ds = IndexedDataset(a)
    check_tokenizer_hash(ds.tokenizer_hash, load_tokenizer(char), a)
    with pytest.raises(TokenizerError, match=rf"{re.escape(a)} was made with tokenizer"):
        check_tokenizer_hash(ds.tokenizer_hash, load_tokenizer(sp), a)
