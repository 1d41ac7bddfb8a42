"""Our own CPU kernels, built from source on first use.

`attention.cpp` trains attention with 64-wide heads in fp32 on AVX-512 CPUs: causal
self-attention (GPT, LingLong), and T5's attention with its bias read in parts.
The blocked torch path (`models.blocks._QueryBlockedCausalAttention`) runs the same arithmetic as
batched GEMMs, and MKL ran those 64-wide products at about 75% of a thread's peak; the kernel's
register tiles of 8 query rows ran the attention's forward and backward in 30 ms against 43 ms
at LingLong-106M's [12, 1024, 64] on 2 threads, and its attention block 1.12x as fast
(BENCHMARKS.md, sections "Training throughput (GPT)" and "Layer levers", row
`attention_kernel`).

The same kernel has a second pair of entry points, `forward_lse`/`backward_lse`, that keep a
log-sum-exp per row instead of the probabilities and recompute them in backward, where the
softmax may span more keys than the kernel saw: LingLong's block-sparse layers run their own
causal blocks through it (`models.blocks._own_blocks`).

`biased_forward`/`biased_backward` add a bias to the scores that is never formed as a
[b, h, S, T] tensor: T5's relative position bias as one value per key - query distance (its
gradient summed along the diagonals in the kernel), a per-key bias for padding and a causal
rule (`BiasedAttention`; `models.t5.ScoreBias`). That tensor is 8 MB at LongLM-small's encoder
(8 heads, 512 x 512), read by every layer, with a gradient of the same size per layer. Forward and
backward of one LongLM-small encoder attention (512 tokens, 8 heads, its bias formed and its
gradient taken, one thread, by hand) took 19 ms against the torch path's 33 ms; the whole
training step ran 1.05x (BENCHMARKS.md, section "Training throughput (T5)"). Attention dropout
is hashed from a seed and the position in the kernel (no mask tensor), in the causal entry
points too: with LongLM's 0.1 the whole step ran 1.13x, with LingLong-106M's 1.48x.

The build (about 25 s, once) goes through `torch.utils.cpp_extension` into
`$TORCH_EXTENSIONS_DIR` (the Makefile keeps it in the virtual environment), as DeepSpeed's CPU ops
do. Where it cannot build or run (no compiler, no AVX-512) callers fall back to the torch path
with one warning; `MEGATRON_LITE_CPU_ATTENTION_KERNEL=0` or `use_attention_kernel(False)` turns
it off.
"""
from __future__ import annotations

import hashlib
import os
import platform
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("attention.cpp")
# -march=native, as DeepSpeed builds its CPU ops: with only the AVX-512 flags (-mavx512f ...)
# the forward ran 1.75x slower here (19.5 against 11.1 ms at [12, 1024, 64]). The build's name
# carries this CPU's feature flags, so that machines sharing $TORCH_EXTENSIONS_DIR never load
# each other's builds. -ffast-math lets the softmax's exp vectorize (glibc's vector math); it
# is a compile flag only, never a link flag, so the process's floating-point mode (denormals)
# stays as it was.
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math"]
HEAD_DIM = 64
SEQ_MULTIPLE = 32

_enabled = os.environ.get("MEGATRON_LITE_CPU_ATTENTION_KERNEL", "1") != "0"
_module = None
_unavailable: str | None = None


def _build_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        cpu = ""
    cpu = cpu or platform.processor() or platform.machine()
    return "megatron_lite_attention_" + hashlib.sha1(cpu.encode()).hexdigest()[:10]


def use_attention_kernel(enabled: bool) -> bool:
    """Turn the attention kernel on or off for this process; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def attention_kernel():
    """The built extension, or None when it is off or cannot be built here (warned once)."""
    global _module, _unavailable
    if not _enabled or _unavailable is not None:
        return None
    if _module is None:
        if torch.backends.cpu.get_cpu_capability() != "AVX512":
            _unavailable = "this CPU has no AVX-512"
        else:
            try:
                from torch.utils.cpp_extension import load
                _module = load(_build_name(), [str(_SOURCE)],
                               extra_cflags=_CFLAGS, verbose=False)
            except Exception as e:  # a missing compiler or ninja: the torch path still trains
                _unavailable = f"it did not build ({type(e).__name__}: {str(e).strip()[:300]})"
        if _unavailable is not None:
            warnings.warn(f"megatron_lite: the CPU causal attention kernel is off: {_unavailable}; "
                          "causal attention runs on torch's kernels instead (slower, same "
                          "results)", RuntimeWarning, stacklevel=2)
            return None
    return _module


def attention_kernel_for(q: torch.Tensor, k: torch.Tensor | None = None):
    """The built extension when q [..., S, d] fits it, fp32 on CPU outside torch.compile with
    d = 64: causal (k None, k and v of q's shape) with S a multiple of 32, or biased over k
    [..., T, d] with S a multiple of 8 and T of 32 (`BiasedAttention`); else None."""
    rows_fit = (q.size(-2) % SEQ_MULTIPLE == 0 if k is None
                else q.size(-2) % 8 == 0 and k.size(-2) % SEQ_MULTIPLE == 0)
    fits = (rows_fit and q.size(-1) == HEAD_DIM and q.device.type == "cpu"
            and q.dtype == torch.float32 and not torch.compiler.is_compiling())
    return attention_kernel() if fits else None


class CausalAttention(torch.autograd.Function):
    """softmax(q kᵀ / 8 + causal mask) v for contiguous fp32 q, k, v [n, T, 64] through the
    kernel; the probabilities (T²/2 per head) are kept for backward. With `dropout_p` > 0 they
    go through dropout before they weigh v, each kept or not by a hash of (`seed`, its position
    in [n, T, T]) that backward recomputes, as in `BiasedAttention`."""

    @staticmethod
    def forward(ctx, q, k, v, dropout_p=0.0, seed=0):
        ctx.kernel = attention_kernel()  # the caller checked that it is there
        out, probs = ctx.kernel.forward(q, k, v, dropout_p, seed)
        ctx.save_for_backward(q, k, v, out, probs)
        ctx.dropout_p, ctx.seed = dropout_p, seed
        return out

    @staticmethod
    def backward(ctx, grad):
        grads = ctx.kernel.backward(grad.contiguous(), *ctx.saved_tensors, ctx.dropout_p,
                                    ctx.seed)
        return (*grads, None, None)


class BiasedAttention(torch.autograd.Function):
    """softmax(q kᵀ · scale + bias) v for fp32 q [b, h, S, 64] over k, v [b, h, T, 64] through
    the kernel, the bias given in parts and never formed as [b, h, S, T] (T5's; each part may be
    None):

    - `rel` [h, S + T - 1]: the relative position bias per distance, key j's bias for query i at
      column j - i + S - 1 (the diagonals of a Toeplitz matrix), with its gradient;
    - `keys` [b, T]: a bias per key, added to every query's scores (padding masks);
    - `causal`: keys after the query masked (S == T).

    With `dropout_p` > 0 the probabilities go through dropout before they weigh v, each kept or
    not by a hash of (`seed`, its position) that backward recomputes: no mask is stored, and the
    same seed gives the same mask (`kernel.dropout_keep_mask` returns it). q, k and v are read
    where they lie; the output comes laid out as [b, S, h, 64] (so the
    heads' merge after it is a view), and the probabilities [b, h, S, T] are kept for backward."""

    @staticmethod
    def forward(ctx, q, k, v, rel, keys, causal, scale, dropout_p=0.0, seed=0):
        ctx.kernel = attention_kernel()  # the caller checked that it is there
        # Read in place so long as each row's values are contiguous (the heads' split of a
        # projection is a view: no copy).
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        rel, keys = (None if x is None else x.contiguous() for x in (rel, keys))
        out, probs = ctx.kernel.biased_forward(q, k, v, rel, keys, causal, scale, dropout_p, seed)
        ctx.save_for_backward(q, k, v, out, probs)
        ctx.scale, ctx.dropout_p, ctx.seed = scale, dropout_p, seed
        return out

    @staticmethod
    def backward(ctx, grad):
        dq, dk, dv, drel = ctx.kernel.biased_backward(
            grad if grad.stride(-1) == 1 else grad.contiguous(), *ctx.saved_tensors, ctx.scale,
            ctx.needs_input_grad[3], ctx.dropout_p, ctx.seed)
        return (dq, dk, dv, None if drel is None else drel.sum(0)) + (None,) * 5
