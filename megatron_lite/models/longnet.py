"""LongNet: a pre-LN decoder (or encoder) whose self-attention is dilated attention (arXiv 2307.02486).

    tokens -> word embedding (vocab-parallel) + learned positions -> dropout
           -> num_layers x [x + drop(dilated_attn(LN(x))); x + drop(mlp(LN(x)))]
           -> final LN -> logits through the tied word embedding (vocab-parallel shard)

Dilated attention. Branch i has a segment length w_i and a dilation r_i. The sequence is cut into
segments of w_i positions; in each, head j keeps the rows t with t mod r_i == offset(j) (t the
position within the segment) and attends among them only (causally for a decoder). Offsets:
`mod` (the paper's) is j mod r_i; `block` (torchscale's, so its checkpoints map) is
j // ceil(H / r_i). The branches combine with weights proportional to their softmax
denominators, which is exactly

    softmax(Q K^T / sqrt(d) + log c) V,   c[q, k] = number of branches in which q and k meet

(c = 0 masked). We compute each branch per sparsified segment with torch's CPU flash kernel,
which also returns the log-sum-exp, and merge branches by it; the backward runs the flash backward
of every branch with the *combined* output and log-sum-exp, which is the exact gradient of the
combination (the weights' dependence on Q and K included: torchscale computes them under
no_grad and loses that term). No n x n tensor exists; time and memory are O(n) for a fixed
branch set.

Memory: one autograd Function projects q/k/v from x inside, a chunk of gathered rows at a time,
and in the backward projects them again and pushes each chunk's gradient straight through the
weight. It saves x, its output and the log-sum-exp (H floats per token) only: at a million tokens
of width 512 every [n, h] fp32 tensor is 2 GiB, and keeping q, k, v (or their gradients) whole
would not fit in 24 GiB.

Sequence parallelism: SP rank s holds positions [s L, (s + 1) L) of an n = S L sequence. A branch
whose segments lie within a rank (w divides L) runs locally. Otherwise each rank projects only its
kept rows, all-gathers their keys/values over the SP group (n / r rows per head, whatever S), and
attends its own queries to the keys of their segments (its own included); the backward
reduce-scatters the key/value gradients to their owners. Heads shard over TP as for GPT.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from megatron_lite.data.contract import Datasets
from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.objectives.causal_lm import CausalLMDataset
from megatron_lite.data.tokenizer import check_tokenizer_hash
from megatron_lite.models.blocks import (ParallelMLP, check_tp_divisible, layer_norm,
                                         padded_vocab_size, position_embedding)
from megatron_lite.models.registry import ModelSpec, register
from megatron_lite.parallel import (ColumnParallelLinear, ParallelState, RNGContext,
                                    RowParallelLinear, VocabParallelEmbedding, copy_to_tp,
                                    parallel_lm_logits, vocab_parallel_cross_entropy)

HEAD_ORDERS = ("mod", "block")
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
# Gathered rows per kernel call: the chunk's x rows, q/k/v and their gradients are the only
# transient buffers (8 MiB each at width 512), so this bounds memory, not the length. Calls
# of 4096 rows still keep the kernel busy; larger ones only add a peak that SP cannot split.
_CHUNK_ROWS = 4096
# Queries per call for a branch spanning SP ranks (its mask is queries x keys of the segment).
_SPAN_QUERIES = 2048


# ---------------------------------------------------------------------------------------------
# Branches and head offsets

def head_offset(head: int, num_heads: int, r: int, order: str) -> int:
    """The row offset (within each segment) that global head `head` keeps in a branch of
    dilation r: j mod r (`mod`, the paper's) or j // ceil(H / r) (`block`, torchscale's)."""
    if order == "mod":
        return head % r
    if order == "block":
        return head // -(-num_heads // r)
    raise ValueError(f"head_offset_order {order!r} must be one of {HEAD_ORDERS}")


def check_branches(segment_lengths, dilation_rates, num_heads: int, order: str,
                   where: str = "LongNetConfig") -> list[tuple[int, int]]:
    """[(w, r), ...] after checking them: integers >= 1, as many of each, and every query row of
    every head covered by some branch (an uncovered row would have no keys at all). Errors are
    one line naming the field and the fix."""
    w_list, r_list = list(segment_lengths), list(dilation_rates)
    if not w_list:
        raise ValueError(f"{where}.segment_lengths is empty: give at least one branch, e.g. "
                         "segment_lengths: [2048] with dilation_rates: [1]")
    if len(w_list) != len(r_list):
        raise ValueError(f"{where}: segment_lengths has {len(w_list)} entries but dilation_rates "
                         f"{len(r_list)}; give one dilation per segment length")
    for name, values in (("segment_lengths", w_list), ("dilation_rates", r_list)):
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{where}.{name} has {v!r}: every segment length w and dilation r "
                                 "must be an integer >= 1")
    if order not in HEAD_ORDERS:
        raise ValueError(f"{where}.head_offset_order={order!r} must be one of {HEAD_ORDERS}")
    if 1 not in r_list:
        # Coverage is periodic in the position with period lcm(w); check one period.
        period = math.lcm(*w_list)
        if period > 1 << 22:
            raise ValueError(f"{where}: no branch has dilation 1 and the segment lengths' period "
                             f"{period} is too long to check coverage; add a branch with r = 1")
        pos = torch.arange(period)
        for j in range(num_heads):
            covered = torch.zeros(period, dtype=torch.bool)
            for w, r in zip(w_list, r_list):
                covered |= (pos % w) % r == head_offset(j, num_heads, r, order)
            if not bool(covered.all()):
                p = int((~covered).nonzero()[0])
                raise ValueError(f"{where}: with segment_lengths {w_list} and dilation_rates "
                                 f"{r_list} ({order} order) no branch covers position {p} for "
                                 f"head {j}, whose output would be undefined; add a branch with "
                                 "dilation 1")
    return list(zip(w_list, r_list))


# ---------------------------------------------------------------------------------------------
# The kernel

class _Plan:
    """What one dilated-attention call needs beyond its tensors (shared by forward and backward)."""

    def __init__(self, branches, num_heads: int, head_start: int, local_heads: int, head_dim: int,
                 order: str, causal: bool, key_keep, ps: ParallelState | None, n_local: int):
        self.branches, self.causal, self.order = branches, causal, order
        self.heads, self.d = local_heads, head_dim
        self.scale = 1.0 / math.sqrt(head_dim)
        sp = ps.sp_size if ps is not None else 1
        self.ps, self.sp = ps, sp
        self.L, self.n = n_local, n_local * sp
        self.start = (ps.sp_rank if sp > 1 else 0) * n_local
        self.key_keep = key_keep  # [b, L] bool or None (True = real token)
        self.keep_all = None  # [b, n], every rank's key_keep (spanning branches)
        if key_keep is not None and sp > 1:
            parts = [torch.empty_like(key_keep, dtype=torch.uint8) for _ in range(sp)]
            dist.all_gather(parts, key_keep.to(torch.uint8).contiguous(), group=ps.sp_group)
            self.keep_all = torch.cat(parts, dim=1).bool()
        # jobs: (branch index, w, r, offset, local heads with that offset, spans ranks)
        self.jobs = []
        for i, (w, r) in enumerate(branches):
            offsets: dict[int, list[int]] = {}
            for h in range(local_heads):
                offsets.setdefault(head_offset(head_start + h, num_heads, r, order), []).append(h)
            spans = sp > 1 and not (w <= n_local and n_local % w == 0)
            for o, hs in sorted(offsets.items()):
                self.jobs.append((i, w, r, o, torch.tensor(hs), spans))


def _weights(weight, bias, hs, heads, d):
    """The fused projection rows [g * 3 * d, h] (and bias) of local heads `hs` (head-major)."""
    w = weight.view(heads, 3 * d, -1)[hs].reshape(-1, weight.shape[1])
    b = None if bias is None else bias.view(heads, 3 * d)[hs].reshape(-1)
    return w, b


def _project(x_rows, w, b, g, d):
    """q, k, v [..., g, d] of gathered rows x_rows [..., h]."""
    qkv = torch.nn.functional.linear(x_rows, w, b).unflatten(-1, (g, 3, d))
    return qkv.unbind(-2)


def _to_heads(t):  # [B, m, g, d] -> [B, g, m, d] contiguous, the kernel's layout
    return t.transpose(1, 2).contiguous()


def _local_rows(plan: _Plan, w: int, r: int, o: int):
    """Kept rows of a branch whose segments lie within the local slice: (idx [nseg, m] clamped
    local positions, valid [nseg, m]), or None when offset o keeps nothing."""
    ws = min(w, plan.L)  # a segment longer than the sequence is the whole sequence
    m = -(-(ws - o) // r) if o < ws else 0
    if m == 0:
        return None
    nseg = -(-plan.L // ws)
    idx = (torch.arange(nseg)[:, None] * ws + o + r * torch.arange(m)[None])
    valid = idx < plan.L
    return idx.clamp_(max=plan.L - 1), valid


def _span_rows(plan: _Plan, w: int, r: int, o: int):
    """Kept rows of a branch spanning SP ranks: (global positions [S, M], -1 padding) of every
    rank, M the most any rank keeps."""
    per_rank = []
    for s in range(plan.sp):
        p = torch.arange(s * plan.L, (s + 1) * plan.L)
        per_rank.append(p[(p % w) % r == o])
    M = max(len(p) for p in per_rank)
    out = torch.full((plan.sp, M), -1, dtype=torch.long)
    for s, p in enumerate(per_rank):
        out[s, :len(p)] = p
    return out


def _chunks(nseg: int, m: int):
    c = max(1, _CHUNK_ROWS // m)
    for s0 in range(0, nseg, c):
        yield s0, min(nseg, s0 + c)


def _key_mask(keep: torch.Tensor, dtype) -> torch.Tensor | None:
    """Additive key mask [B, 1, 1, m] from keep [B, m], or None when every key is kept."""
    if bool(keep.all()):
        return None
    return torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, float("-inf"))[:, None, None]


def _merge(out, lse, rows, hs, o, l):
    """Fold one branch's (o [b, R, g, d], l [b, R, g]) at local rows `rows` [R], heads `hs` into
    the running output and log-sum-exp: weights exp(l_i - LSE), the exact combination."""
    ri, hi = rows[:, None], hs[None, :]
    cur_o, cur_l = out[:, ri, hi], lse[:, ri, hi]
    new = torch.logaddexp(cur_l, l)
    out[:, ri, hi] = cur_o * torch.exp(cur_l - new)[..., None] + o * torch.exp(l - new)[..., None]
    lse[:, ri, hi] = new


class _DilatedAttention(torch.autograd.Function):
    """x [b, L, h] -> dilated attention output [b, L, heads, d] of the local heads, q/k/v
    projected inside from x by `weight` [heads * 3 * d, h] (rows head-major [heads, 3, d]) and
    `bias`. Saves x, the output and the log-sum-exp; the backward recomputes q/k/v."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan: _Plan):
        b, L, _ = x.shape
        heads, d = plan.heads, plan.d
        out = x.new_zeros(b, L, heads, d)
        lse = x.new_full((b, L, heads), float("-inf"))
        for job in plan.jobs:
            (_span_forward if job[5] else _local_forward)(x, weight, bias, plan, job, out, lse)
        # Padded queries give zeros and no gradient (lse = +inf makes the backward's
        # probabilities exp(s - lse) vanish); coverage is checked with the config, so every real
        # row has a finite log-sum-exp.
        dead = ~torch.isfinite(lse)
        if plan.key_keep is not None:
            dead |= ~plan.key_keep[:, :, None]
        out.masked_fill_(dead[..., None], 0.0)
        lse.masked_fill_(dead, float("inf"))
        ctx.save_for_backward(x, weight, bias, out, lse)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, out, lse = ctx.saved_tensors
        plan = ctx.plan
        grad = grad.contiguous()
        if plan.key_keep is not None:
            grad = grad * plan.key_keep[:, :, None, None]
        needs = ctx.needs_input_grad
        grads = [torch.zeros_like(x) if needs[0] else None,
                 torch.zeros_like(weight) if needs[1] else None,
                 torch.zeros_like(bias) if bias is not None and needs[2] else None]
        for job in plan.jobs:
            (_span_backward if job[5] else _local_backward)(x, weight, bias, plan, job, out, lse,
                                                           grad, grads)
        return grads[0], grads[1], grads[2], None


def _local_forward(x, weight, bias, plan, job, out, lse):
    _, w, r, o, hs, _ = job
    rows = _local_rows(plan, w, r, o)
    if rows is None:
        return
    idx, valid = rows
    b, g, d = x.shape[0], len(hs), plan.d
    wg, bg = _weights(weight, bias, hs, plan.heads, d)
    m = idx.shape[1]
    for s0, s1 in _chunks(idx.shape[0], m):
        c, ix, ok = s1 - s0, idx[s0:s1].reshape(-1), valid[s0:s1]
        q, k, v = (_to_heads(t.reshape(b * c, m, g, d)) for t in _project(x[:, ix], wg, bg, g, d))
        keep = ok.expand(b, c, m)
        if plan.key_keep is not None:
            keep = keep & plan.key_keep[:, ix].view(b, c, m)
        o_, l_ = _FLASH(q, k, v, is_causal=plan.causal,
                        attn_mask=_key_mask(keep.reshape(b * c, m), x.dtype), scale=plan.scale)
        sel = ok.reshape(-1)
        o_ = o_.view(b, c, g, m, d).transpose(2, 3).reshape(b, c * m, g, d)[:, sel]
        l_ = l_.view(b, c, g, m).transpose(2, 3).reshape(b, c * m, g)[:, sel]
        _merge(out, lse, ix[sel], hs, o_, l_)


def _local_backward(x, weight, bias, plan, job, out, lse, grad, grads):
    _, w, r, o, hs, _ = job
    rows = _local_rows(plan, w, r, o)
    if rows is None:
        return
    idx, valid = rows
    b, g, d = x.shape[0], len(hs), plan.d
    wg, bg = _weights(weight, bias, hs, plan.heads, d)
    m = idx.shape[1]
    for s0, s1 in _chunks(idx.shape[0], m):
        c, ix, ok = s1 - s0, idx[s0:s1].reshape(-1), valid[s0:s1]
        xr = x[:, ix]
        q, k, v = (_to_heads(t.reshape(b * c, m, g, d)) for t in _project(xr, wg, bg, g, d))
        keep = ok.expand(b, c, m)
        if plan.key_keep is not None:
            keep = keep & plan.key_keep[:, ix].view(b, c, m)
        okr = ok.reshape(1, -1, 1)
        o_ = _to_heads(out[:, ix][:, :, hs].reshape(b * c, m, g, d))
        l_ = lse[:, ix][:, :, hs].masked_fill(~okr, float("inf"))
        l_ = l_.view(b * c, m, g).transpose(1, 2).contiguous()
        go = _to_heads((grad[:, ix][:, :, hs] * okr[..., None]).reshape(b * c, m, g, d))
        dq, dk, dv = _FLASH_BACKWARD(go, q, k, v, o_, l_, 0.0, plan.causal,
                                     attn_mask=_key_mask(keep.reshape(b * c, m), x.dtype),
                                     scale=plan.scale)
        dqkv = torch.stack([t.transpose(1, 2) for t in (dq, dk, dv)], dim=3)  # [bc, m, g, 3, d]
        _push(dqkv.reshape(b, c * m, g * 3 * d), xr, ix, wg, hs, plan, grads)


def _push(dqkv, xr, ix, wg, hs, plan, grads):
    """Chunk rows' q/k/v gradient [b, R, g * 3 * d] -> dx (rows ix), dW and db (heads hs)."""
    dx, dw, db = grads
    if dx is not None:
        dx.index_add_(1, ix, dqkv @ wg)
    if dw is not None:
        part = dqkv.flatten(0, 1).t() @ xr.flatten(0, 1)
        dw.view(plan.heads, -1, dw.shape[1]).index_add_(0, hs, part.view(len(hs), -1, dw.shape[1]))
    if db is not None:
        db.view(plan.heads, -1).index_add_(0, hs, dqkv.sum((0, 1)).view(len(hs), -1))


def _span_setup(x, weight, bias, plan, job):
    """The local kept rows (clamped local idx, valid [M]), every rank's kept positions, and the
    all-gathered keys/values [b, S * M, g, 2, d] of a spanning branch, with the local q."""
    _, w, r, o, hs, _ = job
    allpos = _span_rows(plan, w, r, o)  # [S, M]
    mine = allpos[plan.ps.sp_rank]
    valid = mine >= 0
    ix = (mine - plan.start).clamp(min=0)
    g, d = len(hs), plan.d
    wg, bg = _weights(weight, bias, hs, plan.heads, d)
    xr = x[:, ix]
    q, k, v = _project(xr, wg, bg, g, d)
    kv = torch.stack([k, v], dim=3).contiguous()  # [b, M, g, 2, d]
    parts = [torch.empty_like(kv) for _ in range(plan.sp)]
    dist.all_gather(parts, kv, group=plan.ps.sp_group)
    return allpos, valid, ix, xr, wg, q, torch.cat(parts, dim=1)


def _span_queries(plan, w, allpos, valid):
    """Per query chunk: (query slots, key slots into the gathered S * M rows, additive mask
    [b or 1, 1, q, k])."""
    flat = allpos.reshape(-1)
    mine = allpos[plan.ps.sp_rank]
    slots = valid.nonzero()[:, 0]
    for a in range(0, len(slots), _SPAN_QUERIES):
        qs = slots[a:a + _SPAN_QUERIES]
        qpos = mine[qs]
        lo, hi = int(qpos.min()) // w * w, (int(qpos.max()) // w + 1) * w
        ks = ((flat >= lo) & (flat < hi)).nonzero()[:, 0]  # the segments these queries are in
        kpos = flat[ks]
        allowed = (qpos[:, None] // w) == (kpos[None, :] // w)
        if plan.causal:
            allowed &= kpos[None, :] <= qpos[:, None]
        allowed = allowed[None]
        if plan.keep_all is not None:
            allowed = allowed & plan.keep_all[:, kpos][:, None, :]
        yield qs, ks, allowed[:, None]


def _additive(allowed, dtype):
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))


def _span_forward(x, weight, bias, plan, job, out, lse):
    _, w, r, o, hs, _ = job
    allpos, valid, ix, _, _, q, kv = _span_setup(x, weight, bias, plan, job)
    for qs, ks, allowed in _span_queries(plan, w, allpos, valid):
        o_, l_ = _FLASH(_to_heads(q[:, qs]), _to_heads(kv[:, ks, :, 0]), _to_heads(kv[:, ks, :, 1]),
                        attn_mask=_additive(allowed, x.dtype), scale=plan.scale)
        _merge(out, lse, ix[qs], hs, o_.transpose(1, 2), l_.transpose(1, 2))


def _span_backward(x, weight, bias, plan, job, out, lse, grad, grads):
    _, w, r, o, hs, _ = job
    allpos, valid, ix, xr, wg, q, kv = _span_setup(x, weight, bias, plan, job)
    b, M, g, d = q.shape
    dq = torch.zeros_like(q)
    dkv = torch.zeros_like(kv)  # [b, S * M, g, 2, d]: this rank's share of every rank's keys
    for qs, ks, allowed in _span_queries(plan, w, allpos, valid):
        rows = ix[qs]
        o_ = _to_heads(out[:, rows][:, :, hs])
        l_ = lse[:, rows][:, :, hs].transpose(1, 2).contiguous()
        go = _to_heads(grad[:, rows][:, :, hs])
        dq_, dk_, dv_ = _FLASH_BACKWARD(go, _to_heads(q[:, qs]), _to_heads(kv[:, ks, :, 0]),
                                        _to_heads(kv[:, ks, :, 1]), o_, l_, 0.0, False,
                                        attn_mask=_additive(allowed, x.dtype), scale=plan.scale)
        dq[:, qs] += dq_.transpose(1, 2)
        dkv[:, ks] += torch.stack([dk_.transpose(1, 2), dv_.transpose(1, 2)], dim=3)
    # Each rank's keys got gradient from every rank's queries: sum them at their owner.
    mine = torch.empty_like(kv[:, :M])
    dist.reduce_scatter(mine, [t.contiguous() for t in dkv.chunk(plan.sp, dim=1)],
                        group=plan.ps.sp_group)
    dqkv = torch.cat([dq[:, :, :, None], mine], dim=3) * valid[None, :, None, None, None]
    _push(dqkv.reshape(b, M, g * 3 * d), xr, ix, wg, hs, plan, grads)


def dilated_attention(q, k, v, branches, *, causal: bool, order: str = "mod",
                      key_padding_mask=None, num_heads: int | None = None, head_start: int = 0,
                      ps: ParallelState | None = None) -> torch.Tensor:
    """Dilated attention of q, k, v [b, L, heads, d] -> [b, L, heads, d] (differentiable in all
    three). `branches`: [(w, r), ...]; `key_padding_mask` [b, L] bool, True = real token (padded
    queries give zeros); `num_heads`/`head_start`: the global head count and this shard's first
    head (TP); `ps`: a state with sp_size > 1 when q/k/v are this rank's slice of the sequence.

    The kernel's test entry point: it runs the layer's Function with x = [q | k | v] and an
    identity projection, which is exact in any precision."""
    b, L, heads, d = q.shape
    num_heads = num_heads or heads
    check_branches([w for w, _ in branches], [r for _, r in branches], num_heads, order,
                   where="dilated_attention")
    x = torch.stack([q, k, v], dim=3).reshape(b, L, heads * 3 * d)
    eye = torch.eye(heads * 3 * d, dtype=q.dtype)
    plan = _Plan(branches, num_heads, head_start, heads, d, order, causal, key_padding_mask, ps, L)
    return _DilatedAttention.apply(x, eye, None, plan)


# ---------------------------------------------------------------------------------------------
# The model

@dataclass
class LongNetConfig:
    vocab_size: int | None = None
    """True vocabulary size (the tokenizer's). Filled from the tokenizer when a config omits it."""
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this, whatever the TP size, so checkpoints reshard."""
    num_layers: int = 12
    """Number of transformer blocks."""
    hidden_size: int = 768
    """Model width h."""
    num_attention_heads: int = 12
    """Attention heads; must divide hidden_size, and TP must divide it."""
    ffn_hidden_size: int | None = None
    """MLP inner width; None means 4 * hidden_size."""
    max_position_embeddings: int = 8192
    """Rows of the learned position embedding: the longest sequence the model can read."""
    layernorm_epsilon: float = 1e-5
    """LayerNorm epsilon."""
    hidden_dropout: float = 0.1
    """Dropout on the embedding output and on each residual branch (attention has none: the
    flash kernel's backward must see the forward's probabilities)."""
    init_std: float = 0.02
    """Std of the normal init; output projections use init_std / sqrt(2 * num_layers) (GPT-2)."""
    segment_lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192, 16384, 32768])
    """Segment length w of each branch (the paper's language-model setting by default)."""
    dilation_rates: list[int] = field(default_factory=lambda: [1, 2, 4, 6, 12])
    """Dilation r of each branch, one per segment length (the paper's: 1, 2, 4, 6, 12)."""
    head_offset_order: str = "mod"
    """Which row offset head j keeps in a branch of dilation r: `mod` (j mod r, the paper's) or
    `block` (j // ceil(H / r), torchscale's, for its checkpoints)."""
    causal: bool = True
    """Decoder (causal attention, the LM); false makes the stack an encoder (bidirectional)."""

    def __post_init__(self):
        self.validate()

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size if self.ffn_hidden_size is not None else 4 * self.hidden_size

    padded_vocab_size = property(padded_vocab_size)

    @property
    def branches(self) -> list[tuple[int, int]]:
        return list(zip(self.segment_lengths, self.dilation_rates))

    def validate(self, tp_size: int | None = None) -> None:
        """Check field values (and divisibility by `tp_size` when given); errors name the field."""
        def need(ok, name, why):
            if not ok:
                raise ValueError(f"LongNetConfig.{name}={getattr(self, name)!r}: {why}")

        if self.vocab_size is not None:
            need(self.vocab_size >= 1, "vocab_size", "must be a positive integer")
        need(self.make_vocab_size_divisible_by >= 1, "make_vocab_size_divisible_by", "must be >= 1")
        need(self.num_layers >= 1, "num_layers", "must be >= 1")
        need(self.num_attention_heads >= 1, "num_attention_heads", "must be >= 1")
        need(self.hidden_size >= 1 and self.hidden_size % self.num_attention_heads == 0,
             "hidden_size", f"must be a positive multiple of num_attention_heads="
                            f"{self.num_attention_heads}")
        if self.ffn_hidden_size is not None:
            need(self.ffn_hidden_size >= 1, "ffn_hidden_size", "must be >= 1 (or null for 4h)")
        need(self.max_position_embeddings >= 1, "max_position_embeddings", "must be >= 1")
        need(self.layernorm_epsilon > 0, "layernorm_epsilon", "must be > 0")
        need(0 <= self.hidden_dropout < 1, "hidden_dropout", "must be in [0, 1)")
        need(self.init_std > 0, "init_std", "must be > 0")
        check_branches(self.segment_lengths, self.dilation_rates, self.num_attention_heads,
                       self.head_offset_order)
        if tp_size is not None:
            check_tp_divisible(self, tp_size, self.ffn_size)


class DilatedSelfAttention(nn.Module):
    """Dilated self-attention with heads sharded over TP: fused head-major qkv (column-parallel,
    rows [heads, 3, head_dim]) and a row-parallel output projection, as GPT's attention."""

    def __init__(self, cfg: LongNetConfig, ps: ParallelState, *, out_init_std: float):
        super().__init__()
        self.cfg, self.ps = cfg, ps
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.local_heads = cfg.num_attention_heads // ps.tp_size
        self.qkv = ColumnParallelLinear(cfg.hidden_size, 3 * cfg.hidden_size, ps,
                                        init_std=cfg.init_std)
        self.out = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, ps, init_std=out_init_std)

    def forward(self, x: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        """x [b, L, h] (this SP rank's slice) -> [b, L, h]; key_keep [b, L] bool, True = real."""
        cfg, b, L = self.cfg, x.shape[0], x.shape[1]
        plan = _Plan(cfg.branches, cfg.num_attention_heads, self.ps.tp_rank * self.local_heads,
                     self.local_heads, self.head_dim, cfg.head_offset_order, cfg.causal,
                     key_keep, self.ps if self.ps.sp_size > 1 else None, L)
        # The Function reads the weight itself, so x enters the TP region here (backward: the
        # all-reduce ColumnParallelLinear would have done).
        ctx = _DilatedAttention.apply(copy_to_tp(x, self.ps), self.qkv.weight, self.qkv.bias, plan)
        return self.out(ctx.reshape(b, L, self.local_heads * self.head_dim))


class LongNetLayer(nn.Module):
    def __init__(self, cfg: LongNetConfig, layer_idx: int, ps: ParallelState, rng: RNGContext):
        super().__init__()
        self.layer_idx, self.rng, self.p = layer_idx, rng, cfg.hidden_dropout
        # Each SP rank holds other tokens: its dropout sites carry its rank, so its masks differ.
        self.site = (f"sp{ps.sp_rank}." if ps.sp_size > 1 else "") + f"layers.{layer_idx}."
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.ln_attn = layer_norm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.attn = DilatedSelfAttention(cfg, ps, out_init_std=out_std)
        self.ln_mlp = layer_norm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.mlp = ParallelMLP(cfg.hidden_size, cfg.ffn_size, ps, init_std=cfg.init_std,
                               out_init_std=out_std)

    def _drop(self, x, site):
        return self.rng.dropout(x, self.p, self.site + site, tp_region=False,
                                training=self.training)

    def forward(self, x, key_keep=None):
        x = x + self._drop(self.attn(self.ln_attn(x), key_keep), "attn_out")
        return x + self._drop(self.mlp(self.ln_mlp(x)), "mlp_out")


class LongNetModel(nn.Module):
    """The LongNet stack on one (TP, SP) rank. `forward` takes the whole sequence (every SP rank
    of a replica holds the same batch) and returns this rank's part: the vocab shard of the logits
    of its slice of the positions (`sequence_slice`).

    Parameter names: word_embeddings.weight, position_embeddings.weight,
    layers.{i}.{ln_attn, attn.qkv, attn.out, ln_mlp, mlp.fc1, mlp.fc2}.*, final_ln.* (GPT's).
    """

    def __init__(self, cfg: LongNetConfig, ps: ParallelState | None = None,
                 rng: RNGContext | None = None):
        super().__init__()
        ps = ps if ps is not None else ParallelState.single()
        cfg.validate(ps.tp_size)
        self.cfg, self.ps = cfg, ps
        self.rng = rng if rng is not None else RNGContext(0, ps.dp_rank, ps.tp_rank)
        self.checkpoint_activations = False
        self.word_embeddings = VocabParallelEmbedding(cfg.padded_vocab_size, cfg.hidden_size, ps,
                                                      init_std=cfg.init_std)
        self.position_embeddings = position_embedding(cfg.max_position_embeddings,
                                                      cfg.hidden_size, cfg.init_std)
        self.layers = nn.ModuleList(LongNetLayer(cfg, i, ps, self.rng)
                                    for i in range(cfg.num_layers))
        self.final_ln = layer_norm(cfg.hidden_size, cfg.layernorm_epsilon)

    def sequence_slice(self, seq_len: int) -> slice:
        """This SP rank's positions of a `seq_len` sequence (an error when SP does not divide it)."""
        sp = self.ps.sp_size
        if seq_len % sp:
            raise ValueError(f"sequence length {seq_len} is not divisible by "
                             f"--sequence-parallel-size {sp}: each rank holds an equal slice; set "
                             f"--seq-length to a multiple of {sp} (no padding is applied)")
        n = seq_len // sp
        return slice(self.ps.sp_rank * n, (self.ps.sp_rank + 1) * n)

    def hidden(self, input_ids, position_ids=None, key_padding_mask=None):
        """Final hidden states [b, L, h] of this rank's slice (the encoder's output)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        part = self.sequence_slice(s)
        if position_ids is None:
            if s > self.cfg.max_position_embeddings:
                raise ValueError(f"sequence of {s} positions exceeds max_position_embeddings="
                                 f"{self.cfg.max_position_embeddings}")
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        keep = None
        if key_padding_mask is not None:
            if key_padding_mask.shape != (b, s) or key_padding_mask.dtype != torch.bool:
                raise ValueError("key_padding_mask must be a bool tensor [batch, seq] (True = a "
                                 f"real token), got {key_padding_mask.dtype} "
                                 f"{tuple(key_padding_mask.shape)}")
            keep = key_padding_mask[:, part]
        ids, pos = input_ids[:, part], position_ids[:, part]
        x = self.word_embeddings(ids) + self.position_embeddings(pos)
        sp = f"sp{self.ps.sp_rank}." if self.ps.sp_size > 1 else ""  # as LongNetLayer.site
        x = self.rng.dropout(x, self.cfg.hidden_dropout, sp + "embedding", tp_region=False,
                             training=self.training)
        for layer in self.layers:
            if self.checkpoint_activations and self.training:
                x = checkpoint(layer, x, keep, use_reentrant=False)
            else:
                x = layer(x, keep)
        return self.final_ln(x)

    def forward(self, input_ids, position_ids=None, key_padding_mask=None, attention_mask=None,
                labels=None, loss_mask=None):
        """Logits shard [b, L, padded_vocab / tp] of this SP rank's slice of `input_ids` [b, s].
        `labels`/`loss_mask` are accepted so `model(**batch)` works; `attention_mask` (documents
        kept apart in a packed sequence) is not supported by dilated attention."""
        if attention_mask is not None:
            raise ValueError("LongNet does not isolate documents inside a packed sequence: set "
                             "data.reset_attention_mask to false")
        h = self.hidden(input_ids, position_ids, key_padding_mask)
        return parallel_lm_logits(h, self.word_embeddings.weight, self.ps)

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's part of the mean cross entropy over `loss_mask`, the whole sequence's
        number of loss tokens): the SP ranks' parts sum to the replica's mean (registry,
        `splits_sequence`)."""
        missing = [k for k in ("input_ids", "labels", "loss_mask") if k not in batch]
        if missing:
            raise KeyError(f"LongNet batch is missing {missing}; a causal-LM batch has input_ids, "
                           "labels, loss_mask and position_ids")
        if not self.cfg.causal:
            raise ValueError("LongNetConfig.causal=false is an encoder: it cannot be trained as a "
                             "causal LM; set model.causal to true")
        logits = self(batch["input_ids"], position_ids=batch.get("position_ids"),
                      attention_mask=batch.get("attention_mask"))
        part = self.sequence_slice(batch["input_ids"].shape[1])
        per_token = vocab_parallel_cross_entropy(logits, batch["labels"][:, part], self.ps,
                                                 vocab_size=self.cfg.vocab_size)
        mask = batch["loss_mask"].to(per_token.dtype)
        n_tokens = mask.sum()
        return (per_token * mask[:, part]).sum() / n_tokens.clamp(min=1), n_tokens


# ---------------------------------------------------------------------------------------------
# FLOPs, data, registration

def attended_keys_per_query(cfg: LongNetConfig, seq_len: int) -> float:
    """Keys a query attends per head, averaged over positions and summed over branches: a
    branch of (w, r) runs 1/r of the queries against segments of m = min(w, n) / r rows (causal:
    (m + 1) / 2 keys on average)."""
    total = 0.0
    for w, r in cfg.branches:
        m = min(w, seq_len) / r
        total += ((m + 1) / 2 if cfg.causal else m) / r
    return total


def flops_per_sample(cfg: LongNetConfig, data_cfg) -> float:
    """6·N + 12·L·H·Q·K per token (PaLM's count, gpt.flops_per_token), with K the keys dilated
    attention computes (`attended_keys_per_query`) instead of the full length; the q/k/v
    recomputation in the backward is not counted (it is not model FLOPs)."""
    h, L, f, n = cfg.hidden_size, cfg.num_layers, cfg.ffn_size, data_cfg.seq_length
    per_layer = 4 * h + 3 * h * h + 3 * h + h * h + h + h * f + f + f * h + h
    n_params = L * per_layer + 2 * h + cfg.padded_vocab_size * h
    per_token = 6.0 * n_params + 12.0 * L * h * attended_keys_per_query(cfg, n)
    return per_token * n


def build_longnet(cfg: LongNetConfig, ps: ParallelState, rng: RNGContext) -> LongNetModel:
    return LongNetModel(cfg, ps, rng)


def longnet_datasets(run, tokenizer, model_cfg: LongNetConfig, ps: ParallelState) -> Datasets:
    """Causal-LM datasets (GPT's objective); every SP rank reads the same samples and the model
    takes its slice, so the length must split evenly."""
    data, seed = run.data, run.training.seed
    if tokenizer is None:
        raise ValueError("no tokenizer: set data.tokenizer in the config or pass --tokenizer DIR")
    if data.seq_length % ps.sp_size:
        raise ValueError(f"--seq-length {data.seq_length} is not divisible by "
                         f"--sequence-parallel-size {ps.sp_size}: each SP rank holds an equal "
                         f"slice (no padding is applied); use a multiple of {ps.sp_size}")
    if data.reset_attention_mask:
        raise ValueError("data.reset_attention_mask: LongNet's dilated attention does not keep "
                         "packed documents apart; set it to false")
    if data.finetune_data:
        raise ValueError("data.finetune_data: prompt/text fine-tuning is not wired for LongNet; "
                         "train on an indexed dataset (--train-data-prefix)")
    if not data.train_data_prefix:
        raise ValueError("no training data: set data.train_data_prefix in the config or pass "
                         "--train-data-prefix PREFIX (made by tools/preprocess_data.py)")

    def causal(prefix):
        indexed = IndexedDataset(prefix)
        check_tokenizer_hash(indexed.tokenizer_hash, tokenizer, prefix)
        return CausalLMDataset(indexed, data.seq_length, tokenizer.eod_id, seed,
                               reset_position_ids=data.reset_position_ids,
                               reset_attention_mask=False, eod_mask_loss=data.eod_mask_loss)

    valid = causal(data.valid_data_prefix) if data.valid_data_prefix else None
    return Datasets(train=causal(data.train_data_prefix), valid=valid)


register(ModelSpec(
    name="longnet", config_cls=LongNetConfig, build=build_longnet, build_data=longnet_datasets,
    objective="causal_lm", batch_keys=("input_ids", "labels", "loss_mask"),
    flops_per_sample=flops_per_sample, generation="none", splits_sequence=True))
