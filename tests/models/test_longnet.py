"""LongNet across ranks: sequence parallelism at SP=2 and SP=4 (segments inside a rank, spanning
ranks and longer than the sequence; causal and bidirectional; padding) and TP=2 x SP=2 equal one
process: the kernel's outputs and dQ/dK/dV in float64, and the model's logits, loss and every
gradient in float32. One spawn of 4 gloo ranks holds every layout (SP=2 runs as SP=2 x DP=2).
Also: the model's bad input, its FLOPs count and its registry record."""
import pytest
import torch

from megatron_lite.models import get_model_spec
from megatron_lite.models.longnet import (LongNetConfig, LongNetModel, attended_keys_per_query,
                                          dilated_attention)
from megatron_lite.parallel import (ParallelState, RNGContext, gather_full_logits,
                                    initialize_parameters, merge_shards)
from megatron_lite.testing import run_distributed

SEED = 1234
N = 48
# With N = 48: SP=4 slices of 12, SP=2 slices of 24. (4, 1) stays within a rank at both;
# (8, 1) spans ranks at SP=4 (8 does not divide 12); (24, 2) spans at SP=4 and is local at SP=2;
# (100, 4) is longer than the sequence: one segment across every rank.
BRANCHES = [(4, 1), (8, 1), (24, 2), (100, 4)]
KERNEL_BRANCHES = {"a": BRANCHES, "b": [(5, 1), (16, 3), (36, 2)]}


def kernel_inputs(name):
    g = torch.Generator().manual_seed(len(name))
    q, k, v, grad = (torch.randn(2, N, 4, 8, generator=g, dtype=torch.float64) for _ in range(4))
    keep = torch.ones(2, N, dtype=torch.bool)
    keep[0, 40:] = False
    keep[1, 10:15] = False
    return q, k, v, grad, keep


KERNEL_CASES = [(b, causal, order, padded) for b in KERNEL_BRANCHES for causal in (True, False)
                for order in ("mod", "block") for padded in (False, True)]


def run_kernel(case, ps=None, head_start=0, heads=None):
    name, causal, order, padded = case
    q, k, v, grad, keep = kernel_inputs(name)
    heads = heads or slice(None)
    part = slice(None)
    if ps is not None and ps.sp_size > 1:
        n = N // ps.sp_size
        part = slice(ps.sp_rank * n, (ps.sp_rank + 1) * n)
    q, k, v = (t[:, part, heads].clone().requires_grad_() for t in (q, k, v))
    out = dilated_attention(q, k, v, KERNEL_BRANCHES[name], causal=causal, order=order,
                            key_padding_mask=keep[:, part] if padded else None, num_heads=4,
                            head_start=head_start, ps=ps)
    grads = torch.autograd.grad(out, (q, k, v), grad[:, part, heads])
    return [out.detach(), *grads]


def model_cfg(**kw):
    return LongNetConfig(vocab_size=100, num_layers=2, hidden_size=32, num_attention_heads=4,
                         ffn_hidden_size=64, max_position_embeddings=64, hidden_dropout=0.0,
                         segment_lengths=[w for w, _ in BRANCHES],
                         dilation_rates=[r for _, r in BRANCHES], **kw)


def batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 100, (2, N + 1), generator=g)
    return dict(input_ids=tokens[:, :-1], labels=tokens[:, 1:],
                loss_mask=(torch.rand(2, N, generator=g) > 0.2).float(),
                position_ids=torch.arange(N).expand(2, N))


def run_model(ps, causal=True):
    model = LongNetModel(model_cfg(causal=causal), ps, RNGContext(0, ps.dp_rank, ps.tp_rank))
    initialize_parameters(model, SEED, ps)
    data = batch()
    if causal:
        logits = gather_full_logits(model(data["input_ids"]), ps)
        loss, count = model.loss(data)
        loss.backward()
    else:  # the encoder: hidden states under padding
        keep = torch.ones(2, N, dtype=torch.bool)
        keep[1, 30:] = False
        part = model.sequence_slice(N)
        logits = model.hidden(data["input_ids"], key_padding_mask=keep)
        probe = torch.randn(2, N, 32, generator=torch.Generator().manual_seed(1))
        loss, count = (logits * probe[:, part] * keep[:, part, None]).sum() / N, None
        loss.backward()
    grads = {n: (p.grad.clone(), getattr(p, "tensor_model_parallel", False), p.partition_dim,
                 p.partition_stride) for n, p in model.named_parameters()}
    return logits.detach(), loss.detach(), count, grads


def _worker(rank, world):
    torch.set_num_threads(1)
    layouts = {"sp4": ParallelState.from_world(1, 4), "sp2": ParallelState.from_world(1, 2),
               "tp2sp2": ParallelState.from_world(2, 2)}
    out = {"ranks": {k: (ps.tp_rank, ps.sp_rank, ps.sp_size) for k, ps in layouts.items()}}
    for key in ("sp4", "sp2"):
        out[("kernel", key)] = [run_kernel(c, layouts[key]) for c in KERNEL_CASES]
    ps = layouts["tp2sp2"]  # heads 2 t .. 2 t + 1 of 4
    out[("kernel", "tp2sp2")] = [run_kernel(c, ps, head_start=2 * ps.tp_rank,
                                            heads=slice(2 * ps.tp_rank, 2 * ps.tp_rank + 2))
                                 for c in KERNEL_CASES]
    for key, ps in layouts.items():
        for causal in (True, False):
            out[("model", key, causal)] = run_model(ps, causal)
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_distributed(_worker, 4)


@pytest.fixture(scope="module")
def single():
    ps = ParallelState.single()
    return {"kernel": [run_kernel(c) for c in KERNEL_CASES],
            "model": {c: run_model(ps, c) for c in (True, False)}}


@pytest.mark.parametrize("layout", ["sp4", "sp2", "tp2sp2"])
def test_kernel_across_ranks_equals_one_process(ranks, single, layout):
    for r in ranks:
        tp, sp, size = r["ranks"][layout]
        part = slice(sp * N // size, (sp + 1) * N // size)
        heads = slice(2 * tp, 2 * tp + 2) if layout == "tp2sp2" else slice(None)
        for case, got, want in zip(KERNEL_CASES, r[("kernel", layout)], single["kernel"]):
            for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
                torch.testing.assert_close(a, e[:, part, heads], atol=1e-10, rtol=0,
                                           msg=f"{layout} {case} {name}")


@pytest.mark.parametrize("layout", ["sp4", "sp2", "tp2sp2"])
@pytest.mark.parametrize("causal", [True, False])
def test_model_across_ranks_equals_one_process(ranks, single, layout, causal):
    logits, loss, count, grads = single["model"][causal]
    by_slot = {}
    for r in ranks:
        tp, sp, size = r["ranks"][layout]
        by_slot.setdefault((tp, sp), r[("model", layout, causal)])  # DP replicas agree
        part = slice(sp * N // size, (sp + 1) * N // size)
        got_logits, got_loss, got_count, _ = r[("model", layout, causal)]
        torch.testing.assert_close(got_logits, logits[:, part], atol=1e-5, rtol=0)
        if causal:
            assert got_count == count
    tp_size = 2 if layout == "tp2sp2" else 1
    sp_size = {"sp4": 4, "sp2": 2, "tp2sp2": 2}[layout]
    # The SP ranks' losses are parts that sum to the whole (TP ranks hold the same value).
    total = sum(by_slot[(0, s)][1] for s in range(sp_size))
    torch.testing.assert_close(total, loss, atol=1e-5, rtol=1e-6)
    for name, (full, *_) in grads.items():
        # Gradients sum over SP (as DeepSpeed's SP x DP reduction does), then merge over TP.
        per_tp = []
        for t in range(tp_size):
            per_tp.append(sum(by_slot[(t, s)][3][name][0] for s in range(sp_size)))
        _, sharded, dim, stride = by_slot[(0, 0)][3][name]
        got = merge_shards(per_tp, dim, stride) if sharded else per_tp[0]
        torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-6 * float(full.abs().max()),
                                   msg=f"{layout}: gradient of {name}")


def test_sequence_not_divisible_by_sp_is_a_one_line_error():
    model = LongNetModel(model_cfg(), ParallelState(sp_size=2, sp_rank=0, kind="virtual"))
    with pytest.raises(ValueError) as e:
        model.sequence_slice(47)
    assert "\n" not in str(e.value) and "--sequence-parallel-size 2" in str(e.value)
    assert "multiple of 2" in str(e.value)


def test_flops_count_what_the_branches_compute():
    cfg = model_cfg()
    # n = 48, causal: (4, 1) -> 2.5 keys; (8, 1) -> 4.5; (24, 2): 1/2 of queries x 6.5;
    # (100, 4): segment = 48 -> 12 rows, 1/4 of queries x 6.5.
    assert attended_keys_per_query(cfg, N) == pytest.approx(2.5 + 4.5 + 6.5 / 2 + 6.5 / 4)
    spec = get_model_spec("longnet")
    assert spec.splits_sequence and spec.objective == "causal_lm"
    data = type("D", (), {"seq_length": N})()
    dense = spec.flops_per_sample(cfg, data)
    assert dense > 0 and spec.sample_cost(cfg, data)[0] == N
