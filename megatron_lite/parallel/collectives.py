"""Tensor-parallel collectives as autograd functions (Megatron's f/g operators).

Each comes in a forward/backward pair that are each other's adjoint:
    copy_to_tp              identity    |  all-reduce        (enter a TP region with a replicated input)
    reduce_from_tp          all-reduce  |  identity          (leave it: sum the partial results)
    scatter_to_tp_last_dim  own chunk   |  all-gather
    gather_from_tp_last_dim all-gather  |  own chunk
At tp_size 1 all four are identities and need no process group; at tp_size > 1 a state without
groups (ParallelState.virtual) is an error at call time, even where the forward alone would not
communicate.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .state import ParallelState


def _all_reduce(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    # Reduce a copy: the input may be saved for backward or shared with another branch
    # (an add node hands the same gradient tensor to both of its inputs).
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=ps.require_tp_group())
    return out


def _split_last(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    last = x.size(-1)
    if last % ps.tp_size != 0:
        raise ValueError(f"cannot split the last dimension ({last}) of a tensor of shape {tuple(x.shape)} "
                         f"into {ps.tp_size} tensor-parallel chunks: make it a multiple of {ps.tp_size}")
    n = last // ps.tp_size
    return x[..., ps.tp_rank * n:(ps.tp_rank + 1) * n].contiguous()


def _gather_last(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    group = ps.require_tp_group()
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(ps.tp_size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps):
        ctx.ps = ps
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.ps), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps):
        return _all_reduce(x, ps)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTPLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps):
        ctx.ps = ps
        return _split_last(x, ps)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.ps), None


class _GatherFromTPLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps):
        ctx.ps = ps
        return _gather_last(x, ps)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.ps), None


def copy_to_tp(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Forward identity, backward all-reduce over TP (a replicated input feeding sharded math)."""
    if ps.tp_size == 1:
        return x
    ps.require_tp_group()
    return _CopyToTP.apply(x, ps)


def reduce_from_tp(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Forward all-reduce (sum) over TP, backward identity."""
    if ps.tp_size == 1:
        return x
    ps.require_tp_group()
    return _ReduceFromTP.apply(x, ps)


def scatter_to_tp_last_dim(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Forward: this rank's chunk of the last dim; backward: all-gather along it."""
    if ps.tp_size == 1:
        return x
    ps.require_tp_group()
    return _ScatterToTPLastDim.apply(x, ps)


def gather_from_tp_last_dim(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Forward: all-gather the shards along the last dim; backward: this rank's chunk."""
    if ps.tp_size == 1:
        return x
    ps.require_tp_group()
    return _GatherFromTPLastDim.apply(x, ps)
