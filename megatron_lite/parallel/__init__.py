"""Tensor parallelism, Megatron style: process groups, collectives, sharded layers, vocab-parallel
cross entropy, TP-invariant initialisation and stateless randomness. See docs/ARCHITECTURE.md."""
from .collectives import copy_to_tp, gather_from_tp_last_dim, reduce_from_tp, scatter_to_tp_last_dim
from .cross_entropy import (gather_full_logits, vocab_parallel_cross_entropy,
                            vocab_parallel_linear_cross_entropy)
from .init import (initialize_parameters, is_sharded, mark_replicated, merge_shards, param_seed, set_init,
                   set_partition_tags, take_shard)
from .layers import (ColumnParallelLinear, RowParallelLinear, TiedGradient, VocabParallelEmbedding,
                     parallel_lm_logits, tied_gradient)
from .random import RNGContext
from .state import ParallelState

__all__ = [
    "ParallelState",
    "copy_to_tp", "reduce_from_tp", "scatter_to_tp_last_dim", "gather_from_tp_last_dim",
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "parallel_lm_logits",
    "TiedGradient", "tied_gradient",
    "vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy", "gather_full_logits",
    "set_init", "set_partition_tags", "mark_replicated", "is_sharded", "take_shard", "merge_shards",
    "param_seed", "initialize_parameters",
    "RNGContext",
]
