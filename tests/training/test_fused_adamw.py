"""The engine's AdamW is torch's fused kernel, on the plain path and under ZeRO, and it trains as
the for-loop AdamW does: the same losses and parameters up to rounding. On one data-parallel rank
the plain path skips DeepSpeed's gradient all-reduce, and trains bit for bit as with it."""
import functools
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
    # (stage, fused AdamW, DeepSpeed's gradient all-reduce forced on after build_engine)
    for stage, fused, force_allreduce in (("zero0", True, False), ("zero0", False, False),
                                          ("zero1", True, False), ("zero1", False, False),
                                          ("zero0", True, True)):
        ds = build_deepspeed_config(tcfg, 1, os.path.join(ds_json, f"{stage}.json"))
        ds["optimizer"]["params"]["fused"] = fused
        engine, _ = build_engine(Regression(), ds, ps, "torch")
        allreduce = engine.enable_backward_allreduce
        if force_allreduce:
            engine.enable_backward_allreduce = allreduce = True
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        losses = []
        for x, y in batches:
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        params = torch.cat([p.detach().reshape(-1) for p in engine.module.parameters()])
        out[stage, fused, force_allreduce] = (bool(inner.defaults.get("fused")), losses, params,
                                              allreduce)
        engine.destroy()
    return out


@functools.lru_cache(maxsize=1)
def _runs():
    return run_distributed(_train, 1, os.path.join(ROOT, "configs", "deepspeed"))[0]


def test_engine_adamw_is_fused_and_trains_as_the_for_loop_one():
    got = {(stage, fused): run[:3] for (stage, fused, forced), run in _runs().items()
           if not forced}
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


def test_one_rank_plain_path_skips_the_all_reduce_and_trains_the_same():
    """With one data-parallel rank DeepSpeed's gradient all-reduce is two model-sized copies and
    a reduce over one rank: build_engine turns it off on the plain path (ZeRO keeps its own), and
    training comes out bit for bit as with it on."""
    runs = _runs()
    skipped, forced = runs["zero0", True, False], runs["zero0", True, True]
    assert skipped[3] is False and forced[3] is True and runs["zero1", True, False][3] is True
    assert skipped[1] == forced[1]
    assert torch.equal(skipped[2], forced[2])
