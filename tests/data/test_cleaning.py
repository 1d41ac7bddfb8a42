import sys

import pytest

from megatron_lite.data import cleaning
from megatron_lite.data.cleaning import CleaningOptions, clean_text

CJK_PUNCT = "，。：；！？（）「」《》“”‘’、……——～·【】〔〕＂＃％＆＊＋－．／＜＝＞＠［］｛｜｝￥"


def test_nfkc_keeps_chinese_punctuation():
    text = f"他说{CJK_PUNCT}好"
    assert clean_text(text) == text


def test_fullwidth_letters_digits_and_ideographic_space_fold():
    assert clean_text("ＡＢＣ　ｘｙｚ１２３") == "ABC xyz123"
    assert clean_text("１９９８年，中国") == "1998年，中国"


def test_other_nfkc_forms_still_normalise():
    # Half-width CJK punctuation and compatibility characters go to their usual forms.
    assert clean_text("好｡对､") == "好。对、"
    assert clean_text("ﬁ①") == "fi1"


def test_fold_switch_off_keeps_fullwidth_letters_even_under_nfkc():
    assert clean_text("ＡＢ１，好", fold_fullwidth=False) == "ＡＢ１，好"


def test_nfkc_switch_off_still_folds_letters():
    assert clean_text("Ａ①，", nfkc=False) == "A①，"


def test_drop_control_characters_keeps_newlines():
    text = "a\x00b\x07c\u200bd\ufeffe\ufffdf\x7fg\n\nh"
    assert clean_text(text, collapse_whitespace=False) == "abcdefg\n\nh"
    assert clean_text(text, drop_control=False, collapse_whitespace=False) == text


def test_collapse_whitespace():
    assert clean_text("  a \t  b  \n \n\n  c  ") == "a b\nc"
    assert clean_text("a\u00a0\u3000b") == "a b"
    assert clean_text("a  b", collapse_whitespace=False) == "a  b"


def test_all_steps_off_is_identity():
    text = "ＡＢ，\x00  \u3000ﬁ\n\n"
    off = dict(nfkc=False, fold_fullwidth=False, drop_control=False, collapse_whitespace=False)
    assert clean_text(text, **off) == text
    assert CleaningOptions(enabled=False)(text) == text


def test_options_object_matches_function():
    text = "ＡＢ，\x00  x"
    opts = CleaningOptions(fold_fullwidth=False)
    assert opts(text) == clean_text(text, fold_fullwidth=False)


def test_t2s_without_opencc_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "opencc", None)  # makes `import opencc` fail
    monkeypatch.setattr(cleaning, "_OPENCC", None)
    with pytest.raises(ImportError, match="pip install opencc"):
        clean_text("漢語", t2s=True)
    with pytest.raises(ImportError, match="--t2s"):
        CleaningOptions(t2s=True).check_available()
    CleaningOptions(t2s=False).check_available()


def test_t2s_converts_when_opencc_is_installed():
    pytest.importorskip("opencc")
    assert clean_text("漢語簡體") == "漢語簡體"
    assert clean_text("漢語", t2s=True) == "汉语"
