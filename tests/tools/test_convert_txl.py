"""tools/convert_txl.py: Chinese-Transformer-XL's released checkpoint -> ours.

A tiny checkpoint written in the release's layout (one mp_rank_00_model_states.pt, no `latest`,
GPT2Model's names, fused q/k/v rows [q; k; v], the non-tensor entries DeepSpeed and their trainer
pickle, numpy RNG state included) imports at TP=2 and, merged, gives the logits of a reference
written here from their code's maths (mpu/transformer.py: their masks, rel_shift, memory update,
the memory normed by the layer's input LayerNorm) within 1e-5, over three segments and two
one-token steps. The reference would fail under a plain q/k/v split of our layout and with the
memory not normed. Their sentencepiece vocabulary gains <|endoftext|> at its piece count.
Bad input (unknown names, a pickled class outside the allowlist, an MP size that does not divide
the heads) is one line."""
import argparse
import contextlib
import io
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_lite.checkpoint.reshard import merged_state_dict
from megatron_lite.data.tokenizer import load_tokenizer
from megatron_lite.models.transformer_xl import TransformerXLConfig, TransformerXLModel
from megatron_lite.parallel import ParallelState
from tools import convert_txl

PIECES, ROWS = 300, 384            # their table: the pieces + <|endoftext|>, padded to 128s
LAYERS, H, HEADS, FFN = 2, 32, 4, 128
MEM, TRAIN_SEQ, SEG = 8, 16, 6     # their --mem-length, --seq-length; the segments fed here


def make_spiece(path):
    """A sentencepiece model with their id layout (unk 0, <s> 1, </s> 2), on synthetic words."""
    import sentencepiece as spm
    r = random.Random(0)
    words = ["".join(r.choice("abcdefghij") for _ in range(r.randint(2, 6))) for _ in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(r.choice(words) for _ in range(30)) for _ in range(400)]),
        model_writer=buf, vocab_size=PIECES, minloglevel=2)
    path.write_bytes(buf.getvalue())


def their_state():
    """GPT2Model(relative_encoding=True)'s state dict at MP=1, every tensor random."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=0.1, mean=0.0):
        return mean + scale * torch.randn(*shape, generator=g)

    d = H // HEADS
    sd = {"word_embeddings.weight": rnd(ROWS, H, scale=0.3),
          "transformer.position_embeddings.inv_freq": 1 / 10000 ** (torch.arange(0., H, 2.) / H),
          "transformer.r_w_bias": rnd(HEADS, d, scale=0.3),
          "transformer.r_r_bias": rnd(HEADS, d, scale=0.3),
          "transformer.final_layernorm.weight": rnd(H, mean=1.0),
          "transformer.final_layernorm.bias": rnd(H)}
    for i in range(LAYERS):
        for name, shape in (("input_layernorm", (H,)), ("attention.query_key_value", (3 * H, H)),
                            ("attention.relative", (H, H)), ("attention.dense", (H, H)),
                            ("post_attention_layernorm", (H,)), ("mlp.dense_h_to_4h", (FFN, H)),
                            ("mlp.dense_4h_to_h", (H, FFN))):
            norm = name.endswith("layernorm")
            sd[f"transformer.layers.{i}.{name}.weight"] = rnd(*shape, mean=1.0 if norm else 0.0,
                                                              scale=0.1 if norm else 0.3)
            sd[f"transformer.layers.{i}.{name}.bias"] = rnd(shape[0])
    return sd


def write_release(directory, module, legacy=False, **extra):
    """The release's file: DeepSpeed's model-state entries plus their trainer's client state
    (`legacy`: torch's pre-zip format, which cannot be memory-mapped)."""
    directory.mkdir()
    checkpoint = {"module": module, "buffer_names": [], "optimizer": None, "lr_scheduler": None,
                  "csr_tensor_module_names": set(), "skipped_steps": 0, "global_steps": 160000,
                  "global_samples": 40960000, "dp_world_size": 64, "mp_world_size": 1,
                  "iteration": 160000, "client_lr_scheduler": {"num_iters": 160000},
                  "random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                  "torch_rng_state": torch.get_rng_state(),
                  "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()}, **extra}
    torch.save(checkpoint, directory / convert_txl.RELEASED_FILE,
               _use_new_zipfile_serialization=not legacy)
    return directory


# ---------------------------------------------------------------------------------------------
# Their maths (Chinese-Transformer-XL mpu/transformer.py, GPT2ParallelTransformer at MP=1)

def their_forward(sd, ids, mems, *, qkv_layout="theirs", norm_memory=True):
    """(logits [b, q, rows], next mems) of segment `ids` after `mems` (one per layer input and
    the final output, as their model returns them; [] at the start)."""
    b, q = ids.shape
    d = H // HEADS
    m = mems[0].shape[1] if mems else 0
    # get_masks_and_position_ids(transformer_xl=True), sliced to the keys present.
    mask = torch.tril(torch.triu(torch.ones(q, q + MEM, dtype=torch.float64),
                                 1 - TRAIN_SEQ + MEM), MEM)[:, -(q + m):]
    pos = torch.arange(q + m - 1, -1, -1.0, dtype=torch.float64)
    pos_emb = torch.cat([torch.outer(pos, sd["transformer.position_embeddings.inv_freq"]).sin(),
                         torch.outer(pos, sd["transformer.position_embeddings.inv_freq"]).cos()],
                        -1)
    x = sd["word_embeddings.weight"][ids]
    hiddens = [x]

    def ln(t, name):
        return F.layer_norm(t, (H,), sd[name + ".weight"], sd[name + ".bias"], 1e-5)

    def heads(t):  # [b, s, h] -> [b, heads, s, d]
        return t.view(*t.shape[:-1], HEADS, d).transpose(-3, -2)

    def rel_shift(t):  # their _rel_shift: a zero column, reread as k + 1 rows
        t = torch.cat([t.new_zeros(*t.shape[:-1], 1), t], -1)
        return t.view(*t.shape[:-2], t.shape[-1], t.shape[-2])[:, :, 1:].reshape(
            *t.shape[:-2], t.shape[-2], t.shape[-1] - 1)

    for i in range(LAYERS):
        p = f"transformer.layers.{i}."
        y = ln(x, p + "input_layernorm")
        keys_in = y
        if mems:
            mem = ln(mems[i], p + "input_layernorm") if norm_memory else mems[i]
            keys_in = torch.cat([mem, y], 1)
        mixed = F.linear(keys_in, sd[p + "attention.query_key_value.weight"],
                         sd[p + "attention.query_key_value.bias"])
        if qkv_layout == "theirs":
            mq, mk, mv = mixed.chunk(3, -1)           # split_tensor_along_last_dim(., 3)
        else:                                         # our head-major rows read as theirs
            mq, mk, mv = mixed.view(b, -1, HEADS, 3, d).unbind(3)
            mq, mk, mv = (t.reshape(b, -1, H) for t in (mq, mk, mv))
        qh, kh, vh = heads(mq[:, -q:]), heads(mk), heads(mv)
        r = heads(F.linear(pos_emb, sd[p + "attention.relative.weight"],
                           sd[p + "attention.relative.bias"]))
        ac = torch.matmul(qh + sd["transformer.r_w_bias"][:, None], kh.transpose(-1, -2))
        bd = rel_shift(torch.matmul(qh + sd["transformer.r_r_bias"][:, None], r.transpose(-1, -2)))
        scores = (ac + bd) / math.sqrt(d)
        scores = scores * mask - 10000.0 * (1.0 - mask)
        ctx = torch.matmul(scores.softmax(-1), vh).transpose(1, 2).reshape(b, q, H)
        x = x + F.linear(ctx, sd[p + "attention.dense.weight"], sd[p + "attention.dense.bias"])
        y = ln(x, p + "post_attention_layernorm")
        y = F.linear(y, sd[p + "mlp.dense_h_to_4h.weight"], sd[p + "mlp.dense_h_to_4h.bias"])
        y = F.gelu(y, approximate="tanh")  # their gelu_impl
        x = x + F.linear(y, sd[p + "mlp.dense_4h_to_h.weight"], sd[p + "mlp.dense_4h_to_h.bias"])
        hiddens.append(x)
    logits = F.linear(ln(x, "transformer.final_layernorm"), sd["word_embeddings.weight"])
    # update_mems: the last MEM positions of memory plus segment, per layer input.
    new = [torch.cat([mems[j], t], 1)[:, -MEM:] if mems else t[:, -MEM:]
           for j, t in enumerate(hiddens)]
    return logits, new


def run_theirs(sd, ids, **kw):
    logits, mems = [], []
    for cut in _cuts(ids.shape[1]):
        out, mems = their_forward(sd, ids[:, cut], mems, **kw)
        logits.append(out)
    return torch.cat(logits, 1)


def run_ours(model, ids):
    logits, memory = [], None
    for cut in _cuts(ids.shape[1]):
        out, memory = model(ids[:, cut], memory=memory)
        logits.append(out)
    return torch.cat(logits, 1)


def _cuts(n):
    """Three segments of SEG, then one token at a time (generation's steps)."""
    return [slice(s, s + SEG) for s in range(0, 3 * SEG, SEG)] + \
        [slice(t, t + 1) for t in range(3 * SEG, n)]


def convert(*argv):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            return convert_txl.main([str(a) for a in argv])
        except SystemExit as e:
            return str(e.code)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("txl_release")
    make_spiece(root / "cog-pretrain.model")
    sd = their_state()
    write_release(root / "txl", sd)
    out = root / "ours"
    written = convert(root / "txl", out, "--tokenizer", root / "cog-pretrain.model",
                      "--tensor-model-parallel-size", 2, "--mem-length", MEM,
                      "--max-position-embeddings", 32)
    assert not written.startswith("error"), written
    return dict(root=root, theirs=sd, out=out)


def test_imported_release_gives_their_logits_with_memory(release):
    full, meta, ckpt_dir, _ = merged_state_dict(str(release["out"]))
    assert meta.model == "transformer_xl" and meta.weights_only
    assert (meta.model_config["num_layers"], meta.model_config["mem_length"]) == (LAYERS, MEM)
    model = TransformerXLModel(TransformerXLConfig(**meta.model_config), ParallelState.single())
    model.load_state_dict(full)
    model = model.double().eval()
    theirs = {k: v.double() for k, v in release["theirs"].items()}
    ids = torch.randint(0, PIECES + 1, (2, 3 * SEG + 2), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = run_theirs(theirs, ids)[..., :PIECES + 1]
        got = run_ours(model, ids)[..., :PIECES + 1]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

        # The reference is sensitive to what a wrong import gets wrong: our fused rows split
        # plainly as [q; k; v] ...
        ours_as_theirs = dict(theirs)
        for i in range(LAYERS):
            for kind in ("weight", "bias"):
                ours_as_theirs[f"transformer.layers.{i}.attention.query_key_value.{kind}"] = \
                    model.state_dict()[f"layers.{i}.attn.qkv.{kind}"]
        plain = run_theirs(ours_as_theirs, ids)[..., :PIECES + 1]
        assert (plain - got).abs().max() > 1e-2
        assert (run_theirs(ours_as_theirs, ids, qkv_layout="ours")[..., :PIECES + 1]
                - got).abs().max() < 1e-5  # (the same rows read head-major: ours again)
        # ... and a memory that skips the layer's input LayerNorm (the first segment, read
        # without memory, agrees; every later one differs).
        unnormed = run_theirs(theirs, ids, norm_memory=False)[..., :PIECES + 1]
        assert (unnormed[:, :SEG] - got[:, :SEG]).abs().max() < 1e-5
        assert (unnormed[:, SEG:] - got[:, SEG:]).abs().max() > 1e-2


def test_their_vocabulary_gains_endoftext_at_the_piece_count(release):
    tokenizer = load_tokenizer(str(release["out"] / "global_step0" / "tokenizer"))
    assert tokenizer.vocab_size == PIECES + 1 and tokenizer.eod_id == PIECES
    assert tokenizer.id_to_token(PIECES) == "<|endoftext|>"
    ids = tokenizer.encode("abc def")
    assert ids and max(ids) < PIECES
    assert tokenizer.decode(ids + [PIECES]).endswith("<|endoftext|>")


def test_a_file_in_torchs_legacy_format_imports_the_same(release):
    root = release["root"]
    write_release(root / "legacy", release["theirs"], legacy=True)
    assert not convert(root / "legacy", root / "ours_legacy", "--tokenizer",
                       root / "cog-pretrain.model", "--mem-length", MEM,
                       "--max-position-embeddings", 32).startswith("error")
    got, _, _, _ = merged_state_dict(str(root / "ours_legacy"))
    want, _, _, _ = merged_state_dict(str(release["out"]))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("case, words", [
    ("unknown", ["not Chinese-Transformer-XL's", "bert.pooler.dense.weight",
                 "transformer.layers.0.attention.query.weight"]),
    ("pickled_class", ["cannot be read safely", "argparse.Namespace", "weights_only=False"]),
    ("mp3", ["--tensor-model-parallel-size 3", "num_attention_heads=4"]),
    ("sharded", ["2 model-parallel shards", "mp_rank_00_model_states.pt"]),
])
def test_bad_input_is_one_line(release, case, words):
    root, sd = release["root"], release["theirs"]
    source, mp = root / case, 1
    if case == "unknown":
        bad = dict(sd)
        bad["bert.pooler.dense.weight"] = torch.zeros(2)
        bad["transformer.layers.0.attention.query.weight"] = bad.pop(
            "transformer.layers.0.attention.query_key_value.weight")
        write_release(source, bad)
    elif case == "pickled_class":
        write_release(source, sd, args=argparse.Namespace(lr=1e-4))
    elif case == "mp3":
        source, mp = root / "txl", 3
    else:
        write_release(source, sd)
        torch.save({}, source / "mp_rank_01_model_states.pt")
    message = convert(source, root / f"out_{case}", "--tokenizer", root / "cog-pretrain.model",
                      "--tensor-model-parallel-size", mp)
    assert message.startswith("error:") and "\n" not in message, message
    for word in words:
        assert word in message, message
