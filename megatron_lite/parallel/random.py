"""Stateless randomness: every random op is seeded from where and when it happens.

A seed is a stable hash of (seed, step, micro_step, dp_rank, site, tp_rank or a marker), so
  * resume needs no saved generator state, at any world size;
  * activation recomputation replays the same masks by construction (same step, same site);
  * inside a TP region (e.g. dropout on an attention-head shard) ranks draw different masks, and
    outside one (e.g. on replicated hidden states) every TP rank draws the same mask, as it must.
Each random op needs its own `site` string (e.g. f"layers.{i}.attn.dropout"): two ops with the same
site in the same micro-step would draw the same numbers.
"""
from __future__ import annotations

import contextlib
import hashlib
import struct
import zlib

import torch
import torch.nn.functional as F

# Stands in for the tp rank outside TP regions; no real tp rank is negative.
_REPLICATED = -1


class RNGContext:
    def __init__(self, seed: int, dp_rank: int = 0, tp_rank: int = 0):
        self.seed, self.dp_rank, self.tp_rank = seed, dp_rank, tp_rank
        self.step, self.micro_step = 0, 0

    @classmethod
    def for_state(cls, seed: int, ps) -> "RNGContext":
        """An RNGContext at the ranks of a ParallelState."""
        return cls(seed, dp_rank=ps.dp_rank, tp_rank=ps.tp_rank)

    def set_step(self, step: int, micro_step: int = 0) -> None:
        """Called by the trainer before each micro-batch's forward."""
        self.step, self.micro_step = step, micro_step

    def seed_for(self, site: str, tp_region: bool) -> int:
        """The 63-bit seed of random op `site` at the current step."""
        tp = self.tp_rank if tp_region else _REPLICATED
        fields = (self.seed, self.step, self.micro_step, self.dp_rank, zlib.crc32(site.encode("utf-8")), tp)
        data = struct.pack("<6Q", *(v % 2**64 for v in fields))
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & (2**63 - 1)

    @contextlib.contextmanager
    def fork(self, site: str, tp_region: bool):
        """Run the block with torch's RNG seeded for `site`; the outer RNG state is restored after."""
        cuda = torch.cuda.is_available()
        devices = [torch.cuda.current_device()] if cuda else []
        seed = self.seed_for(site, tp_region)
        with torch.random.fork_rng(devices=devices):
            # Seed only the generators fork_rng restores: torch.manual_seed would also reseed
            # every other visible GPU for good.
            torch.random.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.manual_seed(seed)
            yield

    def generator(self, site: str, tp_region: bool = False, device: str | torch.device = "cpu") -> torch.Generator:
        """A fresh generator seeded for `site` (for sampling outside torch's global RNG)."""
        return torch.Generator(device=device).manual_seed(self.seed_for(site, tp_region))

    def dropout(self, x: torch.Tensor, p: float, site: str, tp_region: bool, training: bool) -> torch.Tensor:
        """F.dropout with a mask seeded for `site`; `x` itself when p == 0 or not training."""
        if p == 0 or not training:
            return x
        with self.fork(site, tp_region):
            return F.dropout(x, p, training=True)

    def __repr__(self) -> str:
        return (f"RNGContext(seed={self.seed}, dp_rank={self.dp_rank}, tp_rank={self.tp_rank}, "
                f"step={self.step}, micro_step={self.micro_step})")
