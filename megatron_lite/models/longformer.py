"""Longformer (Longformer_ZH): a BERT whose every self-attention is a sliding window plus global
tokens, pretrained with masked LM over jieba whole-word masking.

    ids, token types, positions (0-based: BERT's table, no padding offset) -> embeddings -> LN
      -> num_layers x [x = LN(x + drop(attn(x))); x = LN(x + drop(mlp(x)))]       (post-LN, eps 1e-12)
      -> MLM head: dense -> exact GELU -> LN -> logits through the tied word embedding + a bias

Longformer_ZH's shape (configs/longformer/longformer-zh-base.yaml): 12 layers, hidden 768, 12
heads, FFN 3072, vocabulary 21128, 2 token types, 4096 positions, a 512-token window in every
layer. Attention (the section below): a query sees the keys within window/2 of it and the global
tokens; a global token sees every key, through its own query/key/value projections. Banded:
O(n·w) time and memory, no n x n tensor.

Tensor parallelism: heads (q/k/v, the global q/k/v, the output projection) and the MLP width are
sharded; the word embedding, the tied decoder and its bias are vocab-parallel. Anchors beaten
(tests/models/test_longformer*.py, tests/data/test_objective_wwm_mlm.py): [CLS] is global by
default (Longformer_ZH's collator passed no mask, so no token ever was); every block draws its own
masks (its generator was re-created per block); positions start at 0 (transformers derives them
from padding_idx + 1, shifting the table by one and overflowing it at 4096).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatron_lite.data.config import DataConfig
from megatron_lite.data.contract import IGNORE_INDEX, Datasets
from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.objectives.classification import (ClassificationDataset, label_names,
                                                          read_examples, split_lines)
from megatron_lite.data.objectives.wwm_mlm import WholeWordMaskDataset
from megatron_lite.models.blocks import (ParallelMLP, check_tp_divisible, fuse_heads, layer_norm,
                                         padded_vocab_size, position_embedding, resize_rows,
                                         split_heads)
from megatron_lite.models.registry import ConversionError, HFConverter, ModelSpec, register
from megatron_lite.parallel import (ColumnParallelLinear, ParallelState, RNGContext,
                                    RowParallelLinear, VocabParallelEmbedding, copy_to_tp,
                                    mark_replicated, parallel_lm_logits, set_init,
                                    set_partition_tags, vocab_parallel_cross_entropy)

# ---- Attention: banded sliding window + global tokens
#
# Semantics (transformers' LongformerSelfAttention), per head, one-sided radius r = window / 2:
#   * a non-global query i attends the real keys j with |i - j| <= r or j global, through the
#     local projections (q_i . k_j / sqrt(d), values v_j); a global key inside the band counts once;
#   * a global query attends every real key through the global projections (query_global,
#     key_global, value_global);
#   * padded query rows (key_keep false) give zeros; dropout acts on the probabilities of both parts.
#
# Design. Queries are cut into blocks of B = r; block c attends the B + 2r keys around it plus the
# G global keys, one softmax. Each piece of blocks goes through torch's CPU flash-attention kernel
# (`_scaled_dot_product_flash_attention_for_cpu` and its backward, which keep no probabilities)
# with an additive mask [B, B + 2r + G], inside one autograd.Function that also projects qkv
# from x chunk by chunk and, in the backward, recomputes it and pushes each finished row's
# gradient straight through W (dx, dW): only x, the output and the log-sum-exp are saved, so
# neither qkv (3 n h) nor its gradient nor anything n x window ever exists whole.
#
# Global rows use x directly: score_ij = (W_k^T q_i) . x_j + q_i . b_k, and the second term is the
# same for every key of row i, so it cancels in the softmax; the output is W_v (sum_j p_ij x_j) + b_v
# because the probabilities sum to one. That is G x n x h work per head instead of the 2 n h^2 of
# projecting key_global and value_global for every token (exact; b_k gets a zero gradient, as it
# mathematically has). Their backward is written out too, accumulating into dx in place.
#
# Measured on the 2-core EPYC, fp32, h 768, 12 heads, window 512, 1 global token, forward +
# backward with all the projections (benchmarks/longformer_attention.py, BENCHMARKS.md):
#   * 4K tokens 0.76 s (transformers 2.3 s, dense flash SDPA 1.5 s); 16K 4.0x that, 3.0 s
#     (transformers 10 s, SDPA 21 s); peak RSS 0.78-0.89x dense SDPA's;
#   * saving qkv instead of recomputing it was 9% faster but its 3 n h floats put the peak above
#     SDPA's;
#   * chunks of 256 rows cost 3-5% more time; 1024 save 3% at 16K but add 50 MB; kernel calls of
#     512 queries instead of 256 cost the same time and 10 MB more;
#   * blocks of r/2 (fewer masked keys) take 1.2x the time: the kernel runs small query blocks
#     less well; explicit matmuls take 1.6x.
# Where the flash kernel cannot run (dropout > 0, other devices or dtypes) the same pieces go
# through explicit matmuls with a hand-written backward that draws the same dropout masks again
# from a seed: with attention dropout 0.1 the layer takes 0.93 s at 4K (transformers 2.6 s).

_NEG_INF = float("-inf")
# Rows projected at a time: the qkv window (and its gradient's) holds them plus 2r, so this trades
# GEMM size against memory; chunk-sized buffers are much of a 4K sequence's peak.
_CHUNK_QUERIES = 512
# Queries per flash-kernel call within a chunk: its keys, values and their gradients
# ([C, heads, B + 2r + G, d] each) are the rest of the transient memory.
_PIECE_QUERIES = 256


def _check_window(window) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 2 or window % 2:
        raise ValueError(f"attention window {window!r} must be an even integer >= 2 (two-sided, "
                         "Longformer's attention_window): use e.g. 512 (256 tokens each side)")
    return window


class _Plan:
    """Masks and indices of one batch, shared by the forward and backward of the band kernel.

    n is already a multiple of the block size. Built once per layer call from key_keep / is_global.
    """

    def __init__(self, key_keep: torch.Tensor, is_global: torch.Tensor, radius: int, block: int):
        b, n = key_keep.shape
        device = key_keep.device
        self.b, self.n, self.r, self.block = b, n, radius, block
        self.nblocks = n // block
        self.chunk = max(1, _CHUNK_QUERIES // block)
        self.piece = max(1, _PIECE_QUERIES // block)
        is_global = is_global & key_keep
        self.key_keep = key_keep
        # Keys of the band: real and not global (global keys come once, as extra columns).
        self.band_ok = F.pad(key_keep & ~is_global, (radius, radius))  # [b, n + 2r]
        # Band output rows that are not used: padding (zeros) and global queries (replaced).
        self.drop_rows = ~key_keep | is_global
        counts = is_global.sum(1)
        self.num_global = int(counts.max()) if n else 0
        self.global_b, self.global_pos = is_global.nonzero(as_tuple=True)
        slot = (is_global.long().cumsum(1) - 1)[self.global_b, self.global_pos]
        self.global_idx = torch.zeros(b, self.num_global, dtype=torch.long, device=device)
        self.global_idx[self.global_b, slot] = self.global_pos
        self.global_ok = torch.arange(self.num_global, device=device) < counts[:, None]
        t = torch.arange(block, device=device)[:, None]
        s = torch.arange(block + 2 * radius, device=device)[None]
        self.band = (s >= t) & (s <= t + 2 * radius)  # [B, B + 2r]: |query - key| <= r
        self.self_column = s == t + radius  # query t's own key

    def chunks(self):
        for c0 in range(0, self.nblocks, self.chunk):
            yield c0, min(self.nblocks, c0 + self.chunk)

    def pieces(self, c0: int, c1: int):
        for s0 in range(c0, c1, self.piece):
            yield s0, min(c1, s0 + self.piece)

    def mask(self, row: int, c0: int, c1: int, dtype) -> torch.Tensor:
        """Additive mask [C, 1, B, B + 2r + G] of blocks c0..c1 of `row`."""
        B, r = self.block, self.r
        ok = self.band_ok[row, c0 * B:c1 * B + 2 * r].unfold(0, B + 2 * r, B)  # [C, B + 2r]
        allowed = self.band & ok[:, None, :]
        if self.num_global:
            g = self.global_ok[row].expand(c1 - c0, B, self.num_global)
            allowed = torch.cat([allowed, g], dim=-1)
        # A row with no key at all (padding far from any real token, no global) would be NaN in a
        # softmax; let it see itself. Its output is zeroed and its gradient is zero anyway.
        empty = ~allowed.any(-1)
        if bool(empty.any()):
            allowed[..., :B + 2 * r] |= empty[..., None] & self.self_column
        m = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return m.masked_fill_(~allowed, _NEG_INF).unsqueeze(1)


# Where a sequence's fused q/k/v rows ([rows, heads * 3 * d], head-major) come from, and where
# their gradients go. The layer projects them from x chunk by chunk (_Projected), so neither qkv
# nor its gradient ever exists for the whole sequence; the kernel API takes them ready (_Packed).
class _Projected:
    def __init__(self, x, weight, bias):
        self.x, self.weight, self.bias = x, weight, bias

    def rows(self, row: int, lo: int, hi: int, out: torch.Tensor) -> None:
        if self.bias is None:
            torch.mm(self.x[row, lo:hi], self.weight.t(), out=out)
        else:
            torch.addmm(self.bias, self.x[row, lo:hi], self.weight.t(), out=out)

    def rows_at(self, row: int, idx: torch.Tensor) -> torch.Tensor:
        return F.linear(self.x[row, idx], self.weight, self.bias)

    def start_backward(self, needs) -> None:
        self.needs = needs
        self.dx = torch.empty_like(self.x) if needs[0] else None
        self.dw = torch.zeros_like(self.weight) if needs[1] else None
        self.db = torch.zeros_like(self.bias) if self.bias is not None and needs[2] else None

    def flush(self, row: int, lo: int, hi: int, g: torch.Tensor) -> None:
        """Rows lo..hi of `row` have their whole gradient g [hi - lo, F]: push it through W."""
        if self.dx is not None:
            torch.mm(g, self.weight, out=self.dx[row, lo:hi])
        self._params(g, self.x[row, lo:hi])

    def flush_at(self, row: int, idx: torch.Tensor, g: torch.Tensor) -> None:
        if self.dx is not None:
            self.dx[row].index_add_(0, idx, g @ self.weight)
        self._params(g, self.x[row, idx])

    def _params(self, g, x):
        if self.dw is not None:
            self.dw.addmm_(g.t(), x)
        if self.db is not None:
            self.db += g.sum(0)

    def grads(self):
        return self.dx, self.dw, self.db


class _Packed:
    def __init__(self, qkv, weight=None, bias=None):
        self.qkv = qkv  # [b, n, F]

    def rows(self, row: int, lo: int, hi: int, out: torch.Tensor) -> None:
        out.copy_(self.qkv[row, lo:hi])

    def rows_at(self, row: int, idx: torch.Tensor) -> torch.Tensor:
        return self.qkv[row, idx]

    def start_backward(self, needs) -> None:
        self.dqkv = torch.empty_like(self.qkv)
        self.dx = None

    def flush(self, row: int, lo: int, hi: int, g: torch.Tensor) -> None:
        self.dqkv[row, lo:hi] = g

    def flush_at(self, row: int, idx: torch.Tensor, g: torch.Tensor) -> None:
        self.dqkv[row].index_add_(0, idx, g)

    def grads(self):
        return self.dqkv, None, None


class _Window:
    """A rolling buffer holding rows [lo, hi) of one sequence (zero outside [0, n)).

    Consecutive chunks' windows overlap by 2r rows, which move to the front instead of being
    computed again."""

    def __init__(self, plan: _Plan, width: int, like: torch.Tensor):
        self.plan = plan
        self.buf = like.new_empty(plan.chunk * plan.block + 2 * plan.r, width)
        self.lo = self.hi = None

    def advance(self, lo: int, hi: int, fill) -> torch.Tensor:
        """Make the buffer hold rows [lo, hi); `fill(a, z, out)` writes real rows a..z, or None
        to zero the new rows (a gradient accumulator)."""
        start = lo
        if self.lo is not None and lo < self.hi:
            keep, off = self.hi - lo, lo - self.lo
            tail = self.buf[off:off + keep]
            self.buf[:keep] = tail.clone() if off < keep else tail
            start = self.hi
        self.lo, self.hi = lo, hi
        n = self.plan.n
        a, z = max(start, 0), min(hi, n)
        if fill is None or z <= a:
            self.buf[start - lo:hi - lo].zero_()
        else:
            self.buf[start - lo:a - lo].zero_()
            fill(a, z, self.buf[a - lo:z - lo])
            self.buf[z - lo:hi - lo].zero_()
        return self.buf[:hi - lo]


def _band_keys(win: torch.Tensor, glob, plan: _Plan, C: int) -> torch.Tensor:
    """[C, heads, B + 2r + G, d], contiguous: each block's band keys (or values), then the global ones.

    `win` is the window's keys [C·B + 2r, heads, d] (any strides), `glob` [G, heads, d] or None."""
    B, r = plan.block, plan.r
    heads, d = win.shape[1], win.shape[2]
    out = win.new_empty(C, heads, B + 2 * r + plan.num_global, d)
    s0, s1, s2 = win.stride()
    band = win.as_strided((C, heads, B + 2 * r, d), (B * s0, s1, s0, s2), win.storage_offset())
    out[:, :, :B + 2 * r] = band
    if plan.num_global:
        out[:, :, B + 2 * r:] = glob.transpose(0, 1)
    return out


def _fold_band_grad(grad: torch.Tensor, win: torch.Tensor, glob: torch.Tensor | None, plan: _Plan) -> None:
    """Adds the gradient of `_band_keys`'s output ([C, heads, S, d]) into the window `win`
    [C·B + 2r, heads, d] and the global rows `glob` [G, heads, d]."""
    B, r = plan.block, plan.r
    C = grad.shape[0]
    g = grad.transpose(1, 2)  # [C, S, heads, d]
    parts = (B + 2 * r) // B
    band = g[:, :B + 2 * r].unflatten(1, (parts, B))  # [C, parts, B, heads, d]
    acc = win.unflatten(0, (C + parts - 1, B))
    for p in range(parts):  # block c's part p lands on window block c + p
        acc[p:p + C] += band[:, p]
    if glob is not None:
        glob += g[:, B + 2 * r:].sum(0)


def _use_flash(q: torch.Tensor, dropout_p: float) -> bool:
    return (dropout_p == 0 and q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64)
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"))


def _sub_seed(seed: int, row: int, part: int) -> int:
    """The dropout seed of one piece of `row` (part = its first block) or of its global rows (-1)."""
    return (seed * 1_000_003 + row * 2_147_483_659 + part + 1) % (2**63 - 1)


def _drop_rate(p: float) -> float:
    return round(p * 65536) / 65536


# Dropout keeps a probability when a 16-bit random lane is at or above a threshold, so the drop
# rate is p rounded to a multiple of 2^-16. One 64-bit draw gives four lanes: 5x cheaper per
# decision than torch.rand, whose draws were most of the math path's cost (the backward draws
# the same masks again).
def _dropout_keep(shape, p: float, seed: int, device) -> torch.Tensor:
    """bool [shape], True = keep, each dropped with probability _drop_rate(p); a function of seed."""
    numel = math.prod(shape)
    g = torch.Generator(device=device).manual_seed(seed)
    words = torch.empty(-(-numel // 4), dtype=torch.int64, device=device)
    words.random_(-2**63, 2**63 - 1, generator=g)  # all 64 bits (random_() leaves the top one 0)
    return (words.view(torch.int16)[:numel] >= round(p * 65536) - 32768).view(shape)


def _global_forward(x, pos, w, bias, key_ok, scale, keep, inv_keep):
    """Outputs [G, heads, d] of one sequence's global queries (at `pos`), straight from x [n, h].

    w [heads, 3, d, h] and bias [heads, 3, d] are the global projections'. Returns them and what
    the backward needs: q_g, W_k^T q_g, the probabilities, the dropped ones and p @ x."""
    heads, h = w.shape[0], w.shape[3]
    qg = torch.einsum("gk,hdk->ghd", x[pos], w[:, 0])
    qg = (qg if bias is None else qg + bias[:, 0]) * scale
    qt = torch.einsum("ghd,hdk->ghk", qg, w[:, 1]).reshape(-1, h)  # [G * heads, h]
    prob = torch.softmax((qt @ x.t()).masked_fill_(~key_ok, _NEG_INF), dim=-1)  # [G * heads, n]
    dropped = prob if keep is None else prob * keep * inv_keep
    z = dropped @ x
    out = torch.einsum("ghk,hdk->ghd", z.view(-1, heads, h), w[:, 2])
    return (out if bias is None else out + bias[:, 2]), (qg, qt, prob, dropped, z)


def _global_backward(grad, x, pos, w, saved, scale, keep, inv_keep, dx, dw, db):
    """Accumulates the gradients of `_global_forward` (grad [G, heads, d]) into dx [n, h],
    dw [heads, 3, d, h] and db [heads, 3, d] (each may be None), in place: no [n, h] temporary."""
    qg, qt, prob, dropped, z = saved
    heads, h = w.shape[0], w.shape[3]
    dz = torch.einsum("ghd,hdk->ghk", grad, w[:, 2]).reshape(-1, h)
    dprob = dz @ x.t()
    if keep is not None:
        dprob.mul_(keep).mul_(inv_keep)
    ds = torch._softmax_backward_data(dprob, prob, -1, prob.dtype)  # d scores [G * heads, n]
    dqt = (ds @ x).view(-1, heads, h)
    dqg = torch.einsum("ghk,hdk->ghd", dqt, w[:, 1]) * scale
    if dx is not None:
        dx.addmm_(dropped.t(), dz)
        dx.addmm_(ds.t(), qt)
        dx.index_add_(0, pos, torch.einsum("ghd,hdk->gk", dqg, w[:, 0]))
    if dw is not None:
        dw[:, 2] += torch.einsum("ghd,ghk->hdk", grad, z.view(-1, heads, h))
        dw[:, 1] += torch.einsum("ghd,ghk->hdk", qg, dqt)
        dw[:, 0] += torch.einsum("ghd,gk->hdk", dqg, x[pos])
    if db is not None:  # the key bias cancels in the softmax: its gradient is exactly zero
        db[:, 2] += grad.sum(0)
        db[:, 0] += dqg.sum(0)


class _BandAttention(torch.autograd.Function):
    """Band + global-key attention of every non-global query, chunk by chunk, recomputed backward.

    With `weight`, `a` is x [b, n_pad, h] and qkv = x W^T + bias is projected chunk by chunk
    (rows head-major [heads, 3, d]), and the global queries' rows come from x through `gweight`,
    `gbias` (the global projections, same layout). Without, `a` is qkv [b, n_pad, heads * 3 * d]
    itself and `global_rows` [N, heads, d] the N global queries' outputs. Either way those are
    written at their positions. Returns [b, n, heads, d], the first n rows (a view: padding
    costs no copy either way). Saved for backward: the inputs, the output and the log-sum-exp.
    """

    @staticmethod
    def forward(ctx, a, weight, bias, gweight, gbias, global_rows, plan: _Plan, n: int, heads: int,
                d: int, scale: float, dropout_p: float, seed: int, flash: bool):
        src = (_Projected if weight is not None else _Packed)(a, weight, bias)
        B, r, G = plan.block, plan.r, plan.num_global
        out = a.new_empty(plan.b, plan.n, heads, d)
        lse = None
        inv_keep = 1.0 / (1.0 - _drop_rate(dropout_p))
        window = _Window(plan, 3 * heads * d, a)
        for row in range(plan.b):
            glob = src.rows_at(row, plan.global_idx[row]).view(G, heads, 3, d) if G else None
            window.lo = None
            for c0, c1 in plan.chunks():
                win = window.advance(c0 * B - r, c1 * B + r,
                                     lambda lo, hi, o: src.rows(row, lo, hi, o)).view(-1, heads, 3, d)
                for s0, s1 in plan.pieces(c0, c1):
                    C, off = s1 - s0, (s0 - c0) * B
                    q, keys, values = _piece_inputs(win[off:off + C * B + 2 * r], glob, plan, C)
                    mask = plan.mask(row, s0, s1, a.dtype)
                    if flash:
                        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                            q, keys, values, attn_mask=mask, scale=scale)
                    else:
                        keep = (_dropout_keep((C, heads, B, keys.shape[2]), dropout_p,
                                              _sub_seed(seed, row, s0), a.device)
                                if dropout_p > 0 else None)
                        o, l = _math_forward(q, keys, values, mask, scale, keep, inv_keep), None
                    if l is not None:  # the flash backward needs it; the math one recomputes
                        if lse is None:
                            lse = l.new_empty(plan.b, plan.nblocks, heads, B)
                        lse[row, s0:s1] = l
                    out[row, s0 * B:s1 * B].view(C, B, heads, d).copy_(o.transpose(1, 2))
        out.masked_fill_(plan.drop_rows[:, :, None, None], 0)
        if gweight is not None and G:
            global_rows = torch.cat([
                _global_forward(a[row], pos, *_global_params(gweight, gbias, heads, d), plan.key_keep[row],
                                scale, *_global_keep(pos, heads, a, plan, row, dropout_p, seed))[0]
                for row, pos in _global_positions(plan)])
        if global_rows is not None:
            out[plan.global_b, plan.global_pos] = global_rows.to(out.dtype)
        ctx.save_for_backward(a, weight, bias, gweight, gbias, out, lse)
        ctx.plan, ctx.heads, ctx.d, ctx.scale = plan, heads, d, scale
        ctx.dropout_p, ctx.seed, ctx.flash = dropout_p, seed, flash
        ctx.has_global_rows = global_rows is not None and gweight is None
        return out if n == plan.n else out[:, :n]

    @staticmethod
    def backward(ctx, grad):
        a, weight, bias, gweight, gbias, out, lse = ctx.saved_tensors
        plan, heads, d, scale = ctx.plan, ctx.heads, ctx.d, ctx.scale
        B, r, G = plan.block, plan.r, plan.num_global
        src = (_Projected if weight is not None else _Packed)(a, weight, bias)
        src.start_backward(ctx.needs_input_grad[:3])
        keep_rows = (~plan.drop_rows)[:, :, None, None].to(grad.dtype)
        window = _Window(plan, 3 * heads * d, a)
        gwindow = _Window(plan, 3 * heads * d, a)  # the gradient of the same rows
        win = gwin = None
        for row in range(plan.b):
            gidx, gok = plan.global_idx[row], plan.global_ok[row]
            glob = src.rows_at(row, gidx).view(G, heads, 3, d) if G else None
            gglob = a.new_zeros(G, heads, 3, d) if G else None
            window.lo = gwindow.lo = None
            for c0, c1 in plan.chunks():
                lo, hi = c0 * B - r, c1 * B + r
                win = window.advance(lo, hi, lambda a_, z, o: src.rows(row, a_, z, o)).view(-1, heads, 3, d)
                gwin = gwindow.advance(lo, hi, None).view(-1, heads, 3, d)
                for s0, s1 in plan.pieces(c0, c1):
                    _piece_backward(ctx, grad, keep_rows, win, gwin, glob, gglob, lse, out, row, s0, s1, c0)
                # Rows before hi - 2r get nothing from later chunks: their gradient is complete.
                done = hi if c1 == plan.nblocks else hi - 2 * r
                f0, f1 = max(lo, 0), min(done, plan.n)
                if f1 > f0:
                    src.flush(row, f0, f1, gwindow.buf[f0 - lo:f1 - lo])
            if G and bool(gok.any()):
                src.flush_at(row, gidx[gok], gglob[gok].view(-1, 3 * heads * d))
        del window, gwindow, win, gwin  # before the global rows' buffers
        dgw = dgb = None
        if gweight is not None and G:  # after the band: its buffers are free again
            needs = ctx.needs_input_grad
            dgw = torch.zeros_like(gweight) if needs[3] else None
            dgb = torch.zeros_like(gbias) if gbias is not None and needs[4] else None
            w, b_ = _global_params(gweight, gbias, heads, d)
            for row, pos in _global_positions(plan):
                keep, inv_keep = _global_keep(pos, heads, a, plan, row, ctx.dropout_p, ctx.seed)
                _, saved = _global_forward(a[row], pos, w, b_, plan.key_keep[row], scale, keep, inv_keep)
                _global_backward(grad[row, pos], a[row], pos, w, saved, scale, keep, inv_keep,
                                 None if src.dx is None else src.dx[row],
                                 None if dgw is None else dgw.view(w.shape),
                                 None if dgb is None else dgb.view(heads, 3, d))
        grad_global = grad[plan.global_b, plan.global_pos] if ctx.has_global_rows else None
        return (*src.grads(), dgw, dgb, grad_global) + (None,) * 8


def _piece_inputs(win, glob, plan: _Plan, C: int):
    """q [C, heads, B, d] and the keys and values of blocks s0..s0+C, from their window of qkv
    rows [C·B + 2r, heads, 3, d] and the global rows' qkv glob [G, heads, 3, d] (or None)."""
    B, r = plan.block, plan.r
    heads, d = win.shape[1], win.shape[3]
    q = win[r:r + C * B, :, 0].view(C, B, heads, d).transpose(1, 2)
    keys = _band_keys(win[:, :, 1], None if glob is None else glob[:, :, 1], plan, C)
    values = _band_keys(win[:, :, 2], None if glob is None else glob[:, :, 2], plan, C)
    return q, keys, values


def _piece_backward(ctx, grad, keep_rows, win, gwin, glob, gglob, lse, out, row, s0, s1, c0):
    """Gradients of blocks s0..s1 of `row` into the chunk's gradient window (and gglob)."""
    plan, heads, d, scale = ctx.plan, ctx.heads, ctx.d, ctx.scale
    B, r, n = plan.block, plan.r, grad.shape[1]
    C, off = s1 - s0, (s0 - c0) * B
    q, keys, values = _piece_inputs(win[off:off + C * B + 2 * r], glob, plan, C)
    mask = plan.mask(row, s0, s1, win.dtype)
    # Unused rows (padding, global queries) get no gradient: their output is replaced.
    g = grad[row, s0 * B:s1 * B] * keep_rows[row, s0 * B:min(s1 * B, n)]
    if g.shape[0] < C * B:  # the padded tail of the last chunk
        g = F.pad(g, (0, 0, 0, 0, 0, C * B - g.shape[0]))
    g = g.view(C, B, heads, d).transpose(1, 2)
    o = out[row, s0 * B:s1 * B].view(C, B, heads, d).transpose(1, 2)
    if ctx.flash:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            g, q, keys, values, o, lse[row, s0:s1], 0.0, False, attn_mask=mask, scale=scale)
    else:
        keep = (_dropout_keep((C, heads, B, keys.shape[2]), ctx.dropout_p, _sub_seed(ctx.seed, row, s0),
                              win.device)
                if ctx.dropout_p > 0 else None)
        dq, dk, dv = _math_backward(g, q, keys, values, mask, scale, keep,
                                    1.0 / (1.0 - _drop_rate(ctx.dropout_p)))
    gw = gwin[off:off + C * B + 2 * r]
    gw[r:r + C * B, :, 0].view(C, B, heads, d).copy_(dq.transpose(1, 2))
    _fold_band_grad(dk, gw[:, :, 1], None if gglob is None else gglob[:, :, 1], plan)
    _fold_band_grad(dv, gw[:, :, 2], None if gglob is None else gglob[:, :, 2], plan)


def _global_params(gweight, gbias, heads: int, d: int):
    return gweight.view(heads, 3, d, -1), None if gbias is None else gbias.view(heads, 3, d)


def _global_positions(plan: _Plan):
    """(row, positions of its global tokens) for every row that has some, in the batch's order."""
    for row in range(plan.b):
        pos = plan.global_pos[plan.global_b == row]
        if len(pos):
            yield row, pos


def _global_keep(pos, heads: int, a, plan: _Plan, row: int, dropout_p: float, seed: int):
    if dropout_p == 0:
        return None, 1.0
    keep = _dropout_keep((len(pos) * heads, plan.n), dropout_p, _sub_seed(seed, row, -1), a.device)
    return keep, 1.0 / (1.0 - _drop_rate(dropout_p))


def _math_forward(q, k, v, mask, scale, keep, inv_keep):
    """The flash kernel's output by explicit matmuls, with dropout on the probabilities."""
    p = torch.softmax(torch.matmul(q * scale, k.transpose(-1, -2)).add_(mask), dim=-1)
    if keep is None:
        return torch.matmul(p, v)
    return torch.matmul(p.mul_(keep), v).mul_(inv_keep)


def _math_backward(g, q, k, v, mask, scale, keep, inv_keep):
    """dq, dk, dv of `_math_forward` (same keep mask); the probabilities are recomputed."""
    p = torch.softmax(torch.matmul(q * scale, k.transpose(-1, -2)).add_(mask), dim=-1)
    dp = torch.matmul(g, v.transpose(-1, -2))
    if keep is None:
        dv, factor = torch.matmul(p.transpose(-1, -2), g), scale
    else:
        dv = torch.matmul((p * keep).transpose(-1, -2), g).mul_(inv_keep)
        dp.mul_(keep)
        factor = scale * inv_keep
    ds = torch._softmax_backward_data(dp, p, -1, p.dtype)  # p * (dp - sum(p * dp))
    return torch.matmul(ds, k).mul_(factor), torch.matmul(ds.transpose(-1, -2), q).mul_(factor), dv


def _prepare(key_keep: torch.Tensor, is_global: torch.Tensor, n: int, window: int):
    """(radius, block, padded length) for a sequence of n tokens."""
    _check_window(window)
    if key_keep.dtype != torch.bool or is_global.dtype != torch.bool:
        raise ValueError(f"key_keep and is_global must be bool tensors [batch, seq], got "
                         f"{key_keep.dtype} and {is_global.dtype}: pass e.g. attention_mask.bool()")
    if key_keep.shape != is_global.shape or key_keep.dim() != 2 or key_keep.shape[1] != n:
        raise ValueError(f"key_keep {tuple(key_keep.shape)} and is_global {tuple(is_global.shape)} "
                         f"must both be [batch, {n}]")
    # A radius of n or more sees every key already; capping it keeps short inputs short.
    radius = max(1, min(window // 2, n))
    block = radius
    return radius, block, -(-n // block) * block


def longformer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_keep: torch.Tensor,
                         is_global: torch.Tensor, window: int, *, global_q: torch.Tensor | None = None,
                         global_k: torch.Tensor | None = None, global_v: torch.Tensor | None = None,
                         dropout_p: float = 0.0, seed: int | None = None,
                         backend: str = "auto") -> torch.Tensor:
    """Longformer self-attention of [b, heads, n, d] projections; returns [b, heads, n, d].

    key_keep [b, n] bool (True = real token), is_global [b, n] bool (padding is never global);
    window is two-sided and even (r = window / 2 keys each side). global_q/k/v are the global
    projections (same shape), needed when any token is global; only the global queries' rows of
    global_q are read. Padded query rows come out zero. Cost O(n (window + G)) time and memory,
    plus G x n for the global rows. Dropout draws its seed from torch's RNG unless `seed` is
    given; `backend` ("auto", "flash", "math") is for tests.
    """
    b, heads, n, d = q.shape
    radius, block, n_pad = _prepare(key_keep, is_global, n, window)
    is_global = is_global & key_keep
    pad = n_pad - n
    qkv = torch.stack([q, k, v], dim=2).permute(0, 3, 1, 2, 4).reshape(b, n, heads * 3 * d)
    if pad:
        qkv = F.pad(qkv, (0, 0, 0, pad))
        key_keep, is_global = F.pad(key_keep, (0, pad)), F.pad(is_global, (0, pad))
    plan = _Plan(key_keep, is_global, radius, block)
    scale = 1.0 / math.sqrt(d)
    if dropout_p > 0 and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    global_rows = None
    if plan.num_global:
        if global_q is None or global_k is None or global_v is None:
            raise ValueError("some tokens are global: pass global_q, global_k and global_v "
                             "(the query_global / key_global / value_global projections)")
        rows = []
        for row in range(b):  # each sequence's global queries against its n keys: [G_row, heads, n]
            pos = plan.global_pos[plan.global_b == row]
            if not len(pos):
                continue
            s = torch.einsum("hgd,hkd->ghk", global_q[row][:, pos], global_k[row]) * scale
            probs = torch.softmax(s.masked_fill(~key_keep[row, :n], _NEG_INF), dim=-1)
            if dropout_p > 0:
                probs = F.dropout(probs, dropout_p)
            rows.append(torch.einsum("ghk,hkd->ghd", probs, global_v[row]))
        global_rows = torch.cat(rows)
    flash = _select_backend(backend, q, dropout_p)
    out = _BandAttention.apply(qkv, None, None, None, None, global_rows, plan, n, heads, d, scale,
                               float(dropout_p), seed or 0, flash)
    return out.transpose(1, 2)


def _select_backend(backend: str, q: torch.Tensor, dropout_p: float) -> bool:
    if backend not in ("auto", "flash", "math"):
        raise ValueError(f"backend {backend!r} is not one of 'auto', 'flash', 'math'")
    if backend == "flash" and not _use_flash(q, dropout_p):
        raise ValueError("backend 'flash' needs a CPU float32/float64 tensor and dropout_p == 0: "
                         "use backend='auto'")
    return backend != "math" and _use_flash(q, dropout_p)


class ParallelLongformerSelfAttention(nn.Module):
    """Longformer self-attention (sliding window + global tokens) with heads sharded over TP.

    A non-global token attends the real tokens within window/2 of it and every global token
    (query/key/value); a global token attends every real token (the *_global projections);
    padded positions give zeros before `out`. `qkv` and `qkv_global` are column-parallel with
    head-major rows [heads, 3, head_dim], so a TP shard is a block of whole heads (stride 1), as in
    `blocks.ParallelSelfAttention`; `out` is row-parallel (BERT's attention.output.dense).
    Cost beyond the projections: O(n (window + G) h) time; memory O(n h), no [n, n] or
    [n, window] tensor (the global rows are G x n).
    """

    def __init__(self, hidden_size: int, num_heads: int, window: int, ps: ParallelState, rng: RNGContext,
                 *, init_std: float, attention_dropout: float, site: str):
        super().__init__()
        _check_window(window)
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}: "
                             "choose a head count that divides the width")
        if num_heads % ps.tp_size:
            raise ValueError(f"num_heads={num_heads} is not divisible by tensor_model_parallel_size="
                             f"{ps.tp_size}: use a TP size that divides the head count")
        self.hidden_size, self.num_heads, self.window = hidden_size, num_heads, window
        self.head_dim = hidden_size // num_heads
        self.local_heads = num_heads // ps.tp_size
        self.attention_dropout, self.ps, self.rng, self.site = attention_dropout, ps, rng, site
        self.qkv = ColumnParallelLinear(hidden_size, 3 * hidden_size, ps, init_std=init_std)
        self.qkv_global = ColumnParallelLinear(hidden_size, 3 * hidden_size, ps, init_std=init_std)
        self.out = RowParallelLinear(hidden_size, hidden_size, ps, init_std=init_std)
        # ZeRO-3 gathers a module's own parameters around its forward; this one reads its
        # projections' weights inside one autograd Function, so DeepSpeed is told (its "leaf
        # module" flag) to gather the whole subtree here and for the backward.
        self._z3_leaf = True

    def forward(self, x: torch.Tensor, key_keep: torch.Tensor, is_global: torch.Tensor) -> torch.Tensor:
        """x [b, n, h], key_keep / is_global [b, n] bool -> [b, n, h] (after `out`)."""
        return self.out(self.context(x, key_keep, is_global))

    def context(self, x: torch.Tensor, key_keep: torch.Tensor, is_global: torch.Tensor) -> torch.Tensor:
        """The attention output before `out`: [b, n, local_heads * head_dim]."""
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x {tuple(x.shape)} must be [batch, seq, {self.hidden_size}]")
        b, n, _ = x.shape
        radius, block, n_pad = _prepare(key_keep, is_global, n, self.window)
        is_global = is_global & key_keep
        if n_pad > n:
            x = F.pad(x, (0, 0, 0, n_pad - n))
            key_keep, is_global = F.pad(key_keep, (0, n_pad - n)), F.pad(is_global, (0, n_pad - n))
        plan = _Plan(key_keep, is_global, radius, block)
        # x enters the TP region once: the backward all-reduces its gradient over the heads' shards.
        xt = copy_to_tp(x, self.ps)
        heads, d = self.local_heads, self.head_dim
        p = self.attention_dropout if self.training else 0.0
        seed = 0
        if p > 0:
            # Heads differ per TP rank, so their dropout masks must too (tp_region=True). Every
            # mask of the layer is drawn from this seed, in the forward and again in the backward.
            with self.rng.fork(self.site, tp_region=True):
                seed = int(torch.randint(0, 2**62, (1,)).item())
        # qkv is projected inside, chunk by chunk, and the global rows come from x (see above).
        ctx = _BandAttention.apply(xt, self.qkv.weight, self.qkv.bias, self.qkv_global.weight,
                                   self.qkv_global.bias, None, plan, n, heads, d, 1.0 / math.sqrt(d),
                                   float(p), seed, _use_flash(xt, p))
        return ctx.reshape(b, n, heads * d)


# ---- The encoder: Longformer_ZH, a BERT with Longformer attention in every layer


@dataclass
class LongformerConfig:
    vocab_size: Optional[int] = None
    """True vocabulary size (the tokenizer's; 21128 for Longformer_ZH). Filled from the tokenizer
    when a config omits it."""
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this, whatever the TP size, so checkpoints reshard."""
    num_layers: int = 12
    """Encoder layers."""
    hidden_size: int = 768
    """Model width h."""
    num_attention_heads: int = 12
    """Attention heads; TP must divide it."""
    ffn_hidden_size: int = 3072
    """Feed-forward width."""
    max_position_embeddings: int = 4096
    """Rows of the learned position table (positions start at 0, as in BERT): the longest input."""
    type_vocab_size: int = 2
    """Token types (segment ids) of the BERT embedding."""
    attention_window: list[int] = field(default_factory=lambda: [512])
    """Two-sided sliding window per layer (even; one value for every layer, or one per layer)."""
    layernorm_epsilon: float = 1e-12
    """LayerNorm epsilon (BERT's 1e-12)."""
    hidden_dropout: float = 0.1
    """Dropout on the embeddings and on each sublayer's output."""
    attention_dropout: float = 0.1
    """Dropout on the attention probabilities."""
    init_std: float = 0.02
    """Std of the normal init of every weight matrix (BERT's initializer_range)."""

    def __post_init__(self):
        self.attention_window = [int(w) for w in self.attention_window]
        self.validate()

    padded_vocab_size = property(padded_vocab_size)

    def window(self, layer: int) -> int:
        w = self.attention_window
        return w[0] if len(w) == 1 else w[layer]

    def validate(self, tp_size: int | None = None) -> None:
        """Check field values (and divisibility by `tp_size` when given); errors name the field."""
        def need(ok, field, why):
            if not ok:
                raise ValueError(f"LongformerConfig.{field}={getattr(self, field)!r}: {why}")

        if self.vocab_size is not None:
            need(self.vocab_size >= 1, "vocab_size", "must be a positive integer")
        for name in ("make_vocab_size_divisible_by", "num_layers", "hidden_size",
                     "num_attention_heads", "ffn_hidden_size", "max_position_embeddings",
                     "type_vocab_size"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        need(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
             f"must be divisible by num_attention_heads={self.num_attention_heads}")
        need(len(self.attention_window) in (1, self.num_layers), "attention_window",
             f"give one window for every layer, or one per layer ({self.num_layers})")
        for w in self.attention_window:
            need(w >= 2 and w % 2 == 0, "attention_window",
                 f"each window is two-sided and must be even and >= 2 (got {w}; Longformer_ZH "
                 f"uses 512)")
            need(w <= self.max_position_embeddings, "attention_window",
                 f"window {w} is larger than the position table (max_position_embeddings="
                 f"{self.max_position_embeddings}); lower it")
        need(self.layernorm_epsilon > 0, "layernorm_epsilon", "must be > 0")
        need(0 <= self.hidden_dropout < 1, "hidden_dropout", "must be in [0, 1)")
        need(0 <= self.attention_dropout < 1, "attention_dropout", "must be in [0, 1)")
        need(self.init_std > 0, "init_std", "must be > 0")
        if tp_size is not None:
            check_tp_divisible(self, tp_size, self.ffn_hidden_size)


@dataclass
class LongformerDataConfig(DataConfig):
    """The `data:` section of a Longformer run: DataConfig (seq_length is the block length,
    [CLS] and [SEP] included) plus whole-word masking's knobs."""
    masked_lm_prob: float = 0.15
    """Share of each block's tokens chosen for prediction, in whole jieba words."""
    max_predictions_per_seq: Optional[int] = None
    """A fixed cap on predictions per block; none lets it scale with the length (BERT's 80 is
    sized for 512 tokens)."""
    global_attention_cls: bool = True
    """Give [CLS] global attention (Longformer_ZH's collator marked no token global)."""
    pack_documents: bool = True
    """Cut blocks from the stream of documents (each followed by [SEP]), so none is padded; off:
    one padded block per document window."""

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.masked_lm_prob < 1.0:
            raise ValueError(f"masked_lm_prob must be in (0, 1), got {self.masked_lm_prob}")
        if self.max_predictions_per_seq is not None and self.max_predictions_per_seq < 1:
            raise ValueError(f"max_predictions_per_seq must be >= 1 or none, got "
                             f"{self.max_predictions_per_seq}")


class LongformerLayer(nn.Module):
    """Post-LN BERT layer: x = LN(x + drop(attn(x))); x = LN(x + drop(mlp(x)))."""

    def __init__(self, cfg: LongformerConfig, idx: int, ps: ParallelState, rng: RNGContext):
        super().__init__()
        self.idx, self.rng, self.hidden_dropout = idx, rng, cfg.hidden_dropout
        self.attn = ParallelLongformerSelfAttention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.window(idx), ps, rng,
            init_std=cfg.init_std, attention_dropout=cfg.attention_dropout,
            site=f"layers.{idx}.attn_probs")
        self.ln_attn = layer_norm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.mlp = ParallelMLP(cfg.hidden_size, cfg.ffn_hidden_size, ps, init_std=cfg.init_std,
                               out_init_std=cfg.init_std, gelu="none")  # BERT's exact GELU
        self.ln_mlp = layer_norm(cfg.hidden_size, cfg.layernorm_epsilon)

    def _drop(self, x, site):
        # After the row-parallel all-reduce x is replicated: all TP ranks drop the same units.
        return self.rng.dropout(x, self.hidden_dropout, f"layers.{self.idx}.{site}",
                                tp_region=False, training=self.training)

    def forward(self, x, key_keep, is_global):
        x = self.ln_attn(x + self._drop(self.attn(x, key_keep, is_global), "attn_out"))
        return self.ln_mlp(x + self._drop(self.mlp(x), "mlp_out"))


def _replicated_linear(n_in: int, n_out: int, init_std: float) -> nn.Linear:
    """A small linear every TP rank holds whole (a head on the replicated hidden states)."""
    layer = nn.Linear(n_in, n_out)
    for p, init in ((layer.weight, ("normal", init_std)), (layer.bias, ("zeros",))):
        set_init(p, *init)
        mark_replicated(p)
    return layer


class LongformerEncoder(nn.Module):
    """The encoder shared by the MLM model and the classifier, on one TP rank.

    Parameter names: word_embeddings.weight [V_pad/tp, h], position_embeddings.weight [P, h],
    token_type_embeddings.weight [types, h], embedding_ln.*, layers.{i}.attn.{qkv, qkv_global,
    out}.* (q/k/v rows head-major, [heads, 3, head_dim]), layers.{i}.{ln_attn, mlp.fc1, mlp.fc2,
    ln_mlp}.*.
    """

    def __init__(self, cfg: LongformerConfig, ps: ParallelState | None = None,
                 rng: RNGContext | None = None):
        super().__init__()
        ps = ps if ps is not None else ParallelState.single()
        cfg.validate(ps.tp_size)
        self.cfg, self.ps = cfg, ps
        self.rng = rng if rng is not None else RNGContext(0, ps.dp_rank, ps.tp_rank)
        self.checkpoint_activations = False
        h = cfg.hidden_size
        self.word_embeddings = VocabParallelEmbedding(cfg.padded_vocab_size, h, ps,
                                                      init_std=cfg.init_std)
        self.position_embeddings = position_embedding(cfg.max_position_embeddings, h,
                                                      cfg.init_std)
        self.token_type_embeddings = position_embedding(cfg.type_vocab_size, h, cfg.init_std)
        self.embedding_ln = layer_norm(h, cfg.layernorm_epsilon)
        self.layers = nn.ModuleList(LongformerLayer(cfg, i, ps, self.rng)
                                    for i in range(cfg.num_layers))

    def encode(self, input_ids, attention_mask=None, global_attention_mask=None,
               token_type_ids=None, position_ids=None) -> torch.Tensor:
        """Hidden states [b, n, h] of `input_ids` [b, n]. attention_mask: 1 on real tokens (default
        all); global_attention_mask: 1 on global tokens (default none); positions default to
        0..n-1 (BERT's table, no padding offset)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        b, n = input_ids.shape
        if n > self.cfg.max_position_embeddings:
            raise ValueError(f"a sequence of {n} tokens exceeds max_position_embeddings="
                             f"{self.cfg.max_position_embeddings}: shorten it (--seq-length) or "
                             f"extend the table (tools/convert_to_long.py tiles it)")
        device = input_ids.device
        key_keep = (torch.ones(b, n, dtype=torch.bool, device=device) if attention_mask is None
                    else attention_mask.bool())
        is_global = (torch.zeros(b, n, dtype=torch.bool, device=device)
                     if global_attention_mask is None else global_attention_mask.bool() & key_keep)
        if position_ids is None:
            position_ids = torch.arange(n, device=device).expand(b, n)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
             + self.token_type_embeddings(token_type_ids))
        x = self.rng.dropout(self.embedding_ln(x), self.cfg.hidden_dropout, "embedding",
                             tp_region=False, training=self.training)
        recompute = self.checkpoint_activations and self.training
        for layer in self.layers:
            if recompute:
                # The stateless RNG reseeds every dropout from (step, site): the recompute in
                # backward draws the masks the forward drew.
                x = checkpoint(layer, x, key_keep, is_global, use_reentrant=False)
            else:
                x = layer(x, key_keep, is_global)
        return x

    @staticmethod
    def _inputs(batch: dict) -> dict:
        # Through forward(), not encode(): ZeRO-3 gathers a module's own parameters (the MLM
        # head's bias) in its forward hook only.
        return {k: batch.get(k) for k in ("input_ids", "attention_mask", "global_attention_mask",
                                          "token_type_ids", "position_ids")}


class LongformerModel(LongformerEncoder):
    """Longformer_ZH with its MLM head; `forward` returns the rank's vocab shard of the logits.

    Beyond the encoder's: lm_head.{dense, ln}.*, lm_head_bias [V_pad/tp] (the decoder is tied to
    word_embeddings and keeps its own bias, sharded with the vocabulary)."""

    def __init__(self, cfg: LongformerConfig, ps: ParallelState | None = None,
                 rng: RNGContext | None = None):
        super().__init__(cfg, ps, rng)
        h = cfg.hidden_size
        self.lm_head = nn.Module()
        self.lm_head.dense = _replicated_linear(h, h, cfg.init_std)
        self.lm_head.ln = layer_norm(h, cfg.layernorm_epsilon)
        self.lm_head_bias = nn.Parameter(torch.zeros(cfg.padded_vocab_size // self.ps.tp_size))
        set_init(self.lm_head_bias, "zeros")
        set_partition_tags(self.lm_head_bias, 0)

    def forward(self, input_ids, attention_mask=None, global_attention_mask=None,
                token_type_ids=None, position_ids=None, labels=None):
        """MLM logits shard [b, n, V_pad/tp]. `labels` is accepted so `model(**batch)` works, and
        ignored: `loss(batch)` computes the loss."""
        return self._logits(self.encode(input_ids, attention_mask, global_attention_mask,
                                        token_type_ids, position_ids))

    def _logits(self, hidden):
        x = self.lm_head.ln(F.gelu(self.lm_head.dense(hidden)))
        return parallel_lm_logits(x, self.word_embeddings.weight, self.ps, self.lm_head_bias)

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross entropy over the predicted tokens, their number); labels are -100 where
        nothing is predicted."""
        logits = self(**self._inputs(batch))
        labels = batch["labels"]
        per_token = vocab_parallel_cross_entropy(logits, labels, self.ps,
                                                 vocab_size=self.cfg.vocab_size)
        predicted = (labels != IGNORE_INDEX).to(per_token.dtype)
        n = predicted.sum()
        return (per_token * predicted).sum() / n.clamp(min=1), n


def _band_pairs(n: int, r: int) -> int:
    """(query, key) pairs of a two-sided band of r keys per side over n tokens."""
    below = (n - 1) * n // 2 if n - 1 <= r else r * (r + 1) // 2 + r * (n - 1 - r)
    return n + 2 * below


def flops_per_sample(cfg: LongformerConfig, data_cfg) -> float:
    """Model FLOPs (forward + backward) of one block of n = seq_length tokens, PaLM-style.

    6·N·n: N = non-embedding weights (attention q/k/v, the global q/k/v, output, MLP, the MLM
      head's dense) plus the V·h decoder once; LayerNorms and biases are left out as negligible.
      The global projections are counted over all tokens, as the reference implementation
      computes them.
    Attention, 12·h per (query, key) pair (QK^T and AV, 2 FLOPs each, x3 for backward, summed
      over heads): a local query sees the keys of its band (w + 1, fewer near the ends) plus the
      global keys, and a global row sees all n keys: what a banded kernel computes, not the n x n
      square. The global token is [CLS] when data.global_attention_cls is on.
    """
    h, f, n = cfg.hidden_size, cfg.ffn_hidden_size, data_cfg.seq_length
    weights = cfg.num_layers * (7 * h * h + 2 * h * f) + h * h + cfg.padded_vocab_size * h
    g = 1 if getattr(data_cfg, "global_attention_cls", False) else 0
    pairs = sum(_band_pairs(n, cfg.window(i) // 2) + g * 2 * n for i in range(cfg.num_layers))
    return 6.0 * weights * n + 12.0 * h * pairs


def build_longformer(cfg: LongformerConfig, ps: ParallelState, rng: RNGContext) -> LongformerModel:
    return LongformerModel(cfg, ps, rng)


def _too_long(seq_length: int, cfg: LongformerConfig) -> str:
    return (f"--seq-length {seq_length} exceeds the position table (max_position_embeddings="
            f"{cfg.max_position_embeddings}): lower it, or make the checkpoint longer with "
            f"tools/convert_to_long.py --max-positions {seq_length}")


def longformer_datasets(run, tokenizer, cfg: LongformerConfig, ps: ParallelState) -> Datasets:
    """Whole-word-masked MLM blocks over the train and validation prefixes."""
    data = run.data
    if tokenizer is None:
        raise ValueError("no tokenizer: set data.tokenizer in the config or pass --tokenizer DIR "
                         "(a BERT-preset character tokenizer: tools/train_tokenizer.py --type "
                         "char --preset bert)")
    if not data.train_data_prefix:
        raise ValueError("no training data: set data.train_data_prefix or pass "
                         "--train-data-prefix PREFIX (tools/preprocess_data.py --word-boundaries)")
    if data.seq_length > cfg.max_position_embeddings:
        raise ValueError(_too_long(data.seq_length, cfg))

    def blocks(prefix):
        return WholeWordMaskDataset(
            IndexedDataset(prefix), tokenizer, run.training.seed, seq_length=data.seq_length,
            masked_lm_prob=data.masked_lm_prob, max_predictions=data.max_predictions_per_seq,
            global_cls=data.global_attention_cls, pack=data.pack_documents)

    valid = blocks(data.valid_data_prefix) if data.valid_data_prefix else None
    return Datasets(train=blocks(data.train_data_prefix), valid=valid)


# ---- Sequence classification (the `classify` task: scripts/ds_finetune_longformer.sh)


@dataclass
class LongformerClassifierConfig(LongformerConfig):
    labels: list[str] = field(default_factory=list)
    """Class names in index order; empty: the sorted labels of the training data."""


@dataclass
class LongformerClassifierDataConfig(DataConfig):
    """The `data:` section of classification fine-tuning (seq_length: [CLS] text [SEP], cut)."""
    classify_data: Optional[str] = None
    """jsonl of {"text": ..., "label": ...} lines to fine-tune on."""
    valid_fraction: float = 0.1
    """Share of classify_data's lines held out for evaluation (a fixed split); 0 holds none."""
    valid_classify_data: Optional[str] = None
    """A held-out jsonl of its own; then classify_data is trained on whole."""
    global_attention_cls: bool = True
    """Give [CLS], which the head reads, global attention."""

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")


class LongformerClassifier(LongformerEncoder):
    """The encoder with a classification head on [CLS], as transformers' Longformer has it:
    dropout, dense, tanh, dropout, projection to the classes (replicated: it is small)."""

    def __init__(self, cfg: LongformerClassifierConfig, ps: ParallelState | None = None,
                 rng: RNGContext | None = None):
        super().__init__(cfg, ps, rng)
        if len(cfg.labels) < 2:
            raise ValueError(f"LongformerClassifierConfig.labels={cfg.labels!r}: a classifier "
                             "needs at least two classes (they come from the training data)")
        self.classifier = nn.Module()
        self.classifier.dense = _replicated_linear(cfg.hidden_size, cfg.hidden_size, cfg.init_std)
        self.classifier.out = _replicated_linear(cfg.hidden_size, len(cfg.labels), cfg.init_std)

    def forward(self, input_ids, attention_mask=None, global_attention_mask=None,
                token_type_ids=None, position_ids=None, labels=None):
        """Class logits [b, classes] (every TP rank holds them whole). `labels` is accepted so
        `model(**batch)` works, and ignored: `loss(batch)` computes the loss."""
        return self._logits(self.encode(input_ids, attention_mask, global_attention_mask,
                                        token_type_ids, position_ids))

    def _logits(self, hidden):
        x = hidden[:, 0]  # [CLS]
        p, training = self.cfg.hidden_dropout, self.training
        x = self.rng.dropout(x, p, "classifier.in", tp_region=False, training=training)
        x = torch.tanh(self.classifier.dense(x))
        x = self.rng.dropout(x, p, "classifier.hidden", tp_region=False, training=training)
        return self.classifier.out(x)

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross entropy over the batch, number of examples)."""
        logits = self(**self._inputs(batch))
        return F.cross_entropy(logits, batch["labels"]), torch.tensor(float(len(logits)))


def classifier_accuracy(model: LongformerClassifier, batch: dict) -> dict:
    """{"accuracy": (correct, examples)} of a batch, summed over evaluation batches and ranks."""
    predicted = model(**model._inputs(batch)).argmax(-1)
    return {"accuracy": (float((predicted == batch["labels"]).sum()), float(len(predicted)))}


def classify_examples(data) -> tuple[list, list]:
    """(training, held-out) (where, text, label) examples of a classifier's `data:` section: the
    fixed hash split of classify_data, or valid_classify_data whole."""
    if not data.classify_data:
        raise ValueError("no classification data: pass --classify-data FILE.jsonl (lines of "
                         '{"text": ..., "label": ...})')
    examples = read_examples(data.classify_data)
    if data.valid_classify_data:
        return examples, read_examples(data.valid_classify_data)
    train, valid = split_lines(examples, data.valid_fraction, seed=0)
    if not train:
        raise ValueError(f"{data.classify_data}: every line went to the held-out split; lower "
                         f"--valid-fraction")
    return train, valid


def classifier_config(cfg: LongformerClassifierConfig, run, tokenizer):
    """The config with its classes, from the training data when the config names none."""
    if cfg.labels:
        return cfg
    train, _ = classify_examples(run.data)
    return dataclasses.replace(cfg, labels=label_names(train))


def classifier_datasets(run, tokenizer, cfg: LongformerClassifierConfig,
                        ps: ParallelState) -> Datasets:
    """Training and held-out examples of --classify-data (or --valid-classify-data)."""
    data = run.data
    if tokenizer is None:
        raise ValueError("no tokenizer: pass --tokenizer DIR (the checkpoint's tokenizer/)")
    if data.seq_length > cfg.max_position_embeddings:
        raise ValueError(_too_long(data.seq_length, cfg))
    train, valid = classify_examples(data)

    def examples(part):
        return ClassificationDataset(part, tokenizer, data.seq_length, cfg.labels,
                                     global_cls=data.global_attention_cls)
    return Datasets(train=examples(train), valid=examples(valid) if valid else None)


def classifier_flops_per_sample(cfg: LongformerClassifierConfig, data_cfg) -> float:
    """The encoder's FLOPs of `flops_per_sample` without the MLM head (V·h and its dense); the
    classification head's are counted for its one position per example."""
    h, n = cfg.hidden_size, data_cfg.seq_length
    mlm_head = h * h + cfg.padded_vocab_size * h
    head = h * h + h * len(cfg.labels)
    return flops_per_sample(cfg, data_cfg) - 6.0 * mlm_head * n + 6.0 * head


# ---- Hugging Face interop (tools/convert_hf.py) and convert-to-long (tools/convert_to_long.py)
#
# Three layouts of the same weights:
# - transformers' LongformerForMaskedLM / LongformerModel ("longformer." names, "lm_head."):
#   positions come from padding_idx + 1 on (RoBERTa's convention), so its table holds
#   pad_token_id + 1 rows before ours: export prepends them (zeros) and import drops them, and
#   transformers' default positions then read our rows;
# - Longformer_ZH: BERT names ("bert." or "longformer." prefix, "cls.predictions." head) with the
#   Longformer attention's *_global projections, 0-based positions;
# - a plain BERT (BertForMaskedLM, 512 positions): no global projections, made long by
#   tools/convert_to_long.py (`hf_state_to_ours` with the q/k/v copied into the global ones).
# q/k/v (and the global ones) are separate [h, h] matrices there; ours are fused head-major.

_HF_LAYER = {"ln_attn": "attention.output.LayerNorm", "attn.out": "attention.output.dense",
             "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
             "ln_mlp": "output.LayerNorm"}


def _hf_names(hf_sd: dict) -> tuple[str, str]:
    """(encoder prefix, head style "lm_head" | "cls") of a transformers state dict."""
    prefix = next((p for p in ("longformer.", "bert.") if any(k.startswith(p) for k in hf_sd)),
                  None)
    if prefix is None:
        raise ConversionError("the weights have neither 'longformer.' nor 'bert.' names: not a "
                              "BERT or Longformer masked-LM checkpoint")
    return prefix, "cls" if any(k.startswith("cls.predictions.") for k in hf_sd) else "lm_head"


def _get(hf_sd: dict, name: str) -> torch.Tensor:
    if name not in hf_sd:
        raise ConversionError(f"the weights lack '{name}'")
    return hf_sd[name]


def hf_state_to_ours(hf_sd: dict, cfg: LongformerConfig, *, global_from_local: bool = False,
                     positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Our full (TP=1) state dict from any of the three layouts. `global_from_local` copies q/k/v
    into the global projections (a BERT); `positions` replaces the position table."""
    prefix, head = _hf_names(hf_sd)
    emb, heads = prefix + "embeddings.", cfg.num_attention_heads
    unknown = [k for k in hf_sd if not k.startswith((prefix, "lm_head.", "cls.predictions."))
               and not k.endswith("position_ids")]
    if unknown:
        raise ConversionError(f"unknown parameter names {unknown[:5]}: not a BERT / Longformer "
                              f"masked-LM layout")
    if positions is None:
        table = _get(hf_sd, emb + "position_embeddings.weight")
        positions = table[table.shape[0] - cfg.max_position_embeddings:]  # drop the HF offset
    # Rows past the true vocabulary are padding, which never counts: they start at zero, so an
    # export (which writes exactly vocab_size rows) imports back to the same tensors.
    vocab, padded = cfg.vocab_size, cfg.padded_vocab_size
    sd = {"word_embeddings.weight": resize_rows(
              _get(hf_sd, emb + "word_embeddings.weight")[:vocab], padded),
          "position_embeddings.weight": positions,
          "token_type_embeddings.weight": _get(hf_sd, emb + "token_type_embeddings.weight"),
          "embedding_ln.weight": _get(hf_sd, emb + "LayerNorm.weight"),
          "embedding_ln.bias": _get(hf_sd, emb + "LayerNorm.bias")}
    for i in range(cfg.num_layers):
        layer = f"{prefix}encoder.layer.{i}."
        att = layer + "attention.self."
        for suffix in ("weight", "bias"):
            local = [_get(hf_sd, f"{att}{n}.{suffix}") for n in ("query", "key", "value")]
            glob = local if global_from_local else [
                _get(hf_sd, f"{att}{n}_global.{suffix}") for n in ("query", "key", "value")]
            sd[f"layers.{i}.attn.qkv.{suffix}"] = fuse_heads(local, heads)
            sd[f"layers.{i}.attn.qkv_global.{suffix}"] = fuse_heads(glob, heads)
            for ours, theirs in _HF_LAYER.items():
                sd[f"layers.{i}.{ours}.{suffix}"] = _get(hf_sd, f"{layer}{theirs}.{suffix}")
    if head == "cls":
        names = {"dense": "cls.predictions.transform.dense", "ln": "cls.predictions.transform."
                 "LayerNorm", "bias": "cls.predictions.bias"}
    else:
        names = {"dense": "lm_head.dense", "ln": "lm_head.layer_norm", "bias": "lm_head.bias"}
    for suffix in ("weight", "bias"):
        sd[f"lm_head.dense.{suffix}"] = _get(hf_sd, f"{names['dense']}.{suffix}")
        sd[f"lm_head.ln.{suffix}"] = _get(hf_sd, f"{names['ln']}.{suffix}")
    sd["lm_head_bias"] = resize_rows(_get(hf_sd, names["bias"])[:vocab], padded)
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def longformer_state_to_hf(sd: dict, cfg: LongformerConfig, tokenizer) -> dict[str, torch.Tensor]:
    """transformers' LongformerForMaskedLM state dict (exactly vocab_size rows) from ours."""
    heads, vocab, offset = cfg.num_attention_heads, cfg.vocab_size, tokenizer.pad_id + 1
    emb, pos = "longformer.embeddings.", sd["position_embeddings.weight"]
    hf = {emb + "word_embeddings.weight": sd["word_embeddings.weight"][:vocab],
          emb + "position_embeddings.weight": torch.cat([pos.new_zeros(offset, pos.shape[1]),
                                                         pos]),
          emb + "token_type_embeddings.weight": sd["token_type_embeddings.weight"],
          emb + "LayerNorm.weight": sd["embedding_ln.weight"],
          emb + "LayerNorm.bias": sd["embedding_ln.bias"]}
    for i in range(cfg.num_layers):
        layer = f"longformer.encoder.layer.{i}."
        for suffix in ("weight", "bias"):
            for fused, tail in (("qkv", ""), ("qkv_global", "_global")):
                parts = split_heads(sd[f"layers.{i}.attn.{fused}.{suffix}"], heads, 3)
                for n, t in zip(("query", "key", "value"), parts):
                    hf[f"{layer}attention.self.{n}{tail}.{suffix}"] = t
            for ours, theirs in _HF_LAYER.items():
                hf[f"{layer}{theirs}.{suffix}"] = sd[f"layers.{i}.{ours}.{suffix}"]
    for suffix in ("weight", "bias"):
        hf[f"lm_head.dense.{suffix}"] = sd[f"lm_head.dense.{suffix}"]
        hf[f"lm_head.layer_norm.{suffix}"] = sd[f"lm_head.ln.{suffix}"]
    hf["lm_head.bias"] = sd["lm_head_bias"][:vocab]
    hf["lm_head.decoder.weight"] = hf[emb + "word_embeddings.weight"]  # tied
    hf["lm_head.decoder.bias"] = hf["lm_head.bias"]
    return {k: v.detach().clone().contiguous() for k, v in hf.items()}


def longformer_config_from_hf(hf_cfg: dict, hf_sd: dict, tokenizer) -> LongformerConfig:
    """Our config from a Longformer or Longformer_ZH config.json, checked against its weights."""
    if hf_cfg.get("attention_window") is None:
        raise ConversionError("config.json has no attention_window: a plain BERT; make it long "
                              "with tools/convert_to_long.py")
    if hf_cfg.get("hidden_act", "gelu") != "gelu":
        raise ConversionError(f"config.json: hidden_act {hf_cfg.get('hidden_act')!r} is not "
                              "supported; Longformer_ZH and transformers' Longformer use 'gelu'")
    prefix, head = _hf_names(hf_sd)
    rows = _get(hf_sd, prefix + "embeddings.position_embeddings.weight").shape[0]
    words = _get(hf_sd, prefix + "embeddings.word_embeddings.weight").shape[0]
    if tokenizer.vocab_size > words:
        raise ConversionError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's "
                              f"embedding only {words} rows: they do not belong together")
    offset = int(hf_cfg.get("pad_token_id", 1)) + 1 if head == "lm_head" else 0
    window = hf_cfg["attention_window"]
    layers = int(hf_cfg["num_hidden_layers"])
    windows = [int(window)] if isinstance(window, int) else [int(w) for w in window]
    if len(windows) == layers and len(set(windows)) == 1:
        windows = windows[:1]
    dropout = float(hf_cfg.get("hidden_dropout_prob", 0.1))
    try:
        return LongformerConfig(
            vocab_size=tokenizer.vocab_size, num_layers=layers,
            hidden_size=int(hf_cfg["hidden_size"]),
            num_attention_heads=int(hf_cfg["num_attention_heads"]),
            ffn_hidden_size=int(hf_cfg["intermediate_size"]), max_position_embeddings=rows - offset,
            type_vocab_size=int(hf_cfg.get("type_vocab_size", 2)), attention_window=windows,
            layernorm_epsilon=float(hf_cfg.get("layer_norm_eps", 1e-12)), hidden_dropout=dropout,
            attention_dropout=float(hf_cfg.get("attention_probs_dropout_prob", dropout)),
            init_std=float(hf_cfg.get("initializer_range", 0.02)))
    except ValueError as e:
        raise ConversionError(f"config.json: {e}") from None


def longformer_config_to_hf(cfg: LongformerConfig, tokenizer) -> dict:
    windows = [cfg.window(i) for i in range(cfg.num_layers)]
    return {
        "architectures": ["LongformerForMaskedLM"], "model_type": "longformer",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
        "intermediate_size": cfg.ffn_hidden_size, "hidden_act": "gelu",
        "max_position_embeddings": cfg.max_position_embeddings + tokenizer.pad_id + 1,
        "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.layernorm_epsilon,
        "attention_window": windows, "hidden_dropout_prob": cfg.hidden_dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "initializer_range": cfg.init_std, "pad_token_id": tokenizer.pad_id,
        "bos_token_id": tokenizer.cls_id, "eos_token_id": tokenizer.sep_id,
        "sep_token_id": tokenizer.sep_id, "tie_word_embeddings": True,
    }


def save_bert_tokenizer(tokenizer, out_dir: str) -> None:
    """The character vocabulary as transformers' BertTokenizer reads it (vocab.txt)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        with open(os.path.join(tmp, "vocab.txt"), "rb") as f:
            vocab = f.read()
    with open(os.path.join(out_dir, "vocab.txt"), "wb") as f:
        f.write(vocab)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": False,
                   "model_max_length": 1_000_000}, f, indent=2)


class LongformerPeer(nn.Module):
    """transformers' LongformerForMaskedLM in a LongformerConfig's shape (the converter's config
    mapping, the padded vocabulary so its head does the same matmul), taking our MLM batches: the
    reference the throughput benchmark times ours against.

    Positions are passed explicitly (0-based, as ours), so its table needs no padding_idx + 1
    offset rows and both models hold the same parameters. transformers pads the input to a
    multiple of the largest window and runs its own sliding-chunk attention (no SDPA path)."""

    # The BERT-Chinese ids the converter writes into config.json: [PAD] 0, [CLS] 101, [SEP] 102.
    _TOKENS = dataclasses.make_dataclass("_Tokens", [("pad_id", int, 0), ("cls_id", int, 101),
                                                     ("sep_id", int, 102)])

    def __init__(self, cfg: LongformerConfig):
        super().__init__()
        from transformers import LongformerConfig as HFConfig, LongformerForMaskedLM
        hf = longformer_config_to_hf(cfg, self._TOKENS())
        hf.update(vocab_size=cfg.padded_vocab_size,
                  max_position_embeddings=cfg.max_position_embeddings)
        for key in ("architectures", "model_type"):
            hf.pop(key)
        self.model = LongformerForMaskedLM(HFConfig(**hf))

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        ids = batch["input_ids"]
        positions = batch.get("position_ids")
        if positions is None:
            positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        out = self.model(input_ids=ids, attention_mask=batch.get("attention_mask"),
                         global_attention_mask=batch.get("global_attention_mask"),
                         token_type_ids=batch.get("token_type_ids"), position_ids=positions,
                         labels=batch["labels"])
        return out.loss, (batch["labels"] != IGNORE_INDEX).sum()


LONGFORMER_HF = HFConverter(
    model_types=("longformer", "bert"), config_from_hf=longformer_config_from_hf,
    state_from_hf=hf_state_to_ours, config_to_hf=longformer_config_to_hf,
    state_to_hf=longformer_state_to_hf, save_tokenizer=save_bert_tokenizer,
    tokenizer_convention="a BERT-Chinese vocab.txt, read as our BERT-preset character "
                         "vocabulary with the same ids; transformers' Longformer derives "
                         "positions from the pad id (handled by the position-table offset).")


register(ModelSpec(
    name="longformer", config_cls=LongformerConfig, build=build_longformer,
    build_data=longformer_datasets, objective="wwm_mlm", data_config_cls=LongformerDataConfig,
    batch_keys=("input_ids", "labels", "attention_mask", "global_attention_mask"),
    flops_per_sample=flops_per_sample, generation="none", hf=LONGFORMER_HF,
    benchmark_peer=LongformerPeer))

# Fine-tuned from a pretrained "longformer" checkpoint: its MLM head is dropped, the
# classification head starts fresh, and validation reports accuracy.
register(ModelSpec(
    name="longformer_classifier", config_cls=LongformerClassifierConfig,
    build=LongformerClassifier, build_data=classifier_datasets, objective="classify",
    data_config_cls=LongformerClassifierDataConfig,
    batch_keys=("input_ids", "labels", "attention_mask", "global_attention_mask"),
    flops_per_sample=classifier_flops_per_sample, predicts_text=False,
    complete_config=classifier_config, finetunes_from=("longformer",),
    eval_metrics=classifier_accuracy))
