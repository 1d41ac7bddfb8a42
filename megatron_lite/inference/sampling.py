"""Choosing the next token from full-vocabulary logits.

Takes logits over the padded vocabulary (gathered across TP ranks) and never returns a padded id.
Randomness comes only from the `torch.Generator` passed in, so ranks that hold the same logits and
a generator seeded the same way pick the same token.
"""
from __future__ import annotations

import torch


def sample_next(logits_full: torch.Tensor, *, vocab_size: int, greedy: bool = False,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                repetition_penalty: float = 1.0, generated_ids: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next ids [b] from `logits_full` [b, V_padded].

    Order: mask padded columns -> repetition penalty (CTRL: a seen token's positive logit is
    divided by the penalty, a negative one multiplied) on `generated_ids` [b, n] (the context the
    penalty applies to, prompt included, as Hugging Face does) -> greedy argmax, or temperature ->
    top-k -> top-p (smallest set of tokens whose probability reaches top_p; the most likely token
    always stays) -> multinomial draw with `generator`.
    """
    if logits_full.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got {tuple(logits_full.shape)}")
    if not 1 <= vocab_size <= logits_full.shape[-1]:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {logits_full.shape[-1]}] "
                         "(the logits' padded width)")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 disables it)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (1 disables it)")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty={repetition_penalty} must be > 0 (1 disables it)")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0; use greedy=True for argmax")

    logits = logits_full.float().clone()
    logits[:, vocab_size:] = float("-inf")

    if repetition_penalty != 1.0 and generated_ids is not None and generated_ids.numel():
        seen = logits.gather(1, generated_ids)
        seen = torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty)
        logits.scatter_(1, generated_ids, seen)

    if greedy:
        return logits.argmax(dim=-1)

    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, vocab_size), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
