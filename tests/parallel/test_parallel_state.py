"""ParallelState: the TP x DP grid on a real gloo world, the mpu methods DeepSpeed calls, DeepSpeed
itself taking it as its mpu (ZeRO-2 at TP=2 x DP=2 reports the unsharded model's global grad norm
and takes the same clipped Adam step), and the group-less single/virtual states.

One 4-rank spawn serves both world-4 tests: spawning ranks costs far more than the checks."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megatron_lite.parallel import (ColumnParallelLinear, ParallelState, RowParallelLinear, VocabParallelEmbedding,
                                    initialize_parameters, is_sharded, mark_replicated, merge_shards,
                                    parallel_lm_logits, set_init, vocab_parallel_cross_entropy)
from megatron_lite.testing import run_distributed


def _describe(ps):
    def ranks(group):
        return dist.get_process_group_ranks(group)

    # A sum over each group proves the groups communicate, not just that they exist.
    tp_sum, dp_sum = torch.tensor([float(ps.global_rank)]), torch.tensor([float(ps.global_rank)])
    dist.all_reduce(tp_sum, group=ps.get_tensor_model_parallel_group())
    dist.all_reduce(dp_sum, group=ps.get_data_parallel_group())
    return {
        "tp": (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
        "mp": (ps.get_model_parallel_rank(), ps.get_model_parallel_world_size()),
        "dp": (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()),
        "pp": (ps.get_pipe_parallel_rank(), ps.get_pipe_parallel_world_size(),
               ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()),
        "sp": (ps.get_sequence_parallel_rank(), ps.get_sequence_parallel_world_size()),
        "tp_ranks": ranks(ps.get_tensor_model_parallel_group()),
        "mp_ranks": ranks(ps.get_model_parallel_group()),
        "dp_ranks": ranks(ps.get_data_parallel_group()),
        "dp_group_ranks": ps.get_data_parallel_group_ranks(),
        "pp_ranks": ranks(ps.get_pipeline_model_parallel_group()),
        "pipe_ranks": ranks(ps.get_pipe_parallel_group()),
        "tp_src": ps.get_tensor_model_parallel_src_rank(),
        "sums": (tp_sum.item(), dp_sum.item()),
    }


# ---------------------------------------------------------------- DeepSpeed with ParallelState as mpu
SEED = 1234
PADDED_VOCAB, TRUE_VOCAB, HIDDEN, FFN = 16, 13, 8, 16
MICRO, DP, SEQ = 2, 2, 5
LR, CLIP = 1e-2, 0.05  # CLIP below the grad norm, so the clipping path runs

DS_CONFIG = {
    "train_batch_size": MICRO * DP,
    "train_micro_batch_size_per_gpu": MICRO,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "Adam", "params": {"lr": LR, "torch_adam": True, "adam_w_mode": False,
                                             "weight_decay": 0.0}},
    "zero_optimization": {"stage": 2},
    "gradient_clipping": CLIP,
    "steps_per_print": 10**9,
}


class TinyLM(nn.Module):
    """Embedding -> column/row MLP -> replicated norm weight -> tied vocab-parallel head."""

    def __init__(self, ps):
        super().__init__()
        self.ps = ps
        self.embed = VocabParallelEmbedding(PADDED_VOCAB, HIDDEN, ps)
        self.up = ColumnParallelLinear(HIDDEN, FFN, ps)
        self.down = RowParallelLinear(FFN, HIDDEN, ps)
        self.norm_weight = set_init(mark_replicated(nn.Parameter(torch.ones(HIDDEN))), "ones")

    def forward(self, ids, labels):
        h = self.embed(ids)
        h = h + self.down(F.gelu(self.up(h)))
        h = F.layer_norm(h, (HIDDEN,), self.norm_weight)
        logits = parallel_lm_logits(h, self.embed.weight, self.ps)
        return vocab_parallel_cross_entropy(logits, labels, self.ps, TRUE_VOCAB).mean()


def _global_batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, TRUE_VOCAB, (MICRO * DP, SEQ), generator=g)
    labels = torch.randint(0, TRUE_VOCAB, (MICRO * DP, SEQ), generator=g)
    return ids, labels


def _deepspeed_step(ps):
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    model = TinyLM(ps)
    initialize_parameters(model, SEED, ps)
    ids, labels = _global_batch()
    mine = slice(ps.dp_rank * MICRO, (ps.dp_rank + 1) * MICRO)
    # torch.distributed is already initialised: deepspeed wraps the existing world.
    engine, *_ = deepspeed.initialize(model=model, config=DS_CONFIG, mpu=ps)
    loss = engine(ids[mine], labels[mine])
    engine.backward(loss)
    engine.step()
    return {"tp_rank": ps.tp_rank, "dp_rank": ps.dp_rank, "loss": loss.item(),
            "grad_norm": float(engine.get_global_grad_norm()),
            "params": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
            "tags": {n: (is_sharded(p), p.partition_dim) for n, p in engine.module.named_parameters()}}


def _world4_rank(rank, world_size):
    ps = ParallelState.from_world(tp_size=2)
    return {"groups": _describe(ps), "deepspeed": _deepspeed_step(ps)}


@pytest.fixture(scope="module")
def world4():
    return run_distributed(_world4_rank, 4)


def _world3_rank(rank, world_size):
    try:
        ParallelState.from_world(tp_size=2)
        error = None
    except ValueError as e:
        error = str(e)
    # The size-1 dimensions still get real one-rank groups (DeepSpeed reduces over them).
    return {"error": error, "tp3": _describe(ParallelState.from_world(tp_size=3)),
            "tp1": _describe(ParallelState.from_world(tp_size=1))}


def test_world4_tp2_groups_and_mpu(world4):
    for rank, d in enumerate(r["groups"] for r in world4):
        tp_rank, dp_rank = rank % 2, rank // 2
        tp_ranks, dp_ranks = [2 * dp_rank, 2 * dp_rank + 1], [tp_rank, tp_rank + 2]
        assert d["tp"] == d["mp"] == (tp_rank, 2)
        assert d["dp"] == (dp_rank, 2)
        assert d["pp"] == (0, 1, 0, 1) and d["sp"] == (0, 1)
        assert d["tp_ranks"] == d["mp_ranks"] == tp_ranks
        assert d["dp_ranks"] == d["dp_group_ranks"] == dp_ranks
        assert d["pp_ranks"] == d["pipe_ranks"] == [rank]
        assert d["tp_src"] == tp_ranks[0]
        assert d["sums"] == (sum(tp_ranks), sum(dp_ranks))


def test_world3_bad_tp_is_a_clear_error_and_size1_dims_get_groups():
    for rank, d in enumerate(run_distributed(_world3_rank, 3)):
        assert "world size 3 is not divisible by tensor-model-parallel size 2" in d["error"]
        assert "--tensor-model-parallel-size" in d["error"]
        tp3, tp1 = d["tp3"], d["tp1"]
        assert tp3["tp"] == (rank, 3) and tp3["dp"] == (0, 1)
        assert tp3["tp_ranks"] == [0, 1, 2] and tp3["dp_ranks"] == tp3["pp_ranks"] == [rank]
        assert tp1["tp"] == (0, 1) and tp1["dp"] == (rank, 3)
        assert tp1["tp_ranks"] == tp1["pp_ranks"] == [rank] and tp1["dp_ranks"] == [0, 1, 2]
        assert tp1["sums"] == (rank, 3) and tp3["sums"] == (3, rank)


def test_single_and_virtual_states():
    s = ParallelState.single()
    assert (s.tp_size, s.tp_rank, s.dp_size, s.dp_rank) == (1, 0, 1, 0)
    assert s.get_model_parallel_group() is None and s.get_data_parallel_group_ranks() == [0]
    v = ParallelState.virtual(4, 2)
    assert (v.get_tensor_model_parallel_rank(), v.get_tensor_model_parallel_world_size()) == (2, 4)
    assert v.get_data_parallel_world_size() == 1 and v.tp_src_rank == 0
    with pytest.raises(RuntimeError, match="virtual ParallelState .*tp_size=4, tp_rank=2.* no process groups"):
        v.require_tp_group()
    with pytest.raises(ValueError, match=r"tp_rank=4 is not in \[0, tp_size=4\)"):
        ParallelState.virtual(4, 4)


def test_from_world_needs_an_initialised_world():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="needs an initialised torch.distributed world"):
        ParallelState.from_world(1)


def test_deepspeed_zero2_tp2_dp2_matches_unsharded_model(world4):
    results = [r["deepspeed"] for r in world4]

    ref = TinyLM(ParallelState.single())
    initialize_parameters(ref, SEED, ParallelState.single())
    ids, labels = _global_batch()
    # DeepSpeed averages the DP ranks' gradients, i.e. of the mean of their micro-batch losses.
    losses = [ref(ids[d * MICRO:(d + 1) * MICRO], labels[d * MICRO:(d + 1) * MICRO]) for d in range(DP)]
    torch.stack(losses).mean().backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP).item()
    assert ref_norm > CLIP, "the test needs the norm above the clip threshold to exercise clipping"
    torch.optim.Adam(ref.parameters(), lr=LR).step()

    for r in results:
        assert abs(r["loss"] - losses[r["dp_rank"]].item()) < 1e-5, r["loss"]
        assert abs(r["grad_norm"] - ref_norm) <= 1e-5 * ref_norm, (r["grad_norm"], ref_norm)

    by_pos = {(r["tp_rank"], r["dp_rank"]): r for r in results}
    for name, p in ref.named_parameters():
        assert results[0]["tags"][name] == (is_sharded(p), p.partition_dim)
        for dp in range(DP):
            shards = [by_pos[(tp, dp)]["params"][name] for tp in range(2)]
            got = merge_shards(shards, p.partition_dim) if is_sharded(p) else shards[0]
            if not is_sharded(p):
                torch.testing.assert_close(shards[1], shards[0], rtol=0, atol=0)
            torch.testing.assert_close(got, p.detach(), rtol=1e-5, atol=1e-6, msg=f"{name} after one step")
