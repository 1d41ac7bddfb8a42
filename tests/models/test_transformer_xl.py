"""Transformer-XL (models/transformer_xl.py) against its definition.

- A float64 reference written from the paper (explicit R[i - j] lookup, an explicit mask) scores a
  whole text in one pass; the model run segment by segment with memory gives the same logits and
  loss (memory equivalence), for M < S, M = S and M > S, with documents starting mid-segment and
  on a segment boundary.
- `rel_shift` equals the explicit lookup on every (query, key) the causal mask keeps.
- TP=2 and TP=4 equal TP=1: logits, loss and every gradient (the shared r_w / r_r biases and the
  relative projection's bias included), over two segments, the second reading the first's memory.
- change_mp.py round trips 4 -> 2 -> 1 -> 4 bit for bit (the anchor merged `relative.weight` and
  r_w / r_r on the wrong dimension and dropped `relative.bias`).
- A memory every row hides (each starts a document) is skipped, not read.
- Bad configs are one-line errors naming the field.
"""
import contextlib
import io
import math
import os

import pytest
import torch
import torch.nn.functional as F

from megatron_lite.checkpoint.checkpointing import (model_state_path, read_latest_tag,
                                                    write_weights_only_checkpoint)
from megatron_lite.checkpoint.metadata import CheckpointMeta
from megatron_lite.checkpoint.reshard import shard_state_dict
from megatron_lite.models import get_model_spec
from megatron_lite.models.transformer_xl import (TransformerXLConfig, TransformerXLModel,
                                                 rel_shift)
from megatron_lite.parallel import (ParallelState, RNGContext, gather_full_logits,
                                    initialize_parameters, merge_shards, take_shard)
from megatron_lite.parallel.init import param_seed
from megatron_lite.testing import run_distributed

SEED = 1234
VOCAB = 100  # pads to 128 columns: the TP shard boundaries and the padding both matter


def make_cfg(**kw) -> TransformerXLConfig:
    base = dict(vocab_size=VOCAB, num_layers=2, hidden_size=32, num_attention_heads=4,
                ffn_hidden_size=64, mem_length=8, max_position_embeddings=64, hidden_dropout=0.0,
                attention_dropout=0.0, init_std=0.1)
    base.update(kw)
    return TransformerXLConfig(**base)


def build(cfg, ps, *, dtype=torch.float32) -> TransformerXLModel:
    """The model at `ps` with TP-invariant weights; the zero-initialised tensors (r_w / r_r,
    every bias) drawn at random too, whole and then sliced, so they matter in every check."""
    model = TransformerXLModel(cfg, ps, RNGContext(0, ps.dp_rank, ps.tp_rank))
    initialize_parameters(model, SEED, ps)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.init != ("zeros",):
                continue
            shape = list(p.shape)
            if p.tensor_model_parallel:
                shape[p.partition_dim] *= ps.tp_size
            g = torch.Generator().manual_seed(param_seed(SEED, name))
            full = torch.randn(shape, generator=g) * 0.3
            if p.tensor_model_parallel:
                full = take_shard(full, p.partition_dim, ps.tp_size, ps.tp_rank,
                                  p.partition_stride)
            p.copy_(full)
    return model.to(dtype).eval()


def text_batch(b=2, n=None, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (b, n + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


# ---------------------------------------------------------------------------------------------
# The reference: the paper's definition, one pass over the whole text

def reference_logits(model, ids, keep):
    """Logits [b, T, V] of `model` (TP=1) over the whole text `ids` [b, T], query i seeing key j
    where keep[b, i, j]; scores ((q_i + r_w).k_j + (q_i + r_r).R[i - j]) / sqrt(d) with R[delta]
    the relative projection of the sinusoid of distance delta, looked up explicitly."""
    cfg = model.cfg
    b, n = ids.shape
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    d = h // heads
    inv_freq = 1.0 / 10000 ** (torch.arange(0, h, 2, dtype=torch.float64) / h)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq  # row delta
    sinus = torch.cat([angles.sin(), angles.cos()], -1)
    delta = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).clamp(min=0)  # i - j
    x = model.word_embeddings.weight[ids]
    for layer in model.layers:
        a = layer.attn
        y = layer.ln_attn(x)
        q, k, v = F.linear(y, a.qkv.weight, a.qkv.bias).view(b, n, heads, 3, d).unbind(3)
        r = F.linear(sinus, a.relative.weight, a.relative.bias).view(n, heads, d)[delta]
        content = torch.einsum("bihd,bjhd->bhij", q + model.r_w_bias, k)
        position = torch.einsum("bihd,ijhd->bhij", q + model.r_r_bias, r)
        scores = ((content + position) / math.sqrt(d)).masked_fill(~keep[:, None], -math.inf)
        ctx = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(b, n, h)
        x = x + F.linear(ctx, a.out.weight, a.out.bias)
        x = x + layer.mlp(layer.ln_mlp(x))
    return F.linear(model.final_ln(x), model.word_embeddings.weight)


def xl_keep(n, seg, mem, document_start):
    """Query i (in segment i // seg) sees keys j <= i of its own document from the last `mem`
    positions before its segment on: what segment-by-segment processing with memory gives."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    window = (j <= i) & (j >= (i // seg) * seg - mem)
    doc = document_start.long().cumsum(1)
    return window & (doc[:, :, None] == doc[:, None, :])


@pytest.mark.parametrize("seg, mem", [(8, 5), (8, 8), (6, 13)])
def test_segments_with_memory_equal_one_pass_with_the_xl_mask(seg, mem):
    """Acceptance 1, float64: 4 segments run one after another through the memory give the
    logits and loss of one pass over the whole text with the equivalent XL mask."""
    torch.manual_seed(0)
    cfg = make_cfg(mem_length=mem)
    model = build(cfg, ParallelState.single(), dtype=torch.float64)
    n = 4 * seg
    ids, labels = text_batch(2, n)
    starts = torch.zeros(2, n, dtype=torch.bool)
    starts[0, seg + 3] = True      # row 0: a document starts mid-segment 1 ...
    starts[1, 2 * seg] = True      # row 1: ... and on the boundary of segment 2
    starts[1, 3 * seg - 1] = True  # and again at the last position of segment 2

    want = reference_logits(model, ids, xl_keep(n, seg, mem, starts))[..., :VOCAB]
    want_loss = F.cross_entropy(want.reshape(-1, VOCAB), labels.reshape(-1))

    memory, logits, losses = None, [], []
    with torch.no_grad():
        for k in range(4):
            cut = slice(k * seg, (k + 1) * seg)
            batch = dict(input_ids=ids[:, cut], labels=labels[:, cut],
                         loss_mask=torch.ones(2, seg, dtype=torch.float64),
                         document_start=starts[:, cut])
            out, _ = model(batch["input_ids"], memory=memory,
                           document_start=batch["document_start"])
            loss, count, memory = model.loss(batch, memory=memory)
            logits.append(out[..., :VOCAB])
            losses.append(loss)
            assert count == 2 * seg
            assert memory["hidden"][0].shape == (2, min(mem, (k + 1) * seg), cfg.hidden_size)
            assert not memory["hidden"][0].requires_grad  # detached
    torch.testing.assert_close(torch.cat(logits, 1), want, atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.stack(losses).mean(), want_loss, atol=1e-10, rtol=0)

    # The same model in one forward with the XL mask (rel_shift over the whole text) agrees too.
    keep = xl_keep(n, seg, mem, starts)
    whole, _ = model(ids, attention_mask=keep[:, None])
    torch.testing.assert_close(whole[..., :VOCAB], want, atol=1e-10, rtol=0)

    # And the memory matters: without it the segments after the first are scored otherwise.
    alone, _ = model(ids[:, seg:2 * seg])
    assert (alone[..., :VOCAB] - want[:, seg:2 * seg]).abs().max() > 1e-3


def test_a_memory_every_row_hides_is_not_read():
    """Each row starting a document (prompt/text fine-tuning): the memory is skipped, which gives
    the logits of no memory and the next memory of reading it (old positions closed)."""
    model = build(make_cfg(mem_length=8), ParallelState.single(), dtype=torch.float64)
    ids, _ = text_batch(2, 12)
    with torch.no_grad():
        _, memory = model(ids[:, :6])
        starts = torch.zeros(2, 6, dtype=torch.bool)
        starts[:, 0] = True
        logits, following = model(ids[:, 6:], memory=memory, document_start=starts)
        alone, _ = model(ids[:, 6:])
    torch.testing.assert_close(logits, alone, atol=1e-10, rtol=0)
    assert following["hidden"][0].shape == (2, 8, 32)
    assert following["open"].tolist() == [[False] * 2 + [True] * 6] * 2


def test_rel_shift_equals_the_explicit_lookup_where_the_mask_keeps():
    """Acceptance 2: out[i, j] is the score of query i against the row of distance i - j (rows
    run klen-1 ... 0), on every key j <= i (the last q of k positions are the queries)."""
    g = torch.Generator().manual_seed(0)
    for q, k in ((5, 5), (4, 9), (1, 6), (7, 8)):
        x = torch.randn(2, 3, q, k, generator=g, dtype=torch.float64)
        out = rel_shift(x)
        wrong = 0
        for i in range(q):
            for j in range(k):
                distance = (k - q + i) - j
                if distance >= 0:  # kept by the causal mask: exact
                    assert torch.equal(out[..., i, j], x[..., i, k - 1 - distance]), (q, k, i, j)
                else:              # the future: the zero-pad trick's junk, masked out
                    wrong += not torch.equal(out[..., i, j], torch.zeros_like(out[..., i, j]))
        assert wrong or q == 1  # (the junk is real: masking it is required)


# ---------------------------------------------------------------------------------------------
# Tensor parallelism

SEG = 12
# float64: the relative projection's low-frequency cosine columns act as a bias (which the
# softmax cancels), so their gradients are rounding noise that float32 cannot compare.
DTYPE = torch.float64


def _two_segments(model, ps):
    """Logits of two segments (the second reading the first's memory), the summed loss and
    every gradient with its partition tags."""
    ids, labels = text_batch(2, 2 * SEG, seed=3)
    starts = torch.zeros(2, 2 * SEG, dtype=torch.bool)
    starts[1, SEG + 4] = True
    memory, logits, total = None, [], 0.0
    for k in range(2):
        cut = slice(k * SEG, (k + 1) * SEG)
        batch = dict(input_ids=ids[:, cut], labels=labels[:, cut],
                     loss_mask=torch.ones(2, SEG, dtype=torch.float64),
                     document_start=starts[:, cut])
        out, _ = model(batch["input_ids"], memory=memory, document_start=batch["document_start"])
        logits.append(gather_full_logits(out, ps, VOCAB).detach())
        loss, _, memory = model.loss(batch, memory=memory)
        total = total + loss
    total.backward()
    grads = {n: (p.grad.clone(), p.tensor_model_parallel, p.partition_dim, p.partition_stride)
             for n, p in model.named_parameters()}
    return torch.cat(logits, 1), total.detach(), grads


def _tp_worker(rank, world):
    # One world of 4: TP=4, and TP=2 (x DP=2) on the same ranks.
    out = {}
    for tp in (2, 4):
        ps = ParallelState.from_world(tp)
        out[tp] = (ps.tp_rank, _two_segments(build(make_cfg(), ps, dtype=DTYPE).train(), ps))
    return out


def test_tp2_and_tp4_equal_tp1_logits_loss_and_every_gradient():
    ranks = run_distributed(_tp_worker, 4)
    logits, loss, grads = _two_segments(build(make_cfg(), ParallelState.single(),
                                              dtype=DTYPE).train(),
                                        ParallelState.single())
    assert {"r_w_bias", "r_r_bias", "layers.0.attn.relative.bias"} <= set(grads)
    for tp in (2, 4):
        shards = sorted((r[tp][0], r[tp][1]) for r in ranks[:tp])  # one TP group, by TP rank
        for _, (lg, ls, _) in shards:
            torch.testing.assert_close(lg, logits, atol=1e-10, rtol=0, msg=f"TP={tp} logits")
            torch.testing.assert_close(ls, loss, atol=1e-10, rtol=0, msg=f"TP={tp} loss")
        largest = max(float(g.abs().max()) for g, *_ in grads.values())
        for name, (full, *_) in grads.items():
            g0, sharded, dim, stride = shards[0][1][2][name]
            got = (merge_shards([s[1][2][name][0] for s in shards], dim, stride) if sharded
                   else g0)
            if name.endswith("relative.bias"):
                # (q + r_r) . bias is the same for every key of a query, so the softmax cancels
                # it: its gradient is zero but for rounding, at every TP size.
                assert max(float(full.abs().max()), float(got.abs().max())) < 1e-12 * largest
                continue
            torch.testing.assert_close(
                got, full, rtol=1e-8, atol=1e-10 * float(full.abs().max()),
                msg=lambda m, tp=tp, name=name: f"TP={tp}: gradient of {name}: {m}")
            assert float(full.abs().max()) > 1e-6 * largest, name  # every parameter takes part


# ---------------------------------------------------------------------------------------------
# Resharding

def _change_mp(argv):
    import change_mp
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            change_mp.main([str(a) for a in argv])
        except SystemExit as e:
            raise AssertionError(f"change_mp.py {argv} failed: {err.getvalue()}") from e


def _shards(save_dir):
    ckpt = os.path.join(save_dir, read_latest_tag(str(save_dir)))
    n = len([f for f in os.listdir(ckpt) if f.startswith("mp_rank_")])
    return [torch.load(model_state_path(ckpt, r), weights_only=True)["module"]
            for r in range(n)]


def test_change_mp_round_trips_4_2_1_4_bit_exact(tmp_path):
    from tests.data.conftest import tiny_char_tokenizer
    cfg = make_cfg()
    model = build(cfg, ParallelState.single())
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    spec, tokenizer = get_model_spec("transformer_xl"), tiny_char_tokenizer()
    src = tmp_path / "tp4"
    write_weights_only_checkpoint(str(src), CheckpointMeta.for_model(spec, cfg, 4, tokenizer),
                                  shard_state_dict(full, spec, cfg, 4), tokenizer)
    _change_mp([src, 2, "--out", tmp_path / "tp2", "--quiet"])
    _change_mp([tmp_path / "tp2", 1, "--out", tmp_path / "tp1", "--quiet"])
    _change_mp([tmp_path / "tp1", 4, "--out", tmp_path / "back4", "--quiet"])

    # Merged to one rank, every tensor is the full model's: the relative projection and r_w / r_r
    # joined along their head dimension, relative.bias merged too.
    (merged,) = _shards(tmp_path / "tp1")
    assert set(merged) == set(full)
    for key, tensor in full.items():
        assert torch.equal(merged[key], tensor), key
    # Each TP size holds exactly its cut of the full model, and 4 -> 2 -> 1 -> 4 is the identity.
    for tp, where in ((2, "tp2"), (4, "back4")):
        want = shard_state_dict(full, spec, cfg, tp)
        for r, got in enumerate(_shards(tmp_path / where)):
            assert set(got) == set(want[r])
            for key, tensor in want[r].items():
                assert torch.equal(got[key], tensor), (where, r, key)
    for before, after in zip(_shards(src), _shards(tmp_path / "back4")):
        for key in before:
            assert torch.equal(before[key], after[key]), key
    shard = _shards(tmp_path / "tp2")[1]
    assert shard["r_w_bias"].shape == (2, 8) and shard["layers.1.attn.relative.bias"].shape == (16,)


# ---------------------------------------------------------------------------------------------
# Configuration

@pytest.mark.parametrize("overrides, words", [
    (dict(mem_length=-1), ["mem_length=-1", "must be >= 0"]),
    (dict(mem_length=64, max_position_embeddings=64),
     ["mem_length=64", "max_position_embeddings=64", "raise max_position_embeddings"]),
    (dict(num_attention_heads=5), ["hidden_size", "num_attention_heads=5"]),
])
def test_bad_config_is_one_line_naming_the_field(overrides, words):
    with pytest.raises(ValueError) as e:
        make_cfg(**overrides)
    message = str(e.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_a_segment_beyond_the_position_encoding_is_refused():
    model = build(make_cfg(mem_length=8, max_position_embeddings=20), ParallelState.single())
    ids, _ = text_batch(1, 13)
    _, memory = model(ids[:, :12])
    model(ids[:, :12], memory=memory)  # 8 remembered + 12 = 20 distances: covered
    with pytest.raises(ValueError, match=r"8 remembered \+ 13 segment positions exceed "
                                         "max_position_embeddings=20"):
        model(ids, memory=memory)


def test_the_released_shape_has_2_9b_parameters():
    """configs/transformer_xl/txl-2.9b.yaml: 32 layers, h 2560, 32 heads, vocabulary 50000 +
    <|endoftext|> padded to 50048 rows; counted on the meta device."""
    from megatron_lite.training.config import parse_config
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run = parse_config(["--config", os.path.join(root, "configs/transformer_xl/txl-2.9b.yaml")],
                       TransformerXLConfig)
    cfg = run.model
    layout = get_model_spec("transformer_xl").layout(cfg, 1)
    n = sum(math.prod(layout.shapes[k]) for k in layout.param_order)
    assert cfg.padded_vocab_size == 50048 and (run.data.seq_length, cfg.mem_length) == (512, 256)
    assert 2.85e9 < n < 2.95e9, n
