"""Model FLOPs utilisation: achieved model FLOPs over the hardware's peak.

Model FLOPs per token come from the model's registry record (PaLM appendix B: 6·N + 12·L·H·Q·T).
The peak on CPU is measured, not looked up: the best of several large fp32 matmuls on this rank's
threads (a single short probe on a shared machine reads 25% high or low), cached per (CPU model,
threads) so only the first run pays for it. On GPUs it comes from a per-dtype table.
"""
from __future__ import annotations

import json
import os
import time

import torch

from megatron_lite.parallel import gemm

_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "megatron_lite", "peak_flops.json")

# Dense tensor-core peaks (FLOP/s) of common training GPUs, by dtype.
_GPU_PEAKS = {
    "A100": {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 19.5e12},
    "H100": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12},
    "V100": {torch.float16: 125e12, torch.float32: 15.7e12},
    "A10": {torch.bfloat16: 125e12, torch.float16: 125e12, torch.float32: 31.2e12},
}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for caches and reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown-cpu"


def probe_cpu_peak(threads: int, size: int = 4096, repeats: int = 5) -> float:
    """Best FLOP/s of `repeats` fp32 size³ matmuls on `threads` threads, through torch's BLAS
    and, when torch has it, oneDNN (which the layers use, `megatron_lite.parallel.gemm`): the
    faster library sets the peak, so MFU is not measured against a slow library's ceiling."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(size, size)
        b = torch.randn(size, size)
        products = [lambda: torch.mm(a, b)]
        if gemm.onednn_available():
            products.append(lambda: gemm.onednn_nt(a, b))
        best = float("inf")
        for product in products:
            product()  # warm up the library's thread pool
            for _ in range(repeats):
                start = time.perf_counter()
                product()
                best = min(best, time.perf_counter() - start)
        return 2.0 * size ** 3 / best
    finally:
        torch.set_num_threads(previous)


def peak_flops_per_rank(dtype: torch.dtype = torch.float32, override: float | None = None) -> float:
    """Peak FLOP/s of one rank: `override` if given, a GPU table entry, or the cached CPU probe."""
    if override:
        return float(override)
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, table in _GPU_PEAKS.items():
            if key in name and dtype in table:
                return table[dtype]
        raise ValueError(f"no peak FLOP/s known for GPU '{name}' in {dtype}; pass --peak-flops")
    threads = torch.get_num_threads()
    # The libraries in the key: caches from before oneDNN took part in the probe are not reused.
    key = f"{cpu_model()}|threads={threads}|blas+onednn"
    cache = {}
    try:
        with open(_CACHE) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        pass
    if key not in cache:
        cache[key] = probe_cpu_peak(threads)
        os.makedirs(os.path.dirname(_CACHE), exist_ok=True)
        tmp = f"{_CACHE}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(tmp, _CACHE)
    return cache[key]
