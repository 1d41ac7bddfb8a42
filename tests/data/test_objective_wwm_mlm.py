import numpy as np
import pytest
import torch

from megatron_lite.data.objectives.wwm_mlm import IGNORE_INDEX, WholeWordMaskDataset
from tests.data.conftest import ListDataset, random_docs, tiny_char_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def wwm(sample_data):
    return WholeWordMaskDataset(sample_data.bert_ds, sample_data.bert_tokenizer, seed=1,
                                seq_length=512, return_source=True)


def test_reconstructs_source_and_selects_whole_words(sample_data, wwm):
    tok, ds = sample_data.bert_tokenizer, sample_data.bert_ds
    assert len(wwm) >= 3000
    multi_char_words = 0
    for i in range(3000):
        s = wwm[i]
        n = int(s["attention_mask"].sum()) - 2
        source = s["source_ids"].tolist()
        ids, labels = s["input_ids"].tolist(), s["labels"].tolist()
        assert ids[0] == tok.cls_id and ids[n + 1] == tok.sep_id
        assert set(ids[n + 2:]) <= {tok.pad_id} and set(labels[n + 2:]) <= {IGNORE_INDEX}
        assert labels[0] == labels[n + 1] == IGNORE_INDEX
        rebuilt = [l if l != IGNORE_INDEX else t for t, l in zip(ids[1:n + 1], labels[1:n + 1])]
        assert rebuilt == source
        assert s["global_attention_mask"].tolist() == [1] + [0] * (len(ids) - 1)
        assert not s["token_type_ids"].any()

        # Words from the boundaries stored in the dataset (the window edge starts a word).
        doc, start = int(wwm.doc[i]), int(wwm.start[i])
        ws = np.array(ds.word_starts(doc)[start:start + n])
        ws[0] = True
        selected = np.array(labels[1:n + 1]) != IGNORE_INDEX
        target = min(80, max(1, int(np.floor(0.15 * n + 0.5))))
        count = int(selected.sum())
        assert 0 < count <= target
        word = np.cumsum(ws) - 1
        size = np.bincount(word)
        chosen = np.bincount(word, weights=selected)
        assert np.all((chosen == 0) | (chosen == size)), i  # whole words only
        # Only words that would have overshot the target are left out.
        assert np.all(size[chosen == 0] > target - count), i
        multi_char_words += int(((chosen > 0) & (size > 1)).sum())
    assert multi_char_words > 1000  # jieba words, not single characters


def test_80_10_10(sample_data, wwm):
    tok = sample_data.bert_tokenizer
    masked = random = kept = 0
    for i in range(3000):
        s = wwm[i]
        sel = s["labels"] != IGNORE_INDEX
        inp, orig = s["input_ids"][sel], s["labels"][sel]
        masked += int((inp == tok.mask_id).sum())
        kept += int((inp == orig).sum())
        random += int(((inp != tok.mask_id) & (inp != orig)).sum())
        assert not set(inp.tolist()) & (tok.special_ids() - {tok.mask_id})
    total = masked + random + kept
    assert total > 100_000
    assert abs(masked / total - 0.8) < 0.02
    assert abs(random / total - 0.1) < 0.02
    assert abs(kept / total - 0.1) < 0.02


def test_deterministic(sample_data, wwm):
    other = WholeWordMaskDataset(sample_data.bert_ds, sample_data.bert_tokenizer, seed=1,
                                 seq_length=512, return_source=True)
    n = len(wwm)
    for i in (0, 5, n + 5):
        assert all(torch.equal(wwm[i][k], other[i][k]) for k in wwm[i])
    assert torch.equal(wwm[5]["source_ids"], wwm[n + 5]["source_ids"])
    assert not torch.equal(wwm[5]["labels"], wwm[n + 5]["labels"])


def test_caps_and_short_documents():
    tok = tiny_char_tokenizer("bert")
    rng = np.random.default_rng(0)
    docs = random_docs(rng, [1, 2, 30, 2000], tok)
    ws = [np.ones(len(d), bool) for d in docs]  # one-character words
    ws[2][1::2] = False  # 15 two-character words
    ds = WholeWordMaskDataset(ListDataset(docs, ws), tok, seed=0, seq_length=64,
                              max_predictions=5, return_source=True)
    for i in range(len(ds)):
        s = ds[i]
        count = int((s["labels"] != IGNORE_INDEX).sum())
        n = len(s["source_ids"])
        assert count == min(5, max(1, int(np.floor(0.15 * n + 0.5)))) or ds.doc[i] == 2
        assert s["input_ids"].shape == (64,)
    # 30 tokens of two-character words: target round(4.5) = 5, odd, so 4 tokens (2 words) fit.
    (w,) = np.flatnonzero(ds.doc == 2)
    assert int((ds[int(w)]["labels"] != IGNORE_INDEX).sum()) == 4


def test_clear_errors(sample_data):
    with pytest.raises(ValueError, match="character-level"):
        WholeWordMaskDataset(sample_data.spm_ds, sample_data.spm_tokenizer, seed=0)
    bert = tiny_char_tokenizer("bert")
    with pytest.raises(ValueError, match=r"<no-ws>.*--word-boundaries"):
        WholeWordMaskDataset(ListDataset([[7, 8]], prefix="<no-ws>"), bert, seed=0)
    with pytest.raises(ValueError, match="needs the tokenizer's cls token"):
        WholeWordMaskDataset(sample_data.char_ds, sample_data.char_tokenizer, seed=0)


def test_packed_blocks_are_full_and_rebuild_the_document_stream(sample_data):
    """Longformer_ZH's blocks: every document, shuffled per epoch and followed by [SEP], cut into
    full windows; the prediction cap scales with the length (15% of 1022, not BERT's 80)."""
    tok, ds = sample_data.bert_tokenizer, sample_data.bert_ds
    wwm = WholeWordMaskDataset(ds, tok, seed=3, seq_length=1024, pack=True, return_source=True)
    order = wwm.stream.document_order(0)
    stream = np.concatenate([np.append(np.asarray(ds[int(d)], dtype=np.int64), tok.sep_id)
                             for d in order[:400]])
    sources, counts = [], []
    for i in range(120):
        s = wwm[i]
        assert s["attention_mask"].all() and s["input_ids"].shape == (1024,)  # no padding
        ids, labels, source = s["input_ids"].tolist(), s["labels"].tolist(), s["source_ids"]
        assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id
        rebuilt = [l if l != IGNORE_INDEX else t for t, l in zip(ids[1:-1], labels[1:-1])]
        assert rebuilt == source.tolist()
        selected = np.array(labels[1:-1]) != IGNORE_INDEX
        assert not (selected & (source.numpy() == tok.sep_id)).any()  # separators never
        target = int(np.floor(0.15 * int((source != tok.sep_id).sum()) + 0.5))
        counts.append(int(selected.sum()))
        assert target - 4 <= counts[-1] <= target  # whole words: at most a word short
        sources.append(source.numpy())
    assert np.array_equal(np.concatenate(sources), stream[:120 * 1022])
    assert min(counts) > 80


def test_global_cls_flag_and_one_random_stream_per_block():
    """[CLS] is global unless turned off (Longformer_ZH's collator marked none), and identical
    blocks draw different masks (its generator was re-created per block)."""
    tok = tiny_char_tokenizer("bert")
    doc = random_docs(np.random.default_rng(1), [61], tok)[0]
    ds = ListDataset([doc] * 8, [np.ones(61, bool)] * 8)
    packed = WholeWordMaskDataset(ds, tok, seed=0, seq_length=64, pack=True, return_source=True)
    assert len(packed) == 8  # 61 tokens + [SEP] = one 62-token window per document
    masks = {tuple(packed[i]["labels"].tolist()) for i in range(8)}
    assert all(torch.equal(packed[i]["source_ids"], packed[0]["source_ids"]) for i in range(8))
    assert len(masks) == 8
    assert packed[0]["global_attention_mask"].tolist() == [1] + [0] * 63
    off = WholeWordMaskDataset(ds, tok, seed=0, seq_length=64, pack=True, global_cls=False)
    assert not off[0]["global_attention_mask"].any()
    with pytest.raises(ValueError, match="fewer than one block of seq_length - 2 = 998"):
        WholeWordMaskDataset(ds, tok, seed=0, seq_length=1000, pack=True)
