"""Our C++ causal attention kernel (megatron_lite/cpu_kernels) against SDPA in float64, where
causal_attention routes to it, and its fall-backs."""
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.utils.cpp_extension

from megatron_lite import cpu_kernels
from megatron_lite.models import blocks

from tests.models.test_gpt import (assert_trains_alike_with_and_without_the_cpu_path, build,
                                   causal_batch, tiny_cfg)

HAS_AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
needs_kernel = pytest.mark.skipif(not HAS_AVX512, reason="the kernel needs an AVX-512 CPU")


def _grads(fn, q, k, v, grad):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), grad)), out.grad_fn


@needs_kernel
def test_the_kernel_builds_on_an_avx512_cpu():
    # A broken build must fail here, not pass the equality tests below on the torch path.
    assert cpu_kernels.attention_kernel() is not None, cpu_kernels._unavailable


@needs_kernel
@pytest.mark.parametrize("n,t", [(1, 32), (3, 96), (2, 256)])
def test_kernel_equals_sdpa_in_float64(n, t):
    """Output and q, k, v gradients against SDPA in float64: one score tile, tiles that end
    mid-block, and several."""
    g = torch.Generator().manual_seed(t)
    q, k, v, grad = (torch.randn(n, t, 64, generator=g, dtype=torch.float64) for _ in range(4))
    want, _ = _grads(lambda *a: F.scaled_dot_product_attention(*a, is_causal=True), q, k, v, grad)
    got, _ = _grads(lambda *a: cpu_kernels.CausalAttention.apply(*a),
                    *(x.float() for x in (q, k, v)), grad.float())
    for name, a, w in zip(("output", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), w, rtol=1e-5, atol=2e-5, msg=name)


@needs_kernel
def test_causal_attention_routes_64_wide_heads_to_the_kernel(monkeypatch):
    """[b, h, T, 64] with T a multiple of 32 takes the kernel; other head widths, other lengths,
    and the kernel turned off take the blocked GEMMs; results equal SDPA's either way."""
    g = torch.Generator().manual_seed(0)

    def check(shape, expect):
        q, k, v, grad = (torch.randn(*shape, generator=g) for _ in range(4))
        got, fn = _grads(blocks.causal_attention, q, k, v, grad)
        assert expect in fn.next_functions[0][0].name()
        want, _ = _grads(lambda *a: F.scaled_dot_product_attention(*a, is_causal=True),
                         q, k, v, grad)
        for name, a, w in zip(("output", "dq", "dk", "dv"), got, want):
            torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5, msg=name)

    check((2, 2, 256, 64), "CausalAttentionBackward")
    check((1, 2, 256, 32), "QueryBlockedCausal")
    check((1, 2, 300, 64), "QueryBlockedCausal")
    previous = cpu_kernels.use_attention_kernel(False)
    try:
        check((2, 2, 256, 64), "QueryBlockedCausal")
    finally:
        cpu_kernels.use_attention_kernel(previous)


def test_without_the_kernel_it_warns_once_and_trains_on_the_blocked_path(monkeypatch):
    """A CPU without AVX-512 or a failed build: one warning naming why, then the torch path."""
    monkeypatch.setattr(cpu_kernels, "_module", None)
    monkeypatch.setattr(cpu_kernels, "_unavailable", None)
    monkeypatch.setattr(cpu_kernels, "_enabled", True)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    q = torch.randn(1, 2, 256, 64, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="did not build.*Ninja is required"):
        out = blocks.causal_attention(q, q, q)
    assert "QueryBlockedCausal" in out.grad_fn.next_functions[0][0].name()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        blocks.causal_attention(q, q, q)

    monkeypatch.setattr(cpu_kernels, "_unavailable", None)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with pytest.warns(RuntimeWarning, match="no AVX-512"):
        assert cpu_kernels.attention_kernel() is None


@needs_kernel
def test_gpt_with_the_kernel_trains_as_with_sdpa(monkeypatch):
    """The whole GPT (64-wide heads, 256 tokens), fp32: loss and every gradient the same through
    the kernel as through SDPA's flash kernel."""
    cfg = tiny_cfg(num_layers=2, hidden_size=128, num_attention_heads=2, ffn_hidden_size=256,
                   max_position_embeddings=256)
    calls, apply = [], cpu_kernels.CausalAttention.apply
    monkeypatch.setattr(cpu_kernels.CausalAttention, "apply",
                        lambda *a: calls.append(1) or apply(*a))
    assert_trains_alike_with_and_without_the_cpu_path(cfg, causal_batch(2, 256, cfg.vocab_size),
                                                      monkeypatch)
    assert len(calls) == cfg.num_layers  # the first model's layers, not the second's


@needs_kernel
def test_causal_kernel_with_dropout_equals_float64():
    """With dropout the causal kernel's output is (P · keep / (1 - p)) v, keep hashed from the
    seed as in the biased kernel (`dropout_keep_mask` over [1, n, T, T]): output and q, k, v
    gradients against that arithmetic in float64, at a length whose blocks end mid-vector (96)."""
    n, t, p, seed = 3, 96, 0.2, 77
    g = torch.Generator().manual_seed(t)
    q, k, v, grad = (torch.randn(n, t, 64, generator=g, dtype=torch.float64) for _ in range(4))
    keep = cpu_kernels.attention_kernel().dropout_keep_mask(1, n, t, t, p, seed)[0]
    causal = torch.ones(t, t, dtype=torch.bool).tril()

    def reference(q, k, v):
        scores = (q @ k.transpose(-1, -2) / 8).masked_fill(~causal, float("-inf"))
        return (scores.softmax(-1) * keep / (1 - p)) @ v
    want, _ = _grads(reference, q, k, v, grad)
    got, _ = _grads(lambda *a: cpu_kernels.CausalAttention.apply(*a, p, seed),
                    *(x.float() for x in (q, k, v)), grad.float())
    for name, a, w in zip(("output", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), w, rtol=1e-5, atol=2e-5, msg=name)


@needs_kernel
def test_gpt_attention_dropout_on_the_kernel_recomputes_its_masks(monkeypatch):
    """LingLong's configs train with attention dropout: its causal attention stays on the kernel,
    the mask hashed from the (step, site) seed, so activation checkpointing gives the gradients
    of the plain run, and another step draws other masks."""
    cfg = tiny_cfg(num_layers=2, hidden_size=128, num_attention_heads=2, ffn_hidden_size=256,
                   max_position_embeddings=256, attention_dropout=0.2)
    calls, apply = [], cpu_kernels.CausalAttention.apply
    monkeypatch.setattr(cpu_kernels.CausalAttention, "apply",
                        lambda *a: calls.append(a[3:]) or apply(*a))
    batch = causal_batch(2, 256, cfg.vocab_size)
    results = []
    for recompute, step in ((False, 3), (True, 3), (False, 4)):
        model = build(cfg).train()
        model.checkpoint_activations = recompute
        model.rng.set_step(step, 1)
        loss = model.loss(batch)[0]
        results.append((loss.detach(), torch.autograd.grad(loss, list(model.parameters()))))
    assert len(calls) == 4 * cfg.num_layers and all(p == 0.2 for p, _ in calls)
    assert len({seed for _, seed in calls}) == 2 * cfg.num_layers  # per step and layer
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=0)
    for (name, _), a, w in zip(model.named_parameters(), results[1][1], results[0][1]):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.isclose(results[2][0], results[0][0])


@needs_kernel
@pytest.mark.parametrize("s,stride,summary", [(256, 64, 8), (200, 32, 4)])
def test_block_sparse_own_blocks_on_the_kernel_equal_float64(s, stride, summary, monkeypatch):
    """LingLong's block-sparse op runs its own causal blocks through the kernel's log-sum-exp
    forward and the backward that recomputes the probabilities from the merged log-sum-exp of
    both parts; output and q, k, v gradients against the op in float64 (torch's flash kernel),
    with a padded last block (200)."""
    built, calls = cpu_kernels.attention_kernel(), []

    class Counting:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(built, name)
    monkeypatch.setattr(cpu_kernels, "attention_kernel", lambda: Counting())
    g = torch.Generator().manual_seed(s)
    q, k, v, grad = (torch.randn(2, 3, s, 64, generator=g, dtype=torch.float64) for _ in range(4))

    def sparse(*a):
        return blocks.block_sparse_attention(*a, stride, summary)
    want, _ = _grads(sparse, q, k, v, grad)
    assert calls == []  # float64 stays on the flash kernel
    got, _ = _grads(sparse, *(x.float() for x in (q, k, v)), grad.float())
    assert calls == ["forward_lse", "backward_lse"]
    for name, a, w in zip(("output", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), w, rtol=1e-5, atol=2e-5, msg=name)


# ------------------------------------------------------------------- biased attention (T5)

@needs_kernel
@pytest.mark.parametrize("b,h,s,t,rel,keys,causal,scale,split", [
    (1, 3, 64, 64, True, True, False, 1.0, True),    # T5's encoder: positions and padding
    (2, 2, 64, 64, True, False, True, 1.0, True),    # T5's decoder: positions, causal
    (2, 3, 24, 96, False, True, False, 1.0, False),  # T5's cross-attention; S a multiple of 8
    (2, 2, 32, 32, False, False, False, 0.125, False),  # no bias, scaled
])
def test_biased_kernel_equals_float64(b, h, s, t, rel, keys, causal, scale, split):
    """softmax(q kᵀ · scale + bias) v and the q, k, v and per-distance bias gradients against
    the same arithmetic in float64 on the bias formed as a [b, h, s, t] tensor: rel[h, j - i +
    s - 1] + keys[b, j] (T5's mask value at the last keys), the keys after each query masked if
    causal. q, k, v contiguous or (`split`) views of [b, rows, h, 64], as a projection's heads."""
    g = torch.Generator().manual_seed(s + t)
    q, grad = (torch.randn(b, h, s, 64, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(b, h, t, 64, generator=g, dtype=torch.float64) for _ in range(2))
    rel = torch.randn(h, s + t - 1, generator=g, dtype=torch.float64) if rel else None
    if keys:
        keys = torch.zeros(b, t, dtype=torch.float64)
        keys[-1, -5:] = torch.finfo(torch.float32).min
    else:
        keys = None
    i, j = torch.arange(s)[:, None], torch.arange(t)[None, :]

    def reference(q, k, v, rel):
        scores = (q @ k.transpose(-1, -2)) * scale
        if rel is not None:
            scores = scores + rel[:, j - i + s - 1]
        if keys is not None:
            scores = scores + keys[:, None, None, :]
        if causal:
            scores = scores.masked_fill(j > i, torch.finfo(torch.float32).min)
        return scores.softmax(-1) @ v

    def grads(fn, *inputs):
        inputs = [x.detach().requires_grad_() for x in inputs if x is not None]
        out = fn(*inputs, None) if rel is None else fn(*inputs)
        return (out, *torch.autograd.grad(out, inputs, grad.to(out.dtype)))

    def laid_out(x):
        return x.transpose(1, 2).contiguous().transpose(1, 2) if split else x
    want = grads(reference, q, k, v, rel)
    got = grads(lambda q, k, v, rel: cpu_kernels.BiasedAttention.apply(
        q, k, v, rel, None if keys is None else keys.float(), causal, scale),
        *(laid_out(x.float()) for x in (q, k, v)), None if rel is None else rel.float())
    for name, a, w in zip(("output", "dq", "dk", "dv", "drel"), got, want):
        assert a.shape == w.shape, name
        torch.testing.assert_close(a.double(), w, rtol=1e-5, atol=1e-4, msg=name)


@needs_kernel
def test_t5_with_the_biased_kernel_trains_as_without_it(monkeypatch):
    """The whole T5 (64-wide heads, encoder padding), fp32: every self- and cross-attention
    runs through the kernel, with the loss and every gradient of the torch path
    (`t5._biased_attention` and SDPA) when the kernel is off."""
    from tests.models.test_t5 import ids, make_cfg, make_model
    cfg = make_cfg(hidden_size=64, num_attention_heads=2, kv_channels=64)
    enc = ids(2, 64, 41)
    enc[1, 50:] = cfg.pad_token_id
    batch = dict(encoder_input_ids=enc, decoder_input_ids=ids(2, 32, 42), labels=ids(2, 32, 43),
                 loss_mask=torch.ones(2, 32))
    calls, apply = [], cpu_kernels.BiasedAttention.apply
    monkeypatch.setattr(cpu_kernels.BiasedAttention, "apply",
                        lambda *a: calls.append(1) or apply(*a))
    results = []
    for on in (True, False):
        previous = cpu_kernels.use_attention_kernel(on)
        try:
            model = make_model(cfg).train()
            loss, _ = model.loss(batch)
            results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
        finally:
            cpu_kernels.use_attention_kernel(previous)
    assert len(calls) == cfg.num_layers + 2 * cfg.decoder_layers  # the first model's only
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=0)
    for (name, _), a, w in zip(model.named_parameters(), results[0][1], results[1][1]):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-6, msg=name)


@needs_kernel
@pytest.mark.parametrize("causal", [False, True])
def test_biased_kernel_with_dropout_equals_float64(causal):
    """With dropout the output is (P · keep / (1 - p)) v, keep hashed from the seed: output and
    q, k, v and per-distance bias gradients against that arithmetic in float64 with the mask
    the kernel reports for the seed; the mask keeps 1 - p of the values, and another seed
    gives another mask."""
    b, h, s, p = 2, 2, 64, 0.25
    g = torch.Generator().manual_seed(5)
    q, k, v, grad = (torch.randn(b, h, s, 64, generator=g, dtype=torch.float64) for _ in range(4))
    rel = torch.randn(h, 2 * s - 1, generator=g, dtype=torch.float64)
    seed = 2**62 + 12345
    keep = cpu_kernels.attention_kernel().dropout_keep_mask(b, h, s, s, p, seed)
    assert abs(keep.double().mean() - (1 - p)) < 0.01  # 16,384 draws
    assert not torch.equal(keep, cpu_kernels.attention_kernel().dropout_keep_mask(
        b, h, s, s, p, seed + 1))
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]

    def reference(q, k, v, rel):
        scores = q @ k.transpose(-1, -2) + rel[:, j - i + s - 1]
        if causal:
            scores = scores.masked_fill(j > i, torch.finfo(torch.float32).min)
        return (scores.softmax(-1) * keep / (1 - p)) @ v

    def grads(fn, *inputs):
        inputs = [x.detach().requires_grad_() for x in inputs]
        out = fn(*inputs)
        return (out, *torch.autograd.grad(out, inputs, grad.to(out.dtype)))
    want = grads(reference, q, k, v, rel)
    got = grads(lambda q, k, v, rel: cpu_kernels.BiasedAttention.apply(
        q, k, v, rel, None, causal, 1.0, p, seed), *(x.float() for x in (q, k, v, rel)))
    for name, a, w in zip(("output", "dq", "dk", "dv", "drel"), got, want):
        torch.testing.assert_close(a.double(), w, rtol=1e-5, atol=1e-4, msg=name)


@needs_kernel
def test_t5_attention_dropout_on_the_kernel_draws_its_masks_per_step_and_site(monkeypatch):
    """LongLM's configs train with attention dropout: on the kernel each attention hashes its
    mask from the stateless RNG's seed of (step, site), so activation checkpointing's recompute
    gives the gradients of the plain run; every layer has its own seed, another step others."""
    from tests.models.test_t5 import ids, make_cfg, make_model
    cfg = make_cfg(hidden_size=64, num_attention_heads=2, kv_channels=64, attention_dropout=0.2)
    batch = dict(encoder_input_ids=ids(2, 64, 51), decoder_input_ids=ids(2, 32, 52),
                 labels=ids(2, 32, 53), loss_mask=torch.ones(2, 32))
    seeds, apply = [], cpu_kernels.BiasedAttention.apply
    monkeypatch.setattr(cpu_kernels.BiasedAttention, "apply",
                        lambda *a: seeds.append(a[7:]) or apply(*a))
    losses, grads = [], []
    for recompute, step in ((False, 3), (True, 3), (False, 4)):
        model = make_model(cfg).train()
        model.checkpoint_activations = recompute
        model.rng.set_step(step, 1)
        loss = model.loss(batch)[0]
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    layers = cfg.num_layers + 2 * cfg.decoder_layers
    assert len(seeds) == 4 * layers  # the recompute calls the kernel again
    assert all(p == 0.2 for p, _ in seeds)
    step3, step4 = {s for _, s in seeds[:3 * layers]}, {s for _, s in seeds[3 * layers:]}
    assert len(step3) == len(step4) == layers and not step3 & step4
    for (name, _), a, w in zip(model.named_parameters(), grads[1], grads[0]):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.isclose(losses[2], losses[0])
