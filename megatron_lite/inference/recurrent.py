"""Generation for decoders with segment memory (`generation="recurrent"`: Transformer-XL).

The prompt is read in segments of `segment_length` tokens (any prompt length: each segment reads
the memory the previous ones left), then the text grows one token at a time, each step reading
the last `mem_length` positions before it through the memory, as Chinese-Transformer-XL's
generator does. The memory is kept as the keys/values of those positions (the model's
`generation_cache()`), so a step projects only its new token; `use_cache=False` keeps it as
hidden states and recomputes their keys/values every step (`model(ids, memory=...)`, the
training path), which is the reference the cache is tested against.

Under tensor parallelism every rank runs the same loop on its heads; the last position's logits
are gathered to the full vocabulary and sampled with a generator seeded identically everywhere,
so all ranks choose the same token without another collective.
"""
from __future__ import annotations

import torch

from megatron_lite.inference.generation import as_id_lists, decode, in_equal_length_batches


def check_segment_length(cfg, segment_length: int | None) -> int:
    """The prompt's segment length (default: the longest the position encoding covers with a
    full memory, max_position_embeddings - mem_length); a bad one is a one-line ValueError."""
    longest = cfg.max_position_embeddings - cfg.mem_length
    if cfg.mem_length < 1:
        raise ValueError("mem_length=0: this model remembers nothing across segments, so a token "
                         "generated after the prompt would see no context; generation needs a "
                         "model trained with mem_length >= 1")
    if segment_length is None:
        return longest
    if not 1 <= segment_length <= longest:
        raise ValueError(f"--segment-length {segment_length} must be in [1, {longest}]: a segment "
                         f"plus the mem_length={cfg.mem_length} memory must fit the "
                         f"max_position_embeddings={cfg.max_position_embeddings} distances")
    return segment_length


class RollingMemory:
    """The rolling memory of a batch of texts being generated: `feed(ids)` returns the logits
    shard of `ids` [b, s] given everything fed before (as far as the memory reaches)."""

    def __init__(self, model, use_cache: bool = True):
        self.model = model
        self.cache = model.generation_cache() if use_cache else None
        self.memory = None

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            return self.model.forward_cached(ids, self.cache)
        logits, self.memory = self.model(ids, memory=self.memory)
        return logits

    def feed_segments(self, ids: torch.Tensor, segment_length: int) -> torch.Tensor:
        """Feed a prompt segment by segment; the logits shard of its last position [b, V/tp]."""
        for start in range(0, ids.shape[1], segment_length):
            logits = self.feed(ids[:, start:start + segment_length])
        return logits[:, -1]


@torch.no_grad()
def generate_recurrent(model, prompt_ids, max_new_tokens: int, *, segment_length: int | None = None,
                       eos_id: int | None = None, greedy: bool = False, temperature: float = 1.0,
                       top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                       seed: int = 0, use_cache: bool = True) -> list[list[int]]:
    """Up to `max_new_tokens` ids after each prompt (one id list per prompt, without the prompt;
    a text stops after emitting `eos_id`, which is kept). Prompts have any length; prompts of
    equal length run as one batch (no padding, so each reads exactly what it would alone)."""
    cfg = model.cfg
    prompts = as_id_lists(prompt_ids)
    segment_length = check_segment_length(cfg, segment_length)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has ids outside the vocabulary [0, {cfg.vocab_size}): "
                             f"{bad[:5]}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    sampling = dict(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                    repetition_penalty=repetition_penalty)

    def run_batch(tokens):
        memory = RollingMemory(model, use_cache)

        def next_logits(tokens, step):
            if step == 0:  # the whole prompt, segment by segment
                return memory.feed_segments(tokens, segment_length)
            return memory.feed(tokens[:, -1:])[:, -1]

        return decode(model, tokens, max_new_tokens, eos_id, generator, sampling, next_logits)

    return in_equal_length_batches(model, prompts, run_batch)
