"""The layers' CPU products on oneDNN (`megatron_lite.parallel.gemm`): the same values and
gradients as F.linear, and torch's own path wherever oneDNN does not apply."""
import pytest
import torch
import torch.nn.functional as F

from megatron_lite.parallel import gemm
from megatron_lite.parallel.gemm import linear, matmul_nn, matmul_nt, onednn_enabled

needs_onednn = pytest.mark.skipif(not gemm.onednn_available(), reason="torch without oneDNN")
# Large enough for oneDNN (gemm.ONEDNN_MIN_MACS), small enough for a fast test.
ROWS, IN, OUT = 320, 192, 288


@pytest.fixture(autouse=True)
def onednn_on():
    with onednn_enabled(True):
        yield


def _inputs(x_shape, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*x_shape, generator=g, dtype=torch.float64)
    w = torch.randn(OUT, IN, generator=g, dtype=torch.float64) / IN ** 0.5
    b = torch.randn(OUT, generator=g, dtype=torch.float64) if bias else None
    return [t for t in (x, w, b) if t is not None]


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_shape,strided", [((ROWS, IN), False), ((2, ROWS // 2, IN), False),
                                             ((2, ROWS // 2, IN), True)])
def test_onednn_linear_equals_fp64_linear(x_shape, strided, bias):
    ref = [t.requires_grad_() for t in _inputs(x_shape, bias)]
    ours = [t.detach().float().requires_grad_() for t in ref]
    x = ours[0].transpose(0, 1).contiguous().transpose(0, 1) if strided else ours[0]
    assert x.is_contiguous() != strided
    y = linear(x, *ours[1:], *([None] if not bias else []))
    assert type(y.grad_fn).__name__ == "_LinearBackward", "the oneDNN path must be taken"
    y_ref = F.linear(*ref, *([None] if not bias else []))
    grad = torch.randn_like(y_ref)
    y.backward(grad.float())
    y_ref.backward(grad)
    torch.testing.assert_close(y.double(), y_ref.detach(), rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(ours, ref):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_head_products_equal_torchs():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(ROWS, IN, generator=g), torch.randn(OUT, IN, generator=g)
    c = torch.randn(ROWS, OUT, generator=g)
    torch.testing.assert_close(matmul_nt(a, b), a @ b.t(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(matmul_nn(c, b), c @ b, rtol=1e-5, atol=1e-4)


def test_torchs_path_where_onednn_does_not_apply():
    x, w, b = (t.float().requires_grad_() for t in _inputs((ROWS, IN), True))
    with onednn_enabled(False):  # switched off: exactly F.linear
        y = linear(x, w, b)
    assert type(y.grad_fn).__name__ != "_LinearBackward"
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=0, atol=0)
    small = torch.randn(4, IN)  # below ONEDNN_MIN_MACS
    assert 4 * IN * OUT < gemm.ONEDNN_MIN_MACS
    torch.testing.assert_close(linear(small, w, b), F.linear(small, w, b), rtol=0, atol=0)
    assert type(linear(small, w, b).grad_fn).__name__ != "_LinearBackward"
    # Half precision keeps its dtype and torch's kernels (the GPU-style paths).
    xb, wb = x.detach().bfloat16(), w.detach().bfloat16()
    assert linear(xb, wb).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(x, w, b)
    assert y.dtype == torch.bfloat16 and type(y.grad_fn).__name__ != "_LinearBackward"


@needs_onednn
@pytest.mark.parametrize("n,k", [(96, 384), (384, 96)])  # narrowing (oneDNN), widening (BLAS)
def test_weight_gradient_equals_torchs(n, k):
    g = torch.Generator().manual_seed(2)
    grad, x = torch.randn(ROWS * 2, n, generator=g), torch.randn(ROWS * 2, k, generator=g)
    assert ROWS * 2 * n * k >= gemm.ONEDNN_MIN_MACS
    torch.testing.assert_close(gemm.weight_gradient(grad, x), grad.t() @ x, rtol=1e-5, atol=1e-4)
