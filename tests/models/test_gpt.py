"""GPT / LingLong model on one process: config, registry, sparse pattern, loss, recomputation,
packed-document masks and the FLOPs formula."""
import os

import pytest
import torch
import torch.nn.functional as F
import yaml

from megatron_lite.models import GPTConfig, GPTModel, get_model_spec, model_names
from megatron_lite.models.blocks import sparse_causal_pattern
from megatron_lite.models.gpt import flops_per_token, sparse_keys_per_query
from megatron_lite.parallel import ParallelState, RNGContext, initialize_parameters

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_cfg(**overrides):
    kw = dict(vocab_size=100, num_layers=2, hidden_size=32, num_attention_heads=4,
              ffn_hidden_size=64, max_position_embeddings=64, hidden_dropout=0.0,
              attention_dropout=0.0, sparse_attention=False, sparse_stride=8, sparse_summary=2)
    kw.update(overrides)
    return GPTConfig(**kw)


def build(cfg, seed=1234, dtype=torch.float32):
    model = GPTModel(cfg, ParallelState.single(), RNGContext(7))
    initialize_parameters(model, seed, ParallelState.single())
    return model.to(dtype)


def causal_batch(b, s, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, s + 1), generator=g)
    loss_mask = (torch.rand(b, s, generator=g) > 0.2).float()
    return dict(input_ids=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=loss_mask,
                position_ids=torch.arange(s).expand(b, s))


# ---------------------------------------------------------------------------------- config

def test_padded_vocab_and_ffn_default():
    cfg = tiny_cfg(vocab_size=13312, ffn_hidden_size=None)
    assert cfg.padded_vocab_size == 13312 and cfg.ffn_size == 4 * 32
    assert tiny_cfg(vocab_size=13313).padded_vocab_size == 13312 + 128
    assert tiny_cfg(vocab_size=100, make_vocab_size_divisible_by=1).padded_vocab_size == 100


@pytest.mark.parametrize("overrides, field", [
    (dict(hidden_size=30), "hidden_size"),
    (dict(attention_dropout=1.0), "attention_dropout"),
    (dict(sparse_attention=True, sparse_summary=9), "sparse_summary"),
    (dict(num_layers=0), "num_layers"),
])
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_cfg(**overrides)


def test_tp_must_divide_padded_vocab_heads_and_ffn():
    cfg = tiny_cfg(vocab_size=100, make_vocab_size_divisible_by=4, num_attention_heads=8)
    with pytest.raises(ValueError, match="make_vocab_size_divisible_by"):
        GPTModel(cfg, ParallelState.virtual(8, 0))
    with pytest.raises(ValueError, match="num_attention_heads"):
        GPTModel(tiny_cfg(), ParallelState.virtual(8, 0))
    with pytest.raises(ValueError, match="vocab_size is not set"):
        GPTModel(tiny_cfg(vocab_size=None))


def test_yaml_configs_fill_the_dataclass():
    for name, layers, hidden in (("tiny", 2, 64), ("small", 4, 256), ("linglong-106m", 12, 768),
                                 ("linglong-317m", 24, 1024)):
        with open(os.path.join(ROOT, "configs", "gpt", f"{name}.yaml")) as f:
            model = yaml.safe_load(f)["model"]
        model.setdefault("vocab_size", 4000)  # tiny takes it from the tokenizer at run time
        cfg = GPTConfig(**model)
        assert (cfg.num_layers, cfg.hidden_size, cfg.sparse_attention) == (layers, hidden, True)
        cfg.validate(tp_size=4)
        if name not in ("tiny", "small"):
            assert cfg.vocab_size == 13312 and cfg.layernorm_epsilon == 1e-8


def test_registry():
    spec = get_model_spec("gpt")
    assert "gpt" in model_names()
    assert spec.config_cls is GPTConfig and spec.objective == "causal_lm"
    assert isinstance(spec.build(tiny_cfg(), ParallelState.single(), RNGContext(0)), GPTModel)
    with pytest.raises(KeyError, match="known models: .*gpt"):
        get_model_spec("gtp")


def test_every_parameter_is_tagged():
    for name, p in build(tiny_cfg(sparse_attention=True)).named_parameters():
        assert hasattr(p, "init") and hasattr(p, "tensor_model_parallel"), name


# ---------------------------------------------------------------------------------- sparse

def test_sparse_pattern_matches_definition():
    n, stride, summary = 21, 6, 2
    mask = sparse_causal_pattern(n, stride, summary)
    for i in range(n):
        for j in range(n):
            own_block = j // stride == i // stride and j <= i
            summary_col = j // stride < i // stride and j % stride >= stride - summary
            assert bool(mask[i, j]) == (own_block or summary_col), (i, j)


def _dependency(layer, model, x, sparse):
    """[s, s] bool: does output position i of `layer` depend on input position j?"""
    s = x.shape[1]
    mask, is_causal = model._layer_mask(sparse, s, s, None, x.device)
    dep = torch.zeros(s, s, dtype=torch.bool)
    for i in range(s):
        xi = x.clone().requires_grad_(True)
        layer(xi, mask, is_causal)[0, i].sum().backward()
        dep[i] = xi.grad[0].abs().sum(-1) > 0
    return dep


def test_odd_layers_sparse_even_layers_dense():
    model = build(tiny_cfg(sparse_attention=True, num_layers=4))
    assert [layer.sparse for layer in model.layers] == [False, True, False, True]
    s = 20
    x = torch.randn(1, s, 32)
    assert torch.equal(_dependency(model.layers[0], model, x, False),
                       torch.ones(s, s, dtype=torch.bool).tril())
    assert torch.equal(_dependency(model.layers[1], model, x, True),
                       sparse_causal_pattern(s, 8, 2))


def test_sparse_model_equals_dense_within_first_block():
    dense = build(tiny_cfg())
    sparse = build(tiny_cfg(sparse_attention=True))
    ids = causal_batch(2, 24, 100)["input_ids"]
    a, b = dense(ids), sparse(ids)
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=1e-5, rtol=0)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------- loss

def _attention_grads(fn, q, k, v, grad):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), grad)), out.grad_fn


@pytest.mark.parametrize("t", [300, 256])
def test_blocked_causal_attention_equals_sdpa(t):
    """The CPU training path of causal attention (blocks of 128 query rows as batched GEMMs,
    its own backward) against SDPA's causal kernel: output and q, k, v gradients, with a last
    block shorter than the rest (300) and two whole blocks (256)."""
    from megatron_lite.models.blocks import causal_attention
    g = torch.Generator().manual_seed(t)
    q, k, v, grad = (torch.randn(2, 3, t, 16, generator=g) for _ in range(4))
    got, fn = _attention_grads(causal_attention, q, k, v, grad)
    assert "QueryBlockedCausal" in fn.next_functions[0][0].name()  # the blocked path ran
    want, _ = _attention_grads(lambda *a: F.scaled_dot_product_attention(*a, is_causal=True),
                               q, k, v, grad)
    for name, a, w in zip(("output", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5, msg=name)


def test_blocked_causal_attention_only_where_it_pays(monkeypatch):
    """Without gradients, over its memory cap, under two blocks of queries, turned off, or in
    float64, causal attention is SDPA's kernel itself."""
    from megatron_lite.models import blocks
    q = torch.randn(1, 2, 256, 8, requires_grad=True)
    sdpa = "ScaledDotProductFlashAttentionForCpuBackward"
    assert not blocks.causal_attention(q, q, q).grad_fn.name().startswith(sdpa)
    short = q[:, :, :255]
    assert blocks.causal_attention(short, short, short).grad_fn.name().startswith(sdpa)
    assert blocks.causal_attention(q, q, q, blocked=False).grad_fn.name().startswith(sdpa)
    assert blocks.causal_attention(*(q.double(),) * 3).grad_fn.name().startswith(sdpa)
    monkeypatch.setattr(blocks, "CAUSAL_BLOCK_MAX_BYTES", 1024)
    assert blocks.causal_attention(q, q, q).grad_fn.name().startswith(sdpa)

    def refuse(*args):
        raise AssertionError("the blocked path ran without gradients")
    monkeypatch.setattr(blocks, "CAUSAL_BLOCK_MAX_BYTES", 32 << 20)
    monkeypatch.setattr(blocks._QueryBlockedCausalAttention, "apply", refuse)
    with torch.no_grad():
        blocks.causal_attention(q, q, q)


def assert_trains_alike_with_and_without_the_cpu_path(cfg, batch, monkeypatch):
    """A fresh GPT's loss and every gradient, fp32, the same with causal attention's CPU training
    path on (`ParallelSelfAttention.blocked_causal_attention`) as with SDPA's flash kernel."""
    from megatron_lite.models.blocks import ParallelSelfAttention
    results = []
    for on_cpu_path in (True, False):
        monkeypatch.setattr(ParallelSelfAttention, "blocked_causal_attention", on_cpu_path)
        model = build(cfg)
        loss = model.loss(batch)[0]
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=0)
    for (name, _), a, w in zip(model.named_parameters(), results[0][1], results[1][1]):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-6, msg=name)


def test_gpt_with_blocked_attention_trains_as_with_sdpa(monkeypatch):
    """The whole GPT (16-wide heads: the blocked path, not the C++ kernel) against SDPA."""
    cfg = tiny_cfg(num_layers=2, max_position_embeddings=300)
    assert_trains_alike_with_and_without_the_cpu_path(cfg, causal_batch(2, 300, cfg.vocab_size),
                                                      monkeypatch)


def test_loss_is_masked_mean_over_true_vocab():
    model = build(tiny_cfg())
    batch = causal_batch(2, 16, 100)
    loss, n = model.loss(batch)
    logits = model(batch["input_ids"])[..., :100]
    per_token = F.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
    expected = (per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    assert int(n) == int(batch["loss_mask"].sum())
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
    with pytest.raises(KeyError, match="loss_mask"):
        model.loss({"input_ids": batch["input_ids"], "labels": batch["labels"]})


# ---------------------------------------------------------------------------------- recompute

def _grads(model, batch):
    model.zero_grad()
    loss, _ = model.loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("sparse", [False, True])
def test_activation_checkpointing_same_gradients_with_dropout(sparse):
    model = build(tiny_cfg(sparse_attention=sparse, hidden_dropout=0.1, attention_dropout=0.1))
    model.rng.set_step(3, 1)
    batch = causal_batch(2, 24, 100)
    model.eval()
    eval_loss, _ = model.loss(batch)
    model.train()
    loss_a, ga = _grads(model, batch)
    assert abs(loss_a - eval_loss) > 1e-4, "dropout should be active in training"
    model.checkpoint_activations = True
    loss_b, gb = _grads(model, batch)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=0)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-5,
                                   atol=1e-7 * float(ga[name].abs().max()), msg=name)
    # A different step draws different dropout masks.
    model.rng.set_step(4, 0)
    loss_c, _ = _grads(model, batch)
    assert abs(loss_c - loss_a) > 1e-6


# ---------------------------------------------------------------------------------- packing

@pytest.mark.parametrize("sparse", [False, True])
def test_reset_attention_mask_isolates_documents(sparse):
    # The sparse pattern lives in sequence positions, so doc 2 starts on a block boundary (16 =
    # 2 strides) to see the same pattern as when fed alone.
    model = build(tiny_cfg(sparse_attention=sparse))
    a, b = 16, 13
    ids = causal_batch(1, a + b, 100)["input_ids"]
    doc = torch.zeros(a + b, dtype=torch.long)
    doc[a:] = 1
    same_doc = doc[:, None] == doc[None, :]
    mask = same_doc[None, None]
    pos = torch.cat([torch.arange(a), torch.arange(b)])[None]
    packed = model(ids, position_ids=pos, attention_mask=mask)
    alone = model(ids[:, a:])
    torch.testing.assert_close(packed[:, a:], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[:, :a], model(ids[:, :a]), atol=1e-5, rtol=0)
    # Without the mask the second document sees the first one.
    assert (model(ids, position_ids=pos)[:, a:] - alone).abs().max() > 1e-3


def test_bad_attention_mask_is_rejected():
    model = build(tiny_cfg())
    ids = torch.zeros(1, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="bool"):
        model(ids, attention_mask=torch.ones(1, 1, 6, 6))
    with pytest.raises(ValueError, match="6 queries"):
        model(ids, attention_mask=torch.ones(1, 1, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 65, dtype=torch.long))


# ---------------------------------------------------------------------------------- FLOPs

def test_flops_dense_counts_non_embedding_params_and_head():
    cfg = tiny_cfg(ffn_hidden_size=None)
    model = build(cfg)
    n = sum(p.numel() for name, p in model.named_parameters()
            if not name.startswith(("word_embeddings", "position_embeddings")))
    n += cfg.padded_vocab_size * cfg.hidden_size
    seq = 48
    expected = 6 * n + 12 * cfg.num_layers * cfg.hidden_size * seq
    assert flops_per_token(cfg, seq) == pytest.approx(expected, rel=1e-12)


def test_flops_sparse_layers_count_attended_keys():
    for seq, stride, summary in ((48, 8, 2), (50, 16, 4), (5, 8, 2)):
        keys = sparse_causal_pattern(seq, stride, summary).sum(1).double().mean().item()
        assert sparse_keys_per_query(seq, stride, summary) == pytest.approx(keys, rel=1e-12)
    dense, sparse = tiny_cfg(), tiny_cfg(sparse_attention=True)
    seq = 48
    saved = 12 * 32 * (seq - sparse_keys_per_query(seq, 8, 2))  # one sparse layer of two
    assert flops_per_token(dense, seq) - flops_per_token(sparse, seq) == pytest.approx(saved)
