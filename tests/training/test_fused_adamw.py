"""The engine's AdamW is torch's fused kernel, on the plain path and under ZeRO, and it trains as
the for-loop AdamW does: the same losses and parameters up to rounding."""
import os

import torch
import torch.nn as nn

from megatron_lite.testing import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 1))

    def forward(self, x, y):
        return nn.functional.mse_loss(self.net(x), y)


def _train(rank, world, ds_json):
    from megatron_lite.parallel import ParallelState
    from megatron_lite.training.config import TrainingConfig, build_deepspeed_config
    from megatron_lite.training.engine import build_engine
    tcfg = TrainingConfig(micro_batch_size=4, global_batch_size=4, train_iters=5, lr=1e-2,
                          lr_warmup_iters=0, weight_decay=0.1)
    ps = ParallelState.from_world(1)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g))] * 5
    out = {}
    for stage in ("zero0", "zero1"):
        for fused in (True, False):
            ds = build_deepspeed_config(tcfg, 1, os.path.join(ds_json, f"{stage}.json"))
            ds["optimizer"]["params"]["fused"] = fused
            engine, _ = build_engine(Regression(), ds, ps, "torch")
            inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
            losses = []
            for x, y in batches:
                loss = engine(x, y)
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
            params = torch.cat([p.detach().reshape(-1) for p in engine.module.parameters()])
            out[stage, fused] = (bool(inner.defaults.get("fused")), losses, params)
            engine.destroy()
    return out


def test_engine_adamw_is_fused_and_trains_as_the_for_loop_one():
    got = run_distributed(_train, 1, os.path.join(ROOT, "configs", "deepspeed"))[0]
    initial = torch.cat([p.detach().reshape(-1) for p in Regression().parameters()])
    for stage in ("zero0", "zero1"):
        fused_flag, fused_losses, fused_params = got[stage, True]
        loop_flag, loop_losses, loop_params = got[stage, False]
        assert fused_flag and not loop_flag, stage
        assert fused_losses[-1] < fused_losses[0] * 0.9, stage  # it trains
        assert (fused_params - initial).abs().max() > 1e-2, stage
        torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(loop_losses),
                                   rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(fused_params, loop_params, rtol=1e-5, atol=1e-6)
