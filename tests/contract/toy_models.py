"""Two architectures defined outside the megatron_lite package, plugged in through the model
contract alone (`--model-module tests/contract/toy_models.py`): no package file knows them.

- `toy_mlm`: a 2-layer bidirectional encoder with a masked-LM loss over whole-word-masked
  windows, and no generation. It extends the `data:` section with a field of its own.
- `toy_counter`: a tiny causal LM over contiguous streams (a `BatchStream`) that carries
  per-stream state: a running count of the segments each micro-batch slot has seen, mixed into
  its hidden states. Resuming it exactly needs that count back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from megatron_lite.data.config import DataConfig
from megatron_lite.data.contract import IGNORE_INDEX, Datasets
from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.objectives.wwm_mlm import WholeWordMaskDataset
from megatron_lite.data.objectives.xl_stream import XLStreamBatcher
from megatron_lite.models.blocks import (ParallelMLP, ParallelSelfAttention, check_tp_divisible,
                                         layer_norm, padded_vocab_size, position_embedding)
from megatron_lite.models.registry import ModelSpec, register
from megatron_lite.parallel import (ParallelState, RNGContext, VocabParallelEmbedding,
                                    mark_replicated, parallel_lm_logits, set_init,
                                    vocab_parallel_cross_entropy)


@dataclass
class ToyConfig:
    vocab_size: int | None = None
    """Filled from the tokenizer by the trainer."""
    make_vocab_size_divisible_by: int = 128
    num_layers: int = 2
    hidden_size: int = 32
    num_attention_heads: int = 4
    ffn_hidden_size: int = 64
    max_position_embeddings: int = 128
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.0
    init_std: float = 0.02

    padded_vocab_size = property(padded_vocab_size)  # the package's shared block


@dataclass
class ToyMLMDataConfig(DataConfig):
    masked_lm_prob: float = 0.15
    """Share of each window's tokens chosen for prediction (whole words)."""


class ToyEncoder(nn.Module):
    """Embeddings -> num_layers x pre-LN [attention, MLP] -> LN -> tied vocab-parallel head.
    `causal` turns it into a decoder (toy_counter)."""

    def __init__(self, cfg: ToyConfig, ps: ParallelState, rng: RNGContext, causal: bool = False):
        super().__init__()
        check_tp_divisible(cfg, ps.tp_size, cfg.ffn_hidden_size)
        self.cfg, self.ps, self.rng, self.causal = cfg, ps, rng, causal
        self.checkpoint_activations = False
        self.word_embeddings = VocabParallelEmbedding(cfg.padded_vocab_size, cfg.hidden_size, ps,
                                                      init_std=cfg.init_std)
        self.position_embeddings = position_embedding(cfg.max_position_embeddings,
                                                      cfg.hidden_size, cfg.init_std)
        self.layers = nn.ModuleList()
        for i in range(cfg.num_layers):
            layer = nn.Module()
            layer.ln_attn = layer_norm(cfg.hidden_size, 1e-5)
            layer.attn = ParallelSelfAttention(
                cfg.hidden_size, cfg.num_attention_heads, ps, rng, init_std=cfg.init_std,
                out_init_std=cfg.init_std, attention_dropout=cfg.attention_dropout,
                site=f"layers.{i}.attn_probs")
            layer.ln_mlp = layer_norm(cfg.hidden_size, 1e-5)
            layer.mlp = ParallelMLP(cfg.hidden_size, cfg.ffn_hidden_size, ps,
                                    init_std=cfg.init_std, out_init_std=cfg.init_std)
            self.layers.append(layer)
        self.final_ln = layer_norm(cfg.hidden_size, 1e-5)

    def forward(self, input_ids, attention_mask=None, extra=None):
        b, s = input_ids.shape
        x = self.word_embeddings(input_ids) + self.position_embeddings(
            torch.arange(s, device=input_ids.device))
        if extra is not None:
            x = x + extra
        x = self.rng.dropout(x, self.cfg.hidden_dropout, "embedding", tp_region=False,
                             training=self.training)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = x + layer.attn(layer.ln_attn(x), mask, self.causal)
            x = x + layer.mlp(layer.ln_mlp(x))
        return parallel_lm_logits(self.final_ln(x), self.word_embeddings.weight, self.ps)

    def token_losses(self, logits, labels):
        per_token = vocab_parallel_cross_entropy(logits, labels, self.ps,
                                                 vocab_size=self.cfg.vocab_size)
        predicted = (labels != IGNORE_INDEX).to(per_token.dtype)
        n = predicted.sum()
        return (per_token * predicted).sum() / n.clamp(min=1), n


class ToyMLM(ToyEncoder):
    def loss(self, batch):
        logits = self(batch["input_ids"], batch["attention_mask"])
        return self.token_losses(logits, batch["labels"])


class ToyCounter(ToyEncoder):
    """A causal LM whose hidden states see tanh(count / 4) * a learned vector, where `count` is
    the number of segments its micro-batch slot has been through: per-stream state."""

    def __init__(self, cfg: ToyConfig, ps: ParallelState, rng: RNGContext):
        super().__init__(cfg, ps, rng, causal=True)
        self.count_scale = nn.Parameter(torch.empty(cfg.hidden_size))
        set_init(self.count_scale, "normal", 1.0)
        mark_replicated(self.count_scale)

    def loss(self, batch, state):
        b = batch["input_ids"].shape[0]
        count = state["count"] if state is not None else torch.zeros(b)
        extra = torch.tanh(count / 4)[:, None, None] * self.count_scale
        logits = self(batch["input_ids"], extra=extra)
        loss, n = self.token_losses(logits, batch["labels"])
        return loss, n, {"count": count + 1}


def flops_per_sample(cfg: ToyConfig, data_cfg) -> float:
    """6 x weights per token + 12 x L x h x s for attention over all s keys (PaLM, appendix B)."""
    h, f, s = cfg.hidden_size, cfg.ffn_hidden_size, data_cfg.seq_length
    weights = cfg.num_layers * (4 * h * h + 2 * h * f) + cfg.padded_vocab_size * h
    return s * (6.0 * weights + 12.0 * cfg.num_layers * h * s)


def mlm_data(run, tokenizer, cfg: ToyConfig, ps: ParallelState) -> Datasets:
    data = run.data

    def windows(prefix):
        return WholeWordMaskDataset(IndexedDataset(prefix), tokenizer, run.training.seed,
                                    seq_length=data.seq_length,
                                    masked_lm_prob=data.masked_lm_prob)
    valid = windows(data.valid_data_prefix) if data.valid_data_prefix else None
    return Datasets(train=windows(data.train_data_prefix), valid=valid)


def stream_data(run, tokenizer, cfg: ToyConfig, ps: ParallelState) -> Datasets:
    data = run.data

    def streams(prefix, validation):
        # One slot per micro-batch of a step: the per-stream state the trainer keeps follows it.
        return XLStreamBatcher.for_run(IndexedDataset(prefix), run, tokenizer.eod_id, ps.dp_rank,
                                       ps.dp_size, validation=validation)
    valid = streams(data.valid_data_prefix, True) if data.valid_data_prefix else None
    return Datasets(train=streams(data.train_data_prefix, False), valid=valid)


register(ModelSpec(
    name="toy_mlm", config_cls=ToyConfig, build=ToyMLM, build_data=mlm_data,
    objective="wwm_mlm", data_config_cls=ToyMLMDataConfig,
    batch_keys=("input_ids", "labels", "attention_mask"), flops_per_sample=flops_per_sample,
    generation="none"))

register(ModelSpec(
    name="toy_counter", config_cls=ToyConfig, build=ToyCounter, build_data=stream_data,
    objective="xl_stream", batch_keys=("input_ids", "labels"), flops_per_sample=flops_per_sample,
    generation="none", stream_state=True))
