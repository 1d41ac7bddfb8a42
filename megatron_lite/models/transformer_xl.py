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
from megatron_lite.data.objectives.xl_stream import XLStreamBatcher
from megatron_lite.data.tokenizer import check_tokenizer_hash
from megatron_lite.models.blocks import (ParallelMLP, check_tp_divisible, layer_norm,
                                         padded_vocab_size)
from megatron_lite.models.registry import ModelSpec, register
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
                 out_init_std: float, site: str):
        super().__init__()
        h = cfg.hidden_size
        self.head_dim = h // cfg.num_attention_heads
        self.local_heads = cfg.num_attention_heads // ps.tp_size
        self.attention_dropout, self.rng, self.site = cfg.attention_dropout, rng, site
        self.qkv = ColumnParallelLinear(h, 3 * h, ps, init_std=cfg.init_std)
        self.relative = ColumnParallelLinear(h, h, ps, init_std=cfg.init_std)
        self.out = RowParallelLinear(h, h, ps, init_std=out_init_std)

    def forward(self, x, mem, pos_emb, r_w_bias, r_r_bias, mask):
        """x [b, s, h] and mem [b, m, h] (both layer-normed), pos_emb [m + s, h] (distances
        m+s-1..0), r_*_bias [local heads, head_dim], mask bool [b, 1, s, m + s]."""
        b, s, _ = x.shape
        keys_in = torch.cat([mem, x], dim=1) if mem.shape[1] else x
        klen = keys_in.shape[1]
        qkv = self.qkv(keys_in).view(b, klen, self.local_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [b, local_heads, klen, head_dim]
        q = q[:, :, klen - s:]
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


class XLLayer(nn.Module):
    def __init__(self, cfg: TransformerXLConfig, layer_idx: int, ps: ParallelState,
                 rng: RNGContext):
        super().__init__()
        self.layer_idx, self.hidden_dropout, self.rng = layer_idx, cfg.hidden_dropout, rng
        # GPT-2 scaled init for the projections writing into the residual stream.
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.ln_attn = layer_norm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.attn = RelativeSelfAttention(cfg, ps, rng, out_init_std=out_std,
                                          site=f"layers.{layer_idx}.attn_probs")
        self.ln_mlp = layer_norm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.mlp = ParallelMLP(cfg.hidden_size, cfg.ffn_size, ps, init_std=cfg.init_std,
                               out_init_std=out_std)

    def _drop(self, x, site):
        # After the row-parallel all-reduce x is replicated, so all TP ranks drop the same units.
        return self.rng.dropout(x, self.hidden_dropout, f"layers.{self.layer_idx}.{site}",
                                tp_region=False, training=self.training)

    def forward(self, x, mem, pos_emb, r_w_bias, r_r_bias, mask):
        # The memory was this layer's input: normed the same way, keys and values see both alike.
        attn = self.attn(self.ln_attn(x), self.ln_attn(mem), pos_emb, r_w_bias, r_r_bias, mask)
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
        mask = xl_mask(doc, mem_open)
        if attention_mask is not None:
            mask = mask & attention_mask
        x = self.rng.dropout(x, self.cfg.hidden_dropout, "embedding", tp_region=False,
                             training=self.training)
        pos_emb = sinusoid(klen, self.cfg.hidden_size, x.device, x.dtype)
        recompute = self.checkpoint_activations and self.training
        inputs = []
        for layer, mem in zip(self.layers, mems):
            inputs.append(x)
            args = (x, mem, pos_emb, self.r_w_bias, self.r_r_bias, mask)
            # The stateless RNG reseeds every dropout from (step, site): the recompute in
            # backward draws the masks the forward drew.
            x = checkpoint(layer, *args, use_reentrant=False) if recompute else layer(*args)
        logits = parallel_lm_logits(self.final_ln(x), self.word_embeddings.weight, self.ps)
        return logits, self._next_memory(mems, inputs, mem_open, doc)

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


def xl_datasets(run, tokenizer, cfg: TransformerXLConfig, ps: ParallelState) -> Datasets:
    """Contiguous streams (xl_stream) over the indexed train/valid prefixes: one row per global
    batch sample, each micro-batch slot of each DP rank continuing its own rows."""
    data = run.data
    if tokenizer is None:
        raise ValueError("no tokenizer: set data.tokenizer in the config or pass --tokenizer DIR")
    if data.finetune_data:
        raise ValueError("transformer_xl pretrains on contiguous streams; it has no prompt/text "
                         "fine-tuning (--finetune-data): fine-tune a gpt model instead")
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
