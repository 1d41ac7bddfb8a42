"""sample_next: padded columns, greedy, top-k, top-p, temperature, repetition penalty, determinism."""
import pytest
import torch

from megatron_lite.inference import sample_next

V, V_PAD = 100, 128


def logits(b=4, seed=0):
    return torch.randn(b, V_PAD, generator=torch.Generator().manual_seed(seed)) * 3


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_padded_columns_never_chosen():
    x = logits(b=512)
    x[:, V:] = 1e4  # padding columns look best of all
    for kw in (dict(greedy=True), dict(temperature=1e6), dict(temperature=1.0, top_p=0.5),
               dict(top_k=V_PAD)):
        ids = sample_next(x, vocab_size=V, generator=gen(), **kw)
        assert int(ids.max()) < V, kw


def test_top_k_1_is_greedy():
    x = logits(b=64)
    greedy = sample_next(x, vocab_size=V, greedy=True)
    assert torch.equal(greedy, x[:, :V].argmax(-1))
    assert torch.equal(sample_next(x, vocab_size=V, top_k=1, temperature=5.0, generator=gen()),
                       greedy)


def test_samples_stay_inside_top_k_and_top_p_sets():
    x = logits(b=8).repeat(64, 1)
    top5 = x[:, :V].topk(5).indices
    ids = sample_next(x, vocab_size=V, top_k=5, temperature=3.0, generator=gen(1))
    assert (top5 == ids[:, None]).any(-1).all()

    p = 0.6
    probs = x[:, :V].softmax(-1)
    ids = sample_next(x, vocab_size=V, top_p=p, generator=gen(2))
    sorted_p, order = probs.sort(-1, descending=True)
    rank = (order == ids[:, None]).float().argmax(-1)
    mass_before = torch.stack([sorted_p[i, :rank[i]].sum() for i in range(len(ids))])
    assert (mass_before < p).all()
    # The nucleus really is small: nothing far down the ranking was drawn.
    assert int(rank.max()) < 30


def test_temperature_sharpens_and_flattens():
    x = logits(b=1).repeat(2000, 1)
    best = int(x[0, :V].argmax())
    cold = sample_next(x, vocab_size=V, temperature=0.05, generator=gen(3))
    hot = sample_next(x, vocab_size=V, temperature=100.0, generator=gen(3))
    assert (cold == best).float().mean() > 0.95
    assert len(set(hot.tolist())) > 60


def test_deterministic_given_generator():
    x = logits(b=16)
    a = sample_next(x, vocab_size=V, top_p=0.9, generator=gen(7))
    b = sample_next(x, vocab_size=V, top_p=0.9, generator=gen(7))
    assert torch.equal(a, b)


def test_repetition_penalty():
    x = torch.zeros(2, V_PAD)
    x[:, 3], x[:, 4], x[:, 5] = 2.0, 1.5, -1.0
    seen = torch.tensor([[3, 5], [7, 7]])
    ids = sample_next(x, vocab_size=V, greedy=True, repetition_penalty=2.0, generated_ids=seen)
    assert ids.tolist() == [4, 3]  # 3 is penalised to 1.0 < 1.5 in row 0 only


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=0.0), "temperature"), (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(vocab_size=V_PAD + 1), "vocab_size"),
])
def test_bad_arguments(kw, match):
    kw = {"vocab_size": V, **kw}
    with pytest.raises(ValueError, match=match):
        sample_next(logits(), **kw)
