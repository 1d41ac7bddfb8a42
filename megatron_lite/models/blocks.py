"""Building blocks shared by the architectures: norms, embeddings, attention, MLP, masks, KV cache.

Every layer is written against a `ParallelState` with Megatron's column/row-parallel linears, so
it is a plain layer at TP=1 and a sharded one at TP>1. Parameters that are not sharded (norms,
position embeddings) are tagged replicated here, so every parameter of a model carries an init
spec and partition tags and `initialize_parameters` can draw it TP-invariantly.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_lite import cpu_kernels
from megatron_lite.parallel import (ColumnParallelLinear, ParallelState, RNGContext,
                                    RowParallelLinear, copy_to_tp, mark_replicated, set_init)
from megatron_lite.parallel.gemm import linear, matmul_nn, weight_gradient
from megatron_lite.parallel.kernels import layer_norm_class


def layer_norm(hidden_size: int, eps: float) -> nn.LayerNorm:
    """A LayerNorm replicated on every TP rank, initialised to the identity (ones, zeros);
    apex's FusedLayerNorm when the run chose apex's kernels (megatron_lite/parallel/kernels.py)."""
    norm = layer_norm_class()(hidden_size, eps=eps)
    set_init(norm.weight, "ones")
    set_init(norm.bias, "zeros")
    mark_replicated(norm.weight)
    mark_replicated(norm.bias)
    return norm


def position_embedding(max_positions: int, hidden_size: int, init_std: float) -> nn.Embedding:
    """Learned absolute position embedding, replicated: it is small and every rank needs all of it."""
    emb = nn.Embedding(max_positions, hidden_size)
    with torch.no_grad():  # usable before initialize_parameters, like the parallel layers
        emb.weight.normal_(0.0, init_std)
    set_init(emb.weight, "normal", init_std)
    mark_replicated(emb.weight)
    return emb


# ---------------------------------------------------------------------------------------------
# Attention masks. Boolean, True = may attend, shaped [queries, keys]; queries are the last
# `q_len` positions of a sequence of `k_len` (with a KV cache the earlier ones are in the cache).

def causal_pattern(n: int, device=None) -> torch.Tensor:
    """[n, n] lower-triangular: position i sees positions j <= i."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def sparse_causal_pattern(n: int, stride: int, summary: int, device=None) -> torch.Tensor:
    """[n, n] LingLong / GPT-3 style fixed sparse pattern.

    Query i sees, causally, every key of its own block of `stride` positions, and from each earlier
    block only its last `summary` positions: those act as the block's summary, so information
    still flows across the whole context at O(n·(stride + n/stride·summary)) attended keys.
    """
    i = torch.arange(n, device=device).unsqueeze(1)
    j = torch.arange(n, device=device).unsqueeze(0)
    same_block = (i // stride) == (j // stride)
    summary_col = (j % stride) >= (stride - summary)
    return (j <= i) & (same_block | summary_col)


class MaskCache:
    """Builds a pattern once per (kind, device) and hands out slices of it.

    The pattern is built for max(n, min_size) positions, so training (one sequence length) and
    generation (a key length that grows by one per step) both reuse a single tensor.
    """

    def __init__(self, min_size: int):
        self.min_size = min_size
        self._patterns: dict[tuple, torch.Tensor] = {}

    def get(self, kind: tuple, q_len: int, k_len: int, device) -> torch.Tensor:
        key = (kind, torch.device(device))
        pattern = self._patterns.get(key)
        if pattern is None or pattern.shape[0] < k_len:
            n = max(k_len, self.min_size)
            if kind[0] == "causal":
                pattern = causal_pattern(n, device)
            elif kind[0] == "sparse":
                pattern = sparse_causal_pattern(n, kind[1], kind[2], device)
            else:
                raise ValueError(f"unknown mask kind {kind!r}")
            self._patterns[key] = pattern
        return pattern[k_len - q_len:k_len, :k_len]


# ---------------------------------------------------------------------------------------------
# LingLong's sparse layers, block by block: each query block attends to the summary rows (the
# last `summary` positions) of every earlier block plus its own block, causally; nothing else
# of the [s, s] square is computed. `sparse_causal_pattern` + masked SDPA is the reference.

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Query rows per kernel call of the summary part. A call's keys are the summary rows its last
# block may see, so the masked share of a call (later blocks' rows for earlier queries) is about
# rows / s of the summary work, and its additive mask is rows x (s / stride * summary). Fewer,
# larger calls also mean fewer thread barriers, which a machine shared with other jobs
# stretches (T = 4096, 2 threads on 2 busy cores: 2.4 s with calls of 256 rows, 0.7 s with one).
_SUMMARY_CHUNK_ROWS = 2048


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stride: int,
                           summary: int, dropout_p: float = 0.0) -> torch.Tensor:
    """Self-attention under `sparse_causal_pattern(s, stride, summary)`, computing only the
    blocks the pattern attends: q, k, v [b, heads, s, d] -> [b, heads, s, d].

    The sequence is cut into blocks of `stride` (a short last block is padded; padded keys lie
    after every real query, so the causal mask hides them). Query block j attends to
    [summary rows of blocks 0 .. j-1] + [its own block, causal]: s·(stride/2 + s/stride·summary/2)
    scores instead of s²/2. `dropout_p` drops probabilities; the caller seeds the RNG (the layer's
    `rng.fork`). stride >= s is plain causal attention, summary 0 independent causal blocks.

    On CPU without dropout it runs torch's flash kernel twice (own blocks, batched as
    [b·blocks, heads, stride, d] with is_causal, or our C++ kernel for them in fp32 with 64-wide
    heads; the summary rows, in chunks of query rows with a block-causal mask) and merges the
    two by log-sum-exp; the backward runs the flash backward of
    each part against the merged output and log-sum-exp, so the memory kept is q, k, v, the
    output and the log-sum-exp. Elsewhere (dropout, other devices) one SDPA call attends each
    query block to its own [summary rows of all blocks, own block] keys under a mask.
    """
    s = q.shape[2]
    if k.shape[2] != s or v.shape[2] != s:
        raise ValueError(f"block_sparse_attention is self-attention: {s} queries but "
                         f"{k.shape[2]} keys / {v.shape[2]} values")
    _check_pattern(stride, summary)
    if stride >= s:  # one block: the pattern is the causal triangle
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if _flash_applies(q, dropout_p):
        return _BlockSparseFlash.apply(q, k, v, stride, summary)
    return _block_sparse_sdpa(q, k, v, stride, summary, dropout_p)


def projected_block_sparse_attention(x: torch.Tensor, weight: torch.Tensor,
                                     bias: torch.Tensor | None, heads: int, stride: int,
                                     summary: int, dropout_p: float = 0.0) -> torch.Tensor:
    """`block_sparse_attention` of `qkv_heads(F.linear(x, weight, bias), heads)`: x [b, s, c]
    -> [b, heads, s, d]. Where that takes its CPU flash path (and no autocast recasts the
    projection), one op keeps x instead of q, k and v (`_ProjectedBlockSparseFlash`)."""
    _check_pattern(stride, summary)
    if (stride < x.shape[1] and _flash_applies(x, dropout_p) and x.dtype == weight.dtype
            and not torch.is_autocast_enabled(x.device.type)):
        return _ProjectedBlockSparseFlash.apply(x, weight, bias, heads, stride, summary)
    return block_sparse_attention(*qkv_heads(linear(x, weight, bias), heads), stride, summary,
                                  dropout_p)


def qkv_heads(qkv: torch.Tensor, heads: int):
    """A fused projection [b, s, heads * 3 * d] (rows of its weight in head-major order
    [heads, 3, d], as `ParallelSelfAttention` keeps them) -> q, k, v [b, heads, s, d], views."""
    b, s, _ = qkv.shape
    return qkv.view(b, s, heads, 3, -1).permute(3, 0, 2, 1, 4).unbind(0)


def _check_pattern(stride: int, summary: int) -> None:
    if stride < 1 or not 0 <= summary <= stride:
        raise ValueError(f"need stride >= 1 and 0 <= summary <= stride, got stride={stride}, "
                         f"summary={summary}")


def _flash_applies(t: torch.Tensor, dropout_p: float) -> bool:
    return dropout_p == 0.0 and t.device.type == "cpu" and t.dtype in _FLASH_DTYPES


def _pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """[b, h, s, d] -> [b, h, n, d], zero rows appended (t itself when s == n)."""
    return t if t.shape[2] == n else F.pad(t, (0, 0, 0, n - t.shape[2]))


def _summary_rows(t: torch.Tensor, stride: int, summary: int) -> torch.Tensor:
    """The summary rows of every block but the last (no block after it reads them):
    [b, h, n, d] -> [b, h, (n / stride - 1) * summary, d], a view (for in-place accumulation)
    when `t` is contiguous along its rows."""
    b, h, n, d = t.shape
    return t.view(b, h, n // stride, stride, d)[:, :, :-1, stride - summary:]


def _summary_keys(k: torch.Tensor, v: torch.Tensor, stride: int, summary: int):
    """The summary rows of k and v gathered for the kernel, [b, h, (n / stride - 1) * summary, d]
    each. Gathered again in backward rather than kept: the copy is cheap, and the op then keeps
    only what the dense flash kernel keeps."""
    return tuple(_summary_rows(t, stride, summary).reshape(t.shape[0], t.shape[1], -1, t.shape[3])
                 for t in (k, v))


def _to_blocks(t: torch.Tensor, stride: int) -> torch.Tensor:
    """[b, h, n, (d)] -> [b * blocks, h, stride, (d)]: blocks become batch entries, a view when
    the rows of one batch entry are contiguous, as for q/k/v sliced out of a fused projection."""
    b, h, n = t.shape[:3]
    return t.view(b, h, n // stride, stride, *t.shape[3:]).transpose(1, 2).reshape(
        b * (n // stride), h, stride, *t.shape[3:])


def _from_blocks(t: torch.Tensor, b: int) -> torch.Tensor:
    """The inverse of `_to_blocks`."""
    nb, h, stride = t.shape[0] // b, t.shape[1], t.shape[2]
    return t.view(b, nb, h, stride, *t.shape[3:]).transpose(1, 2).reshape(
        b, h, nb * stride, *t.shape[3:])


def _summary_chunks(n: int, stride: int, summary: int, dtype, device):
    """(query rows, key blocks, additive mask [rows, key blocks * summary]) per kernel call of
    the summary part: query blocks 1 .. nb-1 in chunks, each reading the summary rows of the
    blocks before its last one, and masked so a query block sees only blocks before it."""
    nb = n // stride
    per_call = max(1, _SUMMARY_CHUNK_ROWS // stride)
    for j0 in range(1, nb, per_call):
        j1 = min(j0 + per_call, nb)
        later = torch.arange(j1 - 1, device=device)[None, :] >= torch.arange(
            j0, j1, device=device)[:, None]                      # [query blocks, key blocks]
        mask = torch.zeros(later.shape, dtype=dtype, device=device).masked_fill_(
            later, float("-inf"))
        rows, keys = (j1 - j0) * stride, (j1 - 1) * summary
        mask = mask[:, None, :, None].expand(j1 - j0, stride, j1 - 1, summary).reshape(rows, keys)
        yield slice(j0 * stride, j1 * stride), j1 - 1, mask


def _own_blocks(q, k, v, scale: float):
    """Causal attention within each block, q, k, v [blocks, h, stride, d] -> (out, log-sum-exp
    [blocks, h, stride]): our C++ kernel for 64-wide heads and strides that are multiples of 32
    (`megatron_lite.cpu_kernels`), else torch's flash kernel; their log-sum-exps mean the same,
    so either backward takes either forward's."""
    kernel = cpu_kernels.attention_kernel_for(q)
    if kernel is not None:
        nb, h, t, d = q.shape
        out, lse = kernel.forward_lse(
            *(x.reshape(nb * h, t, d).contiguous() for x in (q, k, v)))
        return out.view(nb, h, t, d), lse.view(nb, h, t)
    return _FLASH(q, k, v, is_causal=True, scale=scale)


def _own_blocks_backward(grad, q, k, v, out, lse, scale: float):
    """dq, dk, dv [blocks, h, stride, d] of `_own_blocks` given the merged output and
    log-sum-exp of the whole pattern (see `_sparse_flash_backward`)."""
    kernel = cpu_kernels.attention_kernel_for(q)
    if kernel is not None:
        nb, h, t, d = q.shape
        rows = (x.reshape(nb * h, t, d).contiguous() for x in (grad, q, k, v, out))
        grads = kernel.backward_lse(
            *rows, lse.reshape(nb * h, t).contiguous())
        return tuple(g.view(nb, h, t, d) for g in grads)
    return _FLASH_BACKWARD(grad, q, k, v, out, lse, 0.0, True, scale=scale)[:3]


def _sparse_flash_forward(q, k, v, stride: int, summary: int):
    """The block-sparse forward on torch's CPU flash kernel (`block_sparse_attention`; the own
    blocks on our C++ kernel where `_own_blocks` takes it): (out [b, h, n, d], log-sum-exp
    [b, h, n]) over the rows padded to n, a multiple of stride.
    Every query attends at least its own position, so no row of either part is fully masked and
    the log-sum-exps are finite."""
    b, h, s, d = q.shape
    n = -(-s // stride) * stride
    q, k, v = (_pad_rows(t, n) for t in (q, k, v))
    scale = d ** -0.5
    out, lse = _own_blocks(*(_to_blocks(t, stride) for t in (q, k, v)), scale)
    out, lse = _from_blocks(out, b), _from_blocks(lse, b)  # [b, h, n, d], [b, h, n]
    if summary:
        ks, vs = _summary_keys(k, v, stride, summary)
        for rows, blocks, mask in _summary_chunks(n, stride, summary, q.dtype, q.device):
            keys = blocks * summary
            o2, l2 = _FLASH(q[:, :, rows], ks[:, :, :keys], vs[:, :, :keys], attn_mask=mask,
                            scale=scale)
            # Softmax over both key sets: out = w1·o1 + w2·o2 with w2 = e^l2 / (e^l1 + e^l2)
            # = sigmoid(l2 - l1) and w1 = 1 - w2, i.e. one lerp over the rows.
            l1 = lse[:, :, rows]
            w2 = torch.sigmoid(l2 - l1).to(out.dtype).unsqueeze(-1)
            out[:, :, rows].lerp_(o2, w2)
            lse[:, :, rows] = torch.logaddexp(l1, l2)
    return out, lse


def _sparse_flash_backward(grad, q, k, v, out, lse, stride: int, summary: int):
    """dq, dk, dv [b, h, s, d] of `_sparse_flash_forward` for the (unpadded) q, k, v, given its
    padded output and log-sum-exp. Each part's flash backward, given the merged output and
    log-sum-exp, recomputes its share of the joint probabilities and the joint rowsum(dO * O)
    term, so its dq, dk, dv are those of the joint softmax: the parts' dq add up, their dk/dv land
    on their keys."""
    b, h, s, d = q.shape
    n = out.shape[2]
    q, k, v, grad = (_pad_rows(t, n) for t in (q, k, v, grad))
    scale = d ** -0.5
    grads = _own_blocks_backward(*(_to_blocks(t, stride) for t in (grad, q, k, v, out)),
                                 _to_blocks(lse, stride), scale)
    dq, dk, dv = (_from_blocks(t, b) for t in grads)
    if summary:
        ks, vs = _summary_keys(k, v, stride, summary)
        dk_rows, dv_rows = (_summary_rows(t, stride, summary) for t in (dk, dv))
        for rows, blocks, mask in _summary_chunks(n, stride, summary, q.dtype, q.device):
            keys = blocks * summary
            dq2, dk2, dv2 = _FLASH_BACKWARD(
                grad[:, :, rows], q[:, :, rows], ks[:, :, :keys], vs[:, :, :keys],
                out[:, :, rows], lse[:, :, rows], 0.0, False, attn_mask=mask, scale=scale)
            dq[:, :, rows] += dq2
            dk_rows[:, :, :blocks] += dk2.view(b, h, blocks, summary, d)
            dv_rows[:, :, :blocks] += dv2.view(b, h, blocks, summary, d)
    return dq[:, :, :s], dk[:, :, :s], dv[:, :, :s]


class _BlockSparseFlash(torch.autograd.Function):
    """`block_sparse_attention` on CPU without dropout (see there): keeps q, k, v, the output and
    the log-sum-exp, as torch's flash kernel does for dense attention."""

    @staticmethod
    def forward(ctx, q, k, v, stride: int, summary: int):
        out, lse = _sparse_flash_forward(q, k, v, stride, summary)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pattern = (stride, summary)
        return out[:, :, :q.shape[2]]

    @staticmethod
    def backward(ctx, grad):
        return *_sparse_flash_backward(grad, *ctx.saved_tensors, *ctx.pattern), None, None


class _ProjectedBlockSparseFlash(torch.autograd.Function):
    """The fused projection and `_BlockSparseFlash` in one op that keeps x, the output and the
    log-sum-exp, and projects q, k, v again in backward. Sparse attention is cheap enough that
    this GEMM fits in what it saves (at 4,096 tokens the sparse 106M model stays 1.1x faster
    than the dense one), and the [b, s, 3c] projection is no longer held from forward to backward,
    so a sparse layer keeps less than a dense one. The gradients of q, k and v are written
    into the projection's buffer, one fused gradient as autograd's unbind would make."""

    @staticmethod
    def forward(ctx, x, weight, bias, heads: int, stride: int, summary: int):
        out, lse = _sparse_flash_forward(*qkv_heads(linear(x, weight, bias), heads), stride,
                                         summary)
        ctx.save_for_backward(x, weight, bias, out, lse)
        ctx.pattern = (heads, stride, summary)
        return out[:, :, :x.shape[1]]

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, out, lse = ctx.saved_tensors
        heads, stride, summary = ctx.pattern
        b, s, c = x.shape
        qkv = linear(x, weight, bias)
        grads = _sparse_flash_backward(grad, *qkv_heads(qkv, heads), out, lse, stride, summary)
        # q, k, v are spent: their buffer takes their gradients.
        for part, g in zip(qkv_heads(qkv, heads), grads):
            part.copy_(g)
        d_qkv = qkv.view(b * s, weight.shape[0])
        dx = matmul_nn(d_qkv, weight).view(b, s, c) if ctx.needs_input_grad[0] else None
        dw = weight_gradient(d_qkv, x.reshape(b * s, c)) if ctx.needs_input_grad[1] else None
        db = d_qkv.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None


def _block_sparse_sdpa(q, k, v, stride: int, summary: int, dropout_p: float) -> torch.Tensor:
    """`block_sparse_attention` through one SDPA call, for any device and with dropout: query
    block j attends to [summary rows of all blocks but the last, own block] under a mask that
    keeps blocks < j of the first part and the causal triangle of the second. The summary keys
    are copied once per block (blocks x s / stride x summary rows of k and v)."""
    b, h, s, d = q.shape
    nb = -(-s // stride)
    qb, kb, vb = (_pad_rows(t, nb * stride).reshape(b * h, nb, stride, d) for t in (q, k, v))
    keys = (nb - 1) * summary
    if keys == 0:
        out = F.scaled_dot_product_attention(qb, kb, vb, dropout_p=dropout_p, is_causal=True)
    else:
        def with_summary(t):
            rows = t[:, :-1, stride - summary:].reshape(b * h, 1, keys, d)
            return torch.cat([rows.expand(b * h, nb, keys, d), t], dim=2)

        earlier = (torch.arange(keys, device=q.device) // summary)[None, :] < torch.arange(
            nb, device=q.device)[:, None]                                      # [nb, keys]
        mask = torch.cat([earlier[:, None, :].expand(nb, stride, keys),
                          causal_pattern(stride, q.device).expand(nb, stride, stride)], dim=2)
        out = F.scaled_dot_product_attention(qb, with_summary(kb), with_summary(vb),
                                             attn_mask=mask, dropout_p=dropout_p)
    return out.reshape(b, h, nb * stride, d)[:, :, :s]


# ---------------------------------------------------------------------------------------------

class KVCache:
    """Past keys and values of every layer, each [batch, local_heads, past_len, head_dim].

    A model reads `seq_len` before running its layers (to offset positions and masks), and each
    attention layer appends its new keys/values with `update`.
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def seq_len(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        if self.keys[layer_idx] is not None:
            k = torch.cat([self.keys[layer_idx], k], dim=2)
            v = torch.cat([self.values[layer_idx], v], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v


class _QueryBlockedCausalAttention(torch.autograd.Function):
    """Causal attention of q, k, v [n, T, d] by blocks of query rows, each over only the keys it
    may see (up to the block's last row; the block's own square takes the causal mask), as
    batched GEMMs and a plain softmax. The probabilities are kept for backward, where the
    scores' gradient is formed in place with the row sums of dP * P taken as those of dO * O."""

    @staticmethod
    def forward(ctx, q, k, v, rows):
        t, d = q.shape[1:]
        q = q * d ** -0.5
        causal = torch.full((rows, rows), float("-inf"), dtype=q.dtype).triu_(1)
        out, probs = q.new_empty(q.shape), []
        for lo in range(0, t, rows):
            hi = min(lo + rows, t)
            scores = torch.bmm(q[:, lo:hi], k[:, :hi].transpose(1, 2))
            scores[:, :, lo:hi] += causal[:hi - lo, :hi - lo]
            probs.append(scores.softmax(-1))
            out[:, lo:hi] = torch.bmm(probs[-1], v[:, :hi])
        ctx.save_for_backward(q, k, v, out, *probs)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, *probs = ctx.saved_tensors
        t, d = q.shape[1:]
        row_dot = (grad * out).sum(-1, keepdim=True)
        dq, dk, dv = q.new_empty(q.shape), torch.zeros_like(k), torch.zeros_like(v)
        for p, lo in zip(probs, range(0, t, ctx.rows)):
            hi = min(lo + ctx.rows, t)
            dv[:, :hi] += torch.bmm(p.transpose(1, 2), grad[:, lo:hi])
            dscores = torch.bmm(grad[:, lo:hi], v[:, :hi].transpose(1, 2))
            dscores.sub_(row_dot[:, lo:hi]).mul_(p)
            dq[:, lo:hi] = torch.bmm(dscores, k[:, :hi])
            dk[:, :hi] += torch.bmm(dscores.transpose(1, 2), q[:, lo:hi])
        return dq.mul_(d ** -0.5), dk, dv, None


# Query rows per block of the blocked causal attention, and the most probabilities it may keep
# for one call's backward. 128-row blocks compute (1 + 128 / T) / 2 of the scores' square where
# the flash kernel computes half of it, in larger GEMMs (BENCHMARKS.md, "Layer levers"). The
# cap bounds the memory it adds over the flash kernel, which keeps only per-row statistics:
# LingLong-106M keeps 27 MiB a layer at 1,024 tokens; at 2,048 (108 MiB) and beyond the flash
# kernel runs.
CAUSAL_BLOCK_ROWS = 128
CAUSAL_BLOCK_MAX_BYTES = 32 << 20


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     blocked: bool = True, dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d) + causal mask) v for q, k, v [b, heads, T, d].

    On CPU in fp32 with gradients, outside torch.compile and autocast, for two blocks of query
    rows or more and when its probabilities fit CAUSAL_BLOCK_MAX_BYTES, it trains on a path of
    its own: our C++ kernel for 64-wide heads and T a multiple of 32 where it is built
    (`megatron_lite.cpu_kernels`; 1.4x the path below on the 106M's attention), else by blocks of
    query rows as batched GEMMs (`_QueryBlockedCausalAttention`; 1.10x torch's flash kernel on
    the 106M's attention block, but slower on one block of short heads: 0.70x at [1, 4, 128,
    16]). Otherwise, or with `blocked=False`, it is SDPA's fused causal kernel.

    With `dropout_p` > 0 only the C++ kernel keeps its path (its mask hashed from `seed`);
    elsewhere SDPA draws the mask from torch's RNG, which the caller seeds."""
    b, h, t, d = q.shape
    kept = b * h * t * (t + CAUSAL_BLOCK_ROWS) // 2 * q.element_size()
    if (blocked and q.device.type == "cpu" and q.dtype == torch.float32
            and t >= 2 * CAUSAL_BLOCK_ROWS
            and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
            and kept <= CAUSAL_BLOCK_MAX_BYTES and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled("cpu")):
        rows = [x.reshape(b * h, t, d) for x in (q, k, v)]
        if cpu_kernels.attention_kernel_for(q) is not None:
            out = cpu_kernels.CausalAttention.apply(*(x.contiguous() for x in rows), dropout_p,
                                                    seed)
            return out.view(b, h, t, d)
        if dropout_p == 0:
            return _QueryBlockedCausalAttention.apply(*rows, CAUSAL_BLOCK_ROWS).view(b, h, t, d)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


class ParallelSelfAttention(nn.Module):
    """Multi-head self-attention with heads sharded over TP.

    The fused QKV projection is column-parallel with its output rows in head-major order
    [heads, 3, head_dim], so TP rank r owns a contiguous block of whole heads (q, k and v
    together) and resharding is a plain slice (partition stride 1). The output projection is
    row-parallel: its all-reduce is the only communication of the block.

    Causal attention goes through `causal_attention`, whose CPU training path is our C++ kernel
    (with or without dropout) or blocked GEMMs (without); `blocked_causal_attention = False`
    keeps it on SDPA's flash kernel.
    """
    blocked_causal_attention = True

    def __init__(self, hidden_size: int, num_heads: int, ps: ParallelState, rng: RNGContext, *,
                 init_std: float, out_init_std: float, attention_dropout: float, site: str):
        super().__init__()
        if num_heads % ps.tp_size:
            raise ValueError(f"{num_heads} attention heads do not split over "
                             f"tensor_model_parallel_size={ps.tp_size}")
        self.head_dim = hidden_size // num_heads
        self.local_heads = num_heads // ps.tp_size
        self.attention_dropout = attention_dropout
        self.rng = rng
        self.site = site
        self.qkv = ColumnParallelLinear(hidden_size, 3 * hidden_size, ps, init_std=init_std)
        self.out = RowParallelLinear(hidden_size, hidden_size, ps, init_std=out_init_std)
        # ZeRO-3 gathers a module's own parameters around its forward; the sparse path reads
        # `qkv`'s inside one autograd Function, so DeepSpeed is told (its "leaf module" flag) to
        # gather the whole subtree here and for the backward, rather than relying on its fetch
        # of parameters used outside their module (tests/launch/test_zero_configs.py trains the
        # sparse GPT with every parameter partitioned).
        self._z3_leaf = True

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False,
                kv_cache: KVCache | None = None, layer_idx: int = 0,
                sparse: tuple[int, int] | None = None) -> torch.Tensor:
        """`sparse=(stride, summary)`: self-attention under LingLong's sparse pattern through
        `block_sparse_attention` (no mask, no KV cache); otherwise SDPA with `mask`/`is_causal`."""
        if sparse is not None and (mask is not None or is_causal or kv_cache is not None):
            raise ValueError("sparse=(stride, summary) is its own pattern: it takes no mask, "
                             "is_causal or kv_cache")
        b, s, _ = x.shape
        p = self.attention_dropout if self.training else 0.0
        # Heads differ per TP rank, so their dropout masks must too (tp_region=True).
        with self.rng.fork(self.site, tp_region=True) if p > 0 else contextlib.nullcontext():
            if sparse is not None:
                # The projection goes into the sparse op, which keeps x rather than q, k, v.
                ctx = projected_block_sparse_attention(
                    copy_to_tp(x, self.qkv.ps), self.qkv.weight, self.qkv.bias,
                    self.local_heads, *sparse, dropout_p=p)
            else:
                q, k, v = qkv_heads(self.qkv(x), self.local_heads)  # [b, local_heads, s, d]
                if kv_cache is not None:
                    k, v = kv_cache.update(layer_idx, k, v)
                if is_causal and mask is None and kv_cache is None:
                    # The kernel hashes its dropout mask from the (step, site) seed; SDPA draws
                    # it from the forked RNG.
                    seed = self.rng.seed_for(self.site, tp_region=True) if p > 0 else 0
                    ctx = causal_attention(q, k, v, self.blocked_causal_attention, p, seed)
                else:
                    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                         is_causal=is_causal)
        ctx = ctx.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim)
        return self.out(ctx)


class ParallelMLP(nn.Module):
    """h -> ffn (column-parallel) -> GELU -> h (row-parallel). `gelu`: "tanh" (the approximation
    GPT-2/3 use) or "none" (the exact erf GELU of BERT)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, ps: ParallelState, *,
                 init_std: float, out_init_std: float, gelu: str = "tanh"):
        super().__init__()
        self.gelu = gelu
        if ffn_hidden_size % ps.tp_size:
            raise ValueError(f"ffn_hidden_size={ffn_hidden_size} does not split over "
                             f"tensor_model_parallel_size={ps.tp_size}")
        self.fc1 = ColumnParallelLinear(hidden_size, ffn_hidden_size, ps, init_std=init_std)
        self.fc2 = RowParallelLinear(ffn_hidden_size, hidden_size, ps, init_std=out_init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.gelu))


def padded_vocab_size(cfg) -> int:
    """cfg.vocab_size rounded up to cfg.make_vocab_size_divisible_by; independent of TP, so a
    checkpoint reshards to any TP size that divides it. (Configs take it as a property.)"""
    if cfg.vocab_size is None:
        raise ValueError(f"{type(cfg).__name__}.vocab_size is not set: set model.vocab_size in the "
                         "config or let the trainer fill it from the tokenizer")
    m = cfg.make_vocab_size_divisible_by
    return -(-cfg.vocab_size // m) * m


def check_tp_divisible(cfg, tp_size: int, ffn_size: int) -> None:
    """A model config's heads, FFN width and padded vocabulary must split evenly across
    `tp_size` ranks; the error names the field to change."""
    tp = f"tensor_model_parallel_size={tp_size}"
    if cfg.num_attention_heads % tp_size:
        raise ValueError(f"num_attention_heads={cfg.num_attention_heads} must be divisible by {tp}")
    if ffn_size % tp_size:
        raise ValueError(f"ffn_hidden_size (resolved {ffn_size}) must be divisible by {tp}")
    if cfg.padded_vocab_size % tp_size:
        raise ValueError(f"padded vocabulary {cfg.padded_vocab_size} (vocab_size={cfg.vocab_size} "
                         f"rounded to make_vocab_size_divisible_by="
                         f"{cfg.make_vocab_size_divisible_by}) is not divisible by {tp}; choose "
                         "make_vocab_size_divisible_by as a multiple of the TP size")


# ---------------------------------------------------------------------------------------------
# Weight layouts shared by the converters (models' Hugging Face interop, tools/convert_to_long.py)

def fuse_heads(parts: list[torch.Tensor], heads: int) -> torch.Tensor:
    """Separate projections ([heads * d, ...] each: q, k, v) -> one head-major fused tensor whose
    rows are [heads, len(parts), d], so that a TP shard is a block of whole heads."""
    return torch.stack([p.reshape(heads, -1, *p.shape[1:]) for p in parts], dim=1).reshape(
        -1, *parts[0].shape[1:])


def split_heads(fused: torch.Tensor, heads: int, n: int) -> list[torch.Tensor]:
    """The inverse of `fuse_heads`: n separate [heads * d, ...] tensors."""
    per = fused.reshape(heads, n, -1, *fused.shape[1:])
    return [t.reshape(-1, *fused.shape[1:]) for t in per.unbind(1)]


def resize_rows(table: torch.Tensor, rows: int) -> torch.Tensor:
    """The first `rows` rows of `table`, zero-filled beyond its end (a vocabulary padded to a
    multiple, or cut back to the true size)."""
    out = torch.zeros(rows, *table.shape[1:], dtype=table.dtype)
    n = min(rows, table.shape[0])
    out[:n] = table[:n]
    return out
