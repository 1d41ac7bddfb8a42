"""Megatron-style tensor-parallel layers. At tp_size 1 each is exactly the plain layer's math.

Parameters are created already tagged (partition and init tags, see `init.py`) and filled locally
from torch's global RNG so a module is usable on its own; models call
`initialize_parameters(model, seed, ps)` to get weights that are the same at every TP size.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .collectives import copy_to_tp, gather_from_tp_last_dim, reduce_from_tp, scatter_to_tp_last_dim
from .gemm import linear
from .init import mark_replicated, set_init, set_partition_tags
from .state import ParallelState


def _divide(n: int, ps: ParallelState, what: str) -> int:
    if n % ps.tp_size != 0:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-model-parallel size ({ps.tp_size}): "
                         f"choose a size that is a multiple of {ps.tp_size} or a smaller TP size")
    return n // ps.tp_size


def _new_param(*shape: int, init: tuple, partition_dim: int | None) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape))
    set_init(p, *init)
    if partition_dim is None:
        mark_replicated(p)
    else:
        set_partition_tags(p, partition_dim)
    with torch.no_grad():
        if init[0] == "normal":
            p.normal_(0.0, init[1])
        else:
            p.fill_(1.0 if init[0] == "ones" else 0.0)
    return p


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split by rows (output features): each rank computes out/tp outputs.

    The input is replicated across TP ranks; the output is this rank's shard of the last dim
    unless `gather_output`.
    """

    def __init__(self, in_features: int, out_features: int, ps: ParallelState, *, bias: bool = True,
                 gather_output: bool = False, init_std: float = 0.02):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.ps, self.gather_output = ps, gather_output
        out_per_rank = _divide(out_features, ps, "ColumnParallelLinear out_features")
        self.weight = _new_param(out_per_rank, in_features, init=("normal", init_std), partition_dim=0)
        self.bias = _new_param(out_per_rank, init=("zeros",), partition_dim=0) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(copy_to_tp(x, self.ps), self.weight, self.bias)
        return gather_from_tp_last_dim(y, self.ps) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, tp_size={self.ps.tp_size}, "
                f"bias={self.bias is not None}, gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split by columns (input features): partial products are summed.

    The input is this rank's shard of the last dim (or, if not `input_is_parallel`, replicated and
    scattered here). The bias is replicated and added once, after the all-reduce.
    """

    def __init__(self, in_features: int, out_features: int, ps: ParallelState, *, bias: bool = True,
                 input_is_parallel: bool = True, init_std: float = 0.02):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.ps, self.input_is_parallel = ps, input_is_parallel
        in_per_rank = _divide(in_features, ps, "RowParallelLinear in_features")
        self.weight = _new_param(out_features, in_per_rank, init=("normal", init_std), partition_dim=1)
        self.bias = _new_param(out_features, init=("zeros",), partition_dim=None) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_last_dim(x, self.ps)
        y = reduce_from_tp(linear(x, self.weight), self.ps)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, tp_size={self.ps.tp_size}, "
                f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}")


class TiedGradient:
    """One gradient buffer for a weight that is both a forward's input lookup and its output head.

    The head's backward runs first (its input depends on the lookup's output). It leaves its dense
    [V/tp, h] gradient here instead of returning it, and the lookup's backward adds its rows into
    that buffer and returns it as the weight's whole gradient. Otherwise the lookup would make a
    second table-sized buffer (zeros, then its rows) for autograd to add to the head's: a fill
    and an add over the whole table, which cost more than the lookup itself (and, on glibc's
    default allocator, the fresh buffer's page faults). A forward makes its own.
    """

    __slots__ = ("grad",)

    def __init__(self):
        self.grad: torch.Tensor | None = None


def tied_gradient(tied: bool) -> TiedGradient | None:
    """A `TiedGradient` for one forward, or None where it has nothing to do: an untied weight, no
    gradient, or inside torch.compile (a traced backward cannot hand a Python object along)."""
    if not tied or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    return TiedGradient()


class _TiedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, tied: TiedGradient):
        ctx.save_for_backward(ids)
        ctx.tied, ctx.rows = tied, weight.size(0)
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        ids, = ctx.saved_tensors
        buffer, ctx.tied.grad = ctx.tied.grad, None
        if buffer is None:  # the head's backward did not run
            buffer = grad.new_zeros(ctx.rows, grad.size(-1))
        # index_put_ accumulates repeated ids in a fixed order on GPUs too (index_add_ would not).
        buffer.index_put_((ids.reshape(-1),), grad.reshape(-1, grad.size(-1)).to(buffer.dtype),
                          accumulate=True)
        return None, buffer, None


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split across TP ranks: rank r holds rows
    [r*V/tp, (r+1)*V/tp). Ids outside a rank's range contribute zeros there; the all-reduce sums
    the one nonzero contribution. At TP > 1 an id outside [0, V) therefore gives a zero vector
    rather than an error (checking would cost a device sync per step)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, ps: ParallelState, init_std: float = 0.02):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.ps = num_embeddings, embedding_dim, ps
        rows = _divide(num_embeddings, ps, "VocabParallelEmbedding num_embeddings (the padded vocabulary)")
        self.vocab_start, self.vocab_end = ps.tp_rank * rows, (ps.tp_rank + 1) * rows
        self.weight = _new_param(rows, embedding_dim, init=("normal", init_std), partition_dim=0)

    def forward(self, ids: torch.Tensor, tied: TiedGradient | None = None) -> torch.Tensor:
        """tied: this forward's `TiedGradient`, when the forward's output head
        (`vocab_parallel_linear_cross_entropy`) is this table too."""
        if self.ps.tp_size == 1:
            return self._lookup(ids, tied)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = self._lookup(local, tied).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.ps)

    def _lookup(self, ids: torch.Tensor, tied: TiedGradient | None) -> torch.Tensor:
        if tied is None:
            return F.embedding(ids, self.weight)
        return _TiedLookup.apply(ids, self.weight, tied)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, tp_size={self.ps.tp_size}, "
                f"rows=[{self.vocab_start}, {self.vocab_end})")


def parallel_lm_logits(hidden: torch.Tensor, weight_shard: torch.Tensor, ps: ParallelState,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """Logits shard [..., V/tp] from replicated hidden states and a vocab-sharded weight
    (e.g. the tied input embedding's); feed it to `vocab_parallel_cross_entropy`."""
    return linear(copy_to_tp(hidden, ps), weight_shard, bias)
