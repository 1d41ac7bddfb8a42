"""DeepSpeed's CPU all-reduce buffers in /dev/shm are unlinked once every rank has mapped them
(`megatron_lite.parallel.launch.release_shared_memory_names`): DeepSpeed never unlinks them, so
each run used to leave about 69 MB per rank in RAM until reboot."""
import os

import pytest

from megatron_lite.testing import run_distributed

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm (Linux)")


def _start_deepspeed_comm(rank, world_size):
    import deepspeed
    import deepspeed.comm
    import torch

    from megatron_lite.parallel.launch import release_shared_memory_names

    # The deepspeed launcher says how many ranks share the machine; DeepSpeed's shm all-reduce
    # (and its buffers) needs every rank on one machine.
    os.environ["LOCAL_SIZE"] = str(world_size)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    prefix = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
              f"{os.environ['MASTER_PORT']}_")
    before = sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))
    released = release_shared_memory_names()
    again = release_shared_memory_names()  # idempotent (its barrier: both ranks released)
    after = sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))
    # The shared-memory all-reduce still works on the mappings.
    t = torch.full((1000,), float(rank + 1))
    deepspeed.comm.inference_all_reduce(t)
    return before, released, again, after, float(t[0])


def test_deepspeed_cpu_all_reduce_buffers_are_unlinked_and_still_work():
    results = run_distributed(_start_deepspeed_comm, 2)
    if not any(before for before, *_ in results):
        pytest.skip("DeepSpeed made no shared-memory buffers here (its shm_comm op did not build)")
    for rank, (before, released, again, after, total) in enumerate(results):
        assert len(before) == 2 and released and not again, (rank, before, released, again)
        assert after == [] and total == 3.0, (rank, before, after, total)
