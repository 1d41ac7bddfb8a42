"""tools/convert_hf.py: transformers T5 <-> our checkpoints.

Import: a randomly initialised transformers T5 (small, unequal encoder/decoder depths, log-scale
position buckets reached), imported at TP=1 and TP=2, gives transformers' logits within 1e-4, for
v1.0 (LongLM) and v1.1. Export: a trained tiny checkpoint of ours, exported, gives in transformers
the greedy generation generate.py gives, token for token (transformers with use_cache=False: its
cache fails when the decoder is deeper than the encoder, see DESIGN.md)."""
import io
import json
import math
import os
import random

import pytest
import torch

from megatron_lite.checkpoint.checkpointing import read_model_states
from megatron_lite.data.tokenizer import load_tokenizer
from megatron_lite.models.t5 import T5Config, T5Model
from megatron_lite.parallel import ParallelState, RNGContext, gather_full_logits
from megatron_lite.testing import run_distributed
from tools import convert_hf

transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPIECE_PIECES = 300
HF_ROWS = 448  # > 300 pieces + 100 sentinels: the HF table has padding rows, as t5's 32128 does


def make_spiece(path):
    """A T5-layout sentencepiece model (pad 0, eos 1, unk 2, no sentinels inside) on synthetic
    words: transformers appends the sentinels above it."""
    import sentencepiece as spm
    r = random.Random(0)
    words = ["".join(r.choice("abcdefghij") for _ in range(r.randint(2, 6))) for _ in range(300)]
    texts = [" ".join(r.choice(words) for _ in range(30)) for _ in range(400)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf,
                                   vocab_size=SPIECE_PIECES, pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, minloglevel=2)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def make_hf_dir(path, variant):
    gated = variant == "v1.1"
    cfg = transformers.T5Config(
        vocab_size=HF_ROWS, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu" if gated else "relu", tie_word_embeddings=not gated,
        dropout_rate=0.0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # non-trivial norm scales, so a misplaced LayerNorm shows
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    make_spiece(os.path.join(path, "spiece.model"))
    return model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_t5")
    return {v: (str(root / v), make_hf_dir(str(root / v), v)) for v in ("v1.0", "v1.1")}


def make_inputs():
    g = torch.Generator().manual_seed(1)
    enc = torch.randint(3, 400, (2, 40), generator=g)
    enc[1, 31:] = 0  # padding
    dec = torch.randint(3, 400, (2, 30), generator=g)  # past max_distance 20
    dec[:, 0] = 0
    return enc, dec


def load_ours(ckpt, ps, tag=None):
    state, meta, _ = read_model_states(ckpt, ps.tp_rank, tag=tag)
    model = T5Model(T5Config(**meta.model_config), ps, RNGContext(0, tp_rank=ps.tp_rank))
    model.load_state_dict(state, strict=True)
    return model.eval(), meta


def hf_logits(model, enc, dec):
    with torch.no_grad():
        return model(input_ids=enc, attention_mask=(enc != 0).long(), decoder_input_ids=dec).logits


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
def test_import_gives_transformers_logits(hf_models, tmp_path, variant):
    hf_dir, hf = hf_models[variant]
    convert_hf.main(["import", hf_dir, str(tmp_path / "ckpt")])
    model, meta = load_ours(str(tmp_path / "ckpt"), ParallelState.single())
    cfg = model.cfg
    assert (cfg.num_layers, cfg.decoder_layers) == (2, 3)
    assert cfg.tie_word_embeddings == (variant == "v1.0")
    assert cfg.vocab_size == SPIECE_PIECES + 100 and meta.padded_vocab_size == 512
    enc, dec = make_inputs()
    with torch.no_grad():
        ours = model(enc, dec)[..., :cfg.vocab_size]
    theirs = hf_logits(hf, enc, dec)[..., :cfg.vocab_size]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def _tp_logits(rank, world, ckpt, enc, dec):
    ps = ParallelState.from_world(world)
    model, _ = load_ours(ckpt, ps)
    with torch.no_grad():
        return gather_full_logits(model(enc, dec), ps, model.cfg.vocab_size)


def test_import_at_tp2_gives_transformers_logits(hf_models, tmp_path):
    hf_dir, hf = hf_models["v1.1"]
    ckpt = str(tmp_path / "ckpt")
    convert_hf.import_hf(hf_dir, ckpt, tp_size=2)
    assert sorted(n for n in os.listdir(tmp_path / "ckpt" / "global_step0") if n.startswith("mp_rank"))[:2] == [
        "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]
    enc, dec = make_inputs()
    ranks = run_distributed(_tp_logits, 2, ckpt, enc, dec)
    theirs = hf_logits(hf, enc, dec)[..., :ranks[0].shape[-1]]
    for logits in ranks:
        torch.testing.assert_close(logits, theirs, atol=1e-4, rtol=0)


def test_imported_tokenizer_keeps_the_hf_ids(hf_models, tmp_path):
    hf_dir, _ = hf_models["v1.0"]
    ckpt = convert_hf.import_hf(hf_dir, str(tmp_path / "ckpt"))
    ours = load_tokenizer(os.path.join(ckpt, "tokenizer"))
    assert ours.hash == load_tokenizer(hf_dir).hash
    # HF layout: sentinels appended above the pieces, <extra_id_0> the highest id.
    assert ours.sentinel_id(0) == SPIECE_PIECES + 99 and ours.sentinel_id(99) == SPIECE_PIECES
    assert (ours.pad_id, ours.eos_id) == (0, 1)
    # generate.py's prompts may write sentinels as text; sentencepiece alone would split them.
    from megatron_lite.inference.seq2seq import encode_source
    ids = encode_source(ours, "abc <extra_id_0> def<extra_id_7>")
    assert ids == ours.encode("abc ") + [ours.sentinel_id(0)] + ours.encode(" def") + \
        [ours.sentinel_id(7)]
    assert ours.sentinel_id(0) not in ours.encode("abc <extra_id_0>")
    meta = read_model_states(str(tmp_path / "ckpt"), 0)[1]
    assert meta.model == "t5" and meta.tokenizer_hash == ours.hash and meta.step == 0
    assert meta.partition_spec["encoder.relative_attention_bias"] == [1, 1]


def test_import_errors_say_what_is_wrong(hf_models, tmp_path):
    hf_dir, _ = hf_models["v1.0"]
    with pytest.raises(SystemExit, match="config.json not found"):
        convert_hf.main(["import", str(tmp_path), str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="num_attention_heads.*tensor_model_parallel_size=3"):
        convert_hf.main(["import", hf_dir, str(tmp_path / "y"), "--tensor-model-parallel-size", "3"])
    # A tokenizer with more ids than the embedding has rows does not belong to the model.
    big = tmp_path / "big"
    big.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(hf_dir, name), big / name)
    with open(big / "tokenizer_config.json", "w") as f:
        json.dump({"extra_ids": 200}, f)
    os.symlink(os.path.join(hf_dir, "spiece.model"), big / "spiece.model")
    with pytest.raises(SystemExit, match="500 ids but the model's embedding only 448 rows"):
        convert_hf.main(["import", str(big), str(tmp_path / "z")])
    convert_hf.main(["import", hf_dir, str(tmp_path / "ok")])
    with pytest.raises(SystemExit, match="already exists"):
        convert_hf.main(["import", hf_dir, str(tmp_path / "ok")])


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
def test_import_then_export_gives_back_the_transformers_model(hf_models, tmp_path, variant):
    hf_dir, hf = hf_models[variant]
    convert_hf.import_hf(hf_dir, str(tmp_path / "ckpt"), tp_size=2)
    convert_hf.main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")])
    back = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    original = hf.state_dict()
    vocab = SPIECE_PIECES + 100
    for name, value in back.state_dict().items():
        ref = original[name][:vocab] if name in ("shared.weight", "lm_head.weight") or \
            name.endswith("embed_tokens.weight") else original[name]
        torch.testing.assert_close(value, ref, atol=0, rtol=0, msg=name)
    assert back.config.scale_decoder_outputs == (variant == "v1.0")
    enc, dec = make_inputs()
    torch.testing.assert_close(hf_logits(back, enc, dec), hf_logits(hf, enc, dec)[..., :vocab],
                               atol=1e-6, rtol=0)


def _generate(rank, world, argv):
    import generate
    return generate.main(argv)


def test_exported_trained_checkpoint_generates_what_generate_py_does(t5_checkpoint, t5_data,
                                                                     sample_data, tmp_path):
    from megatron_lite.inference.seq2seq import encode_source
    out = str(tmp_path / "hf")
    convert_hf.main(["export", str(t5_checkpoint), out])
    hf = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
    tokenizer = load_tokenizer(str(t5_data / "tokenizer"))
    assert load_tokenizer(out).hash == tokenizer.hash
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer.convert_tokens_to_ids("<extra_id_1>") == tokenizer.sentinel_id(1)
    assert (hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (tokenizer.eos_id, 0)

    with open(sample_data.valid, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f][:4]
    prompts = [t[:30] + "<extra_id_1>" + t[40:60] for t in texts]
    sources = [encode_source(tokenizer, p) for p in prompts]
    assert all(tokenizer.sentinel_id(1) in s for s in sources)

    # Logits first (teacher-forced), then greedy token for token.
    ours, _ = load_ours(str(t5_checkpoint), ParallelState.single())
    enc = torch.tensor([sources[0]])
    dec = torch.tensor([[0] + sources[1][:20]])
    with torch.no_grad():
        torch.testing.assert_close(ours(enc, dec)[..., :tokenizer.vocab_size],
                                   hf_logits(hf, enc, dec), atol=1e-4, rtol=0)

    argv = ["--load", str(t5_checkpoint), "--greedy", "--max-new-tokens", "24"]
    for p in prompts:
        argv += ["--prompt", p]
    results = run_distributed(_generate, 1, argv)[0]
    for source, result in zip(sources, results):
        ids = torch.tensor([source])
        theirs = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             num_beams=1, max_new_tokens=24, use_cache=False,
                             decoder_start_token_id=0, eos_token_id=tokenizer.eos_id,
                             pad_token_id=0)[0, 1:].tolist()
        assert result["ids"] == theirs, (result["prompt"], result["ids"], theirs)
    assert any(len(r["ids"]) > 3 for r in results)


def _pretrain(rank, world, argv):
    import pretrain_t5
    return pretrain_t5.main(argv)


def test_imported_checkpoint_fine_tunes_and_generates(hf_models, tmp_path):
    """An import is a checkpoint like any other: pretrain_t5.py fine-tunes from it (--finetune;
    without it, a clear error: there is no optimizer state) and generate.py generates with it."""
    import tools.preprocess_data as preprocess
    hf_dir, _ = hf_models["v1.0"]
    ckpt = convert_hf.import_hf(hf_dir, str(tmp_path / "ckpt"))
    r = random.Random(1)
    with open(tmp_path / "text.jsonl", "w") as f:
        for _ in range(60):
            words = ["".join(r.choice("abcdefghij") for _ in range(r.randint(2, 6)))
                     for _ in range(40)]
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    preprocess.main(["--input", str(tmp_path / "text.jsonl"), "--output-prefix",
                     str(tmp_path / "text"), "--tokenizer", os.path.join(ckpt, "tokenizer"),
                     "--workers", "1", "--quiet"])
    config = tmp_path / "model.yaml"  # the HF model's shape, as configs/t5/longlm-*.yaml are
    config.write_text("model:\n  num_layers: 2\n  num_decoder_layers: 3\n  hidden_size: 32\n"
                      "  ffn_hidden_size: 64\n  kv_channels: 8\n  num_attention_heads: 4\n"
                      "  relative_attention_num_buckets: 8\n  relative_attention_max_distance: 20\n"
                      "data:\n  seq_length: 32\n  decoder_seq_length: 16\n")
    argv = ["--config", str(config), "--tokenizer", os.path.join(ckpt, "tokenizer"),
            "--train-data-prefix", str(tmp_path / "text"), "--micro-batch-size", "4",
            "--global-batch-size", "4", "--train-iters", "2", "--lr-warmup-iters", "1",
            "--no-progress-bar", "--eval-interval", "none", "--peak-flops", "1e12",
            "--load", str(tmp_path / "ckpt")]
    out = run_distributed(_pretrain, 1, argv + ["--finetune", "--save", str(tmp_path / "ft")])[0]
    assert out["step"] == 2 and all(math.isfinite(x) for x in out["loss"])
    with pytest.raises(Exception, match="weights only.*--finetune"):
        run_distributed(_pretrain, 1, argv + ["--save", str(tmp_path / "resume")])
    results = run_distributed(_generate, 1, ["--load", str(tmp_path / "ckpt"), "--prompt",
                                             "abc <extra_id_0> def", "--max-new-tokens", "5",
                                             "--greedy"])[0]
    assert 1 <= len(results[0]["ids"]) <= 5 and "=>" not in results[0]["completion"]
