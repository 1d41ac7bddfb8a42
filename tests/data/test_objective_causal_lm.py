import numpy as np
import pytest
import torch

from megatron_lite.data.objectives.causal_lm import CausalLMDataset
from tests.data.conftest import ListDataset

torch.set_num_threads(1)


def expected_stream(ds, order, eod, backward):
    """An epoch's stream built the obvious way: each document (reversed if asked) then eod."""
    parts = []
    for d in order:
        doc = np.asarray(ds[int(d)], dtype=np.int64)
        parts += [doc[::-1] if backward else doc, [eod]]
    return np.concatenate(parts)


def rebuilt_stream(dataset, epoch):
    """Inputs plus the last label of each sample, overlapping samples joined."""
    n = len(dataset)
    pieces = []
    for i in range(epoch * n, (epoch + 1) * n):
        s = dataset[i]
        x = torch.cat([s["input_ids"], s["labels"][-1:]])
        assert torch.equal(s["input_ids"][1:], s["labels"][:-1])
        pieces.append(x if not pieces else x[1:])
    return torch.cat(pieces).numpy()


@pytest.mark.parametrize("backward", [False, True])
def test_epoch_reconstructs_the_shuffled_documents(sample_data, backward):
    ds, eod = sample_data.char_ds, sample_data.char_tokenizer.eod_id
    seq = 1024
    lm = CausalLMDataset(ds, seq, eod, seed=3, backward=backward)
    assert len(lm) == (int(ds.sizes.sum()) + len(ds) - 1) // seq and len(lm) > 1500
    orders = []
    for epoch in (0, 1):
        order = lm.document_order(epoch)
        assert sorted(order.tolist()) == list(range(len(ds)))
        want = expected_stream(ds, order, eod, backward)[:len(lm) * seq + 1]
        assert np.array_equal(rebuilt_stream(lm, epoch), want)
        orders.append(order)
    assert not np.array_equal(*orders)  # a fresh document order each epoch


def positions_by_hand(input_ids, eod):
    out, p = [], 0
    for t in input_ids:
        out.append(p)
        p = 0 if t == eod else p + 1
    return out


def mask_by_hand(input_ids, eod):
    n = len(input_ids)
    doc, d = [], 0
    for t in input_ids:
        doc.append(d)
        d += t == eod
    return [[j <= i and doc[i] == doc[j] for j in range(n)] for i in range(n)]


def test_reset_options_and_eod_loss_mask(sample_data):
    ds, eod = sample_data.char_ds, sample_data.char_tokenizer.eod_id
    seq = 128  # short samples, so many hold a document boundary
    plain = CausalLMDataset(ds, seq, eod, seed=4)
    lm = CausalLMDataset(ds, seq, eod, seed=4, reset_position_ids=True, reset_attention_mask=True,
                         eod_mask_loss=True)
    assert "attention_mask" not in plain[0]
    assert torch.equal(plain[0]["position_ids"], torch.arange(seq))
    with_boundary = 0
    for i in range(0, len(lm), 7):
        s, p = lm[i], plain[i]
        assert torch.equal(s["input_ids"], p["input_ids"]) and torch.equal(s["labels"], p["labels"])
        ids = s["input_ids"].tolist()
        with_boundary += eod in ids[:-1]
        assert s["position_ids"].tolist() == positions_by_hand(ids, eod)
        assert s["loss_mask"].tolist() == [float(t != eod) for t in s["labels"].tolist()]
        if i % 49 == 0:  # the quadratic hand-made mask on a subset
            assert s["attention_mask"].shape == (1, seq, seq)
            assert s["attention_mask"][0].tolist() == mask_by_hand(ids, eod)
    assert with_boundary > 100


def test_deterministic_and_documented_errors():
    docs = [np.arange(10, 10 + n) for n in (5, 9, 3, 12)]
    a = CausalLMDataset(ListDataset(docs), 4, 0, seed=1, return_source=True)
    b = CausalLMDataset(ListDataset(docs), 4, 0, seed=1, return_source=True)
    for i in range(3 * len(a)):
        for k in a[i]:
            assert torch.equal(a[i][k], b[i][k])
    assert a[0]["source_ids"].shape == (5,)
    with pytest.raises(ValueError, match="seq-length"):
        CausalLMDataset(ListDataset([[5, 6]]), 8, 0, seed=0)
    with pytest.raises(ValueError, match="no documents"):
        CausalLMDataset(ListDataset([]), 8, 0, seed=0)
    with pytest.raises(IndexError, match="negative"):
        a[-1]


@pytest.mark.parametrize("backward", [False, True])
def test_datasets_built_with_append_eod(backward):
    eod = 0
    bare = [np.arange(10, 10 + n) for n in (5, 9, 3, 12, 7)]
    with_eod = ListDataset([np.append(d, eod) for d in bare])
    with pytest.raises(ValueError, match="append_eod=False"):
        CausalLMDataset(with_eod, 4, eod, seed=1)
    a = CausalLMDataset(ListDataset(bare), 4, eod, seed=1, backward=backward)
    b = CausalLMDataset(with_eod, 4, eod, seed=1, backward=backward, append_eod=False)
    assert len(a) == len(b)
    for i in range(2 * len(a)):
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"])
        assert torch.equal(a[i]["labels"], b[i]["labels"])
