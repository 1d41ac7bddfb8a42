"""Cross entropy over vocab-parallel logits, without ever gathering the full vocabulary.

Each rank holds logits for vocabulary columns [r*V/tp, (r+1)*V/tp). Two all-reduces over TP
(the max, then the target logit and the sum of exps together) give the exact log-softmax; the
gradient is softmax - onehot on each rank's own columns, computed locally.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import gather_from_tp_last_dim
from .state import ParallelState


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ps, vocab_size):
        ctx.input_dtype = logits.dtype
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        per_rank = logits.size(-1)
        start = ps.tp_rank * per_rank

        valid_here = per_rank if vocab_size is None else min(max(vocab_size - start, 0), per_rank)
        if valid_here < per_rank:
            # Padding columns take no part in the softmax: exp(-inf) = 0 exactly.
            logits = logits.clone()
            logits[..., valid_here:] = float("-inf")

        # Subtracting the global max keeps exp() in range; any shift gives the same loss.
        max_logit = logits.max(dim=-1).values
        if ps.tp_size > 1:
            dist.all_reduce(max_logit, op=dist.ReduceOp.MAX, group=ps.require_tp_group())
        shifted = logits - max_logit.unsqueeze(-1)

        ignored = labels < 0
        not_here = (labels < start) | (labels >= start + per_rank) | ignored
        local_label = (labels - start).masked_fill(not_here, 0)
        target = shifted.gather(-1, local_label.unsqueeze(-1)).squeeze(-1).masked_fill(not_here, 0.0)
        exp = shifted.exp()
        sums = torch.stack([target, exp.sum(dim=-1)])
        if ps.tp_size > 1:
            dist.all_reduce(sums, group=ps.require_tp_group())  # one collective for both sums
        target, sum_exp = sums[0], sums[1]

        loss = (sum_exp.log() - target).masked_fill(ignored, 0.0)
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_label, not_here, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_label, not_here, ignored = ctx.saved_tensors
        grad = softmax.clone()  # out of place: backward may run twice with retain_graph
        onehot = (~not_here).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local_label.unsqueeze(-1), -onehot)
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, labels: torch.Tensor, ps: ParallelState,
                                 vocab_size: int | None = None) -> torch.Tensor:
    """Per-token cross entropy (shape of `labels`, no reduction) from this rank's logits shard.

    logits_shard: [..., V_padded/tp], this rank's columns of the padded vocabulary.
    labels: int64 [...], global token ids; any negative label (e.g. -100) is ignored: its loss is 0
        and it sends no gradient.
    vocab_size: the TRUE vocabulary size; columns with a global index >= vocab_size are padding and
        never count in the softmax. None means no padding.
    The loss is computed in at least fp32 (fp64 stays fp64); the gradient has the logits' dtype.
    """
    if labels.shape != logits_shard.shape[:-1]:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match logits of shape "
                         f"{tuple(logits_shard.shape)}: expected labels of shape {tuple(logits_shard.shape[:-1])}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer token ids, got {labels.dtype}")
    padded = logits_shard.size(-1) * ps.tp_size
    true_vocab = padded if vocab_size is None else vocab_size
    if not 0 < true_vocab <= padded:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {padded}] (the padded vocabulary: "
                         f"{logits_shard.size(-1)} columns x tp_size {ps.tp_size})")
    if labels.numel() and bool((labels >= true_vocab).any()):
        raise ValueError(f"a label is >= the vocabulary size {true_vocab} (max label {int(labels.max())}); "
                         "labels must be token ids, or negative to be ignored")
    return _VocabParallelCrossEntropy.apply(logits_shard, labels.long(), ps, vocab_size)


def gather_full_logits(logits_shard: torch.Tensor, ps: ParallelState, vocab_size: int | None = None) -> torch.Tensor:
    """All-gather the vocab shards into full logits [..., V_padded] (differentiable); with
    `vocab_size`, drop the padding columns."""
    full = gather_from_tp_last_dim(logits_shard, ps)
    return full if vocab_size is None else full[..., :vocab_size]
