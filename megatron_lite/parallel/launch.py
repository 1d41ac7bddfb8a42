"""Process setup shared by every entry point: the torch.distributed world, thread counts and, on
CPU, the allocator.

`init_distributed()` joins the world a launcher (deepspeed, torchrun, our test harness) describes
in RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, or makes a one-rank world when none does, so a
plain `python pretrain_gpt.py ...` and a 64-rank launch run the same code.
"""
from __future__ import annotations

import ctypes
import logging
import os
import socket
import sys
from typing import NoReturn

import torch
import torch.distributed as dist

from megatron_lite.errors import ConfigError


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to 0 and let the kernel pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_OTHER_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")


def keep_freed_memory() -> bool:
    """On a CPU-only machine, have glibc's malloc keep the memory a step frees for the next step,
    instead of handing it back to the kernel; True if it now does.

    A training step allocates and frees the same large buffers every time (activations, weight
    gradients, logits). By default glibc maps each request above its mmap threshold (32 MB at
    most) afresh and returns the free top of its heap, so the next step touches new pages and
    takes a page fault per 4 KB. On the 2-core VM of BENCHMARKS.md that was a third of a tiny
    GPT's step. With no mmaps and no trimming, freed memory is reused, as GPU caching allocators
    do; it stays with the process until it exits, and peaks can grow a little (a freed block
    does not always fit the next request). PyTorch's CPU launcher, `torch.backends.xeon.run_cpu`,
    preloads tcmalloc or jemalloc for the same reason.

    Left alone when CUDA is available (device memory has its own caching allocator), outside
    glibc, when another allocator is preloaded, when the user tunes glibc (any MALLOC_*
    variable), and with MEGATRON_LITE_KEEP_FREED_MEMORY=0."""
    if torch.cuda.is_available() or os.environ.get("MEGATRON_LITE_KEEP_FREED_MEMORY") == "0":
        return False
    if any(name.startswith("MALLOC_") for name in os.environ):
        return False
    if any(name in os.environ.get("LD_PRELOAD", "") for name in _OTHER_ALLOCATORS):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: other C libraries read mallopt's codes otherwise
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # mallopt returns 1 on success; a trim threshold of -1 turns trimming off (man 3 mallopt).
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))


def init_distributed() -> bool:
    """Initialise torch.distributed (gloo on CPU) unless a caller already did; True if we did.

    Without a launcher this is a one-rank world, so the same code runs as one plain process."""
    if dist.is_initialized():
        return False
    if "RANK" not in os.environ:
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            raise ConfigError(
                "SLURM started several tasks, but no launcher set RANK/WORLD_SIZE: each task would "
                "train alone. Run one `deepspeed --no_ssh` launcher per node under srun (README, "
                "\"Launching\")")
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    keep_freed_memory()
    import deepspeed
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               auto_mpi_discovery=False, verbose=False)
    release_shared_memory_names()
    # One rank per core group: ranks sharing a machine split its cores instead of
    # oversubscribing them (each would otherwise start a thread per core). A thread count the
    # user set (OMP_NUM_THREADS, which torch read at start-up) is theirs to keep.
    if os.environ.get("OMP_NUM_THREADS"):
        return True
    local_ranks = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE")
                      or dist.get_world_size())
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, cores // max(1, local_ranks)))
    return True


def release_shared_memory_names() -> bool:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer from /dev/shm once every rank has mapped
    it; True if it did.

    On CPU, DeepSpeed's shm_comm op gives each rank of a one-machine world a shared-memory buffer
    (about 69 MB) named after the master's address and port, and never unlinks it: each run left
    its ranks' buffers in /dev/shm (RAM) until reboot, and here 15 GB of them once got a
    benchmark killed by the OOM killer. Every rank maps every buffer while DeepSpeed's comm
    backend starts, so after a barrier the names can go: the mappings live on until the ranks
    exit, even when they are killed. Collective over the world where DeepSpeed makes the buffers
    (no CUDA, and the launcher's LOCAL_SIZE is the world size: every rank on this machine; the
    same answer on every rank, so no rank waits alone); idempotent."""
    if (not dist.is_initialized() or torch.cuda.is_available()
            or os.environ.get("LOCAL_SIZE") != str(dist.get_world_size())):
        return False
    dist.barrier()  # every rank has mapped every rank's buffer
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{dist.get_rank()}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:
        return False
    return True


def destroy_distributed(owned: bool) -> None:
    """Tear down the world `init_distributed` made (a caller's own world is left alone)."""
    if owned and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(status: int = 0) -> NoReturn:
    """End a command whose run is over: flush its output, then leave without the interpreter's
    teardown.

    Gloo runs native worker threads per process group, and module-level handles (DeepSpeed's,
    ours) can keep a group alive past `destroy_process_group`. Its destruction in a finalizing
    interpreter can abort the process ("terminate called without an active exception", SIGABRT)
    after the run finished and saved everything; the launcher then reports the rank as failed
    and kills the others. Everything the run wrote is closed before its entry point returns."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
