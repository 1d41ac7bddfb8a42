"""T5Model on one process: config checks, padding, the decoder KV cache against a full recompute
(decoder deeper than the encoder, as LongLM-large), generation, loss masking and FLOPs."""
import dataclasses

import pytest
import torch

from megatron_lite.inference.seq2seq import generate_seq2seq
from megatron_lite.models import T5Config, T5Model, get_model_spec
from megatron_lite.models.t5 import EncoderDecoderCache, T5DataConfig, t5_flops
from megatron_lite.parallel import ParallelState, RNGContext, initialize_parameters

VOCAB = 100


def make_cfg(**kw):
    base = dict(vocab_size=VOCAB, num_layers=2, num_decoder_layers=3, hidden_size=32,
                ffn_hidden_size=64, kv_channels=8, num_attention_heads=4, hidden_dropout=0.0,
                attention_dropout=0.0, relative_attention_num_buckets=8,
                relative_attention_max_distance=16)
    base.update(kw)
    return T5Config(**base)


def make_model(cfg, seed=7, dtype=torch.float32):
    model = T5Model(cfg, ParallelState.single(), RNGContext(0))
    initialize_parameters(model, seed, ParallelState.single())
    return model.to(dtype).eval()


def ids(b, s, seed, low=3):
    return torch.randint(low, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_decoder_layers"):
        make_cfg(num_decoder_layers=0)
    with pytest.raises(ValueError, match="feed_forward_proj"):
        make_cfg(feed_forward_proj="swiglu")
    with pytest.raises(ValueError, match="relative_attention_num_buckets"):
        make_cfg(relative_attention_num_buckets=6)
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        make_cfg(decoder_start_token_id=VOCAB)
    with pytest.raises(ValueError, match="num_attention_heads"):
        make_cfg(num_attention_heads=3).validate(tp_size=2)
    with pytest.raises(ValueError, match="decoder_seq_length"):
        T5DataConfig(decoder_seq_length=1)
    with pytest.raises(ValueError, match="continuation_weight"):
        T5DataConfig(span_corruption_weight=0, continuation_weight=0)
    assert make_cfg().decoder_start_id == 0 and make_cfg(decoder_start_token_id=1).decoder_start_id == 1
    assert make_cfg(num_decoder_layers=None).decoder_layers == 2


def test_every_parameter_is_tagged_and_relative_bias_shards_by_head():
    model = T5Model(make_cfg(tie_word_embeddings=False, feed_forward_proj="gated-gelu"),
                    ParallelState.virtual(2, 1))
    for name, p in model.named_parameters():
        assert hasattr(p, "tensor_model_parallel") and hasattr(p, "init"), name
    bias = model.encoder.relative_attention_bias
    assert bias.shape == (8, 2) and bias.tensor_model_parallel and bias.partition_dim == 1
    assert model.lm_head.weight.shape == (64, 32) and model.lm_head.weight.partition_dim == 0
    # No biases anywhere: every parameter is a weight matrix, a norm scale or the position bias.
    assert not [n for n, _ in model.named_parameters() if n.endswith(".bias")]


def test_encoder_padding_is_masked_exactly():
    """A right-padded source gives the same decoder logits as the unpadded one."""
    model = make_model(make_cfg())
    src, dec = ids(1, 9, 1), ids(1, 5, 2)
    padded = torch.cat([src, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded, dec), model(src, dec), atol=1e-6, rtol=0)
        # ...and the padding really is what changes the result when it is not masked.
        unmasked = torch.cat([src, torch.full((1, 6), 5, dtype=torch.long)], dim=1)
        assert (model(unmasked, dec) - model(src, dec)).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
def test_kv_cache_matches_full_recompute_with_decoder_deeper_than_encoder(variant):
    extra = {} if variant == "v1.0" else dict(feed_forward_proj="gated-gelu",
                                             tie_word_embeddings=False)
    cfg = make_cfg(num_layers=1, num_decoder_layers=3, **extra)
    model = make_model(cfg, dtype=torch.float64)
    src = ids(2, 11, 3)
    src[1, 8:] = 0
    dec = ids(2, 24, 4)  # longer than max_distance: the last bucket is reached too
    with torch.no_grad():
        memory, keep = model.encode(src)
        full = model.decode(dec, memory, keep)
        cache = EncoderDecoderCache(cfg.decoder_layers)
        # A prefix of 5, then one token at a time, as generation runs.
        steps = [model.decode(dec[:, :5], memory, keep, cache)]
        for t in range(5, dec.shape[1]):
            steps.append(model.decode(dec[:, t:t + 1], memory, keep, cache))
    assert cache.seq_len == dec.shape[1]
    assert all(kv is not None for kv in cache.cross)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-10, rtol=0)


def test_generation_with_cache_equals_recompute_for_every_sampling_mode():
    cfg = make_cfg(num_layers=1, num_decoder_layers=3)
    model = make_model(cfg, dtype=torch.float64)
    sources = [ids(1, 7, 5)[0].tolist(), ids(1, 12, 6)[0].tolist()]
    modes = [dict(greedy=True), dict(temperature=0.7, top_k=5), dict(top_p=0.8),
             dict(temperature=1.3, top_k=20, top_p=0.9, repetition_penalty=1.2)]
    for mode in modes:
        cached = generate_seq2seq(model, sources, 12, seed=3, **mode)
        recomputed = generate_seq2seq(model, sources, 12, seed=3, use_cache=False, **mode)
        assert cached == recomputed, mode
        assert all(len(o) == 12 for o in cached)
    # A batch of unequal sources gives what each source gives alone.
    alone = [generate_seq2seq(model, s, 12, greedy=True)[0] for s in sources]
    assert generate_seq2seq(model, sources, 12, greedy=True) == alone
    # Sampling depends on the seed (different seeds give a different draw somewhere).
    draws = {tuple(generate_seq2seq(model, sources[0], 12, seed=s, temperature=2.0)[0])
             for s in range(4)}
    assert len(draws) > 1


def test_generation_stops_at_eos_and_honours_the_start_token():
    cfg = make_cfg(num_layers=1, num_decoder_layers=2)
    model = make_model(cfg, dtype=torch.float64)
    src = ids(1, 6, 8)[0].tolist()
    free = generate_seq2seq(model, src, 10, greedy=True)[0]
    eos = free[3]
    stopped = generate_seq2seq(model, src, 10, greedy=True, eos_id=eos)[0]
    assert stopped == free[:free.index(eos) + 1]
    # The start token is the model's decoder_start_id unless overridden; the first step sees it.
    with torch.no_grad():
        memory, keep = model.encode(torch.tensor([src]))
        first = model.decode(torch.tensor([[cfg.decoder_start_id]]), memory, keep)[0, -1]
        first_1 = model.decode(torch.tensor([[1]]), memory, keep)[0, -1]
    assert free[0] == int(first[:VOCAB].argmax())
    assert generate_seq2seq(model, src, 1, greedy=True, decoder_start_token_id=1)[0] == \
        [int(first_1[:VOCAB].argmax())]
    with pytest.raises(ValueError, match="pad id"):
        generate_seq2seq(model, [5, 0, 6], 3, greedy=True)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate_seq2seq(model, [5, VOCAB], 3, greedy=True)


def test_loss_counts_only_masked_tokens():
    cfg = make_cfg()
    model = make_model(cfg)
    src, dec, labels = ids(2, 10, 9), ids(2, 6, 10), ids(2, 6, 11)
    mask = torch.ones(2, 6)
    mask[1, 3:] = 0
    loss, n = model.loss(dict(encoder_input_ids=src, decoder_input_ids=dec, labels=labels,
                              loss_mask=mask))
    logits = model(src, dec)[..., :VOCAB]
    ref = torch.nn.functional.cross_entropy(logits[mask.bool()], labels[mask.bool()])
    assert int(n) == 9
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)
    with pytest.raises(KeyError, match="decoder_input_ids"):
        model.loss(dict(encoder_input_ids=src, labels=labels, loss_mask=mask))


@pytest.mark.parametrize("tied", [True, False])
def test_fused_head_loss_gives_the_logits_then_loss_results(tied):
    """`fused_head_loss` (the head and the cross entropy in chunks) changes no loss or gradient
    beyond float rounding, with the tied head's d_model^-0.5 rescale and with an untied head."""
    cfg = make_cfg(tie_word_embeddings=tied, feed_forward_proj="relu" if tied else "gated-gelu")
    labels = ids(2, 6, 17)
    labels[0, 4:] = -100
    batch = dict(encoder_input_ids=ids(2, 10, 15), decoder_input_ids=ids(2, 6, 16),
                 labels=labels, loss_mask=(labels >= 0).double())
    results = []
    for fused in (False, True):
        model = make_model(cfg, dtype=torch.float64)
        model.fused_head_loss = fused
        loss, n = model.loss(batch)
        loss.backward()
        results.append((loss.detach(), n, {k: p.grad for k, p in model.named_parameters()}))
    (ref, ref_n, ref_grads), (loss, n, grads) = results
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=0)
    assert n == ref_n == 10 and grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("decoder,q_len,k_len,past", [(False, 37, 37, 0), (True, 20, 20, 0),
                                                      (True, 1, 9, 8), (True, 3, 12, 9)])
def test_position_bias_equals_the_per_pair_lookup(decoder, q_len, k_len, past):
    """The Toeplitz layout of the per-distance bias gives the reference's per-(query, key) table
    lookup exactly, and the same gradient up to float summation order."""
    from megatron_lite.models.t5 import ScoreBias, relative_position_bucket
    stack = make_model(make_cfg(), dtype=torch.float64).train()
    stack = stack.decoder if decoder else stack.encoder
    cfg = stack.cfg
    query = torch.arange(past, past + q_len)[:, None]
    buckets = relative_position_bucket(torch.arange(k_len)[None, :] - query, not decoder,
                                       cfg.relative_attention_num_buckets,
                                       cfg.relative_attention_max_distance)
    table = stack.relative_attention_bias
    reference = torch.nn.functional.embedding(buckets, table).permute(2, 0, 1).unsqueeze(0)
    bias = ScoreBias(stack.per_distance_bias(q_len, k_len, past, table.device), None, False,
                     q_len, k_len, past).dense()
    assert bias.shape == (1, cfg.num_attention_heads, q_len, k_len)
    assert torch.equal(bias, reference)
    upstream = torch.randn(bias.shape, dtype=bias.dtype)
    got, = torch.autograd.grad(bias, table, upstream)
    want, = torch.autograd.grad(reference, table, upstream)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_one_embedding_lookup_for_both_stacks_gives_the_two_lookup_results():
    """`loss` embeds encoder and decoder ids in one lookup; `encode` and `decode` (the reference)
    embed them one at a time: the same loss and gradients up to float summation order."""
    batch = dict(encoder_input_ids=ids(2, 10, 21), decoder_input_ids=ids(2, 6, 22),
                 labels=ids(2, 6, 23), loss_mask=torch.ones(2, 6, dtype=torch.float64))
    model = make_model(make_cfg(), dtype=torch.float64)
    model.fused_head_loss = False
    loss, _ = model.loss(batch)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    memory, keep = model.encode(batch["encoder_input_ids"])
    logits = model.decode(batch["decoder_input_ids"], memory, keep)
    reference = torch.nn.functional.cross_entropy(logits[..., :VOCAB].flatten(0, 1),
                                                  batch["labels"].flatten())
    want = torch.autograd.grad(reference, list(model.parameters()))
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=0)
    for (name, _), g, w in zip(model.named_parameters(), grads, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13, msg=name)


def test_biased_attention_gives_sdpas_loss_and_gradients(monkeypatch):
    """On CPU the self-attention, whose bias (relative positions + mask) takes a gradient, runs
    `_biased_attention` (the bias as the scores GEMM's accumulator, a plain softmax) instead of
    SDPA's math path: the same loss and gradients, with encoder padding and two rows."""
    from megatron_lite.models import t5
    enc = ids(2, 10, 31)
    enc[1, 7:] = make_cfg().pad_token_id
    batch = dict(encoder_input_ids=enc, decoder_input_ids=ids(2, 6, 32), labels=ids(2, 6, 33),
                 loss_mask=torch.ones(2, 6, dtype=torch.float64))
    calls = []

    def counted(*args):
        calls.append(1)
        return biased(*args)

    def sdpa(q, k, v, bias):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)

    results = []
    for biased in (t5._biased_attention, sdpa):
        monkeypatch.setattr(t5, "_biased_attention", counted)
        model = make_model(make_cfg(), dtype=torch.float64).train()
        loss, _ = model.loss(batch)
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    assert len(calls) == 2 * (2 + 3)  # every self-attention layer, in both runs
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=0)
    for (name, _), g, w in zip(model.named_parameters(), results[0][1], results[1][1]):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13, msg=name)


def test_activation_checkpointing_gives_the_same_gradients_with_dropout():
    cfg = make_cfg(hidden_dropout=0.2, attention_dropout=0.2)
    batch = dict(encoder_input_ids=ids(2, 10, 12), decoder_input_ids=ids(2, 6, 13),
                 labels=ids(2, 6, 14), loss_mask=torch.ones(2, 6))
    grads = []
    for recompute in (False, True):
        model = make_model(cfg).train()
        model.checkpoint_activations = recompute
        model.rng.set_step(3, 1)
        model.loss(batch)[0].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_flops_count_encoder_and_decoder_tokens_separately():
    cfg = make_cfg(vocab_size=1000)
    spec = get_model_spec("t5")
    data = T5DataConfig(seq_length=64, decoder_seq_length=16)
    tokens, flops = spec.sample_cost(cfg, data)
    assert tokens == 80 and flops == t5_flops(cfg, 64, 16)
    # Brute force: 6 x (weights a token passes) + 12 x H x Q x keys, stack by stack.
    n = dict(T5Model(cfg, ParallelState.single()).named_parameters())
    size = {k: v.numel() for k, v in n.items()}
    enc = sum(v for k, v in size.items() if k.startswith("encoder.layers") or k == "encoder.final_ln.weight")
    cross_kv = sum(v for k, v in size.items() if ".cross_attn.kv." in k)
    dec = sum(v for k, v in size.items() if k.startswith("decoder.layers") or k == "decoder.final_ln.weight")
    head = size["shared.weight"]
    hq = 4 * 8
    expected = 6 * (64 * (enc + cross_kv) + 16 * (dec - cross_kv + head)) \
        + 12 * hq * (2 * 64 * 64 + 3 * 16 * (16 + 64))
    assert flops == pytest.approx(expected, rel=1e-12)
    # Decoder tokens cost more than encoder tokens (cross-attention, the head).
    assert t5_flops(cfg, 16, 64) > t5_flops(cfg, 64, 16)
    untied = dataclasses.replace(cfg, tie_word_embeddings=False)
    assert t5_flops(untied, 64, 16) == t5_flops(cfg, 64, 16)  # the head matmul costs the same


@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (8, 20), (16, 40)])
def test_relative_position_buckets_match_transformers(buckets, max_distance):
    transformers = pytest.importorskip("transformers")
    from megatron_lite.models.t5 import relative_position_bucket
    ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    distance = torch.arange(-600, 601)
    for bidirectional in (True, False):
        ours = relative_position_bucket(distance, bidirectional, buckets, max_distance)
        theirs = ref(distance, bidirectional=bidirectional, num_buckets=buckets,
                     max_distance=max_distance)
        assert torch.equal(ours, theirs), (bidirectional, buckets, max_distance)
        assert int(ours.max()) == buckets - 1 and int(ours.min()) == 0
