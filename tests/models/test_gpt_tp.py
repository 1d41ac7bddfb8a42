"""GPT at TP=2 (two gloo ranks) equals TP=1: logits, loss and every gradient, dense and sparse."""
import torch

from megatron_lite.models import GPTConfig, GPTModel
from megatron_lite.parallel import (ParallelState, RNGContext, gather_full_logits,
                                    initialize_parameters, merge_shards)
from megatron_lite.testing import run_distributed

SEED = 1234
CONFIGS = {
    "dense": dict(sparse_attention=False),
    "sparse": dict(sparse_attention=True),
}


def make_cfg(name):
    # vocab 100 pads to 128 columns, so the TP=2 shard boundary (64) and the padding both matter.
    return GPTConfig(vocab_size=100, num_layers=2, hidden_size=32, num_attention_heads=4,
                     ffn_hidden_size=64, max_position_embeddings=64, hidden_dropout=0.0,
                     attention_dropout=0.0, sparse_stride=8, sparse_summary=2, **CONFIGS[name])


def make_batch():
    g = torch.Generator().manual_seed(0)
    b, s = 2, 32
    tokens = torch.randint(0, 100, (b, s + 1), generator=g)
    return dict(input_ids=tokens[:, :-1], labels=tokens[:, 1:],
                loss_mask=(torch.rand(b, s, generator=g) > 0.2).float(),
                position_ids=torch.arange(s).expand(b, s))


def run(model, ps, batch):
    logits = gather_full_logits(model(batch["input_ids"], batch["position_ids"]), ps)
    loss, _ = model.loss(batch)
    loss.backward()
    grads = {name: (p.grad, p.tensor_model_parallel, p.partition_dim, p.partition_stride)
             for name, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


def _tp2_worker(rank, world_size, names):
    ps = ParallelState.from_world(2)
    out = {}
    for name in names:
        model = GPTModel(make_cfg(name), ps, RNGContext(0, ps.dp_rank, ps.tp_rank))
        initialize_parameters(model, SEED, ps)
        out[name] = run(model, ps, make_batch())
    return out


def test_tp2_matches_tp1():
    names = list(CONFIGS)
    ranks = run_distributed(_tp2_worker, 2, names)
    for name in names:
        ps = ParallelState.single()
        model = GPTModel(make_cfg(name), ps, RNGContext(0))
        initialize_parameters(model, SEED, ps)
        logits, loss, grads = run(model, ps, make_batch())
        for r in ranks:
            torch.testing.assert_close(r[name][0], logits, atol=1e-5, rtol=0, msg=name)
            torch.testing.assert_close(r[name][1], loss, atol=1e-5, rtol=0, msg=name)
        for pname, (full, *_) in grads.items():
            g0, sharded, dim, stride = ranks[0][name][2][pname]
            if sharded:
                got = merge_shards([r[name][2][pname][0] for r in ranks], dim, stride)
            else:
                got = g0
                torch.testing.assert_close(ranks[1][name][2][pname][0], g0, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-6 * float(full.abs().max()),
                                       msg=f"{name}: gradient of {pname}")
