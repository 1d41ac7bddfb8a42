import numpy as np
import pytest
import torch

from megatron_lite.data.objectives.continuation import ContinuationDataset, MixedT5Dataset
from megatron_lite.data.objectives.span_corruption import SpanCorruptionDataset
from megatron_lite.data.sampler import collate
from tests.data.conftest import ListDataset, random_docs, tiny_char_tokenizer

torch.set_num_threads(1)


def front_and_back(sample, tok, sentinel):
    enc = sample["encoder_input_ids"].tolist()
    while enc[-1] == tok.pad_id:
        enc.pop()
    target = sample["labels"][:int(sample["loss_mask"].sum())].tolist()
    assert enc[-1] == sentinel and target[0] == sentinel and target[-1] == tok.eos_id
    return enc[:-1], target[1:-1]


@pytest.mark.parametrize("name", ["char", "spm"])
def test_front_plus_back_is_the_source(sample_data, name):
    tok, ds = getattr(sample_data, f"{name}_tokenizer"), getattr(sample_data, f"{name}_ds")
    cont = ContinuationDataset(ds, tok, seed=1, max_source_length=300, max_target_length=300,
                               return_source=True)
    sentinel = tok.sentinel_id(1)
    fractions = []
    for i in range(min(len(cont), 2500)):
        s = cont[i]
        front, back = front_and_back(s, tok, sentinel)
        source = s["source_ids"].tolist()
        assert front + back == source
        assert front and back
        n, p = len(source), len(front)
        assert np.ceil(0.1 * n) <= p <= np.floor(0.9 * n) or n < 10
        fractions.append(p / n)
        dec = s["decoder_input_ids"].tolist()
        assert dec[0] == tok.pad_id and dec[1:len(back) + 2] == [sentinel] + back
    # Uniform split points: mean 0.5, spread of U(0.1, 0.9) (sd 0.231).
    assert abs(np.mean(fractions) - 0.5) < 0.02
    assert abs(np.std(fractions) - 0.8 / np.sqrt(12)) < 0.02


def test_windows_fit_every_split():
    tok = tiny_char_tokenizer()
    docs = random_docs(np.random.default_rng(0), [3000, 50, 1], tok)
    cont = ContinuationDataset(ListDataset(docs), tok, seed=0, max_source_length=64,
                               max_target_length=32, return_source=True)
    # Every split p in [ceil(0.1 n), floor(0.9 n)] must fit: front + sentinel <= 64 and
    # sentinel + back + eos <= 32, i.e. n - ceil(0.1 n) + 2 <= 32: n = 34 (35 - 4 + 2 = 33).
    assert cont.window == 34
    assert sorted(set(cont.doc.tolist())) == [0, 1]
    for epoch in range(3):
        for i in range(len(cont)):
            s = cont[epoch * len(cont) + i]
            assert s["encoder_input_ids"].shape == (64,) and s["labels"].shape == (32,)
            front, back = front_and_back(s, tok, tok.sentinel_id(1))
            assert front + back == s["source_ids"].tolist()


def test_mixture_is_deterministic_and_proportional(sample_data):
    tok, ds = sample_data.char_tokenizer, sample_data.char_ds
    span = SpanCorruptionDataset(ds, tok, seed=1, max_source_length=256, max_target_length=128)
    cont = ContinuationDataset(ds, tok, seed=1, max_source_length=256, max_target_length=128)
    mixed = MixedT5Dataset([span, cont], seed=3)
    again = MixedT5Dataset([span, cont], seed=3)
    assert len(mixed) == len(span) + len(cont)
    assert abs(int(mixed.counts[0]) - int(mixed.counts[1])) <= 1

    def is_continuation(s):  # continuation targets start with <extra_id_1> and hold one
        return int((s["labels"] == tok.sentinel_id(1)).sum()) == 1 and \
            int((s["labels"] == tok.sentinel_id(2)).sum()) == 0

    kinds = []
    for i in range(0, 400):
        s = mixed[i]
        assert all(torch.equal(s[k], again[i][k]) for k in s)
        kinds.append(int(mixed.owner[i]))
        if mixed.owner[i] == 1:
            assert is_continuation(s)
        child = mixed.datasets[mixed.owner[i]]
        assert torch.equal(s["labels"], child[int(mixed.rank[i])]["labels"])
    assert 0.4 < np.mean(kinds) < 0.6
    # The next mixed epoch reads each child's next epoch.
    i = int(np.flatnonzero(mixed.owner == 0)[0])
    assert torch.equal(mixed[len(mixed) + i]["labels"],
                       span[int(mixed.counts[0]) + int(mixed.rank[i])]["labels"])
    assert collate([mixed[i] for i in range(8)])["labels"].shape == (8, 128)

    uneven = MixedT5Dataset([span, cont], ratios=[3, 1], seed=0)
    assert abs(uneven.counts[0] / len(uneven) - 0.75) < 1e-3
    with pytest.raises(ValueError, match="max_target_length"):
        MixedT5Dataset([span, ContinuationDataset(ds, tok, seed=1, max_source_length=256)])
