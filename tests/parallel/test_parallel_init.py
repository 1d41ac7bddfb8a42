"""TP-invariant initialisation: the shards built at TP 2 and 4 (virtual ranks, one process) concatenate
to exactly the TP=1 tensors."""
import pytest
import torch
import torch.nn as nn

from megatron_lite.parallel import (ColumnParallelLinear, ParallelState, RowParallelLinear, VocabParallelEmbedding,
                                    initialize_parameters, is_sharded, mark_replicated, merge_shards, param_seed,
                                    set_init, set_partition_tags, take_shard)

SEED = 2024


class Block(nn.Module):
    def __init__(self, ps):
        super().__init__()
        self.embed = VocabParallelEmbedding(32, 8, ps)
        self.qkv = ColumnParallelLinear(8, 24, ps, init_std=0.1)
        self.out = RowParallelLinear(8, 8, ps)
        self.norm = set_init(mark_replicated(nn.Parameter(torch.empty(8))), "ones")
        # A fused [a; b] weight, sharded as two interleaved blocks.
        fused = nn.Parameter(torch.empty(2 * 8 // ps.tp_size, 8))
        self.fused = set_init(set_partition_tags(fused, 0, stride=2), "normal", 1.0)


def _build(tp_size, tp_rank, seed=SEED):
    ps = ParallelState.single() if tp_size == 1 else ParallelState.virtual(tp_size, tp_rank)
    m = Block(ps)
    initialize_parameters(m, seed, ps)
    return m


def test_shards_concatenate_to_the_tp1_tensors():
    full = dict(_build(1, 0).named_parameters())
    for tp in (2, 4):
        ranks = [dict(_build(tp, r).named_parameters()) for r in range(tp)]
        for name, ref in full.items():
            shards = [rank[name].detach() for rank in ranks]
            if is_sharded(ref):
                got = merge_shards(shards, ref.partition_dim, ref.partition_stride)
            else:
                got = shards[0]
                for s in shards[1:]:
                    assert torch.equal(s, got), f"replicated {name} differs across TP ranks at TP {tp}"
            assert torch.equal(got, ref.detach()), f"{name} at TP {tp} differs from TP 1"


def test_init_specs_seeds_and_names_matter():
    a, b = dict(_build(1, 0).named_parameters()), dict(_build(1, 0, seed=SEED + 1).named_parameters())
    assert torch.all(a["norm"] == 1) and torch.all(a["qkv.bias"] == 0)
    assert not torch.equal(a["qkv.weight"], b["qkv.weight"]), "the seed must change the weights"
    assert not torch.equal(a["out.weight"], a["embed.weight"][:8, :8]), "different names must draw differently"
    assert abs(a["qkv.weight"].std().item() - 0.1) < 0.03
    assert param_seed(SEED, "qkv.weight") == param_seed(SEED, "qkv.weight") != param_seed(SEED, "qkv.bias")


def test_stride_shards_take_a_chunk_of_every_block():
    full = torch.arange(8.0).reshape(8, 1)   # blocks [0..3] and [4..7]
    assert take_shard(full, 0, 2, 0, stride=2).flatten().tolist() == [0, 1, 4, 5]
    assert take_shard(full, 0, 2, 1, stride=2).flatten().tolist() == [2, 3, 6, 7]
    shards = [take_shard(full, 0, 2, r, stride=2) for r in range(2)]
    assert torch.equal(merge_shards(shards, 0, stride=2), full)
    with pytest.raises(ValueError, match="cannot be split into 2 block"):
        take_shard(torch.zeros(6, 1), 0, 2, 0, stride=2)


def test_casts_to_the_parameter_dtype():
    m64 = Block(ParallelState.single()).double()
    initialize_parameters(m64, SEED, ParallelState.single())
    m32 = _build(1, 0)
    assert m64.qkv.weight.dtype == torch.float64
    assert torch.equal(m64.qkv.weight.float(), m32.qkv.weight)


def test_missing_tags_are_errors_naming_the_parameter():
    m = nn.Module()
    m.scale = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=r"parameter 'scale' \(shape \(3,\)\).*no init tag.*set_init"):
        initialize_parameters(m, SEED, ParallelState.single())
    set_init(m.scale, "ones")
    with pytest.raises(ValueError, match=r"parameter 'scale'.*no partition tags.*mark_replicated"):
        initialize_parameters(m, SEED, ParallelState.single())
    with pytest.raises(ValueError, match="bad init spec"):
        set_init(m.scale, "uniform", 1.0)
    with pytest.raises(ValueError, match="partition_dim 1 is out of range"):
        set_partition_tags(m.scale, 1)
