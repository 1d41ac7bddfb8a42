"""Building blocks shared by the architectures: norms, embeddings, attention, MLP, masks, KV cache.

Every layer is written against a `ParallelState` with Megatron's column/row-parallel linears, so
it is a plain layer at TP=1 and a sharded one at TP>1. Parameters that are not sharded (norms,
position embeddings) are tagged replicated here, so every parameter of a model carries an init
spec and partition tags and `initialize_parameters` can draw it TP-invariantly.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_lite.parallel import (ColumnParallelLinear, ParallelState, RNGContext,
                                    RowParallelLinear, mark_replicated, set_init)


def layer_norm(hidden_size: int, eps: float) -> nn.LayerNorm:
    """A LayerNorm replicated on every TP rank, initialised to the identity (ones, zeros)."""
    norm = nn.LayerNorm(hidden_size, eps=eps)
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


class ParallelSelfAttention(nn.Module):
    """Multi-head self-attention with heads sharded over TP.

    The fused QKV projection is column-parallel with its output rows in head-major order
    [heads, 3, head_dim], so TP rank r owns a contiguous block of whole heads (q, k and v
    together) and resharding is a plain slice (partition stride 1). The output projection is
    row-parallel: its all-reduce is the only communication of the block.
    """

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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False,
                kv_cache: KVCache | None = None, layer_idx: int = 0) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, self.local_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [b, local_heads, s, head_dim]
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)
        p = self.attention_dropout if self.training else 0.0
        if p > 0:
            # Heads differ per TP rank, so their dropout masks must too (tp_region=True).
            with self.rng.fork(self.site, tp_region=True):
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                     is_causal=is_causal)
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
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
