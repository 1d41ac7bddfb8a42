"""The GPU tier (`make test-gpu`): bf16/fp16 training through DeepSpeed and the flash SDPA path.
On CPU every test here is skipped with a reason (tests/conftest.py)."""
import os

import pytest
import torch

pytestmark = pytest.mark.gpu

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("ds_config", ["zero1_bf16.json", "zero2_fp16.json", "zero3_bf16.json"])
def test_tiny_gpt_trains_in_half_precision(gpt_data, tmp_path, ds_config):
    from megatron_lite.testing import run_distributed
    from tests.training.test_trainer import _train, gpt_args
    out = run_distributed(_train, 1, gpt_args(
        gpt_data, tmp_path / "run", "--deepspeed", "--deepspeed_config",
        os.path.join(ROOT, "configs/deepspeed", ds_config), "--lr-decay-style", "constant",
        iters=20))[0]
    assert out["loss"][-1] <= 0.9 * out["loss"][0]


def test_flash_sdpa_matches_math_backend():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = (torch.randn(2, 4, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    with sdpa_kernel(SDPBackend.MATH):
        math = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(flash, math, atol=2e-2, rtol=2e-2)
