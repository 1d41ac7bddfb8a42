"""Sampling over vocab-parallel logits and generation loops with a KV cache."""
from megatron_lite.inference.generation import generate
from megatron_lite.inference.sampling import sample_next

__all__ = ["generate", "sample_next"]
