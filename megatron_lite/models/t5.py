"""T5 as LongLM uses it: an encoder-decoder with relative position buckets, tensor-parallel.

    encoder ids -> shared embedding (vocab-parallel) -> dropout
                -> num_layers x [x + drop(attn(LN(x), bias_enc)); x + drop(ffn(LN(x)))]
                -> final LN -> dropout                                          = memory
    decoder ids -> shared embedding -> dropout
                -> num_decoder_layers x [x + drop(causal attn(LN(x), bias_dec));
                                         x + drop(cross attn(LN(x), memory)); x + drop(ffn(LN(x)))]
                -> final LN -> dropout -> (x d_model^-0.5 when tied) -> logits

T5 v1.0 (LongLM, the default): ReLU feed-forward, the head tied to the input embedding with the
d_model^-0.5 rescale before it. v1.1 (`feed_forward_proj: gated-gelu`, `tie_word_embeddings:
false`): gated GELU (tanh approximation, HF's `gelu_new`) and a separate, unscaled head.

What makes T5 T5, and how this file matches Hugging Face's `T5ForConditionalGeneration`:
- LayerNorm is scale-only RMS normalisation (no mean subtraction, no bias); no linear has a bias.
- Attention scores are NOT divided by sqrt(d_kv): the query projection's init is smaller instead
  (std (d_model * d_kv)^-0.5), so SDPA runs with scale=1.
- Positions enter only as a learned per-head bias on the self-attention scores, looked up by a
  bucketed relative distance (exact up to buckets/2 or /4, then logarithmic up to max_distance).
  The encoder's buckets are bidirectional, the decoder's causal. Each stack computes its bias once
  (HF: in its first layer) and every layer of that stack adds the same one; cross-attention has
  none.
- d_kv x heads need not equal d_model (LongLM-large: 1536 = d_model, 12 x 64 = 768 inner).

Tensor parallelism: heads (q, kv, o and the relative bias's head columns) and the feed-forward
width are sharded; the embedding, the head and the loss are vocab-parallel. Projections are
head-major ([heads, 2, d_kv] rows for the fused key/value), so a shard is a contiguous slice
(partition stride 1). q is kept apart from kv because T5 initialises them with different stds.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatron_lite import cpu_kernels
from megatron_lite.data.config import DataConfig
from megatron_lite.data.contract import Datasets
from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.objectives.continuation import ContinuationDataset, MixedT5Dataset
from megatron_lite.data.objectives.span_corruption import SpanCorruptionDataset
from megatron_lite.data.tokenizer import SP_MODEL_FILE, SentencePieceTokenizer, check_tokenizer_hash
from megatron_lite.models.blocks import (KVCache, check_tp_divisible, fuse_heads,
                                         padded_vocab_size, resize_rows, split_heads)
from megatron_lite.models.registry import ConversionError, HFConverter, ModelSpec, register
from megatron_lite.parallel import (ColumnParallelLinear, ParallelState, RNGContext,
                                    RowParallelLinear, TiedGradient, VocabParallelEmbedding,
                                    mark_replicated, parallel_lm_logits, set_init,
                                    set_partition_tags, tied_gradient,
                                    vocab_parallel_cross_entropy,
                                    vocab_parallel_linear_cross_entropy)


@dataclass
class T5Config:
    vocab_size: Optional[int] = None
    """True vocabulary size (the tokenizer's). Filled from the tokenizer when a config omits it."""
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this, whatever the TP size, so checkpoints reshard."""
    num_layers: int = 6
    """Encoder layers (HF `num_layers`, LongLM's n_e)."""
    num_decoder_layers: Optional[int] = None
    """Decoder layers (HF `num_decoder_layers`, LongLM's n_d); None means num_layers."""
    hidden_size: int = 512
    """Model width d_model."""
    ffn_hidden_size: int = 2048
    """Feed-forward width d_ff."""
    kv_channels: int = 64
    """Width of one attention head, d_kv; heads x d_kv need not equal hidden_size."""
    num_attention_heads: int = 8
    """Attention heads; TP must divide it."""
    relative_attention_num_buckets: int = 32
    """Relative position buckets (per direction: half of them in the bidirectional encoder)."""
    relative_attention_max_distance: int = 128
    """Distances at or beyond this share the last bucket."""
    layernorm_epsilon: float = 1e-6
    """Epsilon of the scale-only RMS LayerNorm."""
    hidden_dropout: float = 0.1
    """Dropout on embeddings, residual branches, the feed-forward's inner activation and each
    stack's output (HF's dropout_rate)."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities (HF's dropout_rate)."""
    feed_forward_proj: Literal["relu", "gated-gelu"] = "relu"
    """relu: T5 v1.0 / LongLM; gated-gelu: T5 v1.1 (tanh-approximated GELU gate)."""
    tie_word_embeddings: bool = True
    """Tie the head to the input embedding and scale the decoder output by d_model^-0.5 first
    (v1.0 / LongLM); false gives v1.1's separate, unscaled head."""
    initializer_factor: float = 1.0
    """Multiplies every init std (HF's initializer_factor); the stds themselves follow T5."""
    pad_token_id: int = 0
    """Padding id: encoder positions holding it are masked out of attention. Must equal the
    tokenizer's pad id (0 for our sentencepiece, LingLong and BERT vocabularies and for HF T5)."""
    decoder_start_token_id: Optional[int] = None
    """First decoder input. None means pad_token_id, T5's convention, which LongLM's fine-tuning
    code also uses; LongLM's released generation scripts pass 1 (`</s>`) instead."""
    append_eos_to_source: bool = False
    """End every encoder input with `</s>`, as transformers' T5Tokenizer does. Our objectives'
    convention is none; `tools/convert_hf.py import` sets it (with decoder_start_token_id, the
    other convention an HF checkpoint brings), and generation, evaluation and the objectives
    follow it. A run may change it (a fine-tune switches the checkpoint's convention)."""

    def __post_init__(self):
        self.validate()

    @property
    def decoder_layers(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    @property
    def inner_size(self) -> int:
        """heads x d_kv: the width attention works in."""
        return self.num_attention_heads * self.kv_channels

    @property
    def decoder_start_id(self) -> int:
        start = self.decoder_start_token_id
        return self.pad_token_id if start is None else start

    padded_vocab_size = property(padded_vocab_size)

    def validate(self, tp_size: int | None = None) -> None:
        """Check field values (and divisibility by `tp_size` when given); errors name the field."""
        def need(ok, field, why):
            if not ok:
                raise ValueError(f"T5Config.{field}={getattr(self, field)!r}: {why}")

        if self.vocab_size is not None:
            need(self.vocab_size >= 1, "vocab_size", "must be a positive integer")
        need(self.make_vocab_size_divisible_by >= 1, "make_vocab_size_divisible_by", "must be >= 1")
        need(self.num_layers >= 1, "num_layers", "must be >= 1")
        if self.num_decoder_layers is not None:
            need(self.num_decoder_layers >= 1, "num_decoder_layers", "must be >= 1 (or null)")
        for field in ("hidden_size", "ffn_hidden_size", "kv_channels", "num_attention_heads",
                      "relative_attention_num_buckets"):
            need(getattr(self, field) >= 1, field, "must be >= 1")
        # The bidirectional encoder splits the buckets by direction, then exact / logarithmic.
        need(self.relative_attention_num_buckets % 4 == 0, "relative_attention_num_buckets",
             "must be a multiple of 4 (half per direction, half of that exact)")
        need(self.relative_attention_max_distance > self.relative_attention_num_buckets // 4,
             "relative_attention_max_distance",
             f"must exceed the exact range ({self.relative_attention_num_buckets // 4})")
        need(self.layernorm_epsilon > 0, "layernorm_epsilon", "must be > 0")
        need(0 <= self.hidden_dropout < 1, "hidden_dropout", "must be in [0, 1)")
        need(0 <= self.attention_dropout < 1, "attention_dropout", "must be in [0, 1)")
        need(self.feed_forward_proj in ("relu", "gated-gelu"), "feed_forward_proj",
             "must be 'relu' (T5 v1.0 / LongLM) or 'gated-gelu' (T5 v1.1)")
        need(self.initializer_factor > 0, "initializer_factor", "must be > 0")
        need(self.pad_token_id >= 0, "pad_token_id", "must be a token id >= 0")
        if self.decoder_start_token_id is not None:
            need(self.decoder_start_token_id >= 0, "decoder_start_token_id",
                 "must be a token id >= 0 (or null for pad_token_id)")
        if self.vocab_size is not None:
            for field in ("pad_token_id", "decoder_start_token_id"):
                value = getattr(self, field)
                need(value is None or value < self.vocab_size, field,
                     f"must be below vocab_size={self.vocab_size}")
        if tp_size is not None:
            check_tp_divisible(self, tp_size, self.ffn_hidden_size)


@dataclass
class T5DataConfig(DataConfig):
    """The `data:` section of a T5 run: DataConfig, where seq_length is the encoder (source)
    length, plus the decoder length and the LongLM objectives' knobs."""
    decoder_seq_length: int = 128
    """Decoder (target) tokens per sample; seq_length is the encoder (source) length."""
    noise_density: float = 0.15
    """Span corruption: fraction of a window's tokens that are masked."""
    mean_noise_span_length: float = 3.0
    """Span corruption: mean length of a masked span (zero-truncated Poisson)."""
    first_sentinel: int = 1
    """Index k of the first sentinel <extra_id_k> used; LongLM numbers spans from 1."""
    span_corruption_weight: float = 1.0
    """Share of span-corruption (text infilling) samples in the mixture."""
    continuation_weight: float = 1.0
    """Share of conditional-continuation samples in the mixture (LongLM's default 1:1)."""

    def __post_init__(self):
        super().__post_init__()
        if self.decoder_seq_length < 2:
            raise ValueError(f"decoder_seq_length must be at least 2, got {self.decoder_seq_length}")
        if not 0.0 < self.noise_density <= 0.5:
            raise ValueError(f"noise_density must be in (0, 0.5], got {self.noise_density}")
        if self.mean_noise_span_length <= 0:
            raise ValueError(f"mean_noise_span_length must be > 0, got {self.mean_noise_span_length}")
        if self.first_sentinel < 0:
            raise ValueError(f"first_sentinel must be >= 0, got {self.first_sentinel}")
        if min(self.span_corruption_weight, self.continuation_weight) < 0 or \
                self.span_corruption_weight + self.continuation_weight <= 0:
            raise ValueError("span_corruption_weight and continuation_weight must be >= 0 and not "
                             f"both 0, got {self.span_corruption_weight} and "
                             f"{self.continuation_weight}")


# ---------------------------------------------------------------------------------------------

def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bucket of each (key - query) distance, as Mesh TensorFlow's T5 computes it.

    Bidirectional: half the buckets for keys after the query. In each half, distances below
    half of it get a bucket each; larger ones share logarithmically wider buckets up to
    max_distance, and everything beyond lands in the last. Causal: keys after the query cannot
    be seen, so all buckets go to the past. The float arithmetic is HF's, step for step: a
    different rounding could move a boundary distance into the neighbouring bucket.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # clamp(min=1) only keeps log(0) = -inf out of the unused branch (its .long() is undefined).
    large = max_exact + (torch.log(distance.clamp(min=1).float() / max_exact)
                         / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


def _mask_value(dtype: torch.dtype) -> float:
    # The most negative finite value rather than -inf: a row with every key masked then softmaxes
    # to a uniform (ignored) distribution instead of NaNs that would leak into gradients.
    return torch.finfo(dtype).min


class T5LayerNorm(nn.Module):
    """Scale-only RMS normalisation, computed in fp32 whatever the input dtype (as HF does)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        set_init(self.weight, "ones")
        mark_replicated(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)


class EncoderDecoderCache:
    """What the decoder keeps between generation steps: each layer's self-attention keys/values
    (growing) and its cross-attention keys/values over the encoder output (computed once)."""

    def __init__(self, num_layers: int):
        self.self_attn = KVCache(num_layers)
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    @property
    def seq_len(self) -> int:
        return self.self_attn.seq_len


def _biased_attention(q, k, v, bias):
    """softmax(q k^T + bias) v with the bias's gradient, on CPU. SDPA needs its math path for a
    bias that takes a gradient (the flash kernel gives none), and that path adds the bias in a
    pass of its own and guards the softmax against fully masked rows with three more passes over
    the scores. Here the bias is the GEMM's accumulator (baddbmm), and T5's finite mask value
    leaves no row fully masked, so a plain softmax is exact."""
    b, h, s, d = q.shape
    t = k.shape[2]
    scores = torch.baddbmm(bias.expand(b, h, s, t).reshape(b * h, s, t), q.reshape(b * h, s, d),
                           k.reshape(b * h, t, d).transpose(1, 2))
    return torch.bmm(scores.softmax(-1), v.reshape(b * h, t, d)).view(b, h, s, d)


@dataclass
class ScoreBias:
    """What a T5 attention adds to its scores, kept in parts: the relative position bias per
    distance (`per_distance` [local_heads, q_len + k_len - 1], self-attention; key j's bias for
    query i at column j - i + q_len - 1), a bias per key (`keys` [b, k_len]: 0 or the mask value
    at padding) and the decoder's causal mask. The attention kernel reads the parts as they are
    (`cpu_kernels.BiasedAttention`); the torch paths take `dense()`, formed once per forward and
    shared by the stack's layers."""
    per_distance: Optional[torch.Tensor]
    keys: Optional[torch.Tensor]
    causal: bool
    q_len: int
    k_len: int
    past: int = 0
    _dense: Optional[torch.Tensor] = dataclasses.field(default=None, repr=False)

    def dense(self) -> Optional[torch.Tensor]:
        """The bias as a tensor broadcastable to [b, local_heads, q_len, k_len], or None.

        Row i of the position bias is the window of `per_distance` starting at q_len - 1 - i,
        so unfold (a view) gives the rows in reverse and one flip copies them into place; in
        backward the per-distance gradient is a sum along the diagonals (unfold's backward)
        instead of an embedding backward over q_len * k_len indices (3x faster at 512 x 512)."""
        if self._dense is None:
            bias = None
            if self.per_distance is not None:
                bias = self.per_distance.unfold(1, self.k_len, 1).flip(1).unsqueeze(0)
            if self.causal:
                visible = torch.ones(self.q_len, self.k_len, dtype=torch.bool,
                                     device=bias.device).tril(diagonal=self.past)
                bias = bias.masked_fill(~visible, _mask_value(bias.dtype))
            if self.keys is not None:
                keys = self.keys[:, None, None, :]
                bias = keys if bias is None else bias + keys
            self._dense = bias
        return self._dense


def _trains(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class T5Attention(nn.Module):
    """Multi-head attention (self or cross) with heads sharded over TP and no score scaling.

    `bias` is added to the scores: the relative position bias plus the mask (large negative where
    a key may not be seen), broadcastable to [b, local_heads, q, k]."""

    def __init__(self, cfg: T5Config, ps: ParallelState, rng: RNGContext, site: str):
        super().__init__()
        h, inner, f = cfg.hidden_size, cfg.inner_size, cfg.initializer_factor
        self.d_kv = cfg.kv_channels
        self.local_heads = cfg.num_attention_heads // ps.tp_size
        self.attention_dropout = cfg.attention_dropout
        self.rng, self.site = rng, site
        # T5's init (HF `_init_weights`): the query's std carries the missing 1/sqrt(d_kv).
        self.q = ColumnParallelLinear(h, inner, ps, bias=False,
                                      init_std=f * (h * cfg.kv_channels) ** -0.5)
        self.kv = ColumnParallelLinear(h, 2 * inner, ps, bias=False, init_std=f * h ** -0.5)
        self.o = RowParallelLinear(inner, h, ps, bias=False, init_std=f * inner ** -0.5)

    def project_kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [b, local_heads, t, d_kv] of `states` [b, t, h]."""
        b, t, _ = states.shape
        kv = self.kv(states).view(b, t, self.local_heads, 2, self.d_kv)
        k, v = kv.permute(3, 0, 2, 1, 4).unbind(0)
        return k, v

    def forward(self, x: torch.Tensor, bias: ScoreBias, kv_states: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv_cache: KVCache | None = None, layer_idx: int = 0) -> torch.Tensor:
        """x [b, s, h] -> [b, s, h]. Keys/values come from `kv` if given (cached cross-attention),
        else from `kv_states` (cross-attention) or x itself (self-attention), appended to
        `kv_cache` when one is given."""
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.local_heads, self.d_kv).transpose(1, 2)
        k, v = kv if kv is not None else self.project_kv(x if kv_states is None else kv_states)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)
        p = self.attention_dropout if self.training else 0.0
        if (bias.past == 0 and _trains(q, k, v, bias.per_distance)
                and cpu_kernels.attention_kernel_for(q, k) is not None):
            # The dropout mask is hashed from the (step, site) seed: a checkpointed layer's
            # recompute draws the same one. Heads differ per TP rank, so masks do too.
            seed = self.rng.seed_for(self.site, tp_region=True) if p > 0 else 0
            ctx = cpu_kernels.BiasedAttention.apply(q, k, v, bias.per_distance, bias.keys,
                                                    bias.causal, 1.0, p, seed)
        elif p > 0:
            with self.rng.fork(self.site, tp_region=True):
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.dense(),
                                                     dropout_p=p, scale=1.0)
        elif bias.per_distance is not None and bias.per_distance.requires_grad and \
                q.device.type == "cpu":
            ctx = _biased_attention(q, k, v, bias.dense())
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.dense(), scale=1.0)
        return self.o(ctx.transpose(1, 2).reshape(b, s, self.local_heads * self.d_kv))


class T5FeedForward(nn.Module):
    """relu: wo(drop(relu(wi x))); gated-gelu: wo(drop(gelu(wi_0 x) * wi_1 x)). The inner width is
    sharded, so the dropout there draws per TP rank."""

    def __init__(self, cfg: T5Config, ps: ParallelState, rng: RNGContext, site: str):
        super().__init__()
        h, ff, f = cfg.hidden_size, cfg.ffn_hidden_size, cfg.initializer_factor
        self.gated = cfg.feed_forward_proj == "gated-gelu"
        self.dropout, self.rng, self.site = cfg.hidden_dropout, rng, site
        if self.gated:
            self.wi_0 = ColumnParallelLinear(h, ff, ps, bias=False, init_std=f * h ** -0.5)
            self.wi_1 = ColumnParallelLinear(h, ff, ps, bias=False, init_std=f * h ** -0.5)
        else:
            self.wi = ColumnParallelLinear(h, ff, ps, bias=False, init_std=f * h ** -0.5)
        self.wo = RowParallelLinear(ff, h, ps, bias=False, init_std=f * ff ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            inner = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        else:
            inner = F.relu(self.wi(x))
        inner = self.rng.dropout(inner, self.dropout, self.site, tp_region=True,
                                 training=self.training)
        return self.wo(inner)


class T5Layer(nn.Module):
    """One encoder or decoder block: self-attention, (decoder) cross-attention, feed-forward, each
    as x + dropout(sublayer(LN(x)))."""

    def __init__(self, cfg: T5Config, is_decoder: bool, layer_idx: int, ps: ParallelState,
                 rng: RNGContext, prefix: str):
        super().__init__()
        self.is_decoder, self.layer_idx = is_decoder, layer_idx
        self.dropout, self.rng, self.prefix = cfg.hidden_dropout, rng, prefix
        eps = cfg.layernorm_epsilon
        self.ln_attn = T5LayerNorm(cfg.hidden_size, eps)
        self.attn = T5Attention(cfg, ps, rng, f"{prefix}.attn_probs")
        if is_decoder:
            self.ln_cross = T5LayerNorm(cfg.hidden_size, eps)
            self.cross_attn = T5Attention(cfg, ps, rng, f"{prefix}.cross_probs")
        self.ln_mlp = T5LayerNorm(cfg.hidden_size, eps)
        self.mlp = T5FeedForward(cfg, ps, rng, f"{prefix}.mlp_inner")

    def _drop(self, x, site):
        # After the row-parallel all-reduce x is replicated, so all TP ranks drop the same units.
        return self.rng.dropout(x, self.dropout, f"{self.prefix}.{site}", tp_region=False,
                                training=self.training)

    def forward(self, x, self_bias, memory=None, cross_bias=None, cache=None):
        self_cache = cache.self_attn if cache is not None else None
        x = x + self._drop(self.attn(self.ln_attn(x), self_bias, kv_cache=self_cache,
                                     layer_idx=self.layer_idx), "attn_out")
        if self.is_decoder:
            kv = None
            if cache is not None:
                if cache.cross[self.layer_idx] is None:
                    cache.cross[self.layer_idx] = self.cross_attn.project_kv(memory)
                kv = cache.cross[self.layer_idx]
            x = x + self._drop(self.cross_attn(self.ln_cross(x), cross_bias, kv_states=memory,
                                               kv=kv), "cross_out")
        return x + self._drop(self.mlp(self.ln_mlp(x)), "mlp_out")


class T5Stack(nn.Module):
    """The encoder or the decoder: its layers, its relative position bias (shared by all of its
    layers) and its final LayerNorm. Embedding happens in T5Model (the table is shared)."""

    def __init__(self, cfg: T5Config, is_decoder: bool, ps: ParallelState, rng: RNGContext):
        super().__init__()
        self.cfg, self.is_decoder, self.rng = cfg, is_decoder, rng
        self.name = "decoder" if is_decoder else "encoder"
        self.checkpoint_activations = False
        # [buckets, local_heads]: one column per head, so it shards with the heads (dim 1).
        self.relative_attention_bias = nn.Parameter(torch.empty(
            cfg.relative_attention_num_buckets, cfg.num_attention_heads // ps.tp_size))
        std = cfg.initializer_factor * cfg.hidden_size ** -0.5
        with torch.no_grad():  # usable before initialize_parameters, like the parallel layers
            self.relative_attention_bias.normal_(0.0, std)
        set_init(self.relative_attention_bias, "normal", std)
        set_partition_tags(self.relative_attention_bias, 1)
        n = cfg.decoder_layers if is_decoder else cfg.num_layers
        self.layers = nn.ModuleList(T5Layer(cfg, is_decoder, i, ps, rng, f"{self.name}.layers.{i}")
                                    for i in range(n))
        self.final_ln = T5LayerNorm(cfg.hidden_size, cfg.layernorm_epsilon)

    def per_distance_bias(self, q_len: int, k_len: int, past: int, device) -> torch.Tensor:
        """[local_heads, q_len + k_len - 1]: the bias of queries past..past+q_len-1 over keys
        0..k_len-1 per key - query distance, key j's for query row i at column j - i + q_len - 1.

        The bias depends on key - query alone, so each distance's bucket is looked up once
        (`ScoreBias.dense` lays them out as the [q_len, k_len] matrix). Made row-major: the
        attention kernel reads it in place, and the dense matrix's flip copy takes its layout."""
        distance = torch.arange(-(past + q_len - 1), k_len - past, device=device)
        buckets = relative_position_bucket(distance, bidirectional=not self.is_decoder,
                                           num_buckets=self.cfg.relative_attention_num_buckets,
                                           max_distance=self.cfg.relative_attention_max_distance)
        return F.embedding(buckets, self.relative_attention_bias).t().contiguous()

    def forward(self, x, keep=None, memory=None, memory_keep=None, cache=None):
        """x: embedded tokens [b, s, h]. Encoder: keep [b, s] bool, False at padding. Decoder:
        memory [b, t, h] (the encoder output) and memory_keep [b, t]; a `cache`
        (EncoderDecoderCache) holds earlier positions and receives this call's."""
        b, s, _ = x.shape
        past = cache.seq_len if cache is not None else 0
        total = past + s
        per_distance = self.per_distance_bias(s, total, past, x.device)
        dtype = per_distance.dtype
        bias = ScoreBias(per_distance, None if self.is_decoder else _keep_to_bias(keep, dtype),
                         self.is_decoder, s, total, past)
        cross_bias = None
        if self.is_decoder:
            cross_bias = ScoreBias(None, _keep_to_bias(memory_keep, dtype), False, s,
                                   memory.shape[1])
        x = self.rng.dropout(x, self.cfg.hidden_dropout, f"{self.name}.embedding",
                             tp_region=False, training=self.training)
        recompute = self.checkpoint_activations and self.training and cache is None
        if recompute:
            # The torch paths' dense bias is formed on first use and kept: form it before the
            # checkpointed layers, so that their recomputation saves what their forward saved.
            for part in (bias, cross_bias):
                if part is not None:
                    part.dense()
        for layer in self.layers:
            if recompute:
                # The stateless RNG reseeds every dropout from (step, site), so the recompute in
                # backward draws exactly the masks the forward drew.
                x = checkpoint(layer, x, bias, memory, cross_bias, use_reentrant=False)
            else:
                x = layer(x, bias, memory, cross_bias, cache)
        x = self.final_ln(x)
        return self.rng.dropout(x, self.cfg.hidden_dropout, f"{self.name}.output",
                                tp_region=False, training=self.training)


def _keep_to_bias(keep: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """[b, k] bool (True = may attend) -> [b, k] additive bias."""
    if keep is None:
        return None
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    return bias.masked_fill(~keep, _mask_value(dtype))


class T5Model(nn.Module):
    """T5 / LongLM on one TP rank; `forward` returns the rank's vocab shard of the decoder logits.

    Parameter names (they seed the TP-invariant init and name checkpoint entries):
    shared.weight [V_pad/tp, h]; {encoder,decoder}.relative_attention_bias [buckets, heads/tp];
    {encoder,decoder}.layers.{i}.{ln_attn,ln_mlp}.weight; ...attn.q.weight [inner/tp, h],
    ...attn.kv.weight [2 inner/tp, h] (rows [heads, 2 (k, v), d_kv]), ...attn.o.weight
    [h, inner/tp]; decoder.layers.{i}.ln_cross / cross_attn.* likewise; ...mlp.wi (or wi_0, wi_1)
    [ff/tp, h], ...mlp.wo [h, ff/tp]; {encoder,decoder}.final_ln.weight; lm_head.weight
    [V_pad/tp, h] only when the head is untied.
    """

    # `loss` runs the output head and the cross entropy in chunks of decoder tokens (as
    # GPTModel.fused_head_loss); False: logits, then the cross entropy (the reference).
    fused_head_loss = True

    def __init__(self, cfg: T5Config, ps: ParallelState | None = None,
                 rng: RNGContext | None = None):
        super().__init__()
        ps = ps if ps is not None else ParallelState.single()
        cfg.validate(ps.tp_size)
        self.cfg, self.ps = cfg, ps
        self.rng = rng if rng is not None else RNGContext(0, ps.dp_rank, ps.tp_rank)
        f = cfg.initializer_factor
        self.shared = VocabParallelEmbedding(cfg.padded_vocab_size, cfg.hidden_size, ps,
                                             init_std=f * 1.0)
        self.encoder = T5Stack(cfg, False, ps, self.rng)
        self.decoder = T5Stack(cfg, True, ps, self.rng)
        if not cfg.tie_word_embeddings:
            # Unscaled head: std d_model^-0.5 gives unit-variance logits from normalised states.
            self.lm_head = ColumnParallelLinear(cfg.hidden_size, cfg.padded_vocab_size, ps,
                                                bias=False, init_std=f * cfg.hidden_size ** -0.5)

    @property
    def checkpoint_activations(self) -> bool:
        return self.encoder.checkpoint_activations

    @checkpoint_activations.setter
    def checkpoint_activations(self, value: bool):
        self.encoder.checkpoint_activations = self.decoder.checkpoint_activations = bool(value)

    def _check_ids(self, ids, name):
        if ids.dim() != 2:
            raise ValueError(f"{name} must be [batch, seq], got shape {tuple(ids.shape)}")

    def encode(self, encoder_input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(memory [b, t, h], keep [b, t]): the encoder output and its non-padding positions."""
        self._check_ids(encoder_input_ids, "encoder_input_ids")
        return self._encode(encoder_input_ids, self.shared(encoder_input_ids))

    def _encode(self, ids: torch.Tensor, embedded: torch.Tensor):
        keep = ids != self.cfg.pad_token_id
        return self.encoder(embedded, keep=keep), keep

    def _embed_pair(self, encoder_input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                    tied: TiedGradient | None = None):
        """Both stacks' input embeddings from one lookup. The table's gradient is then one dense
        [V/tp, h] buffer per step instead of two: one fill and one add over the table fewer
        (and, on glibc's default allocator, one fresh table's page faults)."""
        self._check_ids(encoder_input_ids, "encoder_input_ids")
        self._check_ids(decoder_input_ids, "decoder_input_ids")
        n = encoder_input_ids.numel()
        ids = torch.cat([encoder_input_ids.reshape(-1), decoder_input_ids.reshape(-1)])
        both = self.shared(ids, tied)
        return (both[:n].view(*encoder_input_ids.shape, -1),
                both[n:].view(*decoder_input_ids.shape, -1))

    def decode(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor,
               memory_keep: torch.Tensor, cache: EncoderDecoderCache | None = None,
               hidden_only: bool = False) -> torch.Tensor:
        """Logits shard [b, s, V_pad/tp] of `decoder_input_ids` [b, s] (positions after those in
        `cache`, which receives this call's keys/values) attending to the encoder output.
        hidden_only: the head's input [b, s, h] instead (`head_weight` makes the logits)."""
        self._check_ids(decoder_input_ids, "decoder_input_ids")
        return self._decode(self.shared(decoder_input_ids), memory, memory_keep, cache,
                            hidden_only)

    def _decode(self, embedded, memory, memory_keep, cache=None, hidden_only=False):
        x = self.decoder(embedded, memory=memory, memory_keep=memory_keep, cache=cache)
        if self.cfg.tie_word_embeddings:
            # Tied head: rescale so the logits do not grow with d_model (Mesh TF's T5).
            x = x * self.cfg.hidden_size ** -0.5
        return x if hidden_only else parallel_lm_logits(x, self.head_weight, self.ps)

    @property
    def head_weight(self) -> torch.Tensor:
        """The output head's weight shard [V_pad/tp, h]: the shared embedding's when tied."""
        return self.shared.weight if self.cfg.tie_word_embeddings else self.lm_head.weight

    def forward(self, encoder_input_ids, decoder_input_ids, labels=None, loss_mask=None,
                head_loss=False):
        """Logits shard [b, s_dec, V_pad/tp]. `labels`/`loss_mask` are accepted so
        `model(**batch)` works, and ignored unless `head_loss`: then the result is `loss`'s
        (mean loss, number of loss tokens), computed here because ZeRO-3 gathers a partitioned
        weight (the head's) only while a forward runs."""
        tied = tied_gradient(head_loss and self.fused_head_loss and self.cfg.tie_word_embeddings)
        encoder_embedded, decoder_embedded = self._embed_pair(encoder_input_ids,
                                                              decoder_input_ids, tied)
        memory, keep = self._encode(encoder_input_ids, encoder_embedded)
        hidden = self._decode(decoder_embedded, memory, keep, hidden_only=head_loss)
        if not head_loss:
            return hidden
        if self.fused_head_loss:
            return vocab_parallel_linear_cross_entropy(
                hidden, self.head_weight, labels, loss_mask, self.ps,
                vocab_size=self.cfg.vocab_size, tied=tied)
        logits = parallel_lm_logits(hidden, self.head_weight, self.ps)
        per_token = vocab_parallel_cross_entropy(logits, labels, self.ps,
                                                 vocab_size=self.cfg.vocab_size)
        mask = loss_mask.to(per_token.dtype)
        n_tokens = mask.sum()
        return (per_token * mask).sum() / n_tokens.clamp(min=1), n_tokens

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross entropy over `loss_mask`, number of loss tokens) of an encoder-decoder
        batch."""
        missing = [k for k in ("encoder_input_ids", "decoder_input_ids", "labels", "loss_mask")
                   if k not in batch]
        if missing:
            raise KeyError(f"T5 batch is missing {missing}; an encoder-decoder batch has "
                           "encoder_input_ids, decoder_input_ids, labels and loss_mask")
        return self(batch["encoder_input_ids"], batch["decoder_input_ids"], labels=batch["labels"],
                    loss_mask=batch["loss_mask"], head_loss=True)


# ---------------------------------------------------------------------------------------------
# FLOPs (PaLM appendix B), counted per stack because encoder and decoder see different tokens.

def _layer_params(cfg: T5Config, decoder: bool) -> tuple[int, int]:
    """(parameters applied to the layer's own tokens, cross-attention K/V parameters applied to
    the encoder's tokens) of one layer."""
    h, inner, ff = cfg.hidden_size, cfg.inner_size, cfg.ffn_hidden_size
    attn = h * inner + 2 * h * inner + inner * h  # q, kv, o
    mlp = (3 if cfg.feed_forward_proj == "gated-gelu" else 2) * h * ff
    own = attn + mlp + 2 * h  # + two LayerNorms
    if not decoder:
        return own, 0
    return own + h * inner + inner * h + h, 2 * h * inner  # cross q, o, LN; cross kv


def t5_flops(cfg: T5Config, source_len: int, target_len: int) -> float:
    """Model FLOPs (forward + backward) of one sample: 6·N per token a weight sees, plus
    12·H·Q·T per layer for attention scores and weighted sums.

    Encoder tokens (source_len = S_e) pass the encoder layers, its final LN and every decoder
    layer's cross-attention key/value projection; decoder tokens (S_d) pass the rest of the
    decoder, its final LN and the V·h head (V padded: the head computes those columns too).
    Attention: encoder self-attention S_e x S_e per layer, decoder self-attention S_d x S_d (all
    keys counted, as PaLM does for causal attention) and cross-attention S_d x S_e. The relative
    bias is a lookup and costs no matmul FLOPs, like the embedding.
    """
    h, le, ld = cfg.hidden_size, cfg.num_layers, cfg.decoder_layers
    hq = cfg.num_attention_heads * cfg.kv_channels
    enc_own, _ = _layer_params(cfg, False)
    dec_own, dec_cross_kv = _layer_params(cfg, True)
    n_enc_token = le * enc_own + h + ld * dec_cross_kv
    n_dec_token = ld * dec_own + h + cfg.padded_vocab_size * h
    dense = 6.0 * (source_len * n_enc_token + target_len * n_dec_token)
    attention = 12.0 * hq * (le * source_len * source_len
                             + ld * target_len * (target_len + source_len))
    return dense + attention


def flops_per_token(cfg: T5Config, seq_len: int) -> float:
    """FLOPs per token with encoder and decoder both `seq_len` long (the registry's generic
    view); training counts the real lengths through `flops_per_sample`."""
    return t5_flops(cfg, seq_len, seq_len) / (2 * seq_len)


def flops_per_sample(cfg: T5Config, data_cfg) -> float:
    return t5_flops(cfg, data_cfg.seq_length, data_cfg.decoder_seq_length)


def tokens_per_sample(cfg: T5Config, data_cfg) -> int:
    """Encoder plus decoder tokens of a (padded) sample: what tokens/s counts."""
    return data_cfg.seq_length + data_cfg.decoder_seq_length


def build_t5(cfg: T5Config, ps: ParallelState, rng: RNGContext) -> T5Model:
    return T5Model(cfg, ps, rng)


# ---------------------------------------------------------------------------------------------
# Data: LongLM's mixture of text infilling (span corruption) and conditional continuation.

# Distinct seeds per objective: at the same index the two would otherwise draw the same numbers.
_SPAN_SEED_OFFSET, _CONTINUATION_SEED_OFFSET = 0, 1


def t5_objective_dataset(indexed, tokenizer, data: T5DataConfig, model_cfg: T5Config, seed: int,
                         return_source: bool = False):
    """The span-corruption / continuation mixture over one indexed dataset."""
    common = dict(max_source_length=data.seq_length, max_target_length=data.decoder_seq_length,
                  decoder_start_token_id=model_cfg.decoder_start_id, return_source=return_source,
                  source_eos=model_cfg.append_eos_to_source)
    parts, weights = [], []
    if data.span_corruption_weight > 0:
        parts.append(SpanCorruptionDataset(
            indexed, tokenizer, seed + _SPAN_SEED_OFFSET, noise_density=data.noise_density,
            mean_span_length=data.mean_noise_span_length, first_sentinel=data.first_sentinel,
            **common))
        weights.append(data.span_corruption_weight)
    if data.continuation_weight > 0:
        parts.append(ContinuationDataset(indexed, tokenizer, seed + _CONTINUATION_SEED_OFFSET,
                                         sentinel=data.first_sentinel, **common))
        weights.append(data.continuation_weight)
    return parts[0] if len(parts) == 1 else MixedT5Dataset(parts, weights, seed=seed)


def t5_datasets(run, tokenizer, model_cfg: T5Config, ps: ParallelState) -> Datasets:
    """The mixture over the train and validation prefixes (validation uses the same mixture)."""
    data, seed = run.data, run.training.seed
    if tokenizer is None:
        raise ValueError("no tokenizer: set data.tokenizer in the config or pass --tokenizer DIR "
                         "(a sentencepiece or character tokenizer with sentinels)")
    if tokenizer.pad_id != model_cfg.pad_token_id:
        raise ValueError(f"the tokenizer's pad id is {tokenizer.pad_id} but model.pad_token_id is "
                         f"{model_cfg.pad_token_id}: set --pad-token-id {tokenizer.pad_id} (the "
                         "encoder masks positions holding the pad id)")
    if data.finetune_data:
        raise ValueError("data.finetune_data (prompt/text fine-tuning) is a GPT feature; T5 "
                         "fine-tunes with --load CKPT --finetune on its pretraining objectives")
    if not data.train_data_prefix:
        raise ValueError("no training data: set data.train_data_prefix in the config or pass "
                         "--train-data-prefix PREFIX (made by tools/preprocess_data.py)")

    def mixed(prefix):
        indexed = IndexedDataset(prefix)
        check_tokenizer_hash(indexed.tokenizer_hash, tokenizer, prefix)
        return t5_objective_dataset(indexed, tokenizer, data, model_cfg, seed)

    valid = mixed(data.valid_data_prefix) if data.valid_data_prefix else None
    return Datasets(train=mixed(data.train_data_prefix), valid=valid)


# ---------------------------------------------------------------------------------------------
# Hugging Face interop (tools/convert_hf.py): transformers' T5ForConditionalGeneration.
#
# Vocabulary: our `vocab_size` is the tokenizer's; the embedding is padded to a multiple of 128
# (the HF table usually is too: t5's 32128 rows for 32100 ids). Import copies the HF rows that
# fit and zero-fills the rest; export writes exactly `vocab_size` rows, so transformers never
# samples a padding row. Sentinel ids are the tokenizer's own: an HF T5 vocabulary keeps its
# sentinels at the top (`<extra_id_0>` highest), ours at 4..103.
#
# T5 versions: v1.0 / LongLM (ReLU, tied head scaled by d_model^-0.5) and v1.1 (gated GELU,
# separate unscaled head). transformers 5.x always writes `tie_word_embeddings: true` and records
# the head's scaling as `scale_decoder_outputs`; a separate head is recognised by an
# `lm_head.weight` that differs from `shared.weight`.

def _scaled_head(hf_cfg: dict) -> bool:
    # transformers 5.x stores the v1.0 / v1.1 switch as scale_decoder_outputs; older versions as
    # tie_word_embeddings (false for v1.1).
    if "scale_decoder_outputs" in hf_cfg:
        return bool(hf_cfg["scale_decoder_outputs"])
    return hf_cfg.get("tie_word_embeddings", True) is not False


def t5_config_from_hf(hf_cfg: dict, hf_sd: dict, tokenizer) -> T5Config:
    """Our config from a transformers T5 config.json, checked against its weights and the
    tokenizer that comes with it."""
    if "shared.weight" not in hf_sd:
        raise ConversionError("the weights have no shared.weight (the T5 embedding)")
    rows = hf_sd["shared.weight"].shape[0]
    if tokenizer.vocab_size > rows:
        raise ConversionError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's "
                              f"embedding only {rows} rows: they do not belong together")
    scaled = _scaled_head(hf_cfg)
    head = hf_sd.get("lm_head.weight")
    if scaled and head is not None and not torch.equal(head, hf_sd["shared.weight"]):
        raise ConversionError("the config scales the decoder output for a tied head (T5 v1.0) "
                              "but lm_head.weight differs from shared.weight; this layout is not "
                              "one T5 version uses")
    proj = hf_cfg.get("feed_forward_proj", "relu")
    if proj not in ("relu", "gated-gelu"):
        raise ConversionError(f"config.json: feed_forward_proj {proj!r} is not supported; T5 "
                              "v1.0 / LongLM use 'relu', v1.1 'gated-gelu'")
    dropout = float(hf_cfg.get("dropout_rate", 0.1))
    start = hf_cfg.get("decoder_start_token_id")
    pad = int(hf_cfg.get("pad_token_id", 0) or 0)
    if tokenizer.pad_id is not None and tokenizer.pad_id != pad:
        raise ConversionError(f"config.json says pad_token_id={pad} but the tokenizer's pad id "
                              f"is {tokenizer.pad_id}")
    return T5Config(
        vocab_size=tokenizer.vocab_size, num_layers=int(hf_cfg["num_layers"]),
        num_decoder_layers=int(hf_cfg.get("num_decoder_layers") or hf_cfg["num_layers"]),
        hidden_size=int(hf_cfg["d_model"]), ffn_hidden_size=int(hf_cfg["d_ff"]),
        kv_channels=int(hf_cfg["d_kv"]), num_attention_heads=int(hf_cfg["num_heads"]),
        relative_attention_num_buckets=int(hf_cfg.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(hf_cfg.get("relative_attention_max_distance", 128)),
        layernorm_epsilon=float(hf_cfg.get("layer_norm_epsilon", 1e-6)),
        hidden_dropout=dropout, attention_dropout=dropout, feed_forward_proj=proj,
        tie_word_embeddings=scaled, initializer_factor=float(hf_cfg.get("initializer_factor", 1.0)),
        pad_token_id=pad, decoder_start_token_id=None if start in (None, pad) else int(start),
        append_eos_to_source=True)  # transformers' T5Tokenizer ends every text with </s>


# Parameter layouts. HF keeps q, k, v as separate [inner, h] matrices; ours fuses k and v
# head-major ([heads, 2, d_kv] rows) so that a TP shard is a contiguous block of whole heads.

def _layer_map(cfg: T5Config, stack: str, i: int) -> list[tuple[str, str]]:
    """(our name, HF name) of one layer's plain (1:1) parameters; q/k/v are handled apart."""
    hf = f"{stack}.block.{i}.layer"
    ours = f"{stack}.layers.{i}"
    ff = 2 if stack == "decoder" else 1
    pairs = [(f"{ours}.ln_attn.weight", f"{hf}.0.layer_norm.weight"),
             (f"{ours}.attn.q.weight", f"{hf}.0.SelfAttention.q.weight"),
             (f"{ours}.attn.o.weight", f"{hf}.0.SelfAttention.o.weight"),
             (f"{ours}.ln_mlp.weight", f"{hf}.{ff}.layer_norm.weight"),
             (f"{ours}.mlp.wo.weight", f"{hf}.{ff}.DenseReluDense.wo.weight")]
    if cfg.feed_forward_proj == "gated-gelu":
        pairs += [(f"{ours}.mlp.wi_0.weight", f"{hf}.{ff}.DenseReluDense.wi_0.weight"),
                  (f"{ours}.mlp.wi_1.weight", f"{hf}.{ff}.DenseReluDense.wi_1.weight")]
    else:
        pairs.append((f"{ours}.mlp.wi.weight", f"{hf}.{ff}.DenseReluDense.wi.weight"))
    if stack == "decoder":
        pairs += [(f"{ours}.ln_cross.weight", f"{hf}.1.layer_norm.weight"),
                  (f"{ours}.cross_attn.q.weight", f"{hf}.1.EncDecAttention.q.weight"),
                  (f"{ours}.cross_attn.o.weight", f"{hf}.1.EncDecAttention.o.weight")]
    return pairs


def _kv_map(stack: str, i: int) -> list[tuple[str, str]]:
    """(our fused kv name, HF attention prefix) of one layer's attentions."""
    hf = f"{stack}.block.{i}.layer"
    out = [(f"{stack}.layers.{i}.attn.kv.weight", f"{hf}.0.SelfAttention")]
    if stack == "decoder":
        out.append((f"{stack}.layers.{i}.cross_attn.kv.weight", f"{hf}.1.EncDecAttention"))
    return out


def _stacks(cfg: T5Config):
    return (("encoder", cfg.num_layers), ("decoder", cfg.decoder_layers))


def t5_state_from_hf(hf_sd: dict, cfg: T5Config) -> dict[str, torch.Tensor]:
    """Our full (TP=1) state dict from an HF T5 state dict."""
    def get(name):
        if name not in hf_sd:
            raise ConversionError(f"the HF weights lack '{name}'; is this a "
                                  f"T5ForConditionalGeneration with {cfg.num_layers} encoder and "
                                  f"{cfg.decoder_layers} decoder layers?")
        return hf_sd[name]

    heads = cfg.num_attention_heads
    sd = {"shared.weight": resize_rows(get("shared.weight"), cfg.padded_vocab_size)}
    for stack, n in _stacks(cfg):
        sd[f"{stack}.relative_attention_bias"] = \
            get(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        sd[f"{stack}.final_ln.weight"] = get(f"{stack}.final_layer_norm.weight")
        for i in range(n):
            for ours, theirs in _layer_map(cfg, stack, i):
                sd[ours] = get(theirs)
            for ours, prefix in _kv_map(stack, i):
                sd[ours] = fuse_heads([get(f"{prefix}.k.weight"), get(f"{prefix}.v.weight")],
                                      heads)
    if not cfg.tie_word_embeddings:
        head = hf_sd.get("lm_head.weight", hf_sd["shared.weight"])
        sd["lm_head.weight"] = resize_rows(head, cfg.padded_vocab_size)
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def t5_state_to_hf(sd: dict, cfg: T5Config, tokenizer=None) -> dict[str, torch.Tensor]:
    """An HF T5 state dict (exactly vocab_size rows) from our full (TP=1) state dict."""
    heads, vocab = cfg.num_attention_heads, cfg.vocab_size
    hf = {"shared.weight": sd["shared.weight"][:vocab]}
    for stack, n in _stacks(cfg):
        hf[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = \
            sd[f"{stack}.relative_attention_bias"]
        hf[f"{stack}.final_layer_norm.weight"] = sd[f"{stack}.final_ln.weight"]
        for i in range(n):
            for ours, theirs in _layer_map(cfg, stack, i):
                hf[theirs] = sd[ours]
            for ours, prefix in _kv_map(stack, i):
                hf[f"{prefix}.k.weight"], hf[f"{prefix}.v.weight"] = split_heads(sd[ours], heads, 2)
    if not cfg.tie_word_embeddings:
        hf["lm_head.weight"] = sd["lm_head.weight"][:vocab]
    return {k: v.detach().clone().contiguous() for k, v in hf.items()}


def hf_config_from_t5(cfg: T5Config, tokenizer) -> dict:
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
        "vocab_size": cfg.vocab_size, "d_model": cfg.hidden_size, "d_ff": cfg.ffn_hidden_size,
        "d_kv": cfg.kv_channels, "num_heads": cfg.num_attention_heads,
        "num_layers": cfg.num_layers, "num_decoder_layers": cfg.decoder_layers,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "dropout_rate": cfg.hidden_dropout, "layer_norm_epsilon": cfg.layernorm_epsilon,
        "initializer_factor": cfg.initializer_factor, "feed_forward_proj": cfg.feed_forward_proj,
        # Read by every transformers version: false means v1.1's separate, unscaled head.
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "is_encoder_decoder": True, "use_cache": True, "pad_token_id": cfg.pad_token_id,
        "eos_token_id": tokenizer.eos_id, "decoder_start_token_id": cfg.decoder_start_id,
    }


def save_t5_tokenizer(tokenizer, out_dir: str):
    """The tokenizer as transformers' T5Tokenizer reads it (spiece.model + tokenizer_config)."""
    if not isinstance(tokenizer, SentencePieceTokenizer):
        # transformers' T5Tokenizer reads sentencepiece models only; keep ours beside the model.
        tokenizer.save(os.path.join(out_dir, "megatron_lite_tokenizer"))
        print(f"warning: a {tokenizer.kind} tokenizer has no transformers T5Tokenizer form; it is "
              f"saved in {out_dir}/megatron_lite_tokenizer (load it with "
              "megatron_lite.data.tokenizer.load_tokenizer)", file=sys.stderr)
        return
    with tempfile.TemporaryDirectory() as tmp:  # our saved form holds the model file as is
        tokenizer.save(tmp)
        shutil.copyfile(os.path.join(tmp, SP_MODEL_FILE), os.path.join(out_dir, "spiece.model"))
    specials = {f"{role}_token": tokenizer.id_to_token(i)
                for role, i in (("pad", tokenizer.pad_id), ("eos", tokenizer.eos_id),
                                ("unk", tokenizer.unk_id)) if i is not None}
    # extra_ids: sentinels appended above the model (HF layout); 0 when they are in the model.
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": tokenizer.num_extra_ids,
              "model_max_length": 1_000_000, **specials}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(specials, f, indent=2, ensure_ascii=False)


class HFT5Peer(nn.Module):
    """transformers' T5ForConditionalGeneration in a T5Config's shape (SDPA, the padded
    vocabulary, so its head does the same matmul), taking our encoder-decoder batches: the
    reference the throughput benchmark times ours against."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        from transformers import T5Config as HFConfig, T5ForConditionalGeneration
        self.model = T5ForConditionalGeneration(HFConfig(
            vocab_size=cfg.padded_vocab_size, d_model=cfg.hidden_size,
            d_ff=cfg.ffn_hidden_size, d_kv=cfg.kv_channels, num_heads=cfg.num_attention_heads,
            num_layers=cfg.num_layers, num_decoder_layers=cfg.decoder_layers,
            relative_attention_num_buckets=cfg.relative_attention_num_buckets,
            relative_attention_max_distance=cfg.relative_attention_max_distance,
            dropout_rate=cfg.hidden_dropout, layer_norm_epsilon=cfg.layernorm_epsilon,
            feed_forward_proj=cfg.feed_forward_proj,
            tie_word_embeddings=cfg.tie_word_embeddings, use_cache=False,
            attn_implementation="sdpa"))

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids=batch["encoder_input_ids"],
                         decoder_input_ids=batch["decoder_input_ids"], labels=batch["labels"])
        return out.loss, batch["loss_mask"].sum()


T5_HF = HFConverter(
    model_types=("t5",), config_from_hf=t5_config_from_hf, state_from_hf=t5_state_from_hf,
    config_to_hf=hf_config_from_t5, state_to_hf=t5_state_to_hf, save_tokenizer=save_t5_tokenizer,
    tokenizer_convention="transformers' T5Tokenizer appends </s> to every encoded text; our "
                         "objectives' encoder inputs carry none, so an import sets "
                         "append_eos_to_source (and decoder_start_token_id from config.json).")

register(ModelSpec(
    name="t5", config_cls=T5Config, build=build_t5, build_data=t5_datasets,
    objective="t5_mixed", data_config_cls=T5DataConfig,
    batch_keys=("encoder_input_ids", "decoder_input_ids", "labels", "loss_mask"),
    flops_per_sample=flops_per_sample, tokens_per_sample=tokens_per_sample,
    generation="seq2seq", hf=T5_HF, benchmark_peer=HFT5Peer,
    # Either half of LongLM's mixture alone.
    objectives={
        "span_corruption": lambda data, path: dataclasses.replace(data, continuation_weight=0.0),
        "continuation": lambda data, path: dataclasses.replace(data,
                                                               span_corruption_weight=0.0)}))
