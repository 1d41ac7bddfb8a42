"""Every TP layer at TP=2 (two gloo ranks) against its unsharded twin at TP=1 built from the same seed:
outputs, input gradients and parameter gradients (each rank's = its slice of the full one). fp64, so
the only differences are summation order."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_lite.parallel import (ColumnParallelLinear, ParallelState, RowParallelLinear, VocabParallelEmbedding,
                                    copy_to_tp, gather_from_tp_last_dim, initialize_parameters, is_sharded,
                                    parallel_lm_logits, reduce_from_tp, scatter_to_tp_last_dim, set_init,
                                    set_partition_tags, take_shard, vocab_parallel_cross_entropy)
from megatron_lite.parallel.gemm import linear
from megatron_lite.testing import run_distributed

SEED = 99
IN, OUT, VOCAB = 6, 8, 10           # the embedding's rows split [0, 5) and [5, 10)
PADDED, TRUE_VOCAB, TINY_VOCAB = 12, 9, 5   # head: rank 1 holds columns 6..11; with TINY_VOCAB all padding
BATCH, SEQ = 2, 3
TOL = dict(rtol=1e-10, atol=1e-12)

# Which results are sharded along the last dim at TP > 1 (the rest are replicated).
SHARDED_OUTPUTS = {"col", "logits"}
SHARDED_INPUT_GRADS = {"row_x", "ce_logits", "ce_tiny_logits"}


class Layers(nn.Module):
    def __init__(self, ps):
        super().__init__()
        self.col = ColumnParallelLinear(IN, OUT, ps)
        self.col_gather = ColumnParallelLinear(IN, OUT, ps, gather_output=True)
        self.row = RowParallelLinear(OUT, IN, ps)
        self.row_scatter = RowParallelLinear(OUT, IN, ps, input_is_parallel=False)
        self.embed = VocabParallelEmbedding(VOCAB, IN, ps)
        rows = PADDED // ps.tp_size
        self.head_weight = set_init(set_partition_tags(nn.Parameter(torch.empty(rows, IN)), 0), "normal", 0.5)
        # A random (not zero) bias init so its gradient path is visible in the outputs.
        self.head_bias = set_init(set_partition_tags(nn.Parameter(torch.empty(rows)), 0), "normal", 0.5)


def _build(ps):
    m = Layers(ps).double()
    initialize_parameters(m, SEED, ps)
    for b in (m.col, m.col_gather, m.row, m.row_scatter):  # nonzero biases, so a misplaced add shows
        with torch.no_grad():
            b.bias.add_(0.1)
    return m


def _inputs():
    g = torch.Generator().manual_seed(5)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    logits = randn(BATCH, SEQ, PADDED)
    logits[..., TRUE_VOCAB:] = 1e3  # padding columns would dominate the softmax if they counted
    labels = torch.tensor([[0, 8, -100], [5, -1, 3]])          # both shards, two kinds of ignored
    tiny_labels = torch.tensor([[4, 0, 2], [-100, 1, 3]])
    return {"x": randn(BATCH, SEQ, IN), "h": randn(BATCH, SEQ, OUT),
            "ids": torch.tensor([[0, 9, 4], [5, 2, 7]]),
            "g_out": randn(BATCH, SEQ, OUT), "g_in": randn(BATCH, SEQ, IN), "g_logits": randn(BATCH, SEQ, PADDED),
            "logits": logits, "labels": labels, "tiny_labels": tiny_labels, "g_tok": randn(BATCH, SEQ)}


def _run_all(m, ps, inp):
    """Forward every layer, backward one total loss; a rank's part of a loss on a sharded output is
    its shard of the full loss weights, so the ranks' parts sum to the full loss."""
    def shard(t):
        return take_shard(t, t.dim() - 1, ps.tp_size, ps.tp_rank)

    leaves = {}

    def leaf(name, t):
        leaves[name] = t.clone().requires_grad_()
        return leaves[name]

    out = {
        "col": m.col(leaf("col_x", inp["x"])),
        "col_gather": m.col_gather(leaf("col_gather_x", inp["x"])),
        "row": m.row(leaf("row_x", shard(inp["h"]))),
        "row_scatter": m.row_scatter(leaf("row_scatter_x", inp["h"])),
        "embed": m.embed(inp["ids"]),
        "logits": parallel_lm_logits(leaf("head_x", inp["x"]), m.head_weight, ps, m.head_bias),
        "ce": vocab_parallel_cross_entropy(leaf("ce_logits", shard(inp["logits"])), inp["labels"], ps, TRUE_VOCAB),
        "ce_tiny": vocab_parallel_cross_entropy(leaf("ce_tiny_logits", shard(inp["logits"])), inp["tiny_labels"],
                                                ps, TINY_VOCAB),
    }
    total = ((out["col"] * shard(inp["g_out"])).sum() + (out["col_gather"] * inp["g_out"]).sum()
             + (out["row"] * inp["g_in"]).sum() + (out["row_scatter"] * inp["g_in"]).sum()
             + (out["embed"] * inp["g_in"]).sum() + (out["logits"] * shard(inp["g_logits"])).sum()
             + (out["ce"] * inp["g_tok"]).sum() + (out["ce_tiny"] * inp["g_tok"]).sum())
    total.backward()
    return {"out": {k: v.detach() for k, v in out.items()},
            "input_grads": {k: v.grad for k, v in leaves.items()},
            "param_grads": {k: p.grad for k, p in m.named_parameters()}}


def _tp2_rank(rank, world_size):
    ps = ParallelState.from_world(tp_size=2)
    result = _run_all(_build(ps), ps, _inputs())
    result["tp_rank"] = ps.tp_rank
    return result


@pytest.fixture(scope="module")
def tp2():
    return run_distributed(_tp2_rank, 2)


@pytest.fixture(scope="module")
def reference():
    ps = ParallelState.single()
    m = _build(ps)
    return m, _run_all(m, ps, _inputs())


def _last_dim_shard(t, rank):
    return take_shard(t, t.dim() - 1, 2, rank)


def test_outputs_match_unsharded(tp2, reference):
    _, ref = reference
    for r in tp2:
        for name, got in r["out"].items():
            want = _last_dim_shard(ref["out"][name], r["tp_rank"]) if name in SHARDED_OUTPUTS else ref["out"][name]
            torch.testing.assert_close(got, want, **TOL, msg=f"output {name} on tp rank {r['tp_rank']}")


def test_input_grads_match_unsharded(tp2, reference):
    _, ref = reference
    for r in tp2:
        for name, got in r["input_grads"].items():
            want = ref["input_grads"][name]
            if name in SHARDED_INPUT_GRADS:
                want = _last_dim_shard(want, r["tp_rank"])
            torch.testing.assert_close(got, want, **TOL, msg=f"grad of input {name} on tp rank {r['tp_rank']}")


def test_param_grads_are_slices_of_unsharded(tp2, reference):
    ref_model, ref = reference
    for name, p in ref_model.named_parameters():
        for r in tp2:
            want = ref["param_grads"][name]
            if is_sharded(p):
                want = take_shard(want, p.partition_dim, 2, r["tp_rank"], p.partition_stride)
            torch.testing.assert_close(r["param_grads"][name], want, **TOL,
                                       msg=f"grad of {name} on tp rank {r['tp_rank']}")


def test_cross_entropy_reference_ignores_padding_and_negative_labels(reference):
    _, ref = reference
    inp = _inputs()
    for key, labels, vocab in (("ce", inp["labels"], TRUE_VOCAB), ("ce_tiny", inp["tiny_labels"], TINY_VOCAB)):
        logits = inp["logits"].clone().requires_grad_()
        logp = torch.log_softmax(logits[..., :vocab], dim=-1)
        ignored = labels < 0
        want = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(ignored, 0.0)
        (want * inp["g_tok"]).sum().backward()
        torch.testing.assert_close(ref["out"][key], want.detach(), **TOL)
        grad = ref["input_grads"][f"{key}_logits"]
        torch.testing.assert_close(grad, logits.grad, **TOL)
        assert torch.all(grad[..., vocab:] == 0), "padding columns must get no gradient"
        assert torch.all(grad[ignored] == 0), "ignored positions must get no gradient"


def test_tp1_layers_are_plain_layers():
    ps = ParallelState.single()
    torch.manual_seed(0)
    col, row = ColumnParallelLinear(IN, OUT, ps), RowParallelLinear(OUT, IN, ps)
    emb = VocabParallelEmbedding(VOCAB, IN, ps)
    x, ids = torch.randn(BATCH, SEQ, IN), torch.tensor([[1, 9, 0]])
    h = torch.randn(BATCH, SEQ, OUT)
    # Exactly the product the layers call (`gemm.linear`: on CPU, oneDNN's where it applies) ...
    torch.testing.assert_close(col(x), linear(x, col.weight, col.bias), rtol=0, atol=0)
    torch.testing.assert_close(row(h), linear(h, row.weight) + row.bias, rtol=0, atol=0)
    # ... which is F.linear's within fp32 rounding (the libraries sum in different orders).
    torch.testing.assert_close(col(x), F.linear(x, col.weight, col.bias), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(row(h), F.linear(h, row.weight, row.bias), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(emb(ids), F.embedding(ids, emb.weight), rtol=0, atol=0)
    for f in (copy_to_tp, reduce_from_tp, scatter_to_tp_last_dim, gather_from_tp_last_dim):
        assert f(x, ps) is x


def test_layer_shapes_and_tags_at_tp4():
    ps = ParallelState.virtual(4, 3)
    col, row = ColumnParallelLinear(IN, OUT, ps), RowParallelLinear(OUT, IN, ps)
    emb = VocabParallelEmbedding(12, IN, ps)
    assert col.weight.shape == (OUT // 4, IN) and col.bias.shape == (OUT // 4,)
    assert (col.weight.partition_dim, col.bias.partition_dim, col.weight.partition_stride) == (0, 0, 1)
    assert row.weight.shape == (IN, OUT // 4) and row.weight.partition_dim == 1 and is_sharded(row.weight)
    assert row.bias.shape == (IN,) and row.bias.tensor_model_parallel is False
    assert emb.weight.shape == (3, IN) and (emb.vocab_start, emb.vocab_end) == (9, 12)
    assert col.weight.init == ("normal", 0.02) and col.bias.init == ("zeros",) and row.bias.init == ("zeros",)


def test_bad_sizes_and_virtual_collectives_are_clear_errors():
    ps = ParallelState.virtual(4, 0)
    with pytest.raises(ValueError, match=r"out_features \(6\) is not divisible by the tensor-model-parallel size"):
        ColumnParallelLinear(IN, 6, ps)
    with pytest.raises(ValueError, match=r"in_features \(6\)"):
        RowParallelLinear(6, IN, ps)
    with pytest.raises(ValueError, match=r"num_embeddings .*\(10\)"):
        VocabParallelEmbedding(10, IN, ps)
    x = torch.randn(2, 8)
    for f in (copy_to_tp, reduce_from_tp, scatter_to_tp_last_dim, gather_from_tp_last_dim):
        with pytest.raises(RuntimeError, match="no process groups.*from_world"):
            f(x, ps)


def test_cross_entropy_input_errors():
    ps = ParallelState.single()
    logits = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"labels of shape \(2, 4\) do not match logits of shape \(2, 3, 8\)"):
        vocab_parallel_cross_entropy(logits, torch.zeros(2, 4, dtype=torch.long), ps)
    with pytest.raises(ValueError, match=r"vocab_size=9 must be in \[1, 8\]"):
        vocab_parallel_cross_entropy(logits, torch.zeros(2, 3, dtype=torch.long), ps, vocab_size=9)
    with pytest.raises(ValueError, match="label is >= the vocabulary size 6"):
        vocab_parallel_cross_entropy(logits, torch.full((2, 3), 6), ps, vocab_size=6)
    with pytest.raises(TypeError, match="integer token ids"):
        vocab_parallel_cross_entropy(logits, torch.zeros(2, 3), ps)


def test_cross_entropy_low_precision_logits_compute_in_fp32():
    ps = ParallelState.single()
    logits = torch.randn(4, 16).to(torch.bfloat16).requires_grad_()
    labels = torch.tensor([1, 15, -100, 0])
    loss = vocab_parallel_cross_entropy(logits, labels, ps)
    assert loss.dtype == torch.float32
    want = F.cross_entropy(logits.float(), labels, reduction="none")
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-5)
    loss.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
