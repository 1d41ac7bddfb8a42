"""Longformer interop: transformers' LongformerForMaskedLM and the Longformer_ZH layout through
tools/convert_hf.py, and tools/convert_to_long.py from a 512-position BertForMaskedLM.

- Import of a random LongformerForMaskedLM (windows [4, 8], ragged lengths, global tokens) at
  TP=1 and TP=2 gives its MLM logits with transformers' default positions (padding_idx + 1 on);
  export then re-import gives back every tensor exactly.
- The Longformer_ZH layout (BERT names with the *_global projections, "bert." or "longformer."
  prefix, 0-based positions) gives the logits of the same weights in transformers' BERT modules
  with transformers' LongformerSelfAttention in every layer, assembled here.
- convert_to_long at a length the BERT table covers, no global token and a window of at least
  twice the length, gives BertForMaskedLM's logits.
"""
import json
import shutil

import pytest
import torch

from megatron_lite.checkpoint.checkpointing import read_model_states
from megatron_lite.models.longformer import LongformerModel
from megatron_lite.parallel import ParallelState, RNGContext, gather_full_logits
from megatron_lite.testing import run_distributed
from tests.data.conftest import tiny_char_tokenizer
from tools import convert_hf, convert_to_long

transformers = pytest.importorskip("transformers")

LAYERS, H, HEADS, FFN = 2, 32, 4, 64


def write_vocab(tokenizer, directory):
    tokenizer.save(str(directory / "_ours"))
    shutil.copyfile(directory / "_ours" / "vocab.txt", directory / "vocab.txt")
    shutil.rmtree(directory / "_ours")


def perturb_norms(model):
    with torch.no_grad():  # non-trivial LayerNorm scales and biases, so a misplaced one shows
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                p.add_(0.2 * torch.randn_like(p))


@pytest.fixture(scope="module")
def tok():
    return tiny_char_tokenizer("bert")


@pytest.fixture(scope="module")
def hf_longformer(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_longformer")
    cfg = transformers.LongformerConfig(
        vocab_size=tok.vocab_size + 20, hidden_size=H, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=FFN, attention_window=[4, 8],
        max_position_embeddings=64 + tok.pad_id + 1, pad_token_id=tok.pad_id,
        type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.LongformerForMaskedLM(cfg).eval()
    perturb_norms(model)
    with torch.no_grad():
        model.lm_head.bias.normal_()
    model.save_pretrained(str(path))
    write_vocab(tok, path)
    return str(path), model


def make_inputs(tok):
    g = torch.Generator().manual_seed(1)
    b, n = 3, 21  # no window divides 21
    ids = torch.randint(10, tok.vocab_size, (b, n), generator=g)
    attention = torch.ones(b, n, dtype=torch.long)
    attention[1, 15:] = 0
    attention[2, 9:] = 0
    ids[attention == 0] = tok.pad_id
    glob = torch.zeros(b, n, dtype=torch.long)
    glob[0, 0] = 1
    glob[1, [0, 5, 11]] = 1
    return ids, attention, glob


def load_ours(ckpt, ps):
    state, meta, _ = read_model_states(ckpt, ps.tp_rank)
    from megatron_lite.models import get_model_spec
    spec = get_model_spec(meta.model)
    model = LongformerModel(spec.make_config(meta.model_config), ps, RNGContext(0))
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def our_logits(rank, world, ckpt, ids, attention, glob):
    ps = ParallelState.single() if world == 1 else ParallelState.from_world(world)
    model = load_ours(ckpt, ps)
    return gather_full_logits(model(ids, attention, glob), ps, model.cfg.vocab_size)


def test_import_at_tp1_and_tp2_gives_transformers_logits(hf_longformer, tok, tmp_path):
    hf_dir, hf = hf_longformer
    ids, attention, glob = make_inputs(tok)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=attention, global_attention_mask=glob).logits
    real = attention.bool()
    want = want[..., :tok.vocab_size][real]
    convert_hf.main(["import", hf_dir, str(tmp_path / "tp1")])
    convert_hf.main(["import", hf_dir, str(tmp_path / "tp2"), "--tensor-model-parallel-size", "2"])
    one = our_logits(0, 1, str(tmp_path / "tp1"), ids, attention, glob)
    two = run_distributed(our_logits, 2, str(tmp_path / "tp2"), ids, attention, glob)[0]
    torch.testing.assert_close(one[real], want, atol=1e-4, rtol=0)
    torch.testing.assert_close(two[real], want, atol=1e-4, rtol=0)

    # Export, then import again: every tensor comes back exactly.
    convert_hf.main(["export", str(tmp_path / "tp2"), str(tmp_path / "exported")])
    with open(tmp_path / "exported" / "config.json") as f:
        exported = json.load(f)
    assert exported["model_type"] == "longformer" and exported["attention_window"] == [4, 8]
    back = transformers.LongformerForMaskedLM.from_pretrained(str(tmp_path / "exported")).eval()
    with torch.no_grad():
        again = back(input_ids=ids, attention_mask=attention, global_attention_mask=glob).logits
    torch.testing.assert_close(again[real], want, atol=1e-4, rtol=0)
    convert_hf.main(["import", str(tmp_path / "exported"), str(tmp_path / "reimported")])
    first, _, _ = read_model_states(str(tmp_path / "tp1"), 0)
    second, _, _ = read_model_states(str(tmp_path / "reimported"), 0)
    assert set(first) == set(second)
    for name in first:
        assert torch.equal(first[name], second[name]), name


# ---------------------------------------------------------------------------- Longformer_ZH
def zh_state(hf_model, prefix):
    """The Longformer_ZH layout of `hf_model`'s weights: BERT names under `prefix`, the *_global
    projections kept, a BERT MLM head, the table without transformers' padding offset."""
    sd, out = hf_model.state_dict(), {}
    offset = hf_model.config.pad_token_id + 1
    for k, v in sd.items():
        if k.startswith("longformer."):
            name = prefix + k[len("longformer."):]
            out[name] = v[offset:] if k.endswith("position_embeddings.weight") else v
    out["cls.predictions.transform.dense.weight"] = sd["lm_head.dense.weight"]
    out["cls.predictions.transform.dense.bias"] = sd["lm_head.dense.bias"]
    out["cls.predictions.transform.LayerNorm.weight"] = sd["lm_head.layer_norm.weight"]
    out["cls.predictions.transform.LayerNorm.bias"] = sd["lm_head.layer_norm.bias"]
    out["cls.predictions.decoder.weight"] = sd["lm_head.decoder.weight"]
    out["cls.predictions.bias"] = sd["lm_head.bias"]
    out["cls.predictions.decoder.bias"] = sd["lm_head.bias"]  # tied, as BERT checkpoints hold it
    return {k: v.clone() for k, v in out.items()}


class BertWithLongformerAttention(torch.nn.Module):
    """transformers' BERT modules with its LongformerSelfAttention in every layer, as
    Longformer_ZH's code builds them (0-based positions, BERT's MLM head)."""

    def __init__(self, cfg, windows):
        super().__init__()
        from transformers.models.bert import modeling_bert as mb
        from transformers.models.longformer import modeling_longformer as ml
        self.embeddings = mb.BertEmbeddings(cfg)
        lcfg = transformers.LongformerConfig(**{**cfg.to_dict(), "attention_window": windows})
        self.attn = torch.nn.ModuleList(ml.LongformerSelfAttention(lcfg, i) for i in range(len(windows)))
        self.attn_out = torch.nn.ModuleList(mb.BertSelfOutput(cfg) for _ in windows)
        self.mid = torch.nn.ModuleList(mb.BertIntermediate(cfg) for _ in windows)
        self.out = torch.nn.ModuleList(mb.BertOutput(cfg) for _ in windows)
        self.head = mb.BertOnlyMLMHead(cfg)
        self.pad_to = max(windows)

    def load(self, state, prefix):
        mine = {}
        for k, v in state.items():
            k = k.replace(prefix + "embeddings.", "embeddings.").replace("cls.", "head.")
            for i in range(len(self.attn)):
                layer = f"{prefix}encoder.layer.{i}."
                k = k.replace(layer + "attention.self.", f"attn.{i}.")
                k = k.replace(layer + "attention.output.", f"attn_out.{i}.")
                k = k.replace(layer + "intermediate.", f"mid.{i}.")
                k = k.replace(layer + "output.", f"out.{i}.")
            mine[k] = v
        missing, unexpected = self.load_state_dict(mine, strict=False)
        assert not unexpected and all("position_ids" in m or "token_type_ids" in m
                                      for m in missing), (missing, unexpected)

    @torch.no_grad()
    def forward(self, ids, attention, glob):
        n = ids.shape[1]
        pad = -n % self.pad_to
        ids = torch.nn.functional.pad(ids, (0, pad))
        attention = torch.nn.functional.pad(attention, (0, pad))
        glob = torch.nn.functional.pad(glob, (0, pad))
        merged = attention * (glob + 1)  # 0 padding, 1 local, 2 global
        extended = (merged - 1) * 10000.0  # < 0 padding, 0 local, > 0 global
        masked, global_ = merged == 0, merged == 2
        x = self.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
        for attn, attn_out, mid, out in zip(self.attn, self.attn_out, self.mid, self.out):
            a = attn(x, attention_mask=extended, is_index_masked=masked,
                     is_index_global_attn=global_, is_global_attn=bool(global_.any()))[0]
            x = attn_out(a, x)
            x = out(mid(x), x)
        return self.head(x)[:, :n]


@pytest.mark.parametrize("prefix", ["bert.", "longformer."])
def test_longformer_zh_layout_imports_with_the_reference_logits(hf_longformer, tok, tmp_path, prefix):
    _, hf = hf_longformer
    state = zh_state(hf, prefix)
    zh = tmp_path / "zh"
    zh.mkdir()
    bert_cfg = transformers.BertConfig(
        vocab_size=hf.config.vocab_size, hidden_size=H, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=tok.pad_id)
    with open(zh / "config.json", "w") as f:
        json.dump({**bert_cfg.to_dict(), "model_type": "bert", "attention_window": [4, 8],
                   "architectures": ["BertForMaskedLM"]}, f)
    torch.save(state, zh / "pytorch_model.bin")
    write_vocab(tok, zh)
    reference = BertWithLongformerAttention(bert_cfg, [4, 8]).eval()
    reference.load(state, prefix)
    ids, attention, glob = make_inputs(tok)
    want = reference(ids, attention, glob)[..., :tok.vocab_size]
    convert_hf.main(["import", str(zh), str(tmp_path / "ckpt")])
    got = our_logits(0, 1, str(tmp_path / "ckpt"), ids, attention, glob)
    real = attention.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- convert-to-long
@pytest.fixture(scope="module")
def hf_bert(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_bert")
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=H,
                                  num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                  intermediate_size=FFN, max_position_embeddings=512,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  pad_token_id=tok.pad_id)
    torch.manual_seed(3)
    model = transformers.BertForMaskedLM(cfg).eval()
    perturb_norms(model)
    model.save_pretrained(str(path))
    write_vocab(tok, path)
    return str(path), model


def test_convert_to_long_keeps_bert_at_short_lengths(hf_bert, tok, tmp_path):
    bert_dir, bert = hf_bert
    out = str(tmp_path / "long")
    convert_to_long.main([bert_dir, out, "--max-positions", "1536", "--attention-window", "128"])
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(10, tok.vocab_size, (2, 60), generator=g)
    attention = torch.ones_like(ids)
    with torch.no_grad():
        want = bert(input_ids=ids, attention_mask=attention).logits
    got = our_logits(0, 1, out, ids, attention, torch.zeros_like(ids))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    state, meta, _ = read_model_states(out, 0)
    assert meta.model_config["max_position_embeddings"] == 1536 and meta.weights_only
    table = state["position_embeddings.weight"]
    assert torch.equal(table[512:1024], table[:512]) and torch.equal(table[1024:], table[:512])
    assert torch.equal(state["layers.1.attn.qkv_global.weight"], state["layers.1.attn.qkv.weight"])
    # Ours, made longer again: from 1536 to 3072 positions, same logits.
    again = str(tmp_path / "longer")
    convert_to_long.main([out, again, "--max-positions", "3072"])
    torch.testing.assert_close(our_logits(0, 1, again, ids, attention, torch.zeros_like(ids)),
                               want, atol=1e-5, rtol=0)


def test_converters_refuse_what_they_cannot_convert(hf_bert, tmp_path):
    bert_dir, _ = hf_bert
    other = tmp_path / "t5"
    other.mkdir()
    with open(other / "config.json", "w") as f:
        json.dump({"model_type": "t5"}, f)
    with pytest.raises(SystemExit, match=r"a 't5' model.*not a plain BERT"):
        convert_to_long.main([str(other), str(tmp_path / "x"), "--attention-window", "8"])
    with pytest.raises(SystemExit, match="shorter than the position table.*512 rows"):
        convert_to_long.main([bert_dir, str(tmp_path / "y"), "--max-positions", "256",
                              "--attention-window", "8"])
    with pytest.raises(SystemExit, match="plain BERT; make it long with tools/convert_to_long.py"):
        convert_hf.main(["import", bert_dir, str(tmp_path / "z")])
    for name in ("x", "y", "z"):
        assert not (tmp_path / name).exists()
