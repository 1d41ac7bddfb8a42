"""Stateless RNG: masks depend only on (seed, step, micro_step, dp rank, site, tp rank in TP regions),
and activation recomputation replays them without any saved RNG state."""
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from megatron_lite.parallel import RNGContext

P = 0.5


def _mask(rng, site="attn.dropout", tp_region=False, n=256):
    return rng.dropout(torch.ones(n), P, site, tp_region, training=True) == 0


def test_same_coordinates_same_mask_and_each_coordinate_matters():
    a, b = RNGContext(7, dp_rank=1, tp_rank=0), RNGContext(7, dp_rank=1, tp_rank=0)
    a.set_step(3, 1)
    b.set_step(3, 1)
    assert torch.equal(_mask(a), _mask(b))
    base = _mask(a)
    assert not torch.equal(base, _mask(a, site="mlp.dropout")), "site"
    other_dp = RNGContext(7, dp_rank=0, tp_rank=0)
    other_dp.set_step(3, 1)
    assert not torch.equal(base, _mask(other_dp)), "dp rank"
    for step, micro in ((4, 1), (3, 0)):
        b.set_step(step, micro)
        assert not torch.equal(base, _mask(b)), f"step {step} micro {micro}"
    c = RNGContext(8, dp_rank=1)
    c.set_step(3, 1)
    assert not torch.equal(base, _mask(c)), "seed"


def test_tp_rank_enters_only_inside_tp_regions():
    r0, r1 = RNGContext(7, tp_rank=0), RNGContext(7, tp_rank=1)
    assert torch.equal(_mask(r0, tp_region=False), _mask(r1, tp_region=False))
    assert not torch.equal(_mask(r0, tp_region=True), _mask(r1, tp_region=True))


def test_fork_leaves_the_global_rng_alone():
    torch.manual_seed(1)
    want = torch.rand(4)
    torch.manual_seed(1)
    _mask(RNGContext(7))
    assert torch.equal(torch.rand(4), want)


def test_no_dropout_returns_input():
    rng, x = RNGContext(7), torch.randn(5)
    assert rng.dropout(x, 0.0, "s", False, training=True) is x
    assert rng.dropout(x, 0.3, "s", False, training=False) is x


def test_generator_is_seeded_by_site():
    rng = RNGContext(7)
    assert torch.equal(torch.rand(3, generator=rng.generator("data")), torch.rand(3, generator=rng.generator("data")))
    assert not torch.equal(torch.rand(3, generator=rng.generator("data")), torch.rand(3, generator=rng.generator("x")))


class _Block(nn.Module):
    def __init__(self, rng, stateless=True):
        super().__init__()
        self.rng, self.stateless = rng, stateless
        self.lin1, self.lin2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = torch.relu(self.lin1(x))
        if self.stateless:
            h = self.rng.dropout(h, P, "block.dropout", tp_region=False, training=True)
        else:
            h = nn.functional.dropout(h, P, training=True)
        return self.lin2(h)


def _grads(block, x, recompute):
    block.zero_grad()
    x = x.clone().requires_grad_()
    # preserve_rng_state=False: the replay must not lean on torch's saved state; drawing between
    # forward and backward moves the global RNG like the rest of a real step would.
    y = checkpoint(block, x, use_reentrant=False, preserve_rng_state=False) if recompute else block(x)
    torch.rand(100)
    y.pow(2).sum().backward()
    return y.detach(), [x.grad] + [p.grad.clone() for p in block.parameters()]


def test_recompute_under_checkpoint_replays_the_masks():
    torch.manual_seed(0)
    rng = RNGContext(11)
    rng.set_step(5, 2)
    block, x = _Block(rng), torch.randn(4, 8)
    y_plain, g_plain = _grads(block, x, recompute=False)
    y_ckpt, g_ckpt = _grads(block, x, recompute=True)
    assert torch.equal(y_plain, y_ckpt)
    for a, b in zip(g_plain, g_ckpt):
        assert torch.equal(a, b)

    # The same check catches a dropout that draws from torch's global RNG.
    block.stateless = False
    torch.manual_seed(3)
    _, g_plain = _grads(block, x, recompute=False)
    torch.manual_seed(3)
    _, g_ckpt = _grads(block, x, recompute=True)
    assert not all(torch.equal(a, b) for a, b in zip(g_plain, g_ckpt))
