import math

import numpy as np
import pytest
import torch

from megatron_lite.data.objectives.span_corruption import SpanCorruptionDataset
from megatron_lite.data.tokenizer import TokenizerError
from tests.data.conftest import ListDataset, random_docs, tiny_char_tokenizer

torch.set_num_threads(1)


def parse(sample, sentinel_ids, eos_id):
    """(encoder input, [(sentinel, span tokens)], target) of one unpadded example."""
    n_target = int(sample["loss_mask"].sum())
    target = sample["labels"][:n_target].tolist()
    enc = sample["encoder_input_ids"].tolist()
    pad = sample["decoder_input_ids"][0].item()  # decoder start = pad by default
    while enc and enc[-1] == pad:
        enc.pop()
    assert target[-1] == eos_id
    spans = []
    for t in target[:-1]:
        if t in sentinel_ids:
            spans.append((t, []))
        else:
            spans[-1][1].append(t)
    return enc, spans, target


def rebuild(enc, spans, sentinel_ids):
    """Put each span back where its sentinel stands."""
    by_sentinel = dict(spans)
    out = []
    for t in enc:
        out += by_sentinel[t] if t in sentinel_ids else [t]
    return out


def check_examples(dataset, tokenizer, count, first_sentinel=1):
    sentinel_ids = {tokenizer.sentinel_id(k) for k in range(tokenizer.num_sentinels)}
    for i in range(count):
        s = dataset[i]
        enc, spans, target = parse(s, sentinel_ids, tokenizer.eos_id)
        assert rebuild(enc, spans, sentinel_ids) == s["source_ids"].tolist(), i
        # Sentinels in order from first_sentinel, one per span, each span non-empty.
        used = [t for t in enc if t in sentinel_ids]
        assert used == [tokenizer.sentinel_id(first_sentinel + k) for k in range(len(spans))]
        assert [sen for sen, _ in spans] == used and all(span for _, span in spans)
        # Adjacent sentinels in the input would mean two touching spans.
        assert all(not (a in sentinel_ids and b in sentinel_ids) for a, b in zip(enc, enc[1:]))
        # T5 decoder input: target shifted right behind the pad id; padding carries no loss.
        dec = s["decoder_input_ids"].tolist()
        assert dec[0] == tokenizer.pad_id and dec[1:len(target)] == target[:-1]
        assert set(s["labels"][len(target):].tolist()) <= {tokenizer.pad_id}
        assert s["loss_mask"][len(target):].sum() == 0


def test_reconstructs_real_text_char(sample_data):
    tok = sample_data.char_tokenizer
    ds = SpanCorruptionDataset(sample_data.char_ds, tok, seed=1, max_source_length=512,
                               return_source=True)
    assert len(ds) >= 2000
    check_examples(ds, tok, 2000)


def test_reconstructs_real_text_sentencepiece(sample_data):
    tok = sample_data.spm_tokenizer
    ds = SpanCorruptionDataset(sample_data.spm_ds, tok, seed=2, max_source_length=256,
                               first_sentinel=0, return_source=True)
    check_examples(ds, tok, min(len(ds), 1000), first_sentinel=0)


def simulate_span_lengths(n, rng):
    """The specified process, written out step by step: returns the span lengths."""
    budget = math.floor(0.15 * n + 0.5)
    lengths = []
    while sum(lengths) < budget:
        length = 0
        while length == 0:
            length = rng.poisson(3.0)
        lengths.append(min(length, budget - sum(lengths)))
    return lengths


def test_span_statistics_over_10k_long_examples():
    tok = tiny_char_tokenizer()
    rng = np.random.default_rng(0)
    n_examples = 10_000
    lengths = rng.integers(512, 651, size=n_examples)
    # The token values do not matter for the statistics; every document shares one buffer.
    pool = random_docs(rng, [650], tok)[0]
    ds = SpanCorruptionDataset(ListDataset([pool[:n] for n in lengths]), tok, seed=7,
                               max_source_length=650)
    assert ds.window == 650 and len(ds) == n_examples
    sentinel_ids = np.array([tok.sentinel_id(k) for k in range(tok.num_sentinels)])

    masked_fraction, observed, span_at_start, expected_at_start = [], [], 0, 0.0
    for i in range(n_examples):
        s = ds[i]
        enc = s["encoder_input_ids"].numpy()
        target = s["labels"][:int(s["loss_mask"].sum())].numpy()
        is_sentinel = np.isin(target, sentinel_ids)
        starts = np.flatnonzero(is_sentinel)
        span_lengths = np.diff(np.append(starts, len(target) - 1)) - 1
        n = lengths[i]
        masked_fraction.append(span_lengths.sum() / n)
        observed.append(span_lengths)
        enc_sentinel = np.isin(enc, sentinel_ids)
        assert not (enc_sentinel[1:] & enc_sentinel[:-1]).any(), "adjacent spans"
        span_at_start += bool(enc_sentinel[0])
        # Under a uniform composition, P(first gap = 0) = m / (free + m), free = n - k - m + 1.
        m, k = len(span_lengths), span_lengths.sum()
        expected_at_start += m / (n - k - m + 1 + m)
    assert abs(np.mean(masked_fraction) - 0.15) < 0.005

    observed = np.concatenate(observed)
    sim_rng = np.random.default_rng(12345)
    simulated = np.array([x for n in lengths for x in simulate_span_lengths(int(n), sim_rng)])
    for length in range(1, 9):
        ours, theirs = np.mean(observed == length), np.mean(simulated == length)
        assert abs(ours - theirs) < 0.01, (length, ours, theirs)
    # Placement is a uniform composition of the gaps: spans open the window as often as it says.
    assert abs(span_at_start - expected_at_start) / n_examples < 0.01


def test_windows_never_need_more_sentinels_than_exist():
    tok = tiny_char_tokenizer(num_sentinels=10)  # 9 usable from <extra_id_1>
    rng = np.random.default_rng(1)
    docs = random_docs(rng, [5000, 700, 64, 63, 2, 1], tok)
    ds = SpanCorruptionDataset(ListDataset(docs), tok, seed=0, max_source_length=512,
                               return_source=True)
    assert ds.window == 63  # round(0.15 * 63) = 9 masks at most; 64 would need 10
    assert ds.max_target_length == 2 * 9 + 1
    covered = {}
    for i in range(len(ds)):
        assert len(ds[i]["source_ids"]) <= 63
        covered.setdefault(int(ds.doc[i]), []).append(ds[i]["source_ids"])
    # Windows tile each document exactly; the 1-token document is skipped.
    assert sorted(covered) == [0, 1, 2, 3, 4]
    for d, parts in covered.items():
        assert torch.cat(parts).tolist() == docs[d].tolist()
    check_examples(ds, tok, len(ds))


def test_deterministic_per_seed_epoch_and_index(sample_data):
    tok = sample_data.char_tokenizer
    make = lambda seed: SpanCorruptionDataset(sample_data.char_ds, tok, seed=seed,  # noqa: E731
                                              return_source=True)
    a, b, c = make(5), make(5), make(6)
    n = len(a)
    for i in (0, 7, n - 1, n + 7):
        for key in a[i]:
            assert torch.equal(a[i][key], b[i][key])
    assert not torch.equal(a[7]["encoder_input_ids"], c[7]["encoder_input_ids"])
    # The next epoch masks the same window differently.
    assert torch.equal(a[7]["source_ids"], a[n + 7]["source_ids"])
    assert not torch.equal(a[7]["encoder_input_ids"], a[n + 7]["encoder_input_ids"])


def test_bad_setups_are_clear_errors(sample_data):
    with pytest.raises(TokenizerError, match=sample_data.char_prefix):
        SpanCorruptionDataset(sample_data.char_ds, sample_data.bert_tokenizer, seed=0)
    no_sentinels = tiny_char_tokenizer("bert")
    with pytest.raises(ValueError, match="sentinel"):
        SpanCorruptionDataset(ListDataset([[10] * 50]), no_sentinels, seed=0)
    with pytest.raises(ValueError, match="noise_density"):
        SpanCorruptionDataset(ListDataset([[10] * 50]), tiny_char_tokenizer(), seed=0,
                              noise_density=0.7)
