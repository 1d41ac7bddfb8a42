"""Who am I in the TP x DP grid: sizes, ranks and process groups, and the `mpu` DeepSpeed takes.

There is no global state: every layer and collective receives the `ParallelState` it works in, so
tests can hold several (e.g. one virtual state per TP rank) in one process.

Layout (Megatron's): consecutive global ranks form a tensor-parallel group, so at world 4 and
TP 2 the TP groups are [0, 1] and [2, 3] and the data-parallel groups are the strided [0, 2] and
[1, 3]. Pipeline parallelism is not implemented; its size is 1.
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

    def __post_init__(self):
        for name, size, rank in (("tp", self.tp_size, self.tp_rank), ("dp", self.dp_size, self.dp_rank)):
            if size < 1 or not 0 <= rank < size:
                raise ValueError(f"ParallelState: {name}_rank={rank} is not in [0, {name}_size={size})")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def single(cls) -> "ParallelState":
        """TP=1, DP=1, no process groups; works without torch.distributed.

        Not an mpu for DeepSpeed in a multi-process world: its groups are None, which DeepSpeed
        reads as the whole world. Use `from_world(1)` there.
        """
        return cls(kind="single")

    @classmethod
    def virtual(cls, tp_size: int, tp_rank: int) -> "ParallelState":
        """Sizes only, no groups: builds one rank's shards in-process (collectives raise)."""
        return cls(tp_size=tp_size, tp_rank=tp_rank, global_rank=tp_rank, world_size=tp_size,
                   tp_group_ranks=tuple(range(tp_size)), dp_group_ranks=(tp_rank,), kind="virtual")

    @classmethod
    def from_world(cls, tp_size: int) -> "ParallelState":
        """Split an initialised torch.distributed world into TP groups of consecutive ranks."""
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ParallelState.from_world needs an initialised torch.distributed world: "
                               "call torch.distributed.init_process_group (or run under the deepspeed "
                               "launcher) first, or use ParallelState.single() for one process")
        world, rank = dist.get_world_size(), dist.get_rank()
        if tp_size < 1 or world % tp_size != 0:
            raise ValueError(f"world size {world} is not divisible by tensor-model-parallel size {tp_size}: "
                             f"set --tensor-model-parallel-size to a divisor of {world}, or launch a "
                             f"multiple of {tp_size} processes")
        dp_size = world // tp_size
        tp_lists = [list(range(d * tp_size, (d + 1) * tp_size)) for d in range(dp_size)]
        dp_lists = [list(range(t, world, tp_size)) for t in range(tp_size)]
        # Every rank creates every group in the same order, as torch.distributed requires.
        tp_group, _ = dist.new_subgroups_by_enumeration(tp_lists)
        dp_group, _ = dist.new_subgroups_by_enumeration(dp_lists)
        if tp_size == 1:
            self_group = tp_group
        elif dp_size == 1:
            self_group = dp_group
        else:
            self_group, _ = dist.new_subgroups_by_enumeration([[r] for r in range(world)])
        tp_rank, dp_rank = rank % tp_size, rank // tp_size
        return cls(tp_size=tp_size, tp_rank=tp_rank, dp_size=dp_size, dp_rank=dp_rank,
                   tp_group=tp_group, dp_group=dp_group, global_rank=rank, world_size=world,
                   tp_group_ranks=tuple(tp_lists[dp_rank]), dp_group_ranks=tuple(dp_lists[tp_rank]),
                   self_group=self_group, kind="world")

    # ------------------------------------------------------------------ helpers
    @property
    def tp_src_rank(self) -> int:
        """Global rank of TP rank 0 in this rank's TP group."""
        return self.tp_group_ranks[0]

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
                f"dp {self.dp_rank}/{self.dp_size}, rank {self.global_rank}/{self.world_size})")

    # ------------------------------------------------------------------ DeepSpeed's mpu interface
    # The model-parallel group is the TP group, as pipeline parallelism has size 1.
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

    # Sequence parallelism is not implemented. Deliberately no `initialize_sequence_parallel` or
    # `get_sequence_data_parallel_*`: DeepSpeed treats the former as "ignore this mpu's groups"
    # and falls back to our DP group without the latter.
    def get_sequence_parallel_world_size(self) -> int:
        return 1

    def get_sequence_parallel_rank(self) -> int:
        return 0
