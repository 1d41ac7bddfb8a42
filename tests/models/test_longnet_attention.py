"""Dilated attention (megatron_lite/models/longnet.py) against a float64 dense reference built from
the definition, softmax(Q K^T / sqrt(d) + log c) V with c[q, k] the number of branches in which q
and k meet: outputs and dQ/dK/dV within 1e-6, over random branch sets (segments longer than the
sequence included), lengths no w divides, causal and bidirectional, padding, both head orders.
Plus the anchor bugs the reference rules out, and bad branch sets."""
import math
import random

import pytest
import torch

from megatron_lite.models.longnet import (LongNetConfig, check_branches, dilated_attention,
                                          head_offset)


def reference(q, k, v, branches, causal, order, keep=None):
    """The definition, dense, float64: [b, n, H, d] -> [b, n, H, d]; padded queries give zeros."""
    b, n, H, d = q.shape
    pos = torch.arange(n)
    out = []
    for j in range(H):
        c = torch.zeros(n, n, dtype=torch.float64)
        for w, r in branches:
            kept = (pos % w) % r == head_offset(j, H, r, order)
            meet = (pos[:, None] // w == pos[None, :] // w) & kept[:, None] & kept[None, :]
            if causal:
                meet &= pos[None, :] <= pos[:, None]
            c += meet.double()
        c = c.expand(b, n, n)
        if keep is not None:
            c = c * keep[:, None, :].double()
        s = q[:, :, j] @ k[:, :, j].transpose(1, 2) / math.sqrt(d) + c.log()
        if keep is not None:  # a padded query may see no key at all: give it itself, then zero it
            s = torch.where((~keep)[:, :, None] & torch.eye(n, dtype=torch.bool), 0.0, s)
        o = torch.softmax(s, -1) @ v[:, :, j]
        if keep is not None:
            o = o * keep[:, :, None].double()
        out.append(o)
    return torch.stack(out, dim=2)


def random_case(seed):
    rnd = random.Random(seed)
    n = rnd.choice([37, 50, 61, 75])  # prime or odd lengths: no w divides most of them
    H = rnd.choice([3, 4, 5])
    branches = [(rnd.choice([3, 5, 7, 8, 12, 16, 24, 100]), 1)]  # r = 1 covers every row
    for _ in range(rnd.randint(1, 3)):
        r = rnd.choice([2, 3, 4])
        branches.append((rnd.choice([6, 9, 16, 20, 40, 128]), r))  # 128 > n: one segment
    rnd.shuffle(branches)
    return n, H, branches


def tensors(b, n, H, d, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, H, d, generator=g, dtype=torch.float64).requires_grad_()
               for _ in range(3))
    return q, k, v, torch.randn(b, n, H, d, generator=g, dtype=torch.float64)


def test_the_random_cases_cover_what_the_issue_asks():
    cases = [random_case(seed) for seed in range(4)]
    assert any(w > n for n, _, branches in cases for w, _ in branches)  # one segment only
    assert any(all(n % w for w, _ in branches) for n, _, branches in cases)  # no w divides n
    assert any(w % r for _, _, branches in cases for w, r in branches)  # r does not divide w


CASES = [(seed, causal, order, padded) for seed in range(4) for causal in (True, False)
         for order in ("mod", "block") for padded in (False, True)]


@pytest.mark.parametrize("seed, causal, order, padded", CASES)
def test_matches_the_definition_with_gradients(seed, causal, order, padded):
    n, H, branches = random_case(seed)
    q, k, v, grad = tensors(2, n, H, 4, seed)
    keep = None
    if padded:  # right padding on one row, a hole in the middle of the other
        keep = torch.ones(2, n, dtype=torch.bool)
        keep[0, n - 9:] = False
        keep[1, 5:8] = False
    got = dilated_attention(q, k, v, branches, causal=causal, order=order, key_padding_mask=keep)
    ours = torch.autograd.grad(got, (q, k, v), grad)
    want = reference(q, k, v, branches, causal, order, keep)
    theirs = torch.autograd.grad(want, (q, k, v), grad)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    for name, a, e in zip("qkv", ours, theirs):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=0, msg=f"d{name} ({branches})")


def test_a_branch_longer_than_the_sequence_is_one_segment():
    q, k, v, grad = tensors(1, 20, 2, 4, 7)
    one = dilated_attention(q, k, v, [(1000, 1)], causal=True)
    full = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, k, v)), is_causal=True).transpose(1, 2)
    torch.testing.assert_close(one, full, atol=1e-12, rtol=0)


def test_two_identical_branches_equal_one():
    """c = 2 everywhere adds log 2 to every score: the softmax is unchanged."""
    q, k, v, _ = tensors(1, 30, 2, 4, 3)
    torch.testing.assert_close(dilated_attention(q, k, v, [(8, 1), (8, 1)], causal=False),
                               dilated_attention(q, k, v, [(8, 1)], causal=False),
                               atol=1e-12, rtol=0)


def test_branch_weights_carry_gradient():
    """torchscale's anchor: branch weights computed under no_grad lose part of dQ and dK. The
    same combination with detached weights has our forward but another gradient (ours is the
    definition's, tested above)."""
    n, branches = 32, [(8, 1), (32, 1)]
    q, k, v, grad = tensors(1, n, 2, 4, 11)
    ours = dilated_attention(q, k, v, branches, causal=True)
    pos = torch.arange(n)
    outs, lses = [], []
    for w, r in branches:
        outs.append(dilated_attention(q, k, v, [(w, r)], causal=True))
        meet = (pos[:, None] // w == pos[None, :] // w) & (pos[None, :] <= pos[:, None])
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / 2 + meet.double().log()
        lses.append(torch.logsumexp(s, -1).transpose(1, 2))  # [b, n, H]
    weights = torch.softmax(torch.stack(lses).detach(), 0)[..., None]
    detached = (weights * torch.stack(outs)).sum(0)
    torch.testing.assert_close(detached, ours, atol=1e-12, rtol=0)
    dq_ours, dk_ours = torch.autograd.grad(ours, (q, k), grad)
    dq_det, dk_det = torch.autograd.grad(detached, (q, k), grad)
    assert (dq_ours - dq_det).abs().max() > 1e-3 and (dk_ours - dk_det).abs().max() > 1e-3


@pytest.mark.parametrize("order, expected", [("mod", [0, 1, 2, 0, 1, 2, 0, 1]),
                                             ("block", [0, 0, 0, 1, 1, 1, 2, 2])])
def test_head_offsets(order, expected):
    assert [head_offset(j, 8, 3, order) for j in range(8)] == expected


@pytest.mark.parametrize("kwargs, words", [
    (dict(segment_lengths=[0, 8], dilation_rates=[1, 2]), ["segment_lengths", "0", ">= 1"]),
    (dict(segment_lengths=[8], dilation_rates=[0]), ["dilation_rates", "0", ">= 1"]),
    (dict(segment_lengths=[8, 16], dilation_rates=[1]), ["one dilation per segment length"]),
    (dict(segment_lengths=[8], dilation_rates=[2]), ["no branch covers", "dilation 1"]),
    (dict(head_offset_order="rows"), ["head_offset_order", "mod"]),
])
def test_bad_branch_sets_are_one_line_errors(kwargs, words):
    with pytest.raises(ValueError) as e:
        LongNetConfig(num_attention_heads=4, hidden_size=32, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_dilations_without_one_that_cover_every_row_are_accepted():
    # Two heads, r = 2 in both orders covers offsets 0 and 1 only together with r = 1 elsewhere;
    # with H = 2 and branches (4, 2), (4, 2) each head keeps one parity: uncovered. (6, 2) with
    # (6, 3) covers all of a period of 6 for head 0 (0,2,4 | 0,3) only partially -> rejected,
    # while r = 2 for a one-head model cannot cover odd rows.
    with pytest.raises(ValueError):
        check_branches([4, 6], [2, 3], 2, "mod")
    assert check_branches([4, 4], [2, 1], 2, "mod") == [(4, 2), (4, 1)]
