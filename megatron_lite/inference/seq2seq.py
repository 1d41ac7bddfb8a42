"""Encoder-decoder generation (T5 / LongLM): the encoder runs once, the decoder step by step.

The sources of a call are right-padded with the pad id into one batch: T5 has no absolute
positions and the encoder masks padding keys, so a padded source encodes exactly as it would
alone. The decoder starts from `decoder_start_token_id` and keeps an `EncoderDecoderCache`: its
self-attention keys/values grow by one position per step, and each layer's cross-attention
keys/values over the encoder output are computed on the first step and reused. `use_cache=False`
recomputes the whole decoder prefix every step (the reference the cache is tested against).

Under tensor parallelism every rank runs the same loop; the last position's logits are gathered to
the full vocabulary and sampled with a generator seeded identically everywhere, so all ranks pick
the same token without another collective.

decoder_start_token_id: T5's convention, and LongLM's fine-tuning code, start the decoder with
the pad id (0); LongLM's published generation scripts pass `decoder_start_token_id=1` (`</s>`).
The default here is the model's own `decoder_start_id` (its config's decoder_start_token_id, else
the pad id), which is what its training batches used.
"""
from __future__ import annotations

import re

import torch

from megatron_lite.inference.generation import as_id_lists
from megatron_lite.inference.sampling import sample_next
from megatron_lite.models.t5 import EncoderDecoderCache
from megatron_lite.parallel import gather_full_logits


_SENTINEL = re.compile(r"<extra_id_(\d+)>")


def encode_source(tokenizer, text: str, append_eos: bool = False) -> list[int]:
    """Ids of an encoder input, with `<extra_id_k>` written in the text turned into the
    tokenizer's sentinel k, whether its sentinels live in the sentencepiece model (ours) or above
    it (an HF T5 / LongLM vocabulary, which sentencepiece alone would split into pieces). EOS
    ends it only with `append_eos` (a model config's append_eos_to_source: transformers'
    T5Tokenizer convention, which imported checkpoints keep); our objectives' inputs have none."""
    ids, pos = [], 0
    for m in _SENTINEL.finditer(text):
        if m.start() > pos:
            ids += tokenizer.encode(text[pos:m.start()])
        ids.append(tokenizer.sentinel_id(int(m.group(1))))
        pos = m.end()
    if pos < len(text):
        ids += tokenizer.encode(text[pos:])
    return ids + [tokenizer.eos_id] if append_eos else ids


@torch.no_grad()
def generate_seq2seq(model, source_ids, max_new_tokens: int, *, eos_id: int | None = None,
                     decoder_start_token_id: int | None = None, greedy: bool = False,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     repetition_penalty: float = 1.0, seed: int = 0,
                     use_cache: bool = True) -> list[list[int]]:
    """Up to `max_new_tokens` decoder ids for each source; one id list per source.

    source_ids: one source (list of ids) or a list of them. The result excludes the start token;
    a sequence stops after emitting `eos_id`, which is kept as its last id. The repetition penalty
    applies to the decoder's ids so far (start token included), as transformers does.
    """
    cfg = model.cfg
    sources = as_id_lists(source_ids, "source", "a sentinel")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    for i, s in enumerate(sources):
        bad = [t for t in s if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"source {i} has ids outside the vocabulary [0, {cfg.vocab_size}): "
                             f"{bad[:5]}")
        if cfg.pad_token_id in s:
            raise ValueError(f"source {i} contains the pad id {cfg.pad_token_id}, which the "
                             "encoder masks out; remove it from the input")
    start = cfg.decoder_start_id if decoder_start_token_id is None else int(decoder_start_token_id)
    if not 0 <= start < cfg.vocab_size:
        raise ValueError(f"decoder_start_token_id={start} is outside the vocabulary "
                         f"[0, {cfg.vocab_size})")

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    width = max(len(s) for s in sources)
    enc = torch.full((len(sources), width), cfg.pad_token_id, dtype=torch.long, device=device)
    for i, s in enumerate(sources):
        enc[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    sampling = dict(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                    repetition_penalty=repetition_penalty)

    was_training = model.training
    model.eval()
    try:
        memory, keep = model.encode(enc)
        cache = EncoderDecoderCache(cfg.decoder_layers) if use_cache else None
        tokens = torch.full((len(sources), 1), start, dtype=torch.long, device=device)
        outs: list[list[int]] = [[] for _ in sources]
        done = [False] * len(sources)
        step_input = tokens
        for _ in range(max_new_tokens):
            logits = model.decode(step_input if use_cache else tokens, memory, keep, cache)
            full = gather_full_logits(logits[:, -1], model.ps)
            next_ids = sample_next(full, vocab_size=cfg.vocab_size, generated_ids=tokens,
                                   generator=generator, **sampling)
            for i, t in enumerate(next_ids.tolist()):
                if not done[i]:
                    outs[i].append(t)
                    done[i] = eos_id is not None and t == eos_id
            if all(done):
                break
            # Finished rows keep stepping with the batch; their extra tokens are discarded.
            tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
            step_input = next_ids[:, None]
    finally:
        model.train(was_training)
    return outs
