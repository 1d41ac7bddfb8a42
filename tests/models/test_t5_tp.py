"""T5 at TP=2 (two gloo ranks) equals TP=1: encoder output, decoder logits, loss and every gradient
(the relative position bias, sharded by head, included), for v1.0 and v1.1; and the TP=2 decoder
with its KV cache gives the TP=1 step logits."""
import torch

from megatron_lite.models import T5Config, T5Model
from megatron_lite.models.t5 import EncoderDecoderCache
from megatron_lite.parallel import (ParallelState, RNGContext, gather_full_logits,
                                    initialize_parameters, merge_shards)
from megatron_lite.testing import run_distributed

SEED = 1234
VARIANTS = {
    "v1.0": dict(),
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def make_cfg(name):
    # vocab 100 pads to 128 columns, so the TP=2 shard boundary (64) and the padding both matter;
    # heads x d_kv (32) differs from d_model (24), as in LongLM-large.
    return T5Config(vocab_size=100, num_layers=1, num_decoder_layers=2, hidden_size=24,
                    ffn_hidden_size=64, kv_channels=8, num_attention_heads=4, hidden_dropout=0.0,
                    attention_dropout=0.0, relative_attention_num_buckets=8,
                    relative_attention_max_distance=12, **VARIANTS[name])


def make_batch():
    g = torch.Generator().manual_seed(0)
    src = torch.randint(3, 100, (2, 20), generator=g)
    src[1, 14:] = 0  # padding
    dec = torch.randint(3, 100, (2, 16), generator=g)
    dec[:, 0] = 0
    return dict(encoder_input_ids=src, decoder_input_ids=dec,
                labels=torch.randint(3, 100, (2, 16), generator=g),
                loss_mask=(torch.rand(2, 16, generator=g) > 0.2).float())


def run(model, ps, batch):
    memory, keep = model.encode(batch["encoder_input_ids"])
    logits = gather_full_logits(model.decode(batch["decoder_input_ids"], memory, keep), ps)
    loss, _ = model.loss(batch)
    loss.backward()
    grads = {name: (p.grad, p.tensor_model_parallel, p.partition_dim, p.partition_stride)
             for name, p in model.named_parameters()}
    with torch.no_grad():  # the cached decoder, one token at a time
        cache = EncoderDecoderCache(model.cfg.decoder_layers)
        steps = [gather_full_logits(model.decode(batch["decoder_input_ids"][:, t:t + 1], memory,
                                                 keep, cache), ps)
                 for t in range(batch["decoder_input_ids"].shape[1])]
    return memory.detach(), logits.detach(), loss.detach(), grads, torch.cat(steps, dim=1)


def _tp2_worker(rank, world_size, names):
    ps = ParallelState.from_world(2)
    out = {}
    for name in names:
        model = T5Model(make_cfg(name), ps, RNGContext(0, ps.dp_rank, ps.tp_rank))
        initialize_parameters(model, SEED, ps)
        out[name] = run(model, ps, make_batch())
    return out


def test_tp2_matches_tp1():
    names = list(VARIANTS)
    ranks = run_distributed(_tp2_worker, 2, names)
    for name in names:
        ps = ParallelState.single()
        model = T5Model(make_cfg(name), ps, RNGContext(0))
        initialize_parameters(model, SEED, ps)
        memory, logits, loss, grads, steps = run(model, ps, make_batch())
        for r in ranks:
            torch.testing.assert_close(r[name][0], memory, atol=1e-5, rtol=0, msg=f"{name} encoder")
            torch.testing.assert_close(r[name][1], logits, atol=1e-5, rtol=0, msg=f"{name} logits")
            torch.testing.assert_close(r[name][2], loss, atol=1e-5, rtol=0, msg=f"{name} loss")
            torch.testing.assert_close(r[name][4], steps, atol=1e-5, rtol=0, msg=f"{name} cache")
        torch.testing.assert_close(steps, logits, atol=1e-5, rtol=0)
        sharded_names = set()
        for pname, (full, *_) in grads.items():
            g0, sharded, dim, stride = ranks[0][name][3][pname]
            if sharded:
                sharded_names.add(pname)
                got = merge_shards([r[name][3][pname][0] for r in ranks], dim, stride)
            else:
                got = g0
                torch.testing.assert_close(ranks[1][name][3][pname][0], g0, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-6 * float(full.abs().max()),
                                       msg=f"{name}: gradient of {pname}")
        assert {"encoder.relative_attention_bias", "decoder.relative_attention_bias",
                "shared.weight"} <= sharded_names
