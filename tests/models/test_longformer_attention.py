"""Longformer's sliding-window + global attention (megatron_lite/models/longformer.py).

Against a dense float64 reference written from the definition (the only place an [n, n] mask is
built), against transformers' LongformerSelfAttention, TP=2 against TP=1, and its bad inputs."""
import math

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import megatron_lite.models.longformer as lf
from megatron_lite.models.longformer import ParallelLongformerSelfAttention, longformer_attention
from megatron_lite.parallel import (ParallelState, RNGContext, initialize_parameters, merge_shards)
from megatron_lite.testing import run_distributed

F64 = torch.float64
TOL = dict(rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ the definition, densely
def dense_reference(q, k, v, key_keep, is_global, window, gq, gk, gv):
    """[b, heads, n, d] from the definition, with the full [n, n] mask (a test reference only)."""
    n, d = q.shape[2], q.shape[3]
    is_global = is_global & key_keep
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    local = key_keep[:, None, None, :] & (((i - j).abs() <= window // 2) | is_global[:, None, None, :])
    s = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~local, float("-inf"))
    out = torch.softmax(s, -1).nan_to_num(0.0) @ v  # padded rows may have no key: 0
    sg = (gq @ gk.transpose(-1, -2) / math.sqrt(d)).masked_fill(~key_keep[:, None, None, :], float("-inf"))
    out = torch.where(is_global[:, None, :, None], torch.softmax(sg, -1).nan_to_num(0.0) @ gv, out)
    return out * key_keep[:, None, :, None]


def make_masks(n, lengths, global_counts, generator):
    b = len(lengths)
    key_keep = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    is_global = torch.zeros(b, n, dtype=torch.bool)
    for row, (length, count) in enumerate(zip(lengths, global_counts)):
        is_global[row, torch.randperm(length, generator=generator)[:count]] = True
    return key_keep, is_global


# (window, n, row lengths): a window larger than n, windows not dividing n, no length a
# multiple of the window; every batch mixes 0, 1 and 3 global tokens per row.
CASES = [(2, 13, [13, 9, 5]), (4, 19, [19, 11, 14]), (6, 23, [23, 17, 10]),
         (8, 21, [21, 15, 6]), (10, 27, [27, 25, 13]), (64, 15, [15, 7, 11])]
GLOBALS = [0, 1, 3]


@pytest.mark.parametrize("backend", ["flash", "math"])
def test_kernel_matches_dense_reference(backend, monkeypatch):
    monkeypatch.setattr(lf, "_CHUNK_QUERIES", 8)  # several chunks: the rolling windows matter
    g = torch.Generator().manual_seed(0)
    for window, n, lengths in CASES:
        key_keep, is_global = make_masks(n, lengths, GLOBALS, g)
        t = [torch.randn(3, 2, n, 4, dtype=F64, generator=g).requires_grad_() for _ in range(6)]
        out = longformer_attention(*t[:3], key_keep, is_global, window, global_q=t[3], global_k=t[4],
                                   global_v=t[5], backend=backend)
        ref = dense_reference(*t[:3], key_keep, is_global, window, *t[3:])
        torch.testing.assert_close(out, ref, **TOL, msg=f"window {window}, n {n}")
        go = torch.randn(ref.shape, dtype=F64, generator=g)
        got = torch.autograd.grad(out, t, go)
        want = torch.autograd.grad(ref, t, go)
        for name, a, b in zip(["q", "k", "v", "global_q", "global_k", "global_v"], got, want):
            torch.testing.assert_close(a, b, **TOL, msg=f"grad of {name}, window {window}, n {n}")


def _layer_reference(m, x, key_keep, is_global):
    b, n, h = x.shape

    def heads(lin):
        y = nn.functional.linear(x, lin.weight, lin.bias).view(b, n, m.num_heads, 3, m.head_dim)
        return [t.transpose(1, 2) for t in y.unbind(3)]

    ctx = dense_reference(*heads(m.qkv), key_keep, is_global, m.window, *heads(m.qkv_global))
    return m.out(ctx.transpose(1, 2).reshape(b, n, h))


def _perturbed_layer(window, h=16, heads=4, dtype=F64, seed=0):
    torch.manual_seed(seed)
    m = ParallelLongformerSelfAttention(h, heads, window, ParallelState.single(), RNGContext(0),
                                        init_std=0.3, attention_dropout=0.0, site="attn").to(dtype)
    with torch.no_grad():  # nonzero biases, so a bias that cancels must cancel for real
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def test_layer_matches_dense_reference(monkeypatch):
    """Parameters' and input's gradients too: the projections run inside the kernel, and the
    global rows are computed from x (W_k^T q trick), so both are checked against plain autograd."""
    monkeypatch.setattr(lf, "_CHUNK_QUERIES", 8)
    g = torch.Generator().manual_seed(1)
    for window, n, lengths in CASES:
        m = _perturbed_layer(window)
        key_keep, is_global = make_masks(n, lengths, [1, 3, 0], g)
        x = torch.randn(3, n, 16, dtype=F64, generator=g, requires_grad=True)
        leaves = [x, *m.parameters()]
        out = m(x, key_keep, is_global)
        ref = _layer_reference(m, x, key_keep, is_global)
        torch.testing.assert_close(out, ref, **TOL, msg=f"window {window}")
        go = torch.randn(ref.shape, dtype=F64, generator=g)
        names = ["x"] + [name for name, _ in m.named_parameters()]
        for name, a, b in zip(names, torch.autograd.grad(out, leaves, go), torch.autograd.grad(ref, leaves, go)):
            torch.testing.assert_close(a, b, **TOL, msg=f"grad of {name}, window {window}")


def test_dropout_gradients_and_replay():
    """The math path with dropout: its hand-written backward replays the forward's masks."""
    g = torch.Generator().manual_seed(2)
    key_keep, is_global = make_masks(11, [11, 8], [1, 2], g)
    t = [torch.randn(2, 2, 11, 3, dtype=F64, generator=g).requires_grad_() for _ in range(3)]

    def f(q, k, v, seed=123):
        torch.manual_seed(7)  # the global rows' dropout draws from torch's RNG
        return longformer_attention(q, k, v, key_keep, is_global, 4, global_q=q, global_k=k, global_v=v,
                                    dropout_p=0.3, seed=seed)

    assert torch.autograd.gradcheck(f, t)
    assert torch.equal(f(*t), f(*t))
    assert not torch.equal(f(*t), f(*t, seed=124))
    # The masks' drop rate is p (to 2^-16), and they are a function of the seed.
    keep = lf._dropout_keep((3, 4, 100, 1001), 0.1, 5, "cpu")
    assert abs(1 - keep.float().mean().item() - 0.1) < 3e-3
    assert torch.equal(keep, lf._dropout_keep((3, 4, 100, 1001), 0.1, 5, "cpu"))


def test_layer_dropout_gradients():
    """The layer with dropout: band (explicit path) and global rows (computed from x) replay their
    masks in the backward; checked numerically for x and both fused projections."""
    torch.manual_seed(3)
    rng = RNGContext(9)
    m = ParallelLongformerSelfAttention(8, 2, 4, ParallelState.single(), rng, init_std=0.5,
                                        attention_dropout=0.3, site="attn").double().train()
    g = torch.Generator().manual_seed(4)
    key_keep, is_global = make_masks(9, [9, 6], [2, 1], g)
    x = torch.randn(2, 9, 8, dtype=F64, generator=g, requires_grad=True)
    names = ["qkv.weight", "qkv.bias", "qkv_global.weight", "qkv_global.bias"]
    params = [dict(m.named_parameters())[name].detach().clone().requires_grad_() for name in names]

    def f(x, *params):
        rng.set_step(5)  # the same masks at every call
        return torch.func.functional_call(m, dict(zip(names, params)), (x, key_keep, is_global))

    assert torch.autograd.gradcheck(f, (x, *params))
    at_step_5 = f(x, *params)
    rng.set_step(6)
    assert not torch.equal(at_step_5, m(x, key_keep, is_global))


def test_no_quadratic_tensor():
    """No op, forward or backward, makes a tensor with n^2 elements (not even a mask)."""
    n = 1024
    sizes = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    sizes.append((t.numel(), str(func)))
            return out

    m = _perturbed_layer(16, dtype=torch.float32)
    key_keep = torch.ones(1, n, dtype=torch.bool)
    is_global = torch.zeros(1, n, dtype=torch.bool)
    is_global[0, [0, 500]] = True
    x = torch.randn(1, n, 16, requires_grad=True)
    with Watch():
        m(x, key_keep, is_global).sum().backward()
    assert max(sizes)[0] < n * n // 16, max(sizes)


# ------------------------------------------------------------------ transformers' layer
@pytest.mark.parametrize("window", [4, 8])
def test_matches_transformers(window):
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    h, heads, d = 32, 4, 8
    cfg = LongformerConfig(hidden_size=h, num_attention_heads=heads, attention_window=[window],
                           attention_probs_dropout_prob=0.0)
    torch.manual_seed(3)
    hf = LongformerSelfAttention(cfg, layer_id=0).eval()
    dense = nn.Linear(h, h)
    m = _perturbed_layer(window, h, heads, dtype=torch.float32, seed=4).eval()
    with torch.no_grad():
        for fused, names in ((m.qkv, ("query", "key", "value")),
                             (m.qkv_global, ("query_global", "key_global", "value_global"))):
            w, b = fused.weight.view(heads, 3, d, h), fused.bias.view(heads, 3, d)
            for i, name in enumerate(names):
                w[:, i] = getattr(hf, name).weight.view(heads, d, h)
                b[:, i] = getattr(hf, name).bias.view(heads, d)
        m.out.weight.copy_(dense.weight)
        m.out.bias.copy_(dense.bias)

    g = torch.Generator().manual_seed(5)
    n, lengths = 3 * window + 3, [3 * window + 3, 2 * window + 1, window - 1]
    key_keep, is_global = make_masks(n, lengths, [1, 3, 0], g)
    x = torch.randn(3, n, h, generator=g)
    # LongformerModel pads to a multiple of the window and passes -10000 / 0 / +10000.
    pad = -n % window
    x_hf = nn.functional.pad(x, (0, 0, 0, pad))
    mask = torch.where(is_global, 10000.0, 0.0).masked_fill(~key_keep, -10000.0)
    mask = nn.functional.pad(mask, (0, pad), value=-10000.0)
    with torch.no_grad():
        want = hf(x_hf, attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0,
                  is_global_attn=bool((mask > 0).any()))[0][:, :n]
        ctx = m.context(x, key_keep, is_global)
        out = m(x, key_keep, is_global)
    real = key_keep
    torch.testing.assert_close(ctx[real], want[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[real], dense(want)[real], rtol=1e-5, atol=1e-5)
    assert torch.all(ctx[~real] == 0)


# ------------------------------------------------------------------ tensor parallelism
SEED = 11
H, HEADS, WINDOW, N = 32, 4, 6, 17


def _tp_inputs():
    g = torch.Generator().manual_seed(6)
    key_keep, is_global = make_masks(N, [N, 12], [2, 1], g)
    return torch.randn(2, N, H, dtype=F64, generator=g), key_keep, is_global, torch.randn(2, N, H, dtype=F64,
                                                                                         generator=g)


def _tp_build(ps, dropout=0.0):
    rng = RNGContext.for_state(0, ps)
    m = ParallelLongformerSelfAttention(H, HEADS, WINDOW, ps, rng, init_std=0.3, attention_dropout=dropout,
                                        site="layers.0.attn_probs")
    initialize_parameters(m, SEED, ps)
    with torch.no_grad():
        m.qkv.bias.fill_(0.05)  # zero-initialised biases would hide a misrouted bias gradient
        m.qkv_global.bias.fill_(-0.05)
        m.out.bias.fill_(0.1)
    return m.double(), rng


def _tp_run(m):
    x, key_keep, is_global, go = _tp_inputs()
    x.requires_grad_()
    out = m(x, key_keep, is_global)
    out.backward(go)
    grads = {name: (p.grad, p.tensor_model_parallel, p.partition_dim, p.partition_stride)
             for name, p in m.named_parameters()}
    return out.detach(), x.grad, grads


def _tp2_worker(rank, world_size):
    ps = ParallelState.from_world(2)
    m, _ = _tp_build(ps)
    result = _tp_run(m)
    # Dropout: the masks are a function of (seed, step, site, TP rank), so a step replays exactly.
    md, rng = _tp_build(ps, dropout=0.3)
    md.train()
    x, key_keep, is_global, _ = _tp_inputs()
    outs = []
    for step in (3, 3, 4):
        rng.set_step(step)
        outs.append(md.context(x, key_keep, is_global))
    return result, outs


def test_tp2_matches_tp1():
    ranks = run_distributed(_tp2_worker, 2)
    m, _ = _tp_build(ParallelState.single())
    out, x_grad, grads = _tp_run(m)
    for (r_out, r_x_grad, _), _ in ranks:
        torch.testing.assert_close(r_out, out, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(r_x_grad, x_grad, rtol=1e-10, atol=1e-10)
    for name, (full, *_) in grads.items():
        _, sharded, dim, stride = ranks[0][0][2][name]
        shards = [r[0][2][name][0] for r in ranks]
        got = merge_shards(shards, dim, stride) if sharded else shards[0]
        torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-10, msg=f"gradient of {name}")
    for _, (a, b, c) in ranks:
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg="same step, same dropout masks")
        assert not torch.equal(a, c), "another step draws other masks"


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("window", [5, 0, -2])
def test_bad_window_is_a_one_line_error(window):
    with pytest.raises(ValueError, match=f"window {window} must be an even integer") as e:
        ParallelLongformerSelfAttention(16, 4, window, ParallelState.single(), RNGContext(0), init_std=0.02,
                                        attention_dropout=0.0, site="a")
    assert "\n" not in str(e.value)
    q = torch.zeros(1, 1, 4, 2)
    keep = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=f"window {window} must be an even integer"):
        longformer_attention(q, q, q, keep, ~keep, window)


def test_heads_must_split_over_tp():
    with pytest.raises(ValueError, match="num_heads=6 is not divisible by tensor_model_parallel_size=4") as e:
        ParallelLongformerSelfAttention(24, 6, 4, ParallelState.virtual(4, 0), RNGContext(0), init_std=0.02,
                                        attention_dropout=0.0, site="a")
    assert "\n" not in str(e.value)
