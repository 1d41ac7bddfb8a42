import io
import json
import os
import random

import pytest

from megatron_lite.data.tokenizer import (CharTokenizer, SentencePieceTokenizer, TokenizerError,
                                          check_tokenizer_hash, load_tokenizer)
from tools import train_tokenizer

CJK = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产"
WORDS = ["hello", "world", "LongLM", "2023"]


def synthetic_corpus(n_lines=400, seed=0):
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        parts = ["".join(rng.choices(CJK, k=rng.randint(3, 12))) + rng.choice("，。！？")
                 for _ in range(rng.randint(1, 4))]
        if rng.random() < 0.3:
            parts.insert(rng.randint(0, len(parts)), " " + rng.choice(WORDS) + " ")
        lines.append("".join(parts))
    return lines


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "c.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, line in enumerate(synthetic_corpus()):
            # Two-paragraph documents, so "\n" is part of the training text.
            f.write(json.dumps({"text": line + ("\n" + line[::-1] if i % 2 else "")},
                               ensure_ascii=False) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def sp_dir(corpus_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sp"))
    train_tokenizer.main(["--input", corpus_file, "--output-dir", out, "--type", "sentencepiece",
                          "--vocab-size", "600", "--byte-fallback", "--num-threads", "1"])
    return out


# -- character tokenizers ----------------------------------------------------------------------

def test_char_vocab_order_is_specials_sentinels_then_frequency():
    tok = CharTokenizer.train(["bba", "cab", "d"], preset="linglong", num_sentinels=3)
    assert tok.tokens[:5] == ["<pad>", "<unk>", "<|endoftext|>", "<sep>", "<|startoftext|>"]
    assert tok.tokens[5:8] == ["<extra_id_0>", "<extra_id_1>", "<extra_id_2>"]
    # b x3, a x2, c x1 and d x1 tie: code point order.
    assert tok.tokens[8:] == ["b", "a", "c", "d"]
    again = CharTokenizer.train(["d", "cab", "bba"], preset="linglong", num_sentinels=3)
    assert again.tokens == tok.tokens and again.hash == tok.hash


def test_char_min_count_and_cap():
    tok = CharTokenizer.train(["aaab", "bc"], preset="bert", min_count=2)
    assert tok.tokens[5:] == ["a", "b"]
    capped = CharTokenizer.train(["aaab", "bc"], preset="bert", max_vocab=6)
    assert capped.tokens[5:] == ["a"]
    with pytest.raises(TokenizerError, match="no character occurs at least 5"):
        CharTokenizer.train(["ab"], preset="bert", min_count=5)


def test_char_roundtrip_whitespace_and_unknown():
    tok = CharTokenizer.train(["你好 世界\n再见", "ab"], preset="linglong")
    text = "你好 世界\n再见ab"
    ids = tok.encode(text)
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.encode("你龘") == [tok.token_to_id("你"), tok.unk_id]
    assert tok.decode(tok.encode("龘")) == "<unk>"


def test_char_encode_does_not_parse_special_strings():
    tok = CharTokenizer.train(["[MASK]<pad>"], preset="bert")
    assert tok.mask_id not in tok.encode("[MASK]")
    assert len(tok.encode("[MASK]")) == 6


def test_presets_special_ids():
    bert = CharTokenizer.train(["中文"], preset="bert")
    assert (bert.pad_id, bert.unk_id, bert.cls_id, bert.sep_id, bert.mask_id) == (0, 1, 2, 3, 4)
    assert bert.eod_id == bert.sep_id and bert.eos_id == bert.sep_id and bert.bos_id == bert.cls_id
    assert bert.num_sentinels == 0
    ll = CharTokenizer.train(["中文"], preset="linglong")
    assert (ll.pad_id, ll.unk_id, ll.eod_id, ll.sep_id, ll.bos_id) == (0, 1, 2, 3, 4)
    assert ll.eos_id == ll.eod_id and ll.cls_id is None and ll.mask_id is None
    assert ll.num_sentinels == 100 and ll.sentinel_id(0) == 5 and ll.sentinel_id(99) == 104
    assert ll.special_ids() == set(range(105))
    assert ll.is_char_level


def test_custom_special_tokens():
    tok = CharTokenizer.train(["中文"], preset=None, num_sentinels=0,
                              special_tokens={"pad": "<p>", "unk": "<u>", "eod": "<e>"})
    assert tok.tokens[:3] == ["<p>", "<u>", "<e>"] and tok.eos_id == tok.eod_id == 2
    with pytest.raises(TokenizerError, match="needs a 'eod' special token"):
        CharTokenizer.train(["中文"], preset=None, special_tokens={"pad": "<p>", "unk": "<u>"})


def test_sentinel_out_of_range_names_k_and_count():
    tok = CharTokenizer.train(["中文"], preset="linglong", num_sentinels=4)
    with pytest.raises(ValueError, match=r"<extra_id_4>.*has 4 sentinels"):
        tok.sentinel_id(4)
    with pytest.raises(ValueError, match="has 0 sentinels"):
        CharTokenizer.train(["中文"], preset="bert").sentinel_id(0)


def test_decode_skips_pad_shows_specials():
    tok = CharTokenizer.train(["中文"], preset="bert", num_sentinels=2)
    ids = [tok.cls_id, tok.token_to_id("中"), tok.mask_id, tok.sentinel_id(1), tok.sep_id,
           tok.pad_id, tok.pad_id]
    assert tok.decode(ids) == "[CLS]中[MASK]<extra_id_1>[SEP]"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_char_save_load_hash(tmp_path):
    tok = CharTokenizer.train(["你好 世界\n\t再见\u3000\U000e0001\U00020000"], preset="linglong",
                              num_sentinels=10)
    tok.save(str(tmp_path / "t"))
    assert sorted(os.listdir(tmp_path / "t")) == ["tokenizer.json", "vocab.txt"]
    loaded = load_tokenizer(str(tmp_path / "t"))
    assert isinstance(loaded, CharTokenizer)
    assert loaded.tokens == tok.tokens and loaded.hash == tok.hash
    assert loaded.special_tokens == tok.special_tokens and loaded.num_sentinels == 10
    assert load_tokenizer(str(tmp_path / "t" / "tokenizer.json")).hash == tok.hash
    loaded.save(str(tmp_path / "again"))
    for name in ("vocab.txt", "tokenizer.json"):
        assert (tmp_path / "t" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    lines = (tmp_path / "t" / "vocab.txt").read_text(encoding="utf-8").split("\n")
    assert {"\\u000a", "\\u0009", "\\u3000", "\\U000e0001", "\U00020000"} <= set(lines)
    other = CharTokenizer.train(["你好 世界\n\t再见!"], preset="linglong", num_sentinels=10)
    assert other.hash != tok.hash


def test_from_vocab_file_bert_style(tmp_path):
    vocab = ["[PAD]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "中", "文", "##文",
             "hello", "\\u0020"]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = load_tokenizer(str(path))  # preset guessed from the special tokens present
    assert tok.preset == "bert" and tok.vocab_size == len(vocab)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 2, 3, 4, 5)
    ids = tok.encode("中文 文hello")
    assert tok.token_to_id("##文") not in ids and tok.token_to_id("hello") not in ids
    assert ids[2] == tok.token_to_id(" ")
    assert tok.decode([tok.token_to_id("中"), tok.token_to_id("##文")]) == "中文"
    with_sentinels = CharTokenizer.from_vocab_file(str(path), preset="bert", num_sentinels=3)
    assert with_sentinels.sentinel_id(2) == len(vocab) + 2


@pytest.mark.parametrize("lines,message", [
    (["[PAD]", "[UNK]", "a", "a"], "token 'a' appears twice"),
    (["[PAD]", "", "a"], r"vocab.txt:2: empty line"),
    (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a"], "special token '\\[MASK\\]'"),
])
def test_bad_vocab_files(tmp_path, lines, message):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=message):
        CharTokenizer.from_vocab_file(str(path), preset="bert")


def test_train_tool_char_from_vocab(tmp_path):
    src = tmp_path / "vocab.txt"
    src.write_text("<pad>\n<unk>\n<|endoftext|>\n<sep>\n<|startoftext|>\n中\n", encoding="utf-8")
    tok = train_tokenizer.main(["--type", "char", "--from-vocab", str(src), "--preset", "linglong",
                                "--num-sentinels", "2", "--output-dir", str(tmp_path / "out")])
    assert load_tokenizer(str(tmp_path / "out")).hash == tok.hash
    assert tok.tokens == ["<pad>", "<unk>", "<|endoftext|>", "<sep>", "<|startoftext|>", "中",
                          "<extra_id_0>", "<extra_id_1>"]


def test_train_tool_char_from_corpus(corpus_file, tmp_path):
    tok = train_tokenizer.main(["--input", corpus_file, "--type", "char", "--preset", "bert",
                                "--min-count", "2", "--output-dir", str(tmp_path / "c")])
    assert tok.tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert set(CJK) <= set(tok.tokens) and "\n" in tok.tokens


# -- sentencepiece -----------------------------------------------------------------------------

def test_sentencepiece_fixed_ids_and_sentinels(sp_dir):
    tok = load_tokenizer(sp_dir)
    assert isinstance(tok, SentencePieceTokenizer) and not tok.is_char_level
    assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.bos_id) == (0, 1, 2, 3)
    assert tok.eod_id == tok.eos_id and tok.mask_id is None and tok.cls_id is None
    assert tok.vocab_size == 600 and tok.num_sentinels == 100
    assert [tok.sentinel_id(k) for k in (0, 1, 99)] == [4, 5, 103]
    assert tok.id_to_token(4) == "<extra_id_0>" and tok.token_to_id("<extra_id_99>") == 103
    with pytest.raises(ValueError, match="<extra_id_100>.*has 100 sentinels"):
        tok.sentinel_id(100)


def test_sentencepiece_roundtrip(sp_dir):
    tok = load_tokenizer(sp_dir)
    for text in synthetic_corpus(50, seed=1) + ["的是\n在不 hello 2023", "龘 byte fallback"]:
        ids = tok.encode(text)
        assert tok.bos_id not in ids and tok.eos_id not in ids
        assert tok.decode(ids) == text
    ids = tok.encode("的是")
    assert tok.decode([tok.sentinel_id(1)] + ids + [tok.eos_id, tok.pad_id]) == \
        "<extra_id_1>的是</s>"


def test_sentencepiece_save_load_hash(sp_dir, tmp_path):
    tok = load_tokenizer(sp_dir)
    tok.save(str(tmp_path / "copy"))
    copy = load_tokenizer(str(tmp_path / "copy"))
    assert copy.hash == tok.hash and copy.encode("的是在") == tok.encode("的是在")
    for name in ("spiece.model", "tokenizer.json"):
        assert (tmp_path / "copy" / name).read_bytes() == open(os.path.join(sp_dir, name),
                                                               "rb").read()


def test_hf_style_model_gets_sentinels_appended_at_the_top(corpus_file, tmp_path):
    import sentencepiece as spm
    texts = [json.loads(line)["text"] for line in open(corpus_file, encoding="utf-8")]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model,
                                   vocab_size=200, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   minloglevel=2, num_threads=1)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "spiece.model").write_bytes(model.getvalue())
    tok = load_tokenizer(str(hf))
    assert tok.vocab_size == 300 and tok.num_sentinels == 100 and tok.bos_id is None
    assert tok.sentinel_id(0) == 299 and tok.sentinel_id(99) == 200  # T5's layout
    assert tok.token_to_id("<extra_id_0>") == 299 and tok.id_to_token(200) == "<extra_id_99>"
    assert tok.decode([tok.sentinel_id(0)]) == "<extra_id_0>"
    tok.save(str(tmp_path / "saved"))
    again = load_tokenizer(str(tmp_path / "saved"))
    assert again.hash == tok.hash and again.sentinel_id(0) == 299
    (hf / "tokenizer_config.json").write_text('{"extra_ids": 10}')
    assert load_tokenizer(str(hf)).num_sentinels == 10


# -- loading errors and hash checks ------------------------------------------------------------

def test_check_tokenizer_hash(sp_dir):
    tok = load_tokenizer(sp_dir)
    check_tokenizer_hash(tok.hash, tok, "data/train")
    other = CharTokenizer.train(["中文"], preset="linglong")
    with pytest.raises(TokenizerError) as e:
        check_tokenizer_hash(tok.hash, other, "data/train_text_document")
    msg = str(e.value)
    assert "data/train_text_document" in msg and tok.hash in msg and other.hash in msg
    assert "preprocess_data.py" in msg


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no such tokenizer"):
        load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="train a tokenizer with tools/train_tokenizer.py"):
        load_tokenizer(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text('{"kind": "char"}')
    with pytest.raises(TokenizerError, match=r"bad/tokenizer.json: malformed tokenizer metadata"):
        load_tokenizer(str(bad))
    (bad / "tokenizer.json").write_text('{"kind": "sentencepiece", "model_file": "spiece.model", '
                                        '"num_extra_ids": 0}')
    (bad / "spiece.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a valid sentencepiece model"):
        load_tokenizer(str(bad))
