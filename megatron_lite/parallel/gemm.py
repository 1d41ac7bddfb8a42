"""The layers' matrix products on CPU through oneDNN, where torch's default BLAS is slower.

torch runs fp32 matrix products on CPU through MKL. On the AMD EPYC (Zen 4) of BENCHMARKS.md,
MKL's kernel for a product against a transposed operand, x·Wᵀ (every linear layer's forward),
ran 10 to 20% under oneDNN's, and its x·W (the input's gradient) up to 10% under; for the
weight's gradient, dyᵀ·x, the faster library depended on the shape (`weight_gradient`). torch
ships oneDNN (its `mkldnn` backend) but calls it for fp32 products only from inductor's compiled
code, so the layers call it here: `linear` (ColumnParallelLinear, RowParallelLinear, the sparse
attention's projection) and `matmul_nt` / `matmul_nn` (the fused output head). BENCHMARKS.md,
section "Layer levers", row `onednn_gemms`, measures the lever on a whole GPT layer.

It applies to fp32 tensors on CPU, outside torch.compile (inductor picks its own kernels) and
autocast, when torch was built with oneDNN. `MEGATRON_LITE_CPU_GEMM=blas`, or
`use_onednn(False)`, keeps every product on torch's BLAS. Results equal torch's within fp32
rounding: the two libraries sum the products in different orders.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

_onednn_linear = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
_AVAILABLE = _onednn_linear is not None and torch.backends.mkldnn.is_available()
_enabled = os.environ.get("MEGATRON_LITE_CPU_GEMM", "onednn").lower() != "blas"
# Below about 2^24 multiply-adds oneDNN's per-call cost outweighs its faster kernel: [128, 64] x
# [64, 256] ran 0.78x MKL's speed, [1024, 64] x [64, 256] level, [1024, 256] x [256, 256] 1.10x
# (2 threads, by hand). Smaller products stay on torch's BLAS.
ONEDNN_MIN_MACS = 1 << 24


def use_onednn(enabled: bool) -> bool:
    """Turn the oneDNN products on or off for this process; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


@contextlib.contextmanager
def onednn_enabled(enabled: bool):
    """`use_onednn(enabled)` for the duration of a with block."""
    previous = use_onednn(enabled)
    try:
        yield
    finally:
        use_onednn(previous)


def onednn_applies(macs: int, *tensors: torch.Tensor | None) -> bool:
    """True when a product of these tensors (None entries ignored) with `macs` multiply-adds
    runs on oneDNN."""
    if not (_enabled and _AVAILABLE) or macs < ONEDNN_MIN_MACS or torch.compiler.is_compiling():
        return False
    return (all(t.device.type == "cpu" and t.dtype == torch.float32
                for t in tensors if t is not None)
            and not torch.is_autocast_enabled("cpu"))


def onednn_available() -> bool:
    """True when torch has oneDNN's products (whether or not they are turned on)."""
    return _AVAILABLE


def onednn_nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [m, k] · b [n, k]ᵀ (+ bias [n]) on oneDNN, fp32 CPU tensors."""
    return _onednn_linear(a, b, bias, "none", [], "")


def matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [m, k] · b [n, k]ᵀ -> [m, n]."""
    return onednn_nt(a, b) if onednn_applies(a.numel() * b.size(0), a, b) else a @ b.t()


def matmul_nn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [m, k] · b [k, n] -> [m, n] (oneDNN reads b's transpose as a strided view)."""
    return onednn_nt(a, b.t()) if onednn_applies(a.numel() * b.size(1), a, b) else a @ b


def weight_gradient(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """gradᵀ [n, m] · x [m, k] -> [n, k], a linear layer's weight gradient. On oneDNN only when
    the layer narrows (k > n, as an MLP's second layer): there oneDNN's kernel ran 1.12x (106M's
    [1024, 3072] -> 768) and 1.18x (2,048 x 1,024 -> 256) MKL's speed on 2 threads, by hand;
    where k <= n MKL's was as fast or faster (0.95x and 0.81x at 768 -> 2,304 and 256 -> 1,024)."""
    n, k = grad.size(1), x.size(1)
    if k > n and onednn_applies(grad.size(0) * n * k, grad, x):
        return onednn_nt(grad.t(), x.t())
    return grad.t() @ x


class _Linear(torch.autograd.Function):
    """F.linear with the forward and the input's gradient on oneDNN, the weight's by
    `weight_gradient`."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        rows = x.reshape(-1, x.size(-1))
        return onednn_nt(rows, weight, bias).view(*x.shape[:-1], weight.size(0))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.reshape(-1, weight.size(0))
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = matmul_nn(grad, weight).view(x.shape)
        if ctx.needs_input_grad[1]:
            dw = weight_gradient(grad, x.reshape(-1, x.size(-1)))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = grad.sum(0)
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), its products on oneDNN where `onednn_applies`."""
    if onednn_applies(x.numel() * weight.size(0), x, weight, bias):
        return _Linear.apply(x, weight, bias)
    return F.linear(x, weight, bias)
