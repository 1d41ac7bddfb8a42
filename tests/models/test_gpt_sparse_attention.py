"""LingLong's block-sparse attention (`blocks.block_sparse_attention`, and with the qkv projection
inside, `blocks.projected_block_sparse_attention`) against the masked SDPA reference
(`sparse_causal_pattern`), with gradients, and a sparse GPT through either path."""
import pytest
import torch
import torch.nn.functional as F

from megatron_lite.models import GPTConfig, GPTModel
from megatron_lite.models import blocks
from megatron_lite.models.blocks import (_block_sparse_sdpa, block_sparse_attention,
                                         projected_block_sparse_attention, qkv_heads,
                                         sparse_causal_pattern)
from megatron_lite.parallel import ParallelState, RNGContext, initialize_parameters

# (s, stride, summary): ragged tails, no summary, summary == stride (all of an earlier block,
# i.e. full causal), stride >= s (plain causal), one token, stride 1.
CASES = [(37, 8, 3), (100, 16, 4), (48, 8, 2), (40, 8, 0), (40, 8, 8), (20, 32, 4), (40, 40, 5),
         (1, 8, 2), (33, 1, 1), (64, 4, 1)]
IMPLS = {"flash": block_sparse_attention,  # the CPU path taken at dropout 0
         "sdpa": lambda q, k, v, stride, summary: _block_sparse_sdpa(q, k, v, stride, summary, 0.0)}
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def qkv_views(b, s, heads, d, dtype, seed=0):
    """q, k, v [b, heads, s, d] sliced out of one fused [b, s, heads, 3, d] tensor, as
    ParallelSelfAttention slices them (not contiguous), and that tensor (their gradients)."""
    g = torch.Generator().manual_seed(seed)
    fused = torch.randn(b, s, heads, 3, d, generator=g, dtype=dtype).requires_grad_()
    return fused, fused.permute(3, 0, 2, 1, 4).unbind(0)


def reference(q, k, v, stride, summary):
    mask = sparse_causal_pattern(q.shape[2], stride, summary)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def output_and_grad(fn, s, stride, summary, dtype):
    fused, (q, k, v) = qkv_views(2, s, 3, 8, dtype)
    out = fn(q, k, v, stride, summary)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    (grad,) = torch.autograd.grad(out, fused, grad_out)
    return out.detach(), grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", CASES, ids=[f"s{s}-stride{t}-sum{m}" for s, t, m in CASES])
def test_op_equals_masked_reference(case, impl, dtype, monkeypatch):
    # Summary calls of 16 query rows: several calls per sequence, so the chunked log-sum-exp
    # merge and the chunks' masks are exercised at these short lengths.
    monkeypatch.setattr(blocks, "_SUMMARY_CHUNK_ROWS", 16)
    s, stride, summary = case
    out, grad = output_and_grad(IMPLS[impl], s, stride, summary, dtype)
    ref_out, ref_grad = output_and_grad(reference, s, stride, summary, dtype)
    tol = TOL[dtype]
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=0)
    for i, name in enumerate("qkv"):  # the fused gradient's q, k, v slices
        torch.testing.assert_close(grad[..., i, :], ref_grad[..., i, :], atol=tol, rtol=0,
                                   msg=f"d{name}")


def test_op_default_chunking_and_contiguous_inputs():
    # One summary call for the whole sequence (the default chunk), inputs in [b, h, s, d] order.
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 300, 16, generator=g).requires_grad_() for _ in range(3))
    grad_out = torch.randn(1, 2, 300, 16, generator=g)
    out = block_sparse_attention(q, k, v, 32, 4)
    ref = reference(q, k, v, 32, 4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad_out),
                    torch.autograd.grad(ref, (q, k, v), grad_out)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_op_with_dropout_attends_only_the_pattern():
    s, stride, summary = 24, 8, 2
    fused, (q, k, v) = qkv_views(1, s, 2, 4, torch.float64)

    def run(seed):
        torch.manual_seed(seed)
        return block_sparse_attention(q, k, v, stride, summary, dropout_p=0.5)

    out = run(0)
    torch.testing.assert_close(run(0), out, atol=0, rtol=0)  # the caller's seed decides
    assert (out - block_sparse_attention(q, k, v, stride, summary)).abs().max() > 1e-3
    pattern = sparse_causal_pattern(s, stride, summary)
    for i in (0, 7, 8, 13, 23):  # which keys/values query i reads, through the dropout path
        (grad,) = torch.autograd.grad(run(1)[:, :, i].sum(), fused)
        reads = grad[0, :, :, 1:].abs().sum((1, 2, 3)) > 0  # dk and dv per position
        assert not (reads & ~pattern[i]).any(), i


def projected_output_and_grads(fn, s, stride, summary, dtype, bias=True):
    """fn(x, weight, bias, heads, stride, summary) on a fused projection of 3 heads x 8: the
    output and the gradients of x, the weight and the bias, and the sizes (elements) of the
    storages autograd saved."""
    g = torch.Generator().manual_seed(3)
    # Weights at a usual init scale, so q and k are O(1) and the softmax is not one-hot.
    x, w, b = (torch.randn(shape, generator=g, dtype=dtype).mul_(scale).requires_grad_()
               for shape, scale in [((2, s, 24), 1.0), ((72, 24), 24 ** -0.5), ((72,), 0.1)])
    b = b if bias else None
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.untyped_storage().nbytes() // t.element_size()) or t,
            lambda t: t):
        out = fn(x, w, b, 3, stride, summary)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    inputs = (x, w, b) if bias else (x, w)
    return (out.detach(), *torch.autograd.grad(out, inputs, grad_out)), saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", CASES[:6], ids=[f"s{s}-stride{t}-sum{m}" for s, t, m in CASES[:6]])
def test_projected_op_equals_projection_then_masked_reference(case, dtype, monkeypatch):
    monkeypatch.setattr(blocks, "_SUMMARY_CHUNK_ROWS", 16)
    s, stride, summary = case
    got, saved = projected_output_and_grads(projected_block_sparse_attention, s, stride, summary,
                                            dtype)
    want, _ = projected_output_and_grads(
        lambda x, w, b, heads, stride, summary: reference(
            *qkv_heads(F.linear(x, w, b), heads), stride, summary), s, stride, summary, dtype)
    for a, b, name in zip(got, want, ["out", "dx", "dweight", "dbias"]):
        torch.testing.assert_close(a, b, atol=TOL[dtype], rtol=0, msg=name)
    # x is kept, and the projection is made again in backward: no [b, s, 3c] tensor is saved
    # (stride >= s is one causal block, plain SDPA, which keeps q, k, v).
    assert 2 * s * 24 in saved and (2 * s * 72 in saved) == (stride >= s)


def test_projected_op_without_bias_and_on_the_sdpa_fallback():
    s, stride, summary = 40, 8, 2
    want, _ = projected_output_and_grads(
        lambda x, w, b, heads, stride, summary: reference(
            *qkv_heads(F.linear(x, w, b), heads), stride, summary), s, stride, summary,
        torch.float64, bias=False)
    got, _ = projected_output_and_grads(projected_block_sparse_attention, s, stride, summary,
                                        torch.float64, bias=False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    # Under autocast the projection is left to autograd (the op would not see the recast).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, saved = projected_output_and_grads(projected_block_sparse_attention, s, stride,
                                                summary, torch.float32, bias=False)
    assert got[0].dtype == torch.bfloat16 and 2 * s * 72 in saved


def test_op_rejects_cross_attention():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="self-attention"):
        block_sparse_attention(q, torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8), 2, 1)


# ---------------------------------------------------------------------------------- model

def tiny_sparse_model(**overrides):
    """configs/gpt/tiny.yaml's model, dropout off."""
    kw = dict(vocab_size=300, num_layers=2, hidden_size=64, num_attention_heads=4,
              ffn_hidden_size=256, max_position_embeddings=256, hidden_dropout=0.0,
              attention_dropout=0.0, sparse_attention=True, sparse_stride=16, sparse_summary=4)
    kw.update(overrides)
    model = GPTModel(GPTConfig(**kw), ParallelState.single(), RNGContext(7))
    initialize_parameters(model, 1234, ParallelState.single())
    return model


def batch(b=2, s=100, vocab=300):  # 100 = 6 blocks of 16 and a tail of 4
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (b, s + 1), generator=g)
    return dict(input_ids=tokens[:, :-1], labels=tokens[:, 1:],
                loss_mask=(torch.rand(b, s, generator=g) > 0.2).float(),
                position_ids=torch.arange(s).expand(b, s))


def loss_and_grads(model, data):
    model.zero_grad(set_to_none=True)
    loss, _ = model.loss(data)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=1e-5, rtol=1e-5, msg=name)


def test_sparse_gpt_block_path_equals_masked_path(monkeypatch):
    model, data = tiny_sparse_model(), batch()
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[4:6])
        return projected_block_sparse_attention(*args, **kwargs)

    monkeypatch.setattr(blocks, "projected_block_sparse_attention", spy)
    new = loss_and_grads(model, data)
    assert calls == [(16, 4)], "the sparse layer should run block-sparse"
    model.block_sparse = False
    calls.clear()
    assert_same(new, loss_and_grads(model, data))
    assert not calls
    # An all-True attention_mask (packed documents, one document) takes the masked path too.
    model.block_sparse = True
    s = data["input_ids"].shape[1]
    assert_same(new, loss_and_grads(
        model, {**data, "attention_mask": torch.ones(1, 1, s, s, dtype=torch.bool)}))
    assert not calls


def test_sparse_gpt_block_path_with_activation_checkpointing():
    model, data = tiny_sparse_model(), batch()
    plain = loss_and_grads(model, data)
    model.checkpoint_activations = True
    assert_same(plain, loss_and_grads(model, data))
