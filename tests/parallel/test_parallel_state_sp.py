"""ParallelState's sequence-parallel dimension on a real 4-rank gloo world: Megatron's TP x SP x DP
rank layout (rank = tp + T * (sp + S * dp)) for 2x2x1, 1x2x2 and 2x1x2, the real process groups
behind it, the mpu methods DeepSpeed calls, and DeepSpeed (ZeRO-0 and ZeRO-2) reducing gradients
over SP x DP into the gradient of the unsharded full-batch loss. Also: the divisibility error, and
sp_size=1 creating exactly the groups of before.

One 4-rank spawn serves every world-4 test: spawning ranks and importing DeepSpeed cost far more
than the checks."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from megatron_lite.parallel import ParallelState
from megatron_lite.testing import run_distributed

WORLD = 4
LAYOUTS = [(2, 2, 1), (1, 2, 2), (2, 1, 2)]  # (TP, SP, DP)
SEED, HIDDEN, MICRO, LOCAL_SEQ = 1234, 4, 2, 3  # per rank: MICRO samples x LOCAL_SEQ positions
ZERO_STAGES = (0, 2)


def _expected_layout(tp, sp, dp):
    """Megatron's layout computed independently of ParallelState: rank -> coordinates and groups."""
    coords = {t + tp * (s + sp * d): (t, s, d) for d in range(dp) for s in range(sp) for t in range(tp)}
    assert sorted(coords) == list(range(tp * sp * dp))

    def same(rank, *axes):  # ranks that share `axes` of the coordinates with `rank`, by global rank
        return [r for r in sorted(coords) if all(coords[r][a] == coords[rank][a] for a in axes)]

    return {rank: {"tp_rank": t, "sp_rank": s, "dp_rank": d, "tp": same(rank, 1, 2), "sp": same(rank, 0, 2),
                   "dp": same(rank, 0, 1), "sp_dp": same(rank, 0)}
            for rank, (t, s, d) in coords.items()}


# ---------------------------------------------------------------- what each rank reports
class _RecordGroups:
    """Records the rank lists `from_world` passes to `dist.new_subgroups_by_enumeration`."""

    def __enter__(self):
        self.calls, self._real = [], dist.new_subgroups_by_enumeration

        def record(ranks_per_subgroup_list, *args, **kwargs):
            self.calls.append([list(r) for r in ranks_per_subgroup_list])
            return self._real(ranks_per_subgroup_list, *args, **kwargs)

        dist.new_subgroups_by_enumeration = record
        return self

    def __exit__(self, *exc):
        dist.new_subgroups_by_enumeration = self._real


def _describe(ps):
    def ranks(group):
        return dist.get_process_group_ranks(group)

    # A sum over each group proves the groups communicate, not just that they exist.
    sums = {}
    for name, group in (("tp", ps.tp_group), ("sp", ps.sp_group), ("dp", ps.dp_group),
                        ("sp_dp", ps.sp_dp_group)):
        t = torch.tensor([float(ps.global_rank)])
        dist.all_reduce(t, group=group)
        sums[name] = t.item()
    return {
        "ranks": (ps.tp_rank, ps.sp_rank, ps.dp_rank),
        "sizes": (ps.tp_size, ps.sp_size, ps.dp_size, ps.world_size),
        "fields": {"tp": list(ps.tp_group_ranks), "sp": list(ps.sp_group_ranks),
                   "dp": list(ps.dp_group_ranks), "sp_dp": list(ps.sp_dp_group_ranks)},
        "groups": {"tp": ranks(ps.tp_group), "sp": ranks(ps.sp_group), "dp": ranks(ps.dp_group),
                   "sp_dp": ranks(ps.sp_dp_group), "self": ranks(ps.self_group)},
        "mpu": {
            "tp": (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
                   ranks(ps.get_tensor_model_parallel_group())),
            "mp": (ps.get_model_parallel_rank(), ps.get_model_parallel_world_size(),
                   ranks(ps.get_model_parallel_group())),
            "tp_src": ps.get_tensor_model_parallel_src_rank(),
            "dp": (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
                   ranks(ps.get_data_parallel_group()), ps.get_data_parallel_group_ranks()),
            "sp": (ps.get_sequence_parallel_rank(), ps.get_sequence_parallel_world_size(),
                   ranks(ps.get_sequence_parallel_group())),
            "sp_dp": (ps.get_sequence_data_parallel_rank(), ps.get_sequence_data_parallel_world_size(),
                      ranks(ps.get_sequence_data_parallel_group())),
            "pp": (ps.get_pipe_parallel_rank(), ps.get_pipe_parallel_world_size(),
                   ranks(ps.get_pipe_parallel_group())),
            # DeepSpeed takes this as "ignore the mpu's DP and model-parallel groups".
            "has_initialize_sequence_parallel": hasattr(ps, "initialize_sequence_parallel"),
        },
        "sums": sums,
        "repr": repr(ps),
    }


def _batch(tp, sp, dp):
    """The global batch [DP * MICRO, SP * LOCAL_SEQ, HIDDEN] of inputs and targets of a layout."""
    g = torch.Generator().manual_seed(7)
    shape = (dp * MICRO, sp * LOCAL_SEQ, HIDDEN)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _model():
    torch.manual_seed(SEED)  # the same weights in every rank and in the reference
    return nn.Linear(HIDDEN, HIDDEN)


def _loss(model, x, y, replica_numel):
    # Sum of squares over the local elements / elements of the DP replica's whole sequence-batch:
    # the SP-sum of the local losses is the replica's mean loss, as DeepSpeed's convention needs.
    return (torch.tanh(model(x)) - y).pow(2).sum() / replica_numel


def _deepspeed_grads(ps, stage):
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    x, y = _batch(ps.tp_size, ps.sp_size, ps.dp_size)
    rows = slice(ps.dp_rank * MICRO, (ps.dp_rank + 1) * MICRO)
    cols = slice(ps.sp_rank * LOCAL_SEQ, (ps.sp_rank + 1) * LOCAL_SEQ)
    model = _model()
    # No train_batch_size: DeepSpeed derives it as micro x grad-acc x the mpu's (pure) DP size.
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
              "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config, mpu=ps)
    loss = _loss(engine, x[rows, cols], y[rows, cols], MICRO * ps.sp_size * LOCAL_SEQ * HIDDEN)
    engine.backward(loss)  # at the accumulation boundary: the gradients are reduced here
    # Plain .grad at stage 0; ZeRO-2 keeps reduced partitions, which safe_get_full_grad gathers.
    grads = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()}
    return {"train_batch_size": engine.train_batch_size(), "grads": grads}


def _world4_rank(rank, world_size):
    out = {"errors": {}}
    # Bad sizes raise before any group is created, so they do not desynchronise the ranks.
    for tp, sp in ((2, 4), (3, 1), (1, 3), (1, 0)):
        try:
            ParallelState.from_world(tp, sp_size=sp)
        except ValueError as e:
            out["errors"][(tp, sp)] = str(e)

    with _RecordGroups() as rec:
        default = ParallelState.from_world(2)
    out["default"] = {"calls": rec.calls, "describe": _describe(default),
                      "sp_group_is_self_group": default.sp_group is default.self_group,
                      "sp_dp_group_is_dp_group": default.sp_dp_group is default.dp_group}

    for tp, sp, dp in LAYOUTS:
        with _RecordGroups() as rec:
            ps = ParallelState.from_world(tp, sp_size=sp)
        out[(tp, sp, dp)] = {"calls": rec.calls, "describe": _describe(ps),
                             "deepspeed": {stage: _deepspeed_grads(ps, stage) for stage in ZERO_STAGES}}
    return out


@pytest.fixture(scope="module")
def world4():
    return run_distributed(_world4_rank, WORLD)


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "tp{}_sp{}_dp{}".format(*l))
def test_layout_groups_and_mpu_match_megatron(world4, layout):
    tp, sp, dp = layout
    expected = _expected_layout(tp, sp, dp)
    for rank, result in enumerate(world4):
        d, e = result[layout]["describe"], expected[rank]
        assert d["ranks"] == (e["tp_rank"], e["sp_rank"], e["dp_rank"])
        assert d["sizes"] == (tp, sp, dp, WORLD)
        for axis in ("tp", "sp", "dp", "sp_dp"):
            assert d["fields"][axis] == d["groups"][axis] == e[axis], (rank, axis)
            assert d["sums"][axis] == sum(e[axis]), (rank, axis)
        assert d["groups"]["self"] == [rank]
        m = d["mpu"]
        assert m["tp"] == m["mp"] == (e["tp_rank"], tp, e["tp"]) and m["tp_src"] == e["tp"][0]
        assert m["dp"] == (e["dp_rank"], dp, e["dp"], e["dp"])
        assert m["sp"] == (e["sp_rank"], sp, e["sp"])
        assert m["sp_dp"] == (e["sp_dp"].index(rank), sp * dp, e["sp_dp"])
        assert m["pp"] == (0, 1, [rank])
        assert not m["has_initialize_sequence_parallel"]
        assert f"sp {e['sp_rank']}/{sp}" in d["repr"]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "tp{}_sp{}_dp{}".format(*l))
def test_layout_creates_no_redundant_groups(world4, layout):
    for result in world4:
        calls = [frozenset(map(tuple, c)) for c in result[layout]["calls"]]
        assert len(set(calls)) == len(calls), calls
        assert result[layout]["calls"] == world4[0][layout]["calls"]  # every rank, the same order


@pytest.mark.parametrize("stage", ZERO_STAGES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "tp{}_sp{}_dp{}".format(*l))
def test_deepspeed_sp_dp_reduction_gives_the_unsharded_gradient(world4, layout, stage):
    tp, sp, dp = layout
    ref = _model()
    x, y = _batch(tp, sp, dp)
    _loss(ref, x, y, x.numel()).backward()  # the full-batch mean loss, nothing sharded
    for rank, result in enumerate(world4):
        r = result[layout]["deepspeed"][stage]
        assert r["train_batch_size"] == MICRO * dp  # sized by the pure DP group, not SP x DP
        for name, p in ref.named_parameters():
            torch.testing.assert_close(r["grads"][name], p.grad, rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"rank {rank} {name}: {m}")


def test_sp1_default_creates_exactly_the_old_groups(world4):
    # What from_world(2) created at world 4 before SP existed: TP, DP, then one-rank groups.
    old_calls = [[[0, 1], [2, 3]], [[0, 2], [1, 3]], [[0], [1], [2], [3]]]
    for rank, result in enumerate(world4):
        r = result["default"]
        assert r["calls"] == old_calls
        assert r["sp_group_is_self_group"] and r["sp_dp_group_is_dp_group"]
        d = r["describe"]
        assert d["ranks"] == (rank % 2, 0, rank // 2) and d["sizes"] == (2, 1, 2, WORLD)
        assert d["groups"]["tp"] == [2 * (rank // 2), 2 * (rank // 2) + 1]
        assert d["groups"]["dp"] == d["groups"]["sp_dp"] == [rank % 2, rank % 2 + 2]
        assert d["groups"]["sp"] == d["groups"]["self"] == [rank]
        assert d["mpu"]["sp"] == (0, 1, [rank])
        assert d["mpu"]["sp_dp"] == (rank // 2, 2, [rank % 2, rank % 2 + 2])


def test_indivisible_world_is_a_one_line_error(world4):
    for result in world4:
        errors = result["errors"]
        assert set(errors) == {(2, 4), (3, 1), (1, 3), (1, 0)}
        for (tp, sp), message in errors.items():
            assert "\n" not in message and "world size 4" in message
            assert "--tensor-model-parallel-size" in message and "--sequence-parallel-size" in message
        for tp, sp in ((2, 4), (3, 1), (1, 3)):
            assert (f"world size 4 is not divisible by tensor-model-parallel size {tp} x sequence-parallel "
                    f"size {sp}") in errors[(tp, sp)]
            assert f"launch a multiple of {tp * sp} processes" in errors[(tp, sp)]
        assert "must be at least 1" in errors[(1, 0)]


def test_single_and_virtual_states_have_size1_sp():
    s, v = ParallelState.single(), ParallelState.virtual(4, 2)
    assert (s.sp_size, s.sp_rank, s.sp_group, s.sp_dp_group, s.sp_group_ranks) == (1, 0, None, None, (0,))
    assert (v.get_sequence_parallel_rank(), v.get_sequence_parallel_world_size()) == (0, 1)
    assert (v.get_sequence_data_parallel_rank(), v.get_sequence_data_parallel_world_size()) == (0, 1)
    assert v.sp_group_ranks == v.sp_dp_group_ranks == v.dp_group_ranks == (2,)
    assert repr(v) == "ParallelState(virtual, tp 2/4, sp 0/1, dp 0/1, rank 2/4)"
    with pytest.raises(ValueError, match=r"sp_rank=2 is not in \[0, sp_size=2\)"):
        ParallelState(sp_size=2, sp_rank=2)
