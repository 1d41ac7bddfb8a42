"""Who am I in the TP x SP x DP grid: sizes, ranks and process groups, and the `mpu` DeepSpeed takes.

There is no global state: every layer and collective receives the `ParallelState` it works in, so
tests can hold several (e.g. one virtual state per TP rank) in one process.

Layout (Megatron's, with sequence parallelism placed as its context parallelism): with T = TP size
and S = SP size, global rank = tp + T * (sp + S * dp). TP is innermost, so consecutive ranks form
a tensor-parallel group; a sequence-parallel group holds the ranks with the same (tp, dp), stride T;
a data-parallel group the ranks with the same (tp, sp), stride T * S. The sequence-data-parallel
group (SP x DP together, over which DeepSpeed reduces gradients and shards ZeRO state) holds the
ranks with the same tp, ordered by global rank. At world 8, T=2, S=2, D=2:

    rank            0    1    2    3    4    5    6    7
    tp sp dp       000  100  010  110  001  101  011  111

    TP groups      [0, 1]  [2, 3]  [4, 5]  [6, 7]
    SP groups      [0, 2]  [1, 3]  [4, 6]  [5, 7]
    DP groups      [0, 4]  [1, 5]  [2, 6]  [3, 7]
    SP x DP        [0, 2, 4, 6]  [1, 3, 5, 7]

With S = 1 (the default) this is the plain TP x DP grid: at world 4 and TP 2 the TP groups are
[0, 1] and [2, 3] and the DP groups the strided [0, 2] and [1, 3]. Pipeline parallelism is not
implemented; its size is 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist


@dataclass(eq=False)
class ParallelState:
    tp_size: int = 1
    tp_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    tp_group: Any = None
    dp_group: Any = None
    global_rank: int = 0
    world_size: int = 1
    # Global ranks of this rank's TP and DP groups, in group-rank order.
    tp_group_ranks: tuple = (0,)
    dp_group_ranks: tuple = (0,)
    # A group holding only this rank. DeepSpeed all-reduces over whatever group the mpu returns,
    # and `group=None` means the whole world, so a size-1 dimension still needs a real group.
    self_group: Any = None
    kind: str = field(default="single")  # "single" | "virtual" | "world"
    # Sequence parallelism, appended so the fields above keep their positions. `sp_dp_group` is
    # the sequence-data-parallel group (SP x DP): the ranks holding the same TP shard.
    sp_size: int = 1
    sp_rank: int = 0
    sp_group: Any = None
    sp_group_ranks: tuple = (0,)
    sp_dp_group: Any = None
    sp_dp_group_ranks: tuple = (0,)

    def __post_init__(self):
        for name, size, rank in (("tp", self.tp_size, self.tp_rank), ("sp", self.sp_size, self.sp_rank),
                                 ("dp", self.dp_size, self.dp_rank)):
            if size < 1 or not 0 <= rank < size:
                raise ValueError(f"ParallelState: {name}_rank={rank} is not in [0, {name}_size={size})")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def single(cls) -> "ParallelState":
        """TP=1, SP=1, DP=1, no process groups; works without torch.distributed.

        Not an mpu for DeepSpeed in a multi-process world: its groups are None, which DeepSpeed
        reads as the whole world. Use `from_world(1)` there.
        """
        return cls(kind="single")

    @classmethod
    def virtual(cls, tp_size: int, tp_rank: int) -> "ParallelState":
        """Sizes only, no groups: builds one rank's shards in-process (collectives raise)."""
        return cls(tp_size=tp_size, tp_rank=tp_rank, global_rank=tp_rank, world_size=tp_size,
                   tp_group_ranks=tuple(range(tp_size)), dp_group_ranks=(tp_rank,),
                   sp_group_ranks=(tp_rank,), sp_dp_group_ranks=(tp_rank,), kind="virtual")

    @classmethod
    def from_world(cls, tp_size: int, sp_size: int = 1) -> "ParallelState":
        """Split an initialised torch.distributed world into the TP x SP x DP grid (module docstring)."""
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ParallelState.from_world needs an initialised torch.distributed world: "
                               "call torch.distributed.init_process_group (or run under the deepspeed "
                               "launcher) first, or use ParallelState.single() for one process")
        world, rank = dist.get_world_size(), dist.get_rank()
        tp, sp = tp_size, sp_size
        if tp < 1 or sp < 1:
            raise ValueError(f"--tensor-model-parallel-size ({tp}) and --sequence-parallel-size ({sp}) "
                             f"must be at least 1 (world size {world})")
        if world % (tp * sp) != 0:
            raise ValueError(f"world size {world} is not divisible by tensor-model-parallel size {tp} x "
                             f"sequence-parallel size {sp}: set --tensor-model-parallel-size and "
                             f"--sequence-parallel-size so that their product divides {world}, or launch "
                             f"a multiple of {tp * sp} processes")
        dp = world // (tp * sp)

        def at(t, s, d):
            return t + tp * (s + sp * d)

        tp_lists = [[at(t, s, d) for t in range(tp)] for d in range(dp) for s in range(sp)]
        dp_lists = [[at(t, s, d) for d in range(dp)] for s in range(sp) for t in range(tp)]
        sp_lists = [[at(t, s, d) for s in range(sp)] for d in range(dp) for t in range(tp)]
        sp_dp_lists = [list(range(t, world, tp)) for t in range(tp)]
        # Every rank creates every group in the same order, as torch.distributed requires. A group
        # identical to one already made is reused rather than created again; with sp=1 exactly
        # the TP x DP groups of before are created, in the same order.
        tp_group, _ = dist.new_subgroups_by_enumeration(tp_lists)
        dp_group, _ = dist.new_subgroups_by_enumeration(dp_lists)
        if sp == 1:
            sp_group, sp_dp_group = None, dp_group  # SP groups are one rank: the self group below
        else:
            sp_group, _ = dist.new_subgroups_by_enumeration(sp_lists)
            sp_dp_group = sp_group if dp == 1 else dist.new_subgroups_by_enumeration(sp_dp_lists)[0]
        if tp == 1:
            self_group = tp_group
        elif dp == 1:
            self_group = dp_group
        else:
            self_group, _ = dist.new_subgroups_by_enumeration([[r] for r in range(world)])
        sp_group = self_group if sp == 1 else sp_group

        tp_rank, sp_rank, dp_rank = rank % tp, rank // tp % sp, rank // (tp * sp)
        return cls(tp_size=tp, tp_rank=tp_rank, dp_size=dp, dp_rank=dp_rank,
                   tp_group=tp_group, dp_group=dp_group, global_rank=rank, world_size=world,
                   tp_group_ranks=tuple(at(t, sp_rank, dp_rank) for t in range(tp)),
                   dp_group_ranks=tuple(at(tp_rank, sp_rank, d) for d in range(dp)),
                   self_group=self_group, kind="world",
                   sp_size=sp, sp_rank=sp_rank, sp_group=sp_group,
                   sp_group_ranks=tuple(at(tp_rank, s, dp_rank) for s in range(sp)),
                   sp_dp_group=sp_dp_group, sp_dp_group_ranks=tuple(sp_dp_lists[tp_rank]))

    # ------------------------------------------------------------------ helpers
    @property
    def tp_src_rank(self) -> int:
        """Global rank of TP rank 0 in this rank's TP group."""
        return self.tp_group_ranks[0]

    @property
    def sp_dp_size(self) -> int:
        """Size of the sequence-data-parallel (SP x DP) group."""
        return self.sp_size * self.dp_size

    @property
    def sp_dp_rank(self) -> int:
        """This rank's place in the SP x DP group, which is ordered by global rank."""
        return self.sp_rank + self.sp_size * self.dp_rank

    def require_tp_group(self):
        """The TP process group, or a clear error when this state has none to communicate over."""
        if self.tp_group is None:
            raise RuntimeError(f"a tensor-parallel collective was called on a {self.kind} ParallelState "
                               f"(tp_size={self.tp_size}, tp_rank={self.tp_rank}) that has no process "
                               "groups; build it with ParallelState.from_world(tp_size) on an initialised "
                               "torch.distributed world")
        return self.tp_group

    def __repr__(self) -> str:
        return (f"ParallelState({self.kind}, tp {self.tp_rank}/{self.tp_size}, "
                f"sp {self.sp_rank}/{self.sp_size}, dp {self.dp_rank}/{self.dp_size}, "
                f"rank {self.global_rank}/{self.world_size})")

    # ------------------------------------------------------------------ DeepSpeed's mpu interface
    # The model-parallel group is the TP group, as pipeline parallelism has size 1 and the SP
    # ranks hold the whole model (they split the sequence, not the weights).
    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_model_parallel_group(self):
        return self.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.tp_src_rank

    # The pure DP group: DeepSpeed sizes the batch by it (train_batch_size = micro x grad-acc x
    # DP) and hands out data by its rank, so the SP ranks of a replica must read the same samples.
    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_group_ranks(self) -> list:
        return list(self.dp_group_ranks)

    def get_pipe_parallel_rank(self) -> int:
        return 0

    def get_pipe_parallel_world_size(self) -> int:
        return 1

    def get_pipe_parallel_group(self):
        # DeepSpeed 0.19 only communicates over it when its size is > 1; a real one-rank group
        # keeps any other caller from silently reducing over the world (group=None).
        return self.self_group

    get_pipeline_model_parallel_rank = get_pipe_parallel_rank
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size
    get_pipeline_model_parallel_group = get_pipe_parallel_group

    # Deliberately no `initialize_sequence_parallel`: DeepSpeed 0.19 reads its presence as "this
    # mpu is a pure SP one" and then ignores our DP and model-parallel groups.
    def get_sequence_parallel_rank(self) -> int:
        return self.sp_rank

    def get_sequence_parallel_world_size(self) -> int:
        return self.sp_size

    def get_sequence_parallel_group(self):
        # At sp_size 1 this is the one-rank self group, never None (which DeepSpeed reads as the world).
        return self.sp_group

    def get_sequence_data_parallel_group(self):
        """The SP x DP group: the ranks holding the same TP shard (the DP group when sp_size is 1).

        DeepSpeed broadcasts the initial weights, shards ZeRO state and reduces gradients over
        this group instead of the DP group. Its reduction all-reduces (sums) the gradients over
        the group and divides by SP x DP / SP = DP, so gradients are SUMMED over the SP ranks and
        AVERAGED over the DP ranks. A model that splits a sequence across SP ranks must therefore
        scale each rank's loss so that the SP-sum of the local losses is the loss of the whole
        sequence (e.g. a token mean divides the local sum by the full sequence's token count,
        not by the local one).
        """
        return self.sp_dp_group

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.sp_dp_size

    def get_sequence_data_parallel_rank(self) -> int:
        return self.sp_dp_rank
