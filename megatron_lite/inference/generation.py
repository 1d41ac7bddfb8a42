"""Autoregressive generation for the causal decoders (GPT / LingLong) with a KV cache.

The prompt is run once (prefill) filling a `KVCache`; each further step feeds only the token just
chosen. Under tensor parallelism every rank runs the same loop: the logits of the last position
are gathered to the full vocabulary and sampled with a generator seeded identically everywhere,
so all ranks choose the same token without another collective.
"""
from __future__ import annotations

import torch

from megatron_lite.inference.sampling import sample_next
from megatron_lite.models.blocks import KVCache
from megatron_lite.parallel import gather_full_logits


def as_id_lists(ids, what: str = "prompt", hint: str = "a BOS/EOD id") -> list[list[int]]:
    """One id list or several -> a non-empty list of non-empty id lists."""
    if len(ids) and isinstance(ids[0], int):
        ids = [ids]
    lists = [list(p) for p in ids]
    if not lists:
        raise ValueError(f"no {what}s given")
    for i, p in enumerate(lists):
        if not p:
            raise ValueError(f"{what} {i} is empty: give at least one token (e.g. {hint})")
    return lists


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens: int, *, eos_id: int | None = None,
             greedy: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, seed: int = 0,
             use_cache: bool = True) -> list[list[int]]:
    """Generate up to `max_new_tokens` ids after each prompt; returns one id list per prompt.

    prompt_ids: one prompt (list of ids) or a list of prompts; the result is always a list of
    lists, without the prompt. A sequence stops after emitting `eos_id`, which is kept as its
    last id (so a caller can tell an ended text from a truncated one). Prompts of equal length
    run as one batch; different lengths run as separate batches, which keeps positions and the
    sparse pattern exactly as in training (no left padding).

    Backward models (a config with `backward` set, LingLong-Backward) read text right to left. Give the
    prompt in normal reading order: it is the text's *ending*. The result is the text that
    precedes it, also in normal reading order, so `result + prompt` reads naturally.
    """
    cfg = model.cfg
    prompts = as_id_lists(prompt_ids)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    for i, p in enumerate(prompts):
        if len(p) + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens="
                             f"{max_new_tokens} that exceeds max_position_embeddings="
                             f"{cfg.max_position_embeddings}: shorten the prompt or the output")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has ids outside the vocabulary [0, {cfg.vocab_size}): "
                             f"{bad[:5]}")
    if getattr(cfg, "backward", False):
        prompts = [p[::-1] for p in prompts]

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    sampling = dict(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                    repetition_penalty=repetition_penalty)
    results = in_equal_length_batches(model, prompts, lambda batch: _generate_batch(
        model, batch, max_new_tokens, eos_id, generator, use_cache, sampling))
    if getattr(cfg, "backward", False):
        results = [r[::-1] for r in results]
    return results


def in_equal_length_batches(model, prompts, run_batch) -> list[list[int]]:
    """`run_batch(ids [b, length]) -> b id lists` over the prompts grouped by length (no padding,
    so each reads exactly what it would alone), in order, with the model in eval mode meanwhile."""
    device = next(model.parameters()).device
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    was_training = model.training
    model.eval()
    try:
        results: list[list[int]] = [[] for _ in prompts]
        for length in sorted(by_length):
            idx = by_length[length]
            batch = torch.tensor([prompts[i] for i in idx], dtype=torch.long, device=device)
            for i, out in zip(idx, run_batch(batch)):
                results[i] = out
    finally:
        model.train(was_training)
    return results


def decode(model, tokens, max_new_tokens, eos_id, generator, sampling, next_logits):
    """Up to `max_new_tokens` sampled ids per row of `tokens` [b, s] (a row stops after `eos_id`,
    which is kept). `next_logits(tokens, step)` is the logits shard of the last position of
    `tokens`: the prompt at step 0, then the prompt with every id chosen so far."""
    outs: list[list[int]] = [[] for _ in range(tokens.shape[0])]
    done = [False] * len(outs)
    for step in range(max_new_tokens):
        full = gather_full_logits(next_logits(tokens, step), model.ps)
        next_ids = sample_next(full, vocab_size=model.cfg.vocab_size, generated_ids=tokens,
                               generator=generator, **sampling)
        for i, t in enumerate(next_ids.tolist()):
            if not done[i]:
                outs[i].append(t)
                done[i] = eos_id is not None and t == eos_id
        if all(done):
            break
        # Finished rows keep stepping with the batch; their extra tokens are discarded.
        tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
    return outs


def _generate_batch(model, tokens, max_new_tokens, eos_id, generator, use_cache, sampling):
    cache = KVCache(model.cfg.num_layers) if use_cache else None

    def next_logits(tokens, step):
        if cache is None:  # the reference: the whole text again at every step
            return model(tokens)[:, -1]
        return model(tokens if step == 0 else tokens[:, -1:], kv_cache=cache)[:, -1]

    return decode(model, tokens, max_new_tokens, eos_id, generator, sampling, next_logits)
