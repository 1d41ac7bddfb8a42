"""Run a function on N gloo ranks spawned in-process: the harness of the distributed tests.

Tests and benchmarks call `run_distributed(fn, world_size, *args)`; `fn(rank, world_size, *args)`
runs in each rank with torch.distributed initialised (gloo, one thread per rank so two ranks do
not oversubscribe two cores) and its return value comes back in a list indexed by rank.
"""
from __future__ import annotations

import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_lite.parallel.launch import exit_process, free_port


def _worker(rank, fn, world_size, port, result_dir, threads, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            init_method=f"tcp://127.0.0.1:{port}")
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))
    except BaseException:
        # mp.spawn reports only the first failure; print every rank's traceback for the log.
        traceback.print_exc()
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Without the interpreter's teardown, which can abort a finished rank (exit_process says why)
    # and mp.spawn would report it as killed.
    exit_process(0)


def run_distributed(fn, world_size: int, *args, threads: int = 1):
    """Spawn `world_size` gloo ranks running `fn(rank, world_size, *args)`; return their results."""
    with tempfile.TemporaryDirectory() as result_dir:
        mp.spawn(_worker, args=(fn, world_size, free_port(), result_dir, threads, args),
                 nprocs=world_size, join=True)
        return [torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=False)
                for r in range(world_size)]


def run_entry_point(rank, world_size, module: str, argv: list[str]):
    """A rank function for `run_distributed`: `module.main(argv)` of an entry point
    (`pretrain_gpt`, `generate`, ...), importable from any test without pickling a local."""
    import importlib
    return importlib.import_module(module).main(argv)
