"""GPT (LingLong): a GPT-3-style pre-LN decoder with optional alternating sparse attention.

    tokens -> word embedding (vocab-parallel) + learned positions -> dropout
           -> num_layers x [x + drop(attn(LN(x))); x + drop(mlp(LN(x)))]
           -> final LN -> logits through the tied word embedding (vocab-parallel shard)

LingLong (Chinese GPT, 106M / 317M) makes every odd layer sparse: a query sees its own block of
`sparse_stride` tokens and the last `sparse_summary` tokens of every earlier block; even layers
stay dense. LingLong-Backward is the same network trained on reversed text (`backward: true`);
only data preparation and generation care about that flag.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from megatron_lite.data.contract import Datasets
from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.objectives.causal_lm import CausalLMDataset
from megatron_lite.data.objectives.prompt_text import PromptTextDataset
from megatron_lite.data.tokenizer import check_tokenizer_hash
from megatron_lite.models.blocks import (MaskCache, ParallelMLP, ParallelSelfAttention,
                                         check_tp_divisible, layer_norm, padded_vocab_size,
                                         position_embedding)
from megatron_lite.models.registry import ModelSpec, register
from megatron_lite.parallel import (ParallelState, RNGContext, VocabParallelEmbedding,
                                    parallel_lm_logits, vocab_parallel_cross_entropy)


@dataclass
class GPTConfig:
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
    max_position_embeddings: int = 1024
    """Rows of the learned position embedding: the longest sequence the model can read."""
    layernorm_epsilon: float = 1e-5
    """LayerNorm epsilon (LingLong uses 1e-8)."""
    hidden_dropout: float = 0.1
    """Dropout on the embedding output and on each residual branch."""
    attention_dropout: float = 0.1
    """Dropout on the attention probabilities."""
    init_std: float = 0.02
    """Std of the normal init; output projections use init_std / sqrt(2 * num_layers) (GPT-2)."""
    sparse_attention: bool = False
    """Make odd layers (1, 3, ...) use the fixed sparse pattern; even layers stay dense."""
    sparse_stride: int = 128
    """Block length of the sparse pattern."""
    sparse_summary: int = 8
    """How many trailing positions of each earlier block a sparse query sees."""
    backward: bool = False
    """LingLong-Backward: trained on reversed text; generation reverses prompt and output."""

    def __post_init__(self):
        self.validate()

    @property
    def ffn_size(self) -> int:
        """The resolved MLP width (ffn_hidden_size, or 4h when it is None)."""
        return self.ffn_hidden_size if self.ffn_hidden_size is not None else 4 * self.hidden_size

    padded_vocab_size = property(padded_vocab_size)

    def is_sparse_layer(self, layer_idx: int) -> bool:
        return self.sparse_attention and layer_idx % 2 == 1

    def validate(self, tp_size: int | None = None) -> None:
        """Check field values (and divisibility by `tp_size` when given); errors name the field."""
        def need(ok, field, why):
            if not ok:
                raise ValueError(f"GPTConfig.{field}={getattr(self, field)!r}: {why}")

        if self.vocab_size is not None:
            need(self.vocab_size >= 1, "vocab_size", "must be a positive integer")
        need(self.make_vocab_size_divisible_by >= 1, "make_vocab_size_divisible_by", "must be >= 1")
        need(self.num_layers >= 1, "num_layers", "must be >= 1")
        need(self.hidden_size >= 1, "hidden_size", "must be >= 1")
        need(self.num_attention_heads >= 1, "num_attention_heads", "must be >= 1")
        need(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
             f"must be divisible by num_attention_heads={self.num_attention_heads}")
        if self.ffn_hidden_size is not None:
            need(self.ffn_hidden_size >= 1, "ffn_hidden_size", "must be >= 1 (or null for 4h)")
        need(self.max_position_embeddings >= 1, "max_position_embeddings", "must be >= 1")
        need(self.layernorm_epsilon > 0, "layernorm_epsilon", "must be > 0")
        need(0 <= self.hidden_dropout < 1, "hidden_dropout", "must be in [0, 1)")
        need(0 <= self.attention_dropout < 1, "attention_dropout", "must be in [0, 1)")
        need(self.init_std > 0, "init_std", "must be > 0")
        if self.sparse_attention:
            need(self.sparse_stride >= 1, "sparse_stride", "must be >= 1")
            need(0 <= self.sparse_summary <= self.sparse_stride, "sparse_summary",
                 f"must be in [0, sparse_stride={self.sparse_stride}]")
        if tp_size is not None:
            check_tp_divisible(self, tp_size, self.ffn_size)


class GPTLayer(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int, ps: ParallelState, rng: RNGContext):
        super().__init__()
        self.layer_idx = layer_idx
        self.sparse = cfg.is_sparse_layer(layer_idx)
        self.hidden_dropout = cfg.hidden_dropout
        self.rng = rng
        # GPT-2 scaled init: each residual branch adds to the stream, so shrink the projections
        # writing into it by sqrt(2 * L) to keep the residual variance independent of depth.
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.ln_attn = layer_norm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.attn = ParallelSelfAttention(
            cfg.hidden_size, cfg.num_attention_heads, ps, rng, init_std=cfg.init_std,
            out_init_std=out_std, attention_dropout=cfg.attention_dropout,
            site=f"layers.{layer_idx}.attn_probs")
        self.ln_mlp = layer_norm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.mlp = ParallelMLP(cfg.hidden_size, cfg.ffn_size, ps, init_std=cfg.init_std,
                               out_init_std=out_std)

    def _drop(self, x, site):
        # After the row-parallel all-reduce x is replicated, so all TP ranks drop the same units.
        return self.rng.dropout(x, self.hidden_dropout, f"layers.{self.layer_idx}.{site}",
                                tp_region=False, training=self.training)

    def forward(self, x, mask=None, is_causal=False, kv_cache=None):
        x = x + self._drop(self.attn(self.ln_attn(x), mask, is_causal, kv_cache, self.layer_idx),
                           "attn_out")
        return x + self._drop(self.mlp(self.ln_mlp(x)), "mlp_out")


class GPTModel(nn.Module):
    """The GPT / LingLong decoder on one TP rank; `forward` returns the rank's vocab shard of logits.

    Parameter names (they seed the TP-invariant init and name checkpoint entries):
    word_embeddings.weight [V_pad/tp, h], position_embeddings.weight [P, h],
    layers.{i}.{ln_attn, ln_mlp}.{weight, bias}, layers.{i}.attn.qkv.{weight, bias} (rows
    [heads, 3, head_dim]), layers.{i}.attn.out.*, layers.{i}.mlp.fc1.*, layers.{i}.mlp.fc2.*,
    final_ln.*; the output head is tied to word_embeddings.
    """

    def __init__(self, cfg: GPTConfig, ps: ParallelState | None = None,
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
        self.layers = nn.ModuleList(GPTLayer(cfg, i, ps, self.rng) for i in range(cfg.num_layers))
        self.final_ln = layer_norm(cfg.hidden_size, cfg.layernorm_epsilon)
        self._masks = MaskCache(cfg.max_position_embeddings)

    def _layer_mask(self, sparse, q_len, k_len, attention_mask, device):
        """(mask, is_causal) for SDPA: plain causal uses the fused path, anything else a bool mask."""
        if not sparse and attention_mask is None and q_len == k_len:
            return None, True
        kind = ("sparse", self.cfg.sparse_stride, self.cfg.sparse_summary) if sparse else ("causal",)
        mask = self._masks.get(kind, q_len, k_len, device)
        if attention_mask is not None:
            mask = mask & attention_mask
        return mask, False

    def forward(self, input_ids, position_ids=None, attention_mask=None, kv_cache=None,
                labels=None, loss_mask=None):
        """Logits shard [b, s, padded_vocab / tp] for `input_ids` [b, s].

        position_ids: [b, s] (default: past_len + arange(s)). attention_mask: optional bool
        [b, 1, s, past_len + s], True = may attend (packed documents kept apart); it is combined
        with the causal (and, on sparse layers, the sparse) pattern. kv_cache: a `KVCache` that
        holds earlier positions and receives this call's keys/values. `labels`/`loss_mask` are
        accepted so `model(**batch)` works, and ignored: `loss(batch)` computes the loss.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        past = kv_cache.seq_len if kv_cache is not None else 0
        total = past + s
        if position_ids is None:
            if total > self.cfg.max_position_embeddings:
                raise ValueError(f"sequence of {total} positions exceeds max_position_embeddings="
                                 f"{self.cfg.max_position_embeddings}")
            position_ids = torch.arange(past, total, device=input_ids.device).expand(b, s)
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool or attention_mask.dim() != 4:
                raise ValueError("attention_mask must be a bool tensor [b, 1, s, past + s] "
                                 f"(True = may attend), got {attention_mask.dtype} "
                                 f"{tuple(attention_mask.shape)}")
            if attention_mask.shape[-2:] != (s, total):
                raise ValueError(f"attention_mask covers {tuple(attention_mask.shape[-2:])} "
                                 f"(queries, keys) but the input has {s} queries and {total} keys")

        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        x = self.rng.dropout(x, self.cfg.hidden_dropout, "embedding", tp_region=False,
                             training=self.training)

        dense = self._layer_mask(False, s, total, attention_mask, input_ids.device)
        sparse = (self._layer_mask(True, s, total, attention_mask, input_ids.device)
                  if self.cfg.sparse_attention else None)
        recompute = self.checkpoint_activations and self.training and kv_cache is None
        for layer in self.layers:
            mask, is_causal = sparse if layer.sparse else dense
            if recompute:
                # The stateless RNG reseeds every dropout from (step, site), so the recompute in
                # backward draws exactly the masks the forward drew.
                x = checkpoint(layer, x, mask, is_causal, use_reentrant=False)
            else:
                x = layer(x, mask, is_causal, kv_cache)
        x = self.final_ln(x)
        return parallel_lm_logits(x, self.word_embeddings.weight, self.ps)

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross entropy over `loss_mask`, number of loss tokens) for a causal-LM batch."""
        missing = [k for k in ("input_ids", "labels", "loss_mask") if k not in batch]
        if missing:
            raise KeyError(f"GPT batch is missing {missing}; a causal-LM batch has input_ids, "
                           "labels, loss_mask, position_ids and optionally attention_mask")
        logits = self(batch["input_ids"], position_ids=batch.get("position_ids"),
                      attention_mask=batch.get("attention_mask"))
        per_token = vocab_parallel_cross_entropy(logits, batch["labels"], self.ps,
                                                 vocab_size=self.cfg.vocab_size)
        mask = batch["loss_mask"].to(per_token.dtype)
        n_tokens = mask.sum()
        return (per_token * mask).sum() / n_tokens.clamp(min=1), n_tokens


def sparse_keys_per_query(seq_len: int, stride: int, summary: int) -> float:
    """Average number of keys a query attends to under the sparse pattern over `seq_len` tokens."""
    total = 0
    for start in range(0, seq_len, stride):
        block, n = start // stride, min(stride, seq_len - start)
        # r + 1 keys of the own block for the r-th query, plus `summary` keys per earlier block.
        total += n * (n + 1) // 2 + n * block * summary
    return total / seq_len


def flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """Model FLOPs (forward + backward) per token: 6·N + 12·L·H·Q·T (PaLM, appendix B).

    6·N: every weight does one multiply-add (2 FLOPs) per token forward and two backward (input
      and weight gradients); N = non-embedding parameters plus the V·h output head once (the head
      is tied to the embedding, but the lookup costs no FLOPs while the head matmul does). V is
      the padded vocabulary: the head computes those columns too.
    12·L·H·Q·T: attention scores (QK^T) and the weighted sum (AV) are matmuls of H·Q per
      (query, key) pair: 2 matmuls x 2 FLOPs x 3 (forward + backward) = 12. Dense layers count all
      T keys, as PaLM does (kernels compute the full square). A sparse layer counts the average
      number of keys its pattern attends (`sparse_keys_per_query`), what a block-sparse kernel
      computes; our masked SDPA path actually computes the full square there as well.
    """
    h, L, f = cfg.hidden_size, cfg.num_layers, cfg.ffn_size
    per_layer = (4 * h             # two LayerNorms
                 + 3 * h * h + 3 * h  # fused QKV
                 + h * h + h          # attention output
                 + h * f + f          # MLP in
                 + f * h + h)         # MLP out
    n_params = L * per_layer + 2 * h + cfg.padded_vocab_size * h
    sparse_layers = sum(cfg.is_sparse_layer(i) for i in range(L))
    keys = (L - sparse_layers) * seq_len
    if sparse_layers:
        keys += sparse_layers * sparse_keys_per_query(seq_len, cfg.sparse_stride, cfg.sparse_summary)
    head_dim = h // cfg.num_attention_heads
    return 6.0 * n_params + 12.0 * cfg.num_attention_heads * head_dim * keys


def flops_per_sample(cfg: GPTConfig, data_cfg) -> float:
    return flops_per_token(cfg, data_cfg.seq_length) * data_cfg.seq_length


def build_gpt(cfg: GPTConfig, ps: ParallelState, rng: RNGContext) -> GPTModel:
    return GPTModel(cfg, ps, rng)


def gpt_datasets(run, tokenizer, model_cfg: GPTConfig, ps: ParallelState) -> Datasets:
    """Causal-LM datasets over the indexed train/valid prefixes, or prompt/text fine-tuning."""
    data, seed = run.data, run.training.seed
    if tokenizer is None:
        raise ValueError("no tokenizer: set data.tokenizer in the config or pass --tokenizer DIR")
    if data.finetune_data:
        train = PromptTextDataset(data.finetune_data, tokenizer, data.seq_length,
                                  truncate=data.truncate, eod_id=tokenizer.eod_id)
        return Datasets(train=train, valid=None)

    def causal(prefix):
        indexed = IndexedDataset(prefix)
        check_tokenizer_hash(indexed.tokenizer_hash, tokenizer, prefix)
        return CausalLMDataset(indexed, data.seq_length, tokenizer.eod_id, seed,
                               reset_position_ids=data.reset_position_ids,
                               reset_attention_mask=data.reset_attention_mask,
                               eod_mask_loss=data.eod_mask_loss, backward=model_cfg.backward)

    if not data.train_data_prefix:
        raise ValueError("no training data: set data.train_data_prefix in the config or pass "
                         "--train-data-prefix PREFIX (made by tools/preprocess_data.py)")
    valid = causal(data.valid_data_prefix) if data.valid_data_prefix else None
    return Datasets(train=causal(data.train_data_prefix), valid=valid)


class GPT2Peer(nn.Module):
    """transformers' GPT2LMHeadModel in a GPTConfig's shape (dense attention, SDPA, the padded
    vocabulary, so its head does the same matmul), taking our causal-LM batches: the reference
    the throughput benchmark times ours against. GPT-2 shifts the labels itself, so it predicts
    s - 1 targets where ours predicts s (a 0.1% gap at s = 1024)."""

    def __init__(self, cfg: GPTConfig, activation: str = "gelu_new"):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel
        self.model = GPT2LMHeadModel(GPT2Config(
            vocab_size=cfg.padded_vocab_size, n_positions=cfg.max_position_embeddings,
            n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_attention_heads,
            n_inner=cfg.ffn_size, activation_function=activation,
            layer_norm_epsilon=cfg.layernorm_epsilon, resid_pdrop=cfg.hidden_dropout,
            embd_pdrop=cfg.hidden_dropout, attn_pdrop=cfg.attention_dropout,
            initializer_range=cfg.init_std, tie_word_embeddings=True, use_cache=False,
            bos_token_id=None, eos_token_id=None, attn_implementation="sdpa"))

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        ids = batch["input_ids"]
        loss = self.model(input_ids=ids, labels=ids).loss
        return loss, torch.tensor(float(ids.numel() - ids.shape[0]))


register(ModelSpec(
    name="gpt", config_cls=GPTConfig, build=build_gpt, build_data=gpt_datasets,
    objective="causal_lm", batch_keys=("input_ids", "labels", "loss_mask"),
    flops_per_sample=flops_per_sample, generation="causal", benchmark_peer=GPT2Peer))
