"""tools/convert_hf.py for dense GPT configs: transformers' GPT2LMHeadModel <-> our checkpoints.

Import: a random GPT2LMHeadModel (padded vocabulary, perturbed norms) gives transformers' logits
within 1e-4 at TP=1 and TP=2, and exports back to the same weights. Export: a trained dense tiny
GPT of ours generates in transformers the greedy tokens generate.py gives. A sparse (LingLong)
config is refused, with the reason."""
import os

import pytest
import torch

from megatron_lite.checkpoint.checkpointing import read_model_states
from megatron_lite.data.tokenizer import load_tokenizer
from megatron_lite.models.gpt import GPTConfig, GPTModel
from megatron_lite.parallel import ParallelState, RNGContext, gather_full_logits
from megatron_lite.testing import run_distributed
from tests.data.conftest import tiny_char_tokenizer
from tools import convert_hf

transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HF_ROWS = 448  # more rows than the tokenizer's 405 ids, as a padded GPT-2 table has


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf_gpt2"))
    cfg = transformers.GPT2Config(vocab_size=HF_ROWS, n_positions=64, n_embd=32, n_layer=2,
                                  n_head=4, n_inner=48, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a misplaced one shows
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    tokenizer = tiny_char_tokenizer()
    tokenizer.save(os.path.join(path, "megatron_lite_tokenizer"))  # found there by import
    return path, model, tokenizer.vocab_size


def load_ours(ckpt, ps):
    state, meta, _ = read_model_states(ckpt, ps.tp_rank)
    model = GPTModel(GPTConfig(**meta.model_config), ps, RNGContext(0, tp_rank=ps.tp_rank))
    model.load_state_dict(state, strict=True)
    return model.eval()


def _tp_logits(rank, world, ckpt, ids):
    ps = ParallelState.from_world(world)
    model = load_ours(ckpt, ps)
    with torch.no_grad():
        return gather_full_logits(model(ids), ps, model.cfg.vocab_size)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_import_gives_transformers_logits_at_tp1_and_tp2(hf_gpt2, tmp_path):
    hf_dir, hf, vocab = hf_gpt2
    ids = torch.randint(0, vocab, (2, 50), generator=torch.Generator().manual_seed(1))
    theirs = hf_logits(hf, ids)[..., :vocab]
    convert_hf.main(["import", hf_dir, str(tmp_path / "tp1")])
    model = load_ours(str(tmp_path / "tp1"), ParallelState.single())
    assert (model.cfg.vocab_size, model.cfg.ffn_size, model.cfg.padded_vocab_size) == \
        (vocab, 48, 512)
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[..., :vocab], theirs, atol=1e-4, rtol=0)
    convert_hf.main(["import", hf_dir, str(tmp_path / "tp2"), "--tensor-model-parallel-size",
                     "2"])
    for logits in run_distributed(_tp_logits, 2, str(tmp_path / "tp2"), ids):
        torch.testing.assert_close(logits, theirs, atol=1e-4, rtol=0)
    # And back: the same weights (the vocabulary cut to the tokenizer's ids).
    convert_hf.main(["export", str(tmp_path / "tp2"), str(tmp_path / "hf")])
    back = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    original = hf.state_dict()
    for name, value in back.state_dict().items():
        ref = original[name][:vocab] if name in ("transformer.wte.weight", "lm_head.weight") \
            else original[name]
        torch.testing.assert_close(value, ref, atol=0, rtol=0, msg=name)


def _train_and_generate(rank, world, train_argv, generate_argv):
    import generate
    import pretrain_gpt
    pretrain_gpt.main(train_argv)
    return generate.main(generate_argv)


def test_exported_trained_checkpoint_generates_what_generate_py_does(gpt_data, tmp_path):
    save = str(tmp_path / "dense")
    train = ["--config", os.path.join(ROOT, "configs/gpt/tiny.yaml"), "--no-sparse-attention",
             "--tokenizer", str(gpt_data / "tokenizer"), "--train-data-prefix",
             str(gpt_data / "train"), "--save", save, "--seq-length", "64",
             "--micro-batch-size", "8", "--global-batch-size", "8", "--train-iters", "40",
             "--lr", "5e-3", "--lr-warmup-iters", "5", "--hidden-dropout", "0",
             "--attention-dropout", "0", "--eval-interval", "none", "--no-progress-bar",
             "--log-interval", "10", "--peak-flops", "1e12"]
    (ours,) = run_distributed(_train_and_generate, 1, train, [
        "--load", save, "--prompt", "中国人民", "--greedy", "--max-new-tokens", "16"])[0]
    out = str(tmp_path / "hf")
    convert_hf.main(["export", save, out])
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    tokenizer = load_tokenizer(os.path.join(out, "megatron_lite_tokenizer"))
    prompt = torch.tensor([tokenizer.encode("中国人民")])
    # Logits first (the greedy comparison is only as good as the top-2 margins).
    model = load_ours(save, ParallelState.single())
    with torch.no_grad():
        torch.testing.assert_close(model(prompt)[..., :tokenizer.vocab_size],
                                   hf_logits(hf, prompt), atol=1e-4, rtol=0)
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=16, do_sample=False)  # both stop at eod
    assert theirs[0, prompt.shape[1]:].tolist() == ours["ids"] and len(ours["ids"]) > 1


def test_sparse_configs_are_refused_for_export(tiny_gpt_checkpoint, tmp_path):
    out = tmp_path / "hf"
    with pytest.raises(SystemExit, match="LingLong's fixed sparse attention.*cannot express"):
        convert_hf.main(["export", str(tiny_gpt_checkpoint), str(out)])
    assert not out.exists()
