"""The fused output head + cross entropy (`vocab_parallel_linear_cross_entropy`) against its
reference, the head's logits followed by `vocab_parallel_cross_entropy` and the masked mean: the
loss and the gradients of the hidden states and of the weight, at TP=1 and TP=2 (two gloo ranks),
over chunk boundaries, padding columns, ignored labels and masked tokens; and its peak memory
(one chunk's logits and softmax at a time)."""
import pytest
import torch

from megatron_lite.parallel import (ParallelState, TiedGradient, VocabParallelEmbedding,
                                    parallel_lm_logits, vocab_parallel_cross_entropy,
                                    vocab_parallel_linear_cross_entropy)
from megatron_lite.testing import run_distributed

B, S, H, PADDED, VOCAB = 3, 37, 16, 128, 100   # columns 100..127 are padding


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, H, generator=g, dtype=dtype)
    weight = torch.randn(PADDED, H, generator=g, dtype=dtype)
    weight[VOCAB:] *= 50  # padding columns would dominate the softmax if they counted
    labels = torch.randint(0, VOCAB, (B, S), generator=g)
    labels[0, :5] = -100
    labels[2, 7] = -1
    mask = (torch.rand(B, S, generator=g) > 0.2).to(dtype)
    mask[1, 3] = 2.5  # a weighted token
    return hidden, weight, labels, mask


def _reference(hidden, weight, labels, mask, ps):
    per_token = vocab_parallel_cross_entropy(parallel_lm_logits(hidden, weight, ps), labels, ps,
                                             vocab_size=VOCAB)
    return (per_token * mask).sum() / mask.sum().clamp(min=1), mask.sum()


def _loss_and_grads(fn, hidden, weight, labels, mask, ps, scale=1.7, **kw):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, n_tokens = fn(hidden, weight, labels, mask, ps, **kw)
    (loss * scale).backward()
    return loss.detach(), n_tokens, hidden.grad, weight.grad


@pytest.mark.parametrize("dtype, tol", [(torch.float64, dict(rtol=1e-10, atol=1e-12)),
                                        (torch.float32, dict(rtol=1e-5, atol=1e-6))])
@pytest.mark.parametrize("chunk_rows, scale", [(1, 1.7), (10, 1.7), (37, 1.0), (1000, 1.7)])
def test_fused_head_matches_logits_then_cross_entropy(dtype, tol, chunk_rows, scale):
    # scale 1.0: backward hands over the gradients made in forward as they are (no product)
    ps = ParallelState.single()
    inputs = _inputs(dtype)
    want = _loss_and_grads(_reference, *inputs, ps, scale=scale)
    got = _loss_and_grads(
        lambda *a: vocab_parallel_linear_cross_entropy(*a, vocab_size=VOCAB,
                                                       chunk_rows=chunk_rows), *inputs, ps,
        scale=scale)
    for name, w, g in zip(("loss", "n_tokens", "hidden grad", "weight grad"), want, got):
        torch.testing.assert_close(g, w, **tol, msg=lambda m: f"{name}: {m}")
    assert got[3][VOCAB:].abs().max() == 0  # padding rows get no gradient


def test_no_grad_gives_the_loss_and_a_mask_of_zeros_gives_zero():
    ps = ParallelState.single()
    hidden, weight, labels, mask = _inputs(torch.float64)
    with torch.no_grad():
        loss, _ = vocab_parallel_linear_cross_entropy(hidden, weight, labels, mask, ps,
                                                      vocab_size=VOCAB)
    torch.testing.assert_close(loss, _reference(hidden, weight, labels, mask, ps)[0])
    zero = _loss_and_grads(lambda *a: vocab_parallel_linear_cross_entropy(*a, vocab_size=VOCAB),
                           hidden, weight, labels, torch.zeros_like(mask), ps)
    assert zero[0] == 0 and zero[1] == 0 and zero[2].abs().max() == 0 and zero[3].abs().max() == 0


@pytest.mark.parametrize("scale, twice", [(1.0, False), (1.7, False), (1.0, True)])
def test_tied_lookup_and_head_give_the_gradient_autograd_sums(scale, twice):
    """With a TiedGradient the head leaves its weight gradient for the lookup's backward, which
    adds its rows into it: the weight gradient autograd makes by adding the two, also when
    backward runs twice (retain_graph: the head makes its gradient again)."""
    ps = ParallelState.single()
    _, weight, labels, mask = _inputs(torch.float64)
    ids = torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(3))
    ids[0, :4] = 7  # a repeated id: its rows add up
    table = VocabParallelEmbedding(PADDED, H, ps).double()
    with torch.no_grad():
        table.weight.copy_(weight)

    def weight_grad(tied):
        table.weight.grad = None
        hidden = torch.tanh(table(ids, tied))
        loss, _ = vocab_parallel_linear_cross_entropy(hidden, table.weight, labels, mask, ps,
                                                      vocab_size=VOCAB, tied=tied)
        (loss * scale).backward(retain_graph=twice)
        if twice:
            (loss * scale).backward()
        return table.weight.grad

    want = weight_grad(None)
    torch.testing.assert_close(weight_grad(TiedGradient()), want, rtol=1e-12, atol=1e-14)


def test_backward_twice_with_retain_graph_accumulates_the_same_gradient():
    ps = ParallelState.single()
    hidden, weight, labels, mask = _inputs(torch.float64)
    hidden.requires_grad_()
    weight.requires_grad_()
    loss, _ = vocab_parallel_linear_cross_entropy(hidden, weight, labels, mask, ps,
                                                  vocab_size=VOCAB)
    loss.backward(retain_graph=True)
    once = hidden.grad.clone(), weight.grad.clone()
    loss.backward()
    torch.testing.assert_close(hidden.grad, 2 * once[0])
    torch.testing.assert_close(weight.grad, 2 * once[1])


def test_bad_input_is_a_clear_error():
    ps = ParallelState.single()
    hidden, weight, labels, mask = _inputs(torch.float32)
    with pytest.raises(ValueError, match="labels .* and loss_mask .* must both have the shape"):
        vocab_parallel_linear_cross_entropy(hidden, weight, labels[:, :-1], mask, ps)
    with pytest.raises(ValueError, match="a label is >= the vocabulary size 100"):
        vocab_parallel_linear_cross_entropy(hidden, weight, labels.clamp(min=0) + 50, mask, ps,
                                            vocab_size=VOCAB)
    with pytest.raises(ValueError, match="vocab_size=200 must be in"):
        vocab_parallel_linear_cross_entropy(hidden, weight, labels, mask, ps, vocab_size=200)


def _tp2(rank, world):
    ps = ParallelState.from_world(tp_size=2)
    hidden, weight, labels, mask = _inputs(torch.float64)
    rows = PADDED // 2
    shard = weight[rank * rows:(rank + 1) * rows]
    return _loss_and_grads(
        lambda *a: vocab_parallel_linear_cross_entropy(*a, vocab_size=VOCAB, chunk_rows=10),
        hidden, shard, labels, mask, ps)


def test_tp2_shards_give_the_unsharded_loss_and_gradients():
    ps = ParallelState.single()
    inputs = _inputs(torch.float64)
    want = _loss_and_grads(_reference, *inputs, ps)
    ranks = run_distributed(_tp2, 2)
    tol = dict(rtol=1e-10, atol=1e-12)
    for rank, (loss, n_tokens, grad_hidden, grad_shard) in enumerate(ranks):
        torch.testing.assert_close(loss, want[0], **tol)
        torch.testing.assert_close(n_tokens, want[1], **tol)
        torch.testing.assert_close(grad_hidden, want[2], **tol)  # all-reduced over TP
        rows = PADDED // 2
        torch.testing.assert_close(grad_shard, want[3][rank * rows:(rank + 1) * rows], **tol)


def test_gpt_loss_and_gradients_fused_and_unfused_agree():
    """A whole tiny GPT: `fused_head_loss` changes no result beyond float rounding."""
    from megatron_lite.models.gpt import GPTConfig, GPTModel
    from megatron_lite.parallel import RNGContext, initialize_parameters
    cfg = GPTConfig(vocab_size=300, num_layers=2, hidden_size=32, num_attention_heads=4,
                    ffn_hidden_size=64, max_position_embeddings=64, hidden_dropout=0.0,
                    attention_dropout=0.0)
    ps = ParallelState.single()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 300, (2, 25), generator=g)
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:],
             "loss_mask": (torch.rand(2, 24, generator=g) > 0.3).float()}
    results = []
    for fused in (False, True):
        model = GPTModel(cfg, ps, RNGContext(1, 0, 0)).double()
        initialize_parameters(model, 1, ps)
        model.fused_head_loss = fused
        loss, n_tokens = model.loss(batch)
        loss.backward()
        results.append((loss.detach(), n_tokens, {n: p.grad for n, p in model.named_parameters()}))
    (ref_loss, ref_n, ref_grads), (loss, n, grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
    assert n == ref_n
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("with_grad", [True, False])
def test_one_chunk_of_logits_at_a_time(with_grad):
    """Peak memory: each chunk's softmax is freed before the next chunk's logits are made, so at
    most a chunk's logits and its softmax exist together (two [chunk, V] buffers), not three."""
    chunk, vocab, hidden_size = 64, 4096, 16
    buffer = chunk * vocab * 4
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4 * chunk, hidden_size, generator=g, requires_grad=with_grad)
    weight = torch.randn(vocab, hidden_size, generator=g)
    labels = torch.randint(0, vocab, (4 * chunk,), generator=g)
    ps = ParallelState.single()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        loss, _ = vocab_parallel_linear_cross_entropy(hidden, weight, labels,
                                                      torch.ones(4 * chunk), ps, chunk_rows=chunk)
    # Allocations (+bytes) and frees (-bytes) in time order; torch is pinned, so its profiler's
    # record of them (kineto_results) is a stable thing to read here.
    memory = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(memory, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    assert 2 * buffer <= peak < 2.5 * buffer, peak / buffer
    assert torch.isfinite(loss)
