"""Transformer-XL (Chinese-Transformer-XL): a GPT-3 objective on a decoder with segment memory.

    segment [b, S] -> word embedding (vocab-parallel) -> dropout
        -> num_layers x [x + drop(attn(LN(x), LN(memory))); x + drop(mlp(LN(x)))]
        -> final LN -> logits through the tied word embedding (vocab-parallel shard)

Memory (Dai et al. 2019, section 3.2): layer l keeps its own input of the previous segments,
detached, the last `mem_length` positions. It is normed by the layer's input LayerNorm, as the
segment is, and keys and values are computed over cat(memory, segment); queries only for the
segment, so each segment sees itself causally plus the last M positions before it.

Relative positions (section 3.3): no absolute position embedding. The sinusoids of the distances
klen-1 ... 0 go through each layer's `relative` projection (with a bias) to R, and

    score(i, j) = ((q_i + r_w) . k_j + (q_i + r_r) . R[i - j]) / sqrt(head_dim)

with one pair r_w_bias / r_r_bias [heads, head_dim] shared by every layer (zero at init). The
second term is computed against every distance row and moved into key order by `rel_shift`.
The relative projection's bias adds (q_i + r_r) . bias to every key of query i alike, which the
softmax cancels (its gradient is zero): it is kept for the original checkpoints' layout.

Documents: the batch marks where documents start (`document_start`); a query never sees a key
of an earlier document, in the memory or in its own segment, so the memory is hidden at a
document start and a document starting mid-segment is isolated from the text before it. Which
remembered positions still belong to the open document travels with the memory (`open`).

Tensor parallelism shards heads: the fused q/k/v rows are head-major [heads, 3, head_dim], the
relative projection's rows [heads, head_dim] and r_w/r_r by head (dim 0), so a TP shard is a
block of whole heads and resharding is a plain slice; the output projection is row-parallel.

The memory is the model's per-stream state (`ModelSpec.stream_state`): `loss(batch, memory)`
returns the next one, {"hidden": [num_layers x [b, m, h]], "open": [b, m]}, rows first, which the
trainer carries from step to step per micro-batch slot and saves by global stream row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatron_lite.data.contract import Datasets
from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.objectives.prompt_text import PromptTextDataset
from megatron_lite.data.objectives.xl_stream import XLStreamBatcher
from megatron_lite.data.sampler import TrainingSampler, collate
from megatron_lite.data.tokenizer import check_tokenizer_hash
from megatron_lite.models.blocks import (KVCache, ParallelMLP, check_tp_divisible, fuse_heads,
                                         layer_norm, padded_vocab_size, resize_rows)
from megatron_lite.models.registry import ConversionError, ModelSpec, register
from megatron_lite.parallel import (ColumnParallelLinear, ParallelState, RNGContext,
                                    RowParallelLinear, VocabParallelEmbedding,
                                    parallel_lm_logits, set_init, set_partition_tags,
                                    vocab_parallel_cross_entropy)


@dataclass
class TransformerXLConfig:
    vocab_size: int | None = None
    """True vocabulary size (the tokenizer's). Filled from the tokenizer when a config omits it."""
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this, whatever the TP size (checkpoints reshard)."""
    num_layers: int = 12
    """Number of transformer blocks (each with its own memory)."""
    hidden_size: int = 768
    """Model width h (even: the sinusoids pair a sine and a cosine per frequency)."""
    num_attention_heads: int = 12
    """Attention heads; must divide hidden_size, and TP must divide it."""
    ffn_hidden_size: int | None = None
    """MLP inner width; None means 4 * hidden_size."""
    mem_length: int = 256
    """Positions of the previous segments each layer remembers (0: none, a GPT with relative
    positions)."""
    max_position_embeddings: int = 1024
    """Relative distances the position encoding covers: the longest key span, memory plus
    segment, the model reads."""
    layernorm_epsilon: float = 1e-5
    """LayerNorm epsilon."""
    hidden_dropout: float = 0.1
    """Dropout on the embedding output and on each residual branch."""
    attention_dropout: float = 0.1
    """Dropout on the attention probabilities."""
    init_std: float = 0.02
    """Std of the normal init; output projections use init_std / sqrt(2 * num_layers) (GPT-2)."""

    def __post_init__(self):
        self.validate()

    @property
    def ffn_size(self) -> int:
        """The resolved MLP width (ffn_hidden_size, or 4h when it is None)."""
        return self.ffn_hidden_size if self.ffn_hidden_size is not None else 4 * self.hidden_size

    padded_vocab_size = property(padded_vocab_size)

    def validate(self, tp_size: int | None = None) -> None:
        """Check field values (and divisibility by `tp_size` when given); errors name the field."""
        def need(ok, field, why):
            if not ok:
                raise ValueError(f"TransformerXLConfig.{field}={getattr(self, field)!r}: {why}")

        if self.vocab_size is not None:
            need(self.vocab_size >= 1, "vocab_size", "must be a positive integer")
        need(self.make_vocab_size_divisible_by >= 1, "make_vocab_size_divisible_by", "must be >= 1")
        need(self.num_layers >= 1, "num_layers", "must be >= 1")
        need(self.hidden_size >= 2 and self.hidden_size % 2 == 0, "hidden_size",
             "must be even and >= 2 (sinusoids pair a sine and a cosine)")
        need(self.num_attention_heads >= 1, "num_attention_heads", "must be >= 1")
        need(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
             f"must be divisible by num_attention_heads={self.num_attention_heads}")
        if self.ffn_hidden_size is not None:
            need(self.ffn_hidden_size >= 1, "ffn_hidden_size", "must be >= 1 (or null for 4h)")
        need(self.max_position_embeddings >= 1, "max_position_embeddings", "must be >= 1")
        need(self.mem_length >= 0, "mem_length", "must be >= 0 (0 turns the memory off)")
        need(self.mem_length < self.max_position_embeddings, "mem_length",
             f"the memory plus at least one segment token must fit the "
             f"max_position_embeddings={self.max_position_embeddings} distances the position "
             f"encoding covers; lower mem_length or raise max_position_embeddings")
        need(self.layernorm_epsilon > 0, "layernorm_epsilon", "must be > 0")
        need(0 <= self.hidden_dropout < 1, "hidden_dropout", "must be in [0, 1)")
        need(0 <= self.attention_dropout < 1, "attention_dropout", "must be in [0, 1)")
        need(self.init_std > 0, "init_std", "must be > 0")
        if tp_size is not None:
            check_tp_divisible(self, tp_size, self.ffn_size)


# ---------------------------------------------------------------------------------------------
# Relative positions and the XL mask

def sinusoid(klen: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[klen, dim] embeddings of the distances klen-1, ..., 1, 0 (row r: distance klen-1-r),
    sines then cosines of geometric frequencies (Vaswani et al.), computed in float64."""
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(klen - 1, -1, -1, device=device, dtype=torch.float64),
                         inv_freq)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype)


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """[..., q, k] scores of queries against distance rows (row r: distance k-1-r; the queries
    are the last q of k positions) -> the same scores in key order:
    out[..., i, j] = x[..., i, j + q - 1 - i], the row of distance (k - q + i) - j.

    Exact wherever key j is not in query i's future (j <= k - q + i); elsewhere it holds the next
    query's values (the zero-pad trick), which the causal mask must hide."""
    *lead, q, k = x.shape
    # A zero column before each row, read back as k + 1 rows of q: dropping the first one
    # shifts query i's row left by q - 1 - i.
    padded = F.pad(x, (1, 0))
    return padded.reshape(*lead, k + 1, q)[..., 1:, :].reshape(*lead, q, k)


def xl_mask(doc: torch.Tensor, mem_open: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, m + s] bool, True = may attend: every remembered position still in the open
    document for the queries before the segment's first document start, and the segment's own
    positions causally within one document. doc [b, s]: document starts up to each position
    (0 = the document the memory ends in); mem_open [b, m]."""
    s = doc.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc.device).tril()
    own = causal & (doc[:, :, None] == doc[:, None, :])
    remembered = mem_open[:, None, :] & (doc == 0)[:, :, None]
    return torch.cat([remembered, own], dim=-1)[:, None]


def _head_bias(local_heads: int, head_dim: int) -> nn.Parameter:
    # Per head, so TP shards it by head; zero at init (the positional terms start unbiased).
    p = nn.Parameter(torch.zeros(local_heads, head_dim))
    set_init(p, "zeros")
    set_partition_tags(p, 0)
    return p


class RelativeSelfAttention(nn.Module):
    """Heads sharded over TP: fused head-major q/k/v and the relative projection column-parallel,
    the output row-parallel (its all-reduce is the block's only communication)."""

    def __init__(self, cfg: TransformerXLConfig, ps: ParallelState, rng: RNGContext, *,
                 out_init_std: float, layer_idx: int):
        super().__init__()
        h = cfg.hidden_size
        self.head_dim = h // cfg.num_attention_heads
        self.local_heads = cfg.num_attention_heads // ps.tp_size
        self.attention_dropout, self.rng = cfg.attention_dropout, rng
        self.layer_idx, self.site = layer_idx, f"layers.{layer_idx}.attn_probs"
        self.qkv = ColumnParallelLinear(h, 3 * h, ps, init_std=cfg.init_std)
        self.relative = ColumnParallelLinear(h, h, ps, init_std=cfg.init_std)
        self.out = RowParallelLinear(h, h, ps, init_std=out_init_std)

    def forward(self, x, mem, pos_emb, r_w_bias, r_r_bias, mask, cache=None):
        """x [b, s, h] and mem [b, m, h] (both layer-normed), pos_emb [m + s, h] (distances
        m+s-1..0), r_*_bias [local heads, head_dim], mask bool [b, 1, s, m + s]. With a
        `RollingKVCache` (generation), mem is None and the memory's keys/values come from it."""
        b, s, _ = x.shape
        keys_in = x if cache is not None or not mem.shape[1] else torch.cat([mem, x], dim=1)
        klen = keys_in.shape[1]
        qkv = self.qkv(keys_in).view(b, klen, self.local_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [b, local_heads, klen, head_dim]
        q = q[:, :, klen - s:]
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
            klen = k.shape[2]
        r = self.relative(pos_emb).view(klen, self.local_heads, self.head_dim).transpose(0, 1)
        scale = self.head_dim ** -0.5
        position = rel_shift(torch.matmul(q + r_r_bias[:, None], r.transpose(1, 2)))
        # The positional term enters SDPA as an additive mask; masked entries (where rel_shift
        # is wrong, and other documents) become -inf.
        bias = (position * scale).masked_fill(~mask, float("-inf"))
        p = self.attention_dropout if self.training else 0.0
        if p > 0:
            # Heads differ per TP rank, so their dropout masks must too (tp_region=True).
            with self.rng.fork(self.site, tp_region=True):
                ctx = F.scaled_dot_product_attention(q + r_w_bias[:, None], k, v, attn_mask=bias,
                                                     dropout_p=p, scale=scale)
        else:
            ctx = F.scaled_dot_product_attention(q + r_w_bias[:, None], k, v, attn_mask=bias,
                                                 scale=scale)
        return self.out(ctx.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim))


class RollingKVCache(KVCache):
    """Generation's memory as keys and values: per layer those of the last `mem_length` positions
    (this rank's heads), so a step projects only its new tokens instead of recomputing the
    memory's keys/values from its hidden states. Positions are relative, so a key does not
    depend on where it sits and the window simply rolls."""

    def __init__(self, num_layers: int, mem_length: int):
        super().__init__(num_layers)
        self.mem_length = mem_length

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """The keys/values a segment attends to (memory, then its own), keeping the last
        mem_length of them for the next one: what `_next_memory` keeps of the hidden states."""
        k, v = super().update(layer_idx, k, v)
        start = max(k.shape[2] - self.mem_length, 0)
        self.keys[layer_idx], self.values[layer_idx] = k[:, :, start:], v[:, :, start:]
        return k, v


class XLLayer(nn.Module):
    def __init__(self, cfg: TransformerXLConfig, layer_idx: int, ps: ParallelState,
                 rng: RNGContext):
        super().__init__()
        self.layer_idx, self.hidden_dropout, self.rng = layer_idx, cfg.hidden_dropout, rng
        # GPT-2 scaled init for the projections writing into the residual stream.
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.ln_attn = layer_norm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.attn = RelativeSelfAttention(cfg, ps, rng, out_init_std=out_std, layer_idx=layer_idx)
        self.ln_mlp = layer_norm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.mlp = ParallelMLP(cfg.hidden_size, cfg.ffn_size, ps, init_std=cfg.init_std,
                               out_init_std=out_std)

    def _drop(self, x, site):
        # After the row-parallel all-reduce x is replicated, so all TP ranks drop the same units.
        return self.rng.dropout(x, self.hidden_dropout, f"layers.{self.layer_idx}.{site}",
                                tp_region=False, training=self.training)

    def forward(self, x, mem, pos_emb, r_w_bias, r_r_bias, mask, cache=None):
        # The memory was this layer's input: normed the same way, keys and values see both alike.
        mem = None if cache is not None else self.ln_attn(mem)
        attn = self.attn(self.ln_attn(x), mem, pos_emb, r_w_bias, r_r_bias, mask, cache)
        x = x + self._drop(attn, "attn_out")
        return x + self._drop(self.mlp(self.ln_mlp(x)), "mlp_out")


class TransformerXLModel(nn.Module):
    """The Transformer-XL decoder on one TP rank; `forward` returns (the rank's vocab shard of
    logits, the next memory).

    Parameter names: word_embeddings.weight [V_pad/tp, h], r_w_bias and r_r_bias
    [heads/tp, head_dim], layers.{i}.{ln_attn, ln_mlp}.*, layers.{i}.attn.qkv.* (rows
    [heads, 3, head_dim]), layers.{i}.attn.relative.* (rows [heads, head_dim]),
    layers.{i}.attn.out.*, layers.{i}.mlp.{fc1, fc2}.*, final_ln.*; the output head is tied to
    word_embeddings.
    """

    def __init__(self, cfg: TransformerXLConfig, ps: ParallelState | None = None,
                 rng: RNGContext | None = None):
        super().__init__()
        ps = ps if ps is not None else ParallelState.single()
        cfg.validate(ps.tp_size)
        self.cfg, self.ps = cfg, ps
        self.rng = rng if rng is not None else RNGContext(0, ps.dp_rank, ps.tp_rank)
        self.checkpoint_activations = False
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        local_heads = cfg.num_attention_heads // ps.tp_size
        self.word_embeddings = VocabParallelEmbedding(cfg.padded_vocab_size, cfg.hidden_size, ps,
                                                      init_std=cfg.init_std)
        self.r_w_bias = _head_bias(local_heads, head_dim)
        self.r_r_bias = _head_bias(local_heads, head_dim)
        self.layers = nn.ModuleList(XLLayer(cfg, i, ps, self.rng) for i in range(cfg.num_layers))
        self.final_ln = layer_norm(cfg.hidden_size, cfg.layernorm_epsilon)

    def _memory(self, memory, b: int, like: torch.Tensor):
        """(per-layer hidden [b, m, h], open [b, m]) of a memory, or empty ones for None."""
        if memory is None:
            empty = like.new_zeros(b, 0, self.cfg.hidden_size)
            return [empty] * self.cfg.num_layers, torch.zeros(b, 0, dtype=torch.bool,
                                                              device=like.device)
        hidden, open_ = memory["hidden"], memory["open"]
        if len(hidden) != self.cfg.num_layers or open_.shape[0] != b:
            raise ValueError(f"the memory holds {len(hidden)} layers x {open_.shape[0]} rows, but "
                             f"the model has {self.cfg.num_layers} layers and the batch {b} rows: "
                             f"pass the memory this model returned for the same rows")
        return ([t.to(device=like.device, dtype=like.dtype) for t in hidden],
                open_.to(like.device))

    def forward(self, input_ids, memory=None, document_start=None, attention_mask=None,
                position_ids=None, labels=None, loss_mask=None):
        """(logits shard [b, s, padded_vocab / tp], next memory) of a segment `input_ids` [b, s].

        memory: what this model returned for the previous segment of the same rows, or None.
        document_start: optional bool [b, s], True where a document begins (nothing before it is
        seen). attention_mask: optional bool [b, 1, s, m + s] (True = may attend), combined with
        the XL mask. position_ids, labels and loss_mask are accepted so `model(**batch)` works,
        and ignored (positions are relative; `loss` computes the loss)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        x = self.word_embeddings(input_ids)
        mems, mem_open = self._memory(memory, b, x)
        klen = mem_open.shape[1] + s
        if klen > self.cfg.max_position_embeddings:
            raise ValueError(f"{mem_open.shape[1]} remembered + {s} segment positions exceed "
                             f"max_position_embeddings={self.cfg.max_position_embeddings}")
        if document_start is None:
            document_start = torch.zeros(b, s, dtype=torch.bool, device=input_ids.device)
        doc = document_start.long().cumsum(dim=1)
        read, read_open = mems, mem_open
        if attention_mask is None and mem_open.shape[1] and bool(document_start[:, 0].all()):
            # Every row starts a document (prompt/text fine-tuning): the mask would hide the whole
            # memory, so it is not read at all (the next memory is the same either way).
            read, read_open = [m[:, :0] for m in mems], mem_open[:, :0]
            klen = s
        mask = xl_mask(doc, read_open)
        if attention_mask is not None:
            mask = mask & attention_mask
        x = self.rng.dropout(x, self.cfg.hidden_dropout, "embedding", tp_region=False,
                             training=self.training)
        pos_emb = sinusoid(klen, self.cfg.hidden_size, x.device, x.dtype)
        recompute = self.checkpoint_activations and self.training
        inputs = []
        for layer, mem in zip(self.layers, read):
            inputs.append(x)
            args = (x, mem, pos_emb, self.r_w_bias, self.r_r_bias, mask)
            # The stateless RNG reseeds every dropout from (step, site): the recompute in
            # backward draws the masks the forward drew.
            x = checkpoint(layer, *args, use_reentrant=False) if recompute else layer(*args)
        logits = parallel_lm_logits(self.final_ln(x), self.word_embeddings.weight, self.ps)
        return logits, self._next_memory(mems, inputs, mem_open, doc)

    def generation_cache(self) -> RollingKVCache:
        """An empty memory for `forward_cached` (generation's rolling keys/values)."""
        return RollingKVCache(self.cfg.num_layers, self.cfg.mem_length)

    def forward_cached(self, input_ids, cache: RollingKVCache):
        """Generation: the logits shard of `input_ids` [b, s] continuing the text whose last
        positions' keys/values `cache` holds (empty at the start), which it then rolls on. Equal
        to `forward(input_ids, memory)` with the hidden-state memory of the same positions; no
        documents (the text is one)."""
        b, s = input_ids.shape
        m = cache.seq_len
        if m + s > self.cfg.max_position_embeddings:
            raise ValueError(f"{m} remembered + {s} segment positions exceed "
                             f"max_position_embeddings={self.cfg.max_position_embeddings}")
        x = self.word_embeddings(input_ids)
        pos_emb = sinusoid(m + s, self.cfg.hidden_size, x.device, x.dtype)
        mask = torch.ones(s, m + s, dtype=torch.bool, device=x.device).tril(m)[None, None]
        for layer in self.layers:
            x = layer(x, None, pos_emb, self.r_w_bias, self.r_r_bias, mask, cache)
        return parallel_lm_logits(self.final_ln(x), self.word_embeddings.weight, self.ps)

    def _next_memory(self, mems, inputs, mem_open, doc) -> dict:
        """The last mem_length positions of cat(memory, segment) of every layer's input, detached,
        and which of them are in the document still open at the segment's end."""
        last = doc[:, -1:]
        open_ = torch.cat([mem_open & (last == 0), doc == last], dim=1)
        start = max(open_.shape[1] - self.cfg.mem_length, 0)
        hidden = [torch.cat([m, x], dim=1)[:, start:].detach() for m, x in zip(mems, inputs)]
        return {"hidden": hidden, "open": open_[:, start:]}

    def loss(self, batch: dict, memory=None):
        """(mean cross entropy over `loss_mask`, number of loss tokens, next memory)."""
        missing = [k for k in ("input_ids", "labels", "loss_mask") if k not in batch]
        if missing:
            raise KeyError(f"Transformer-XL batch is missing {missing}; an xl_stream batch has "
                           "input_ids, labels, loss_mask, position_ids and document_start")
        logits, memory = self(batch["input_ids"], memory=memory,
                              document_start=batch.get("document_start"))
        per_token = vocab_parallel_cross_entropy(logits, batch["labels"], self.ps,
                                                 vocab_size=self.cfg.vocab_size)
        mask = batch["loss_mask"].to(per_token.dtype)
        n_tokens = mask.sum()
        return (per_token * mask).sum() / n_tokens.clamp(min=1), n_tokens, memory


# ---------------------------------------------------------------------------------------------
# Chinese-Transformer-XL's released checkpoint (tools/convert_txl.py)
#
# The release is one `mp_rank_00_model_states.pt` (MP=1) whose `module` holds GPT2Model's names.
# Its fused query_key_value rows are [q; k; v], each [heads, head_dim] (at MP=1 the stride-3
# ColumnParallelLinear's three blocks), where ours are head-major [heads, 3, head_dim].

_RELEASED_NAMES = {  # theirs -> ours, {i}: layer index
    "word_embeddings.weight": "word_embeddings.weight",
    "transformer.r_w_bias": "r_w_bias",
    "transformer.r_r_bias": "r_r_bias",
    "transformer.final_layernorm.weight": "final_ln.weight",
    "transformer.final_layernorm.bias": "final_ln.bias",
    **{f"transformer.layers.{{i}}.{theirs}.{kind}": f"layers.{{i}}.{ours}.{kind}"
       for theirs, ours in (("input_layernorm", "ln_attn"),
                            ("attention.query_key_value", "attn.qkv"),
                            ("attention.relative", "attn.relative"),
                            ("attention.dense", "attn.out"),
                            ("post_attention_layernorm", "ln_mlp"),
                            ("mlp.dense_h_to_4h", "mlp.fc1"), ("mlp.dense_4h_to_h", "mlp.fc2"))
       for kind in ("weight", "bias")},
}
_RELEASED_BUFFERS = ("transformer.position_embeddings.inv_freq",)  # the sinusoids' frequencies


def _released_template(name: str) -> tuple[str, int | None]:
    """(the name with its layer index as {i}, the index) of one of their parameter names."""
    parts = name.split(".")
    if len(parts) > 3 and parts[:2] == ["transformer", "layers"] and parts[2].isdigit():
        return ".".join(parts[:2] + ["{i}"] + parts[3:]), int(parts[2])
    return name, None


def released_config(state: dict, vocab_size: int, **fields) -> TransformerXLConfig:
    """Our config for their weights `state` (their names); `fields` give what the weights do not
    say (mem_length, max_position_embeddings, ...). Unknown names are a ConversionError listing
    the first few."""
    unknown = [n for n in state if n not in _RELEASED_BUFFERS
               and _released_template(n)[0] not in _RELEASED_NAMES]
    if unknown:
        raise ConversionError(f"{len(unknown)} parameter name(s) are not Chinese-Transformer-XL's "
                              f"(GPT2Model with --transformer-xl), e.g. {unknown[:4]}; give its "
                              f"released mp_rank_00_model_states.pt")
    missing = [k for k in ("word_embeddings.weight", "transformer.r_w_bias") if k not in state]
    if missing:
        raise ConversionError(f"no {missing[0]} among the weights: not a Transformer-XL "
                              f"(--transformer-xl) checkpoint of Chinese-Transformer-XL")
    rows, hidden = state["word_embeddings.weight"].shape
    if rows < vocab_size:
        raise ConversionError(f"word_embeddings.weight has {rows} rows but the vocabulary "
                              f"{vocab_size} ids: give the sentencepiece model it was trained with")
    layers = 1 + max((_released_template(n)[1] for n in state
                      if _released_template(n)[1] is not None), default=-1)
    heads = state["transformer.r_w_bias"].shape[0]
    fc1 = state.get("transformer.layers.0.mlp.dense_h_to_4h.weight")
    ffn = fc1.shape[0] if fc1 is not None else None  # (a missing weight is named when sharding)
    try:
        return TransformerXLConfig(vocab_size=vocab_size, num_layers=layers, hidden_size=hidden,
                                   num_attention_heads=heads, ffn_hidden_size=ffn, **fields)
    except ValueError as e:
        raise ConversionError(str(e)) from None


def state_from_released(state: dict, cfg: TransformerXLConfig) -> dict:
    """Our full (TP=1) state dict, float32, from their weights (names checked by
    `released_config`); the vocabulary rows cut or zero-padded to our padded size."""
    heads = cfg.num_attention_heads
    out = {}
    for name, tensor in state.items():
        if name in _RELEASED_BUFFERS:
            continue
        template, i = _released_template(name)
        ours = _RELEASED_NAMES[template].format(i=i)
        tensor = tensor.float()
        if template.startswith("transformer.layers.{i}.attention.query_key_value."):
            tensor = fuse_heads(list(tensor.chunk(3, dim=0)), heads)  # [q; k; v] -> head-major
        elif ours == "word_embeddings.weight":
            tensor = resize_rows(tensor[:cfg.vocab_size], cfg.padded_vocab_size)
        out[ours] = tensor.contiguous()
    return out


# ---------------------------------------------------------------------------------------------
# FLOPs, data, registration

def flops_per_sample(cfg: TransformerXLConfig, data_cfg) -> float:
    """Model FLOPs (forward + backward) of one segment of S tokens read with a full memory of M
    positions, K = S + M keys (PaLM's 6N + attention, appendix B):

    6 x weights x positions: a weight does one multiply-add (2 FLOPs) per position it is applied
      to forward and two backward (input and weight gradients).
      - per segment token: the attention output, the MLP, the LayerNorms and the V x h output
        head (tied to the embedding, but the head matmul costs FLOPs where the lookup does not;
        V is the padded vocabulary, which the head computes too);
      - per key position (K): the fused q/k/v projection, run over cat(memory, segment) (the
        memory's keys and values are recomputed each segment, its queries computed and
        dropped), and the relative projection of the K distance embeddings, counted per
        sample as for a micro-batch of one (a micro-batch of b shares it).
    18 x L x h x S x K: three matmuls of h per (query, key) pair, the content scores
      (q + r_w)k, the position scores (q + r_r)R and the weighted sum of values, at 2 FLOPs x 3
      (forward + backward); every query counts all K keys, as PaLM does (the kernel computes the
      whole rectangle and masks the future).
    """
    h, L, f = cfg.hidden_size, cfg.num_layers, cfg.ffn_size
    s = data_cfg.seq_length
    k = s + cfg.mem_length
    per_token = (L * (h * h + h          # attention output
                      + 2 * h              # MLP LayerNorm
                      + h * f + f          # MLP in
                      + f * h + h)         # MLP out
                 + 2 * h + cfg.padded_vocab_size * h)  # final LayerNorm, output head
    per_key = L * (2 * h                   # attention LayerNorm (memory and segment)
                   + 3 * h * h + 3 * h     # fused q/k/v
                   + h * h + h)            # relative projection
    return 6.0 * (per_token * s + per_key * k) + 18.0 * L * h * s * k


def build_transformer_xl(cfg: TransformerXLConfig, ps: ParallelState,
                         rng: RNGContext) -> TransformerXLModel:
    return TransformerXLModel(cfg, ps, rng)


class PromptTextStream:
    """Prompt/text fine-tuning (`--finetune-data`, the loss on the text only) as the stream a
    model with per-stream state trains on: global row g of step t is pair t * G + g of the
    sampler's shuffled order (the order a map-style dataset would be read in), and every pair is
    a document of its own (`document_start` at its first position), so no memory crosses pairs
    and the model skips reading it."""

    def __init__(self, dataset, batch_size: int, seed: int, dp_rank: int = 0, dp_size: int = 1,
                 *, accumulation: int = 1):
        self.dataset, self.batch_size, self.seed = dataset, int(batch_size), int(seed)
        self.dp_rank, self.dp_size, self.slots = int(dp_rank), int(dp_size), int(accumulation)
        self.global_rows = self.batch_size * self.dp_size * self.slots
        self.order = TrainingSampler(len(dataset), 1, 0, 1, seed=self.seed)
        self.step, self.slot = 0, 0

    @classmethod
    def for_run(cls, dataset, run, dp_rank: int, dp_size: int) -> "PromptTextStream":
        tcfg = run.training
        accumulation = max(1, tcfg.global_batch_size // (tcfg.micro_batch_size * dp_size))
        return cls(dataset, tcfg.micro_batch_size, tcfg.seed, dp_rank, dp_size,
                   accumulation=accumulation)

    def batch(self, step: int, slot: int = 0) -> dict:
        first = self.rows(slot)[0]
        indices = self.order.global_indices(step * self.global_rows + first, self.batch_size)
        batch = collate([self.dataset[i] for i in indices])
        starts = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        starts[:, 0] = True
        return dict(batch, document_start=starts)

    # The same split of global rows into slots and DP ranks, walked slot by slot, step by step.
    rows = XLStreamBatcher.rows
    __iter__, __next__ = XLStreamBatcher.__iter__, XLStreamBatcher.__next__

    def state_dict(self) -> dict:
        return {"step": self.step, "slot": self.slot, "global_rows": self.global_rows,
                "seed": self.seed}

    def load_state_dict(self, state: dict, *, regroup: bool = False) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(f"the fine-tuning position was saved with seed {state.get('seed')}, "
                             f"this run has {self.seed}; resume with the same --seed")
        step, slot, rows = int(state["step"]), int(state["slot"]), int(state["global_rows"])
        if rows != self.global_rows:
            if not regroup or slot:
                raise ValueError(f"the fine-tuning position was saved with a global batch of "
                                 f"{rows}, this run has {self.global_rows}; resume with the same "
                                 f"global batch size")
            # Pairs are independent: the new rows start at the first pair not yet read.
            step, slot = -(-step * rows // self.global_rows), 0
        self.step, self.slot = step, slot


def xl_datasets(run, tokenizer, cfg: TransformerXLConfig, ps: ParallelState) -> Datasets:
    """Contiguous streams (xl_stream) over the indexed train/valid prefixes: one row per global
    batch sample, each micro-batch slot of each DP rank continuing its own rows."""
    data = run.data
    if tokenizer is None:
        raise ValueError("no tokenizer: set data.tokenizer in the config or pass --tokenizer DIR")
    if data.finetune_data:
        pairs = PromptTextDataset(data.finetune_data, tokenizer, data.seq_length,
                                  truncate=data.truncate, eod_id=tokenizer.eod_id)
        return Datasets(train=PromptTextStream.for_run(pairs, run, ps.dp_rank, ps.dp_size))
    if not data.train_data_prefix:
        raise ValueError("no training data: set data.train_data_prefix in the config or pass "
                         "--train-data-prefix PREFIX (made by tools/preprocess_data.py)")
    keys = data.seq_length + cfg.mem_length
    if keys > cfg.max_position_embeddings:
        raise ValueError(f"--seq-length {data.seq_length} plus mem_length {cfg.mem_length} is "
                         f"{keys} key positions, more than the max_position_embeddings="
                         f"{cfg.max_position_embeddings} distances the position encoding covers; "
                         f"lower one of them or raise max_position_embeddings")

    def streams(prefix, validation):
        indexed = IndexedDataset(prefix)
        check_tokenizer_hash(indexed.tokenizer_hash, tokenizer, prefix)
        return XLStreamBatcher.for_run(indexed, run, tokenizer.eod_id, ps.dp_rank, ps.dp_size,
                                       validation=validation)

    valid = streams(data.valid_data_prefix, True) if data.valid_data_prefix else None
    return Datasets(train=streams(data.train_data_prefix, False), valid=valid)


register(ModelSpec(
    name="transformer_xl", config_cls=TransformerXLConfig, build=build_transformer_xl,
    build_data=xl_datasets, objective="xl_stream",
    batch_keys=("input_ids", "labels", "loss_mask", "document_start"),
    flops_per_sample=flops_per_sample, generation="recurrent", stream_state=True))
