"""An imported Hugging Face T5 keeps its tokenizer's conventions (issue: generate.py's greedy
output differed from transformers' for the same text prompt, because transformers' T5Tokenizer
ends every text with </s> and our encoder inputs did not).

A random transformers T5 of LongLM's shape (v1.0: ReLU, tied head, a decoder deeper than the
encoder) with a scaled-up final norm, so its top-2 logit margins are large and greedy tokens
compare exactly, is imported; then for a text prompt generate.py's encoder ids are transformers'
tokenizer output, the first decoding step's logits are transformers', and so are the greedy
tokens. The T5 objectives (and so tools/evaluate.py) follow the same convention; checkpoints we
pretrain keep ours."""
import os

import numpy as np
import pytest
import torch

from megatron_lite.checkpoint.checkpointing import read_model_states
from megatron_lite.models.t5 import T5Config, T5Model
from megatron_lite.parallel import ParallelState, RNGContext
from megatron_lite.testing import run_distributed
from tests.tools.test_convert_hf import make_spiece
from tools import convert_hf

transformers = pytest.importorskip("transformers")

PROMPT = "abc def ghij cab"
VOCAB = 400  # the sentencepiece model's 300 pieces and transformers' 100 sentinels above them


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_conventions")
    hf_dir = str(root / "hf")
    cfg = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
        feed_forward_proj="relu", tie_word_embeddings=True, dropout_rate=0.0,
        decoder_start_token_id=0)  # LongLM's config.json says so
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # large logits: top-2 margins far above reduction-order noise
        hf.decoder.final_layer_norm.weight.mul_(40.0)
    hf.save_pretrained(hf_dir)
    make_spiece(os.path.join(hf_dir, "spiece.model"))
    tag_dir = convert_hf.import_hf(hf_dir, str(root / "ckpt"))  # the tokenizer is beside it
    return hf_dir, hf, str(root / "ckpt"), os.path.join(tag_dir, "tokenizer")


def _generate(rank, world, argv):
    import generate
    return generate.main(argv)


def test_generate_follows_an_imported_checkpoints_tokenizer_conventions(imported):
    import generate
    hf_dir, hf, ckpt, tokenizer_dir = imported
    state, meta, _ = read_model_states(ckpt, 0)
    assert meta.model_config["append_eos_to_source"] is True  # recorded by the import
    assert T5Config().append_eos_to_source is False  # what our pretraining writes
    model = T5Model(T5Config(**meta.model_config), ParallelState.single(), RNGContext(0))
    model.load_state_dict(state, strict=True)
    model.eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    from megatron_lite.data.tokenizer import load_tokenizer
    gen = generate.Seq2SeqGenerator(model, load_tokenizer(tokenizer_dir), None)
    (ours,) = gen.sources([PROMPT])
    theirs = hf_tok(PROMPT).input_ids
    assert ours == theirs and theirs[-1] == hf_tok.eos_token_id
    # The first decoding step, from each side's decoder start token.
    start = hf.config.decoder_start_token_id
    assert start == model.cfg.decoder_start_id
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([theirs]), decoder_input_ids=torch.tensor([[start]]))
        logits = model(torch.tensor([ours]), torch.tensor([[start]]))[..., :VOCAB]
        without_eos = model(torch.tensor([ours[:-1]]), torch.tensor([[start]]))[..., :VOCAB]
    torch.testing.assert_close(logits, ref.logits, atol=1e-4, rtol=0)
    assert (without_eos - ref.logits).abs().max() > 1e-2  # the bug this guards against
    top2 = ref.logits[0, -1].topk(2).values
    assert top2[0] - top2[1] > 0.5  # margins large enough for exact greedy comparisons
    # Greedy tokens through generate.py, as a user runs it, against transformers' generate (a
    # random model repeats itself: a repetition penalty, which both apply alike, varies them).
    (result,) = run_distributed(_generate, 1, ["--load", ckpt, "--prompt", PROMPT, "--greedy",
                                               "--max-new-tokens", "12",
                                               "--repetition-penalty", "3"])[0]

    def hf_greedy(source):  # use_cache=False: its cache fails on a deeper decoder (DESIGN.md)
        with torch.no_grad():
            return hf.generate(torch.tensor([source]), max_new_tokens=12, do_sample=False,
                               use_cache=False, repetition_penalty=3.0)[0, 1:].tolist()
    assert result["ids"] == hf_greedy(theirs) != hf_greedy(theirs[:-1])
    assert len(set(result["ids"])) > 6


def test_t5_objectives_follow_the_convention(sample_data):
    """An imported checkpoint fine-tuned or evaluated (tools/evaluate.py builds the model's data)
    sees its encoder inputs end with </s>; ours do not."""
    from megatron_lite.models.t5 import T5DataConfig, t5_objective_dataset
    tok = sample_data.spm_tokenizer
    data = T5DataConfig(seq_length=48, decoder_seq_length=24)
    for eos in (False, True):
        cfg = T5Config(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id,
                       append_eos_to_source=eos)
        ds = t5_objective_dataset(sample_data.spm_ds, tok, data, cfg, seed=3)
        for i in range(40):
            enc = ds[i]["encoder_input_ids"].numpy()
            real = enc[enc != tok.pad_id]
            assert len(real) <= 48 and (real[-1] == tok.eos_id) == eos
            assert np.count_nonzero(real == tok.eos_id) == int(eos)
