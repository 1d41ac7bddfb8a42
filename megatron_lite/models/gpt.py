"""GPT (LingLong): a GPT-3-style pre-LN decoder with optional alternating sparse attention.

    tokens -> word embedding (vocab-parallel) + learned positions -> dropout
           -> num_layers x [x + drop(attn(LN(x))); x + drop(mlp(LN(x)))]
           -> final LN -> logits through the tied word embedding (vocab-parallel shard)

LingLong (Chinese GPT, 106M / 317M) makes every odd layer sparse: a query sees its own block of
`sparse_stride` tokens and the last `sparse_summary` tokens of every earlier block; even layers
stay dense. Sparse layers compute only those blocks (`blocks.block_sparse_attention`), except
under a KV cache or a packed-document mask, where the pattern is a mask on SDPA.
LingLong-Backward is the same network trained on reversed text (`backward: true`); only data
preparation and generation care about that flag.
"""
from __future__ import annotations

import dataclasses
import math
import os
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
                                         check_tp_divisible, fuse_heads, layer_norm,
                                         padded_vocab_size, position_embedding, resize_rows,
                                         split_heads)
from megatron_lite.models.registry import ConversionError, HFConverter, ModelSpec, register
from megatron_lite.parallel import (ParallelState, RNGContext, VocabParallelEmbedding,
                                    parallel_lm_logits, tied_gradient,
                                    vocab_parallel_cross_entropy,
                                    vocab_parallel_linear_cross_entropy)


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

    def forward(self, x, mask=None, is_causal=False, kv_cache=None, sparse=None):
        """`sparse=(stride, summary)` runs the attention block-sparse, in place of mask/is_causal."""
        x = x + self._drop(self.attn(self.ln_attn(x), mask, is_causal, kv_cache, self.layer_idx,
                                     sparse), "attn_out")
        return x + self._drop(self.mlp(self.ln_mlp(x)), "mlp_out")


class GPTModel(nn.Module):
    """The GPT / LingLong decoder on one TP rank; `forward` returns the rank's vocab shard of logits.

    Parameter names (they seed the TP-invariant init and name checkpoint entries):
    word_embeddings.weight [V_pad/tp, h], position_embeddings.weight [P, h],
    layers.{i}.{ln_attn, ln_mlp}.{weight, bias}, layers.{i}.attn.qkv.{weight, bias} (rows
    [heads, 3, head_dim]), layers.{i}.attn.out.*, layers.{i}.mlp.fc1.*, layers.{i}.mlp.fc2.*,
    final_ln.*; the output head is tied to word_embeddings.
    """

    # Sparse layers of a plain causal forward (no KV cache, no attention_mask) compute only the
    # blocks their pattern attends (`block_sparse_attention`); False (on a model, or on the class
    # for a whole run) sends them through masked SDPA over the whole square: the reference the
    # tests compare against, which also draws the attention-dropout masks runs before it drew.
    block_sparse = True
    # `loss` runs the output head and the cross entropy in chunks of tokens
    # (`vocab_parallel_linear_cross_entropy`): the full logits never exist. False: logits, then
    # the cross entropy, as before (the reference, and the summation order recorded runs used).
    fused_head_loss = True

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
                labels=None, loss_mask=None, head_loss=False):
        """Logits shard [b, s, padded_vocab / tp] for `input_ids` [b, s].

        position_ids: [b, s] (default: past_len + arange(s)). attention_mask: optional bool
        [b, 1, s, past_len + s], True = may attend (packed documents kept apart); it is combined
        with the causal (and, on sparse layers, the sparse) pattern. kv_cache: a `KVCache` that
        holds earlier positions and receives this call's keys/values. `labels`/`loss_mask` are
        accepted so `model(**batch)` works, and ignored: `loss(batch)` computes the loss.
        head_loss: return `loss`'s (mean loss, number of loss tokens) of `labels`/`loss_mask`
        instead of the logits. It is computed here, inside forward, because ZeRO-3 gathers a
        partitioned weight (the tied head's) only while a forward runs.
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

        tied = tied_gradient(head_loss and self.fused_head_loss)  # the head is the embedding
        x = self.word_embeddings(input_ids, tied) + self.position_embeddings(position_ids)
        x = self.rng.dropout(x, self.cfg.hidden_dropout, "embedding", tp_region=False,
                             training=self.training)

        dense = self._layer_mask(False, s, total, attention_mask, input_ids.device)
        blocks = None  # (stride, summary) when the sparse layers run block-sparse
        sparse = None
        if self.cfg.sparse_attention:
            if self.block_sparse and kv_cache is None and attention_mask is None:
                blocks = (self.cfg.sparse_stride, self.cfg.sparse_summary)
                sparse = (None, False)
            else:  # generation steps and packed documents: the pattern as a mask
                sparse = self._layer_mask(True, s, total, attention_mask, input_ids.device)
        recompute = self.checkpoint_activations and self.training and kv_cache is None
        for layer in self.layers:
            mask, is_causal = sparse if layer.sparse else dense
            layer_blocks = blocks if layer.sparse else None
            if recompute:
                # The stateless RNG reseeds every dropout from (step, site), so the recompute in
                # backward draws exactly the masks the forward drew.
                x = checkpoint(layer, x, mask, is_causal, None, layer_blocks, use_reentrant=False)
            else:
                x = layer(x, mask, is_causal, kv_cache, layer_blocks)
        x = self.final_ln(x)
        if head_loss:
            return self._head_loss(x, labels, loss_mask, tied)
        return parallel_lm_logits(x, self.word_embeddings.weight, self.ps)

    def _head_loss(self, hidden, labels, loss_mask, tied=None):
        if self.fused_head_loss:
            return vocab_parallel_linear_cross_entropy(
                hidden, self.word_embeddings.weight, labels, loss_mask, self.ps,
                vocab_size=self.cfg.vocab_size, tied=tied)
        logits = parallel_lm_logits(hidden, self.word_embeddings.weight, self.ps)
        per_token = vocab_parallel_cross_entropy(logits, labels, self.ps,
                                                 vocab_size=self.cfg.vocab_size)
        mask = loss_mask.to(per_token.dtype)
        n_tokens = mask.sum()
        return (per_token * mask).sum() / n_tokens.clamp(min=1), n_tokens

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross entropy over `loss_mask`, number of loss tokens) for a causal-LM batch."""
        missing = [k for k in ("input_ids", "labels", "loss_mask") if k not in batch]
        if missing:
            raise KeyError(f"GPT batch is missing {missing}; a causal-LM batch has input_ids, "
                           "labels, loss_mask, position_ids and optionally attention_mask")
        return self(batch["input_ids"], position_ids=batch.get("position_ids"),
                    attention_mask=batch.get("attention_mask"), labels=batch["labels"],
                    loss_mask=batch["loss_mask"], head_loss=True)


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
      T keys, as PaLM does. A sparse layer counts the average number of keys its pattern attends
      (`sparse_keys_per_query`): what `block_sparse_attention` computes in training and
      evaluation, give or take the masked entries of its kernel tiles (above the diagonal of an
      own block; later blocks' summary rows inside one summary call). Generation steps and
      packed-document masks still run those layers as masked SDPA over the whole square.
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


# ---------------------------------------------------------------------------------------------
# Hugging Face interop (tools/convert_hf.py): transformers' GPT2LMHeadModel, for dense configs.
#
# The block is GPT-2's: pre-LN, learned positions, tanh GELU ("gelu_new"), a head tied to the
# embedding, 1/sqrt(head_dim) attention. GPT-2 keeps its projections as Conv1D ([in, out], the
# transpose of our Linear) and its fused q|k|v columns q-block, k-block, v-block; ours are
# head-major rows ([heads, 3, head_dim]) so a TP shard is a block of whole heads. Vocabulary as
# for T5: import copies the rows the tokenizer uses into our padded table, export writes exactly
# vocab_size rows. GPT-2's byte-level BPE has no counterpart among our tokenizers: an imported
# directory needs one of ours (--tokenizer DIR, or the megatron_lite_tokenizer/ an export leaves).

_GPT2_GELU = ("gelu_new", "gelu_pytorch_tanh")  # both the tanh approximation ours computes


def gpt_config_from_hf(hf_cfg: dict, hf_sd: dict, tokenizer) -> GPTConfig:
    """Our config from a GPT2 config.json, checked against its weights and our tokenizer."""
    def refuse(key, why):
        raise ConversionError(f"config.json: {key}={hf_cfg.get(key)!r}: {why}")
    if hf_cfg.get("activation_function", "gelu_new") not in _GPT2_GELU:
        refuse("activation_function", f"our GPT computes the tanh GELU ({_GPT2_GELU[0]}) only")
    if hf_cfg.get("tie_word_embeddings", True) is False:
        refuse("tie_word_embeddings", "our GPT's output head is its embedding")
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf_cfg.get(key):
            refuse(key, "our GPT has no such option")
    if hf_cfg.get("scale_attn_weights", True) is False:
        refuse("scale_attn_weights", "our attention always scales by 1/sqrt(head_dim)")
    rows = _gpt2_weights(hf_sd)["wte.weight"].shape[0]
    if tokenizer.vocab_size > rows:
        raise ConversionError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's "
                              f"embedding only {rows} rows: they do not belong together")
    return GPTConfig(
        vocab_size=tokenizer.vocab_size, num_layers=int(hf_cfg["n_layer"]),
        hidden_size=int(hf_cfg["n_embd"]), num_attention_heads=int(hf_cfg["n_head"]),
        ffn_hidden_size=hf_cfg.get("n_inner"),
        max_position_embeddings=int(hf_cfg["n_positions"]),
        layernorm_epsilon=float(hf_cfg.get("layer_norm_epsilon", 1e-5)),
        hidden_dropout=float(hf_cfg.get("resid_pdrop", 0.1)),
        attention_dropout=float(hf_cfg.get("attn_pdrop", 0.1)),
        init_std=float(hf_cfg.get("initializer_range", 0.02)))


def _gpt2_weights(hf_sd: dict) -> dict:
    """The GPT2 weights without the `transformer.` prefix (GPT2LMHeadModel's; the original GPT-2
    files have none)."""
    return {k.removeprefix("transformer."): v for k, v in hf_sd.items()}


def _gpt2_map(cfg: GPTConfig) -> list[tuple[str, str, bool]]:
    """(our name, GPT2 name, transposed: a Conv1D weight) of every tensor but q|k|v."""
    pairs = [("position_embeddings.weight", "wpe.weight", False),
             ("final_ln.weight", "ln_f.weight", False), ("final_ln.bias", "ln_f.bias", False)]
    for i in range(cfg.num_layers):
        ours, hf = f"layers.{i}", f"h.{i}"
        for a, b in (("ln_attn", "ln_1"), ("ln_mlp", "ln_2")):
            pairs += [(f"{ours}.{a}.weight", f"{hf}.{b}.weight", False),
                      (f"{ours}.{a}.bias", f"{hf}.{b}.bias", False)]
        for a, b in (("attn.out", "attn.c_proj"), ("mlp.fc1", "mlp.c_fc"),
                     ("mlp.fc2", "mlp.c_proj")):
            pairs += [(f"{ours}.{a}.weight", f"{hf}.{b}.weight", True),
                      (f"{ours}.{a}.bias", f"{hf}.{b}.bias", False)]
    return pairs


def gpt_state_from_hf(hf_sd: dict, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Our full (TP=1) state dict from a GPT2LMHeadModel state dict."""
    weights = _gpt2_weights(hf_sd)

    def get(name):
        if name not in weights:
            raise ConversionError(f"the HF weights lack '{name}'; is this a GPT2LMHeadModel "
                                  f"with {cfg.num_layers} layers?")
        return weights[name]

    heads = cfg.num_attention_heads
    sd = {"word_embeddings.weight": resize_rows(get("wte.weight"), cfg.padded_vocab_size)}
    for ours, theirs, transposed in _gpt2_map(cfg):
        sd[ours] = get(theirs).t() if transposed else get(theirs)
    for i in range(cfg.num_layers):
        w = get(f"h.{i}.attn.c_attn.weight").t()  # [3h, h]: q rows, then k, then v
        b = get(f"h.{i}.attn.c_attn.bias")
        sd[f"layers.{i}.attn.qkv.weight"] = fuse_heads(list(w.chunk(3)), heads)
        sd[f"layers.{i}.attn.qkv.bias"] = fuse_heads(list(b.chunk(3)), heads)
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def _check_exportable(cfg: GPTConfig) -> None:
    if cfg.sparse_attention:
        raise ConversionError(
            "this GPT's odd layers use LingLong's fixed sparse attention (sparse_attention: "
            "true), which GPT2LMHeadModel cannot express (its attention is dense): exported, it "
            "would compute another model. Only dense configs export")


def gpt_state_to_hf(sd: dict, cfg: GPTConfig, tokenizer=None) -> dict[str, torch.Tensor]:
    """A GPT2LMHeadModel state dict (exactly vocab_size rows) from our full state dict."""
    _check_exportable(cfg)
    heads = cfg.num_attention_heads
    hf = {"transformer.wte.weight": sd["word_embeddings.weight"][:cfg.vocab_size]}
    for ours, theirs, transposed in _gpt2_map(cfg):
        hf[f"transformer.{theirs}"] = sd[ours].t() if transposed else sd[ours]
    for i in range(cfg.num_layers):
        q_k_v = split_heads(sd[f"layers.{i}.attn.qkv.weight"], heads, 3)
        hf[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat(q_k_v).t()
        hf[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat(
            split_heads(sd[f"layers.{i}.attn.qkv.bias"], heads, 3))
    return {k: v.contiguous() for k, v in hf.items()}


def gpt_config_to_hf(cfg: GPTConfig, tokenizer) -> dict:
    _check_exportable(cfg)
    eod = tokenizer.eod_id if tokenizer is not None else None
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "vocab_size": cfg.vocab_size, "n_positions": cfg.max_position_embeddings,
            "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers,
            "n_head": cfg.num_attention_heads, "n_inner": cfg.ffn_size,
            "activation_function": "gelu_new", "layer_norm_epsilon": cfg.layernorm_epsilon,
            "resid_pdrop": cfg.hidden_dropout, "embd_pdrop": cfg.hidden_dropout,
            "attn_pdrop": cfg.attention_dropout, "initializer_range": cfg.init_std,
            "tie_word_embeddings": True, "bos_token_id": eod, "eos_token_id": eod,
            "pad_token_id": eod}


def save_gpt_tokenizer(tokenizer, out_dir: str) -> None:
    """Ours beside the weights: GPT-2's tokenizer classes read byte-level BPE only."""
    tokenizer.save(os.path.join(out_dir, "megatron_lite_tokenizer"))


GPT2_HF = HFConverter(
    model_types=("gpt2",), config_from_hf=gpt_config_from_hf, state_from_hf=gpt_state_from_hf,
    config_to_hf=gpt_config_to_hf, state_to_hf=gpt_state_to_hf,
    save_tokenizer=save_gpt_tokenizer,
    tokenizer_convention="GPT-2's byte-level BPE has no counterpart here: the tokenizer travels "
                         "as megatron_lite_tokenizer/ (load it with megatron_lite.data.tokenizer."
                         "load_tokenizer); the end-of-document token is GPT-2's bos/eos.")


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
    flops_per_sample=flops_per_sample, generation="causal", hf=GPT2_HF, benchmark_peer=GPT2Peer,
    # Prompt/text pairs read from the input itself: the loss on the text only.
    objectives={"prompt_text": lambda data, path: dataclasses.replace(data, finetune_data=path)}))
