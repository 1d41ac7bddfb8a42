"""Cross entropy over vocab-parallel logits, without ever gathering the full vocabulary.

Each rank holds logits for vocabulary columns [r*V/tp, (r+1)*V/tp). Two all-reduces over TP
(the max, then the target logit and the sum of exps together) give the exact log-softmax; the
gradient is softmax - onehot on each rank's own columns, computed locally.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import copy_to_tp, gather_from_tp_last_dim
from .gemm import matmul_nn, matmul_nt
from .layers import TiedGradient
from .state import ParallelState


def _local_labels(labels, per_rank: int, ps: ParallelState, vocab_size: int | None):
    """(columns of this rank's shard that are real vocabulary, not padding; each label's column
    in the shard, 0 where it is not here; where the label is not here or ignored)."""
    start = ps.tp_rank * per_rank
    valid_here = per_rank if vocab_size is None else min(max(vocab_size - start, 0), per_rank)
    not_here = (labels < start) | (labels >= start + per_rank) | (labels < 0)
    return valid_here, (labels - start).masked_fill(not_here, 0), not_here


def _softmax_over_tp_(logits, local_label, not_here, ps: ParallelState):
    """(per-token loss, softmax) of logits whose columns are split over the TP ranks, exactly:
    the global max, then the target logit and the sum of exps, reduced over TP. `logits` (this
    rank's columns, fp32 or wider) is overwritten by the softmax."""
    # Subtracting the global max keeps exp() in range; any shift gives the same loss.
    max_logit = logits.amax(dim=-1, keepdim=True)  # (max() would also find the indices: slower)
    if ps.tp_size > 1:
        dist.all_reduce(max_logit, op=dist.ReduceOp.MAX, group=ps.require_tp_group())
    shifted = logits.sub_(max_logit)
    target = shifted.gather(-1, local_label.unsqueeze(-1)).squeeze(-1).masked_fill(not_here, 0.0)
    exp = shifted.exp_()
    sums = torch.stack([target, exp.sum(dim=-1)])
    if ps.tp_size > 1:
        dist.all_reduce(sums, group=ps.require_tp_group())  # one collective for both sums
    target, sum_exp = sums[0], sums[1]
    return sum_exp.log() - target, exp.div_(sum_exp.unsqueeze(-1))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ps, vocab_size):
        ctx.input_dtype = logits.dtype
        # A copy in at least fp32: the softmax is computed in place.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32), copy=True)
        valid_here, local_label, not_here = _local_labels(labels, logits.size(-1), ps, vocab_size)
        if valid_here < logits.size(-1):
            # Padding columns take no part in the softmax: exp(-inf) = 0 exactly.
            logits[..., valid_here:] = float("-inf")
        loss, softmax = _softmax_over_tp_(logits, local_label, not_here, ps)
        ignored = labels < 0
        ctx.save_for_backward(softmax, local_label, not_here, ignored)
        return loss.masked_fill(ignored, 0.0)

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_label, not_here, ignored = ctx.saved_tensors
        grad = softmax.clone()  # out of place: backward may run twice with retain_graph
        onehot = (~not_here).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local_label.unsqueeze(-1), -onehot)
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None


def _check_labels(labels: torch.Tensor, per_rank: int, unit: str, ps: ParallelState,
                  vocab_size: int | None) -> None:
    """Integer labels below the true vocabulary size, which fits the padded one."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer token ids, got {labels.dtype}")
    padded = per_rank * ps.tp_size
    true_vocab = padded if vocab_size is None else vocab_size
    if not 0 < true_vocab <= padded:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {padded}] (the padded vocabulary: "
                         f"{per_rank} {unit} x tp_size {ps.tp_size})")
    if labels.numel() and bool((labels >= true_vocab).any()):
        raise ValueError(f"a label is >= the vocabulary size {true_vocab} (max label "
                         f"{int(labels.max())}); labels must be token ids, or negative to be ignored")


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
    _check_labels(labels, logits_shard.size(-1), "columns", ps, vocab_size)
    return _VocabParallelCrossEntropy.apply(logits_shard, labels.long(), ps, vocab_size)


def gather_full_logits(logits_shard: torch.Tensor, ps: ParallelState, vocab_size: int | None = None) -> torch.Tensor:
    """All-gather the vocab shards into full logits [..., V_padded] (differentiable); with
    `vocab_size`, drop the padding columns."""
    full = gather_from_tp_last_dim(logits_shard, ps)
    return full if vocab_size is None else full[..., :vocab_size]


# Tokens per chunk of the fused head. The chunk's token count is the inner dimension of the
# weight-gradient GEMM and the outer one of the logits GEMM, and CPU GEMMs run below their peak
# when it is small: with chunks of 315 tokens the head of a 256-wide model over 2,048 tokens and
# 13,312 words was 1.11x slower than with 1,024-token chunks (2 threads; 1.06x on one), and the
# whole step 5% slower. A chunk's logits are a [1024, V/tp] buffer (54 MB at LingLong's
# vocabulary in fp32); at TP=1 its softmax is a second one, and the first is freed.
FUSED_CHUNK_TOKENS = 1024


def _head_and_loss(hidden, weight, labels, weights, ps, vocab_size, chunk_rows, with_grad):
    """(loss, its gradient wrt hidden, wrt weight) of `_LinearCrossEntropy`, chunk by chunk; the
    gradients are None without `with_grad`."""
    compute = torch.promote_types(hidden.dtype, torch.float32)
    per_rank = weight.size(0)
    valid_here, local_label, not_here = _local_labels(labels, per_rank, ps, vocab_size)
    loss = hidden.new_zeros((), dtype=compute)
    grad_hidden = torch.empty_like(hidden) if with_grad else None
    grad_weight = None
    for lo in range(0, hidden.size(0), chunk_rows):
        rows = slice(lo, lo + chunk_rows)
        h, w = hidden[rows], weights[rows]
        logits = matmul_nt(h, weight).to(compute)
        if valid_here < per_rank:  # padding columns take no part in the softmax
            logits[:, valid_here:] = float("-inf")
        label, away = local_label[rows].unsqueeze(-1), not_here[rows]
        if ps.tp_size == 1:
            # torch's softmax kernel: 13.8 ms for [1024, 13312] on one thread, against 19.2 ms
            # for the sharded path's five passes and 22.2 ms for log_softmax then exp. The loss
            # is lse - target, with lse = max - log(largest probability), which is >= 1/V.
            target = logits.gather(-1, label).squeeze(-1)
            top = logits.amax(dim=-1)
            probs = torch.softmax(logits, dim=-1)
            del logits  # the chunk's logits, before the GEMMs below make their outputs
            per_token = top - probs.amax(dim=-1).log() - target
        else:  # the softmax spans every rank's columns; the chunk's buffer becomes it
            per_token, probs = _softmax_over_tp_(logits, local_label[rows], away, ps)
            del logits  # now the name of the buffer that probs holds
        loss += (per_token * w).sum()
        if with_grad:
            # d(loss)/d(logits) = w * (softmax - onehot); onehot only where the label is here.
            probs.scatter_add_(-1, label, -(~away).to(compute).unsqueeze(-1))
            probs, w = probs.to(hidden.dtype), w.to(hidden.dtype).unsqueeze(-1)
            grad_hidden[rows] = matmul_nn(probs, weight) * w
            if grad_weight is None:  # the first chunk writes the buffer: no zero fill before it
                grad_weight = (probs.t() @ (h * w)).to(compute)
            elif grad_weight.dtype == probs.dtype:
                grad_weight.addmm_(probs.t(), h * w)
            else:  # half-precision matmul, accumulated over the chunks in fp32
                grad_weight.add_(probs.t() @ (h * w))
        # Freed before the next chunk's logits, so that two chunks' buffers never coexist.
        del probs
    if with_grad and grad_weight is None:  # no tokens
        grad_weight = torch.zeros(weight.shape, dtype=compute, device=weight.device)
    return loss, grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """The output head and a masked mean cross entropy in one pass over chunks of tokens.

    One chunk's [chunk, V/tp] logits exist at a time: each chunk's logits are made, turned into that
    chunk's losses and its gradient (softmax - onehot), and dropped. Because the loss is one mean
    with weights known up front (loss_mask / its sum), the gradients of the hidden states and of
    the weight are finished in the forward; backward hands them over, scaled by the incoming
    gradient (or into `tied`, see `TiedGradient`).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, weights, ps, vocab_size, chunk_rows, with_grad, tied):
        loss, grad_hidden, grad_weight = _head_and_loss(hidden, weight, labels, weights, ps,
                                                        vocab_size, chunk_rows, with_grad)
        if with_grad:
            # On ctx, not saved: backward gives them away, and with no reference left here
            # autograd may add into them or keep them as .grad instead of copying. A second
            # backward (retain_graph) makes them again from the saved inputs.
            ctx.grads = (grad_hidden, grad_weight)
            ctx.save_for_backward(hidden, weight, labels, weights)
            ctx.args, ctx.tied = (ps, vocab_size, chunk_rows), tied
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            _, *ctx.grads = _head_and_loss(*ctx.saved_tensors, *ctx.args, with_grad=True)
        (grad_hidden, grad_weight), ctx.grads = ctx.grads, None
        if not (grad_loss.device.type == "cpu" and grad_loss.item() == 1.0):
            # Skipped when the incoming gradient is 1 (loss.backward() of this loss alone): on CPU
            # the product is a pass over a fresh [V/tp, h] buffer (with page faults on glibc's
            # default allocator). (On GPUs the check would sync the stream; the product is cheap.)
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
            grad_weight = grad_weight * grad_loss.to(grad_weight.dtype)
        if ctx.tied is not None:  # the tied lookup's backward finishes and returns it
            ctx.tied.grad, grad_weight = grad_weight, None
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def vocab_parallel_linear_cross_entropy(hidden: torch.Tensor, weight_shard: torch.Tensor,
                                        labels: torch.Tensor, loss_mask: torch.Tensor,
                                        ps: ParallelState, vocab_size: int | None = None,
                                        chunk_rows: int | None = None,
                                        tied: TiedGradient | None = None):
    """(mean cross entropy over `loss_mask`, number of loss tokens) of the head
    `hidden @ weight_shard.T`, without the full logits: the same value and gradients as
    `vocab_parallel_cross_entropy(parallel_lm_logits(hidden, weight_shard, ps), labels, ...)`
    averaged over `loss_mask`, in less time and memory.

    hidden: [..., h], replicated over TP; weight_shard: [V_padded/tp, h], this rank's rows of the
    (tied) output weight; labels: int [...], negative = ignored; loss_mask: [...], the weight of each
    token's loss before the division by its sum (a sum of 0 gives a loss of 0).
    chunk_rows: tokens per chunk (default FUSED_CHUNK_TOKENS).
    tied: the `TiedGradient` of `weight_shard`'s input lookup (`VocabParallelEmbedding`) in this
    forward, if the weight is tied: its backward then finishes the weight's gradient.
    """
    if labels.shape != hidden.shape[:-1] or loss_mask.shape != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and loss_mask {tuple(loss_mask.shape)} "
                         f"must both have the shape of hidden {tuple(hidden.shape)} without its "
                         "last dimension")
    _check_labels(labels, weight_shard.size(0), "rows", ps, vocab_size)
    compute = torch.promote_types(hidden.dtype, torch.float32)
    mask = loss_mask.to(compute)
    n_tokens = mask.sum()
    weights = (mask / n_tokens.clamp(min=1)).masked_fill(labels < 0, 0.0).reshape(-1)
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight_shard.requires_grad)
    rows = chunk_rows or FUSED_CHUNK_TOKENS
    flat = copy_to_tp(hidden, ps).reshape(-1, hidden.size(-1))
    loss = _LinearCrossEntropy.apply(flat, weight_shard, labels.reshape(-1).long(), weights, ps,
                                     vocab_size, rows, with_grad, tied)
    return loss, n_tokens
