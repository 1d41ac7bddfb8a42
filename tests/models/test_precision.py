"""Half-precision paths on CPU: shapes and dtypes only (bf16 matmul on these CPUs is far too slow
to train with, and fp16 training needs a GPU); their numerics are checked in `make test-gpu`."""
import pytest
import torch

from megatron_lite.models.gpt import GPTConfig, GPTModel
from megatron_lite.parallel import ParallelState, RNGContext, initialize_parameters


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sparse", [False, True])
def test_gpt_half_precision_forward_and_loss_shapes(dtype, sparse):
    cfg = GPTConfig(vocab_size=300, num_layers=2, hidden_size=32, num_attention_heads=4,
                    max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0,
                    sparse_attention=sparse, sparse_stride=8, sparse_summary=2)
    ps = ParallelState.single()
    model = GPTModel(cfg, ps, RNGContext(0))
    initialize_parameters(model, 0, ps)
    model = model.to(dtype)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    logits = model(ids)
    assert logits.dtype == dtype and logits.shape == (2, 24, cfg.padded_vocab_size)
    loss, ntokens = model.loss({"input_ids": ids, "labels": ids, "loss_mask": torch.ones(2, 24),
                                "position_ids": torch.arange(24).expand(2, 24)})
    assert loss.dtype == torch.float32 and loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in model.parameters())
