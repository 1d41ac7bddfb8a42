"""The Longformer encoder: TP=2 equals TP=1 (logits, loss and every gradient, with per-layer
windows, ragged padding and global tokens), change_mp.py round trips it bit-exact, and bad input
is a one-line error naming the value. (The attention kernel itself is tested against a dense
float64 reference and transformers in test_longformer_attention.py.)"""

import pytest
import torch

from megatron_lite.checkpoint.checkpointing import (read_model_states,
                                                    write_weights_only_checkpoint)
from megatron_lite.checkpoint.metadata import CheckpointMeta
from megatron_lite.checkpoint.reshard import reshard_checkpoint
from megatron_lite.data.contract import IGNORE_INDEX
from megatron_lite.models import get_model_spec
from megatron_lite.models.longformer import LongformerConfig, LongformerModel
from megatron_lite.parallel import (ParallelState, RNGContext, gather_full_logits,
                                    initialize_parameters, merge_shards)
from megatron_lite.testing import run_distributed

SEED = 77


def make_cfg(**kw):
    # vocab 100 pads to 128 columns: the TP=2 shard boundary (64) and the padding both matter.
    return LongformerConfig(**{**dict(vocab_size=100, num_layers=2, hidden_size=32,
                                      num_attention_heads=4, ffn_hidden_size=64,
                                      max_position_embeddings=64, attention_window=[4, 10],
                                      hidden_dropout=0.0, attention_dropout=0.0), **kw})


def make_batch():
    """Two rows of 23 tokens (no window divides it): the second padded after 17, with [CLS] and
    one more global token; the first without any global token."""
    g = torch.Generator().manual_seed(0)
    b, n = 2, 23
    ids = torch.randint(5, 100, (b, n), generator=g)
    attention = torch.ones(b, n, dtype=torch.long)
    attention[1, 17:] = 0
    ids[1, 17:] = 0
    glob = torch.zeros(b, n, dtype=torch.long)
    glob[1, [0, 9]] = 1
    labels = torch.full((b, n), IGNORE_INDEX)
    labels[:, 3:15:3] = ids[:, 3:15:3]
    return dict(input_ids=ids, attention_mask=attention, global_attention_mask=glob,
                token_type_ids=torch.zeros(b, n, dtype=torch.long), labels=labels)


def run(model, ps, batch):
    logits = gather_full_logits(model(batch["input_ids"], batch["attention_mask"],
                                      batch["global_attention_mask"]), ps)
    loss, _ = model.loss(batch)
    loss.backward()
    grads = {name: (p.grad, p.tensor_model_parallel, p.partition_dim, p.partition_stride)
             for name, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


def _tp2(rank, world):
    ps = ParallelState.from_world(2)
    model = LongformerModel(make_cfg(), ps, RNGContext(0, ps.dp_rank, ps.tp_rank))
    initialize_parameters(model, SEED, ps)
    return run(model, ps, make_batch())


def test_tp2_matches_tp1():
    ranks = run_distributed(_tp2, 2)
    ps = ParallelState.single()
    model = LongformerModel(make_cfg(), ps, RNGContext(0))
    initialize_parameters(model, SEED, ps)
    logits, loss, grads = run(model, ps, make_batch())
    real = make_batch()["attention_mask"].bool()
    for r in ranks:
        torch.testing.assert_close(r[0][real], logits[real], atol=1e-5, rtol=0)
        torch.testing.assert_close(r[1], loss, atol=1e-5, rtol=0)
    assert {name for name, (_, sharded, *_) in grads.items() if sharded} >= {
        "word_embeddings.weight", "layers.0.attn.qkv.weight", "layers.1.attn.qkv_global.weight",
        "layers.0.attn.out.weight", "lm_head_bias"}
    for name, (full, *_) in grads.items():
        g0, sharded, dim, stride = ranks[0][2][name]
        if sharded:
            got = merge_shards([r[2][name][0] for r in ranks], dim, stride)
        else:
            got = g0
            torch.testing.assert_close(ranks[1][2][name][0], g0, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-6 * float(full.abs().max()),
                                   msg=f"gradient of {name}")


def test_change_mp_round_trips_bit_exact(tmp_path, sample_data):
    spec = get_model_spec("longformer")
    cfg = make_cfg(vocab_size=sample_data.bert_tokenizer.vocab_size, max_position_embeddings=32)
    model = LongformerModel(cfg)
    initialize_parameters(model, SEED, ParallelState.single())
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    one = str(tmp_path / "tp1")
    write_weights_only_checkpoint(one, CheckpointMeta.for_model(spec, cfg, 1),
                                  [full], sample_data.bert_tokenizer)
    reshard_checkpoint(one, 2, str(tmp_path / "tp2"))
    reshard_checkpoint(str(tmp_path / "tp2"), 1, str(tmp_path / "back"))
    back, meta, _ = read_model_states(str(tmp_path / "back"), 0)
    assert meta.tp_size == 1 and set(back) == set(full)
    assert all(torch.equal(back[k], full[k]) for k in full)
    two, meta2, _ = read_model_states(str(tmp_path / "tp2"), 1)
    assert meta2.partition_spec["lm_head_bias"] == [0, 1]
    assert two["lm_head_bias"].shape == (cfg.padded_vocab_size // 2,)


@pytest.mark.parametrize("overrides, message", [
    (dict(attention_window=[5]), "must be even"),
    (dict(attention_window=[128]), "larger than the position table"),
    (dict(attention_window=[4, 4, 4]), "one per layer"),
])
def test_bad_windows_are_one_line_errors(overrides, message):
    with pytest.raises(ValueError, match=message) as e:
        make_cfg(**overrides)
    assert "\n" not in str(e.value) and "attention_window" in str(e.value)


def test_a_sequence_longer_than_the_table_is_refused():
    model = LongformerModel(make_cfg(max_position_embeddings=16, attention_window=[4]))
    with pytest.raises(ValueError, match="23 tokens exceeds max_position_embeddings=16"):
        model(make_batch()["input_ids"])


def test_flops_count_the_band_not_the_square():
    from megatron_lite.models.longformer import LongformerDataConfig, flops_per_sample
    cfg = make_cfg(attention_window=[8])
    data = LongformerDataConfig(seq_length=64, global_attention_cls=False)
    # A layer's band over 64 tokens with r keys a side holds 64 + 2 (r (r + 1) / 2 + r (63 - r))
    # pairs: r = 4 against r = 1, in both layers, 12 h FLOPs a pair; the weights cancel.
    more = 2 * ((10 + 4 * 59) - (1 + 62))
    assert flops_per_sample(cfg, data) - flops_per_sample(make_cfg(attention_window=[2]), data) \
        == pytest.approx(2 * 12 * 32 * more)


def test_benchmark_peer_is_the_same_model():
    # The throughput benchmark times transformers' LongformerForMaskedLM against ours: with our
    # weights (the converter's export, positions without HF's offset rows) it computes our loss.
    from megatron_lite.models.longformer import LongformerPeer, longformer_state_to_hf
    cfg = LongformerConfig(vocab_size=256, num_layers=2, hidden_size=32, num_attention_heads=4,
                           ffn_hidden_size=64, max_position_embeddings=64,
                           attention_window=[8, 16], hidden_dropout=0.0, attention_dropout=0.0)
    ours = LongformerModel(cfg, ParallelState.single(), RNGContext(0))
    initialize_parameters(ours, 0, ParallelState.single())
    peer = get_model_spec("longformer").benchmark_peer(cfg)
    assert isinstance(peer, LongformerPeer)
    sd = ours.state_dict()
    hf = longformer_state_to_hf(sd, cfg, LongformerPeer._TOKENS())
    hf["longformer.embeddings.position_embeddings.weight"] = sd["position_embeddings.weight"]
    result = peer.model.load_state_dict(hf, strict=False)
    assert not result.missing_keys and not result.unexpected_keys, result
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 256, (2, 40), generator=g)  # padded to 48 inside transformers
    labels = torch.where(torch.rand(2, 40, generator=g) < 0.3, ids, IGNORE_INDEX)
    glob = torch.zeros(2, 40, dtype=torch.long)
    glob[:, 0] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
             "global_attention_mask": glob, "token_type_ids": torch.zeros_like(ids)}
    (ours_loss, ours_n), (peer_loss, peer_n) = ours.loss(batch), peer.loss(batch)
    assert int(ours_n) == int(peer_n) > 0
    torch.testing.assert_close(peer_loss, ours_loss, atol=1e-5, rtol=0)
