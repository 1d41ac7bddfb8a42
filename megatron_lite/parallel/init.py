"""Parameter tags (partition and init) and TP-invariant initialisation.

Every parameter carries two kinds of tags:
  * partition (Megatron's names): `tensor_model_parallel` (bool), `partition_dim`, `partition_stride`.
    They, not parameter names, drive resharding. Replicated parameters have
    `tensor_model_parallel=False, partition_dim=-1, partition_stride=1` (Megatron's defaults).
  * init: `param.init = ("normal", std) | ("zeros",) | ("ones",)`.

`initialize_parameters` draws each parameter's FULL tensor from a generator seeded by (seed,
crc32(name)) and keeps this rank's slice, so the same seed gives the same model at any TP size.
"""
from __future__ import annotations

import hashlib
import struct
import zlib

import torch
import torch.nn as nn

from .state import ParallelState

_INIT_KINDS = {"normal": 1, "zeros": 0, "ones": 0}  # kind -> number of arguments


def set_init(param: torch.Tensor, *spec) -> torch.Tensor:
    """Tag `param` with how to initialise it: ("normal", std), ("zeros",) or ("ones",)."""
    if not spec or spec[0] not in _INIT_KINDS or len(spec) != 1 + _INIT_KINDS[spec[0]]:
        raise ValueError(f"bad init spec {spec!r}: use ('normal', std), ('zeros',) or ('ones',)")
    if spec[0] == "normal" and not float(spec[1]) >= 0:
        raise ValueError(f"bad init spec {spec!r}: the standard deviation must be >= 0")
    param.init = tuple(spec)
    return param


def set_partition_tags(param: torch.Tensor, partition_dim: int, stride: int = 1) -> torch.Tensor:
    """Mark `param` as TP-sharded along `partition_dim` (stride: see `take_shard`)."""
    if not 0 <= partition_dim < param.dim():
        raise ValueError(f"partition_dim {partition_dim} is out of range for a parameter of shape "
                         f"{tuple(param.shape)}")
    if stride < 1:
        raise ValueError(f"partition_stride must be >= 1, got {stride}")
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = stride
    return param


def mark_replicated(param: torch.Tensor) -> torch.Tensor:
    """Mark `param` as replicated on every TP rank (counted once in norms, copied by resharding)."""
    param.tensor_model_parallel = False
    param.partition_dim = -1
    param.partition_stride = 1
    return param


def is_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def take_shard(full: torch.Tensor, dim: int, tp_size: int, tp_rank: int, stride: int = 1) -> torch.Tensor:
    """Rank `tp_rank`'s shard of `full` along `dim`.

    Stride s means the dim holds s interleaved blocks (e.g. a fused [q; k; v] weight with s=3);
    each block is chunked and the rank's shard is its chunk of every block, concatenated.
    """
    size = full.size(dim)
    if size % (stride * tp_size) != 0:
        raise ValueError(f"dimension {dim} of size {size} (shape {tuple(full.shape)}) cannot be split into "
                         f"{stride} block(s) x {tp_size} tensor-parallel shards")
    blocks = full.chunk(stride, dim=dim)
    return torch.cat([b.chunk(tp_size, dim=dim)[tp_rank] for b in blocks], dim=dim)


def merge_shards(shards: list, dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of `take_shard`: the full tensor from every rank's shard, in rank order."""
    size = shards[0].size(dim)
    if size % stride != 0:
        raise ValueError(f"shard dimension {dim} of size {size} is not a multiple of stride {stride}")
    pieces = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([pieces[r][b] for b in range(stride) for r in range(len(shards))], dim=dim)


def param_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for parameter `name` (crc32 and blake2b: never Python's salted hash)."""
    data = struct.pack("<QI", seed % 2**64, zlib.crc32(name.encode("utf-8")))
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & (2**63 - 1)


def _draw(spec: tuple, shape: list, generator: torch.Generator) -> torch.Tensor:
    if spec[0] == "normal":
        return torch.empty(shape, dtype=torch.float32).normal_(0.0, float(spec[1]), generator=generator)
    if spec[0] == "zeros":
        return torch.zeros(shape, dtype=torch.float32)
    return torch.ones(shape, dtype=torch.float32)


@torch.no_grad()
def initialize_parameters(module: nn.Module, seed: int, ps: ParallelState) -> None:
    """Initialise every parameter of `module` TP-invariantly (call before deepspeed.initialize).

    Names are those of `module.named_parameters()`, which must not depend on the TP size; tied
    parameters appear once, under their first name.
    """
    for name, p in module.named_parameters():
        spec = getattr(p, "init", None)
        if spec is None:
            raise ValueError(f"parameter '{name}' (shape {tuple(p.shape)}) of {type(module).__name__} has no "
                             "init tag: call megatron_lite.parallel.set_init(param, 'normal', std) "
                             "(or 'zeros' / 'ones') where it is created")
        if not hasattr(p, "tensor_model_parallel"):
            raise ValueError(f"parameter '{name}' (shape {tuple(p.shape)}) of {type(module).__name__} has no "
                             "partition tags: call megatron_lite.parallel.mark_replicated(param) or "
                             "set_partition_tags(param, dim) where it is created")
        shape = list(p.shape)
        if is_sharded(p):
            shape[p.partition_dim] *= ps.tp_size
        full = _draw(spec, shape, torch.Generator().manual_seed(param_seed(seed, name)))
        if is_sharded(p):
            full = take_shard(full, p.partition_dim, ps.tp_size, ps.tp_rank, p.partition_stride)
        p.copy_(full)
