"""tools/evaluate.py on the session's tiny GPT (TP=2, two gloo ranks): bits per character against
a hand computation, the text and JSON reports, --objective, and bad input."""
import contextlib
import io
import json
import math
import os

import pytest
import torch

from megatron_lite.checkpoint.reshard import merged_state_dict
from megatron_lite.data.tokenizer import load_tokenizer
from megatron_lite.models.gpt import GPTConfig, GPTModel
from megatron_lite.testing import run_distributed

# Common characters only (no space or ASCII): cleaning leaves it as it is, one token each.
TEXT = "中国人民在党的领导下取得了伟大的成就我们要继续努力"


def _session(rank, world, calls):
    """Each call's (result, stdout, error) on this rank."""
    import tools.evaluate as evaluate
    out = []
    for argv in calls:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            try:
                result, error = evaluate.main(argv), None
            except SystemExit as e:
                result, error = None, str(e.code)
        out.append((result, buf.getvalue(), error))
    return out


@pytest.fixture(scope="module")
def evaluated(tiny_gpt_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    text = root / "text.jsonl"
    text.write_text(json.dumps({"text": TEXT}, ensure_ascii=False) + "\n", encoding="utf-8")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": TEXT[:8], "text": TEXT[8:]},
                                        ensure_ascii=False) + "\n" for _ in range(2)),
                     encoding="utf-8")
    ckpt = str(tiny_gpt_checkpoint)
    common = ["--load", ckpt, "--seq-length", str(len(TEXT))]
    calls = [common + ["--input", str(text), "--json"],
             common + ["--input", str(text)],
             common + ["--input", str(pairs), "--objective", "prompt_text", "--json"],
             common + ["--input", str(text), "--objective", "span_corruption"]]
    ranks = run_distributed(_session, 2, calls)
    return dict(ckpt=ckpt, rank0=ranks[0], rank1=ranks[1])


def test_bits_per_character_match_a_hand_computation(evaluated):
    (result, stdout, error) = evaluated["rank0"][0]
    assert error is None and json.loads(stdout) == result
    assert result["objective"] == "causal_lm" and result["batches"] == 1
    # By hand, at TP=1 from the merged shards: one sample, the text followed by the
    # end-of-document token; every label is a character but that last one.
    state, meta, ckpt_dir, _ = merged_state_dict(evaluated["ckpt"])
    cfg = GPTConfig(**meta.model_config)
    model = GPTModel(cfg)
    model.load_state_dict(state, strict=True)
    model.eval()
    tokenizer = load_tokenizer(os.path.join(ckpt_dir, "tokenizer"))
    ids = tokenizer.encode(TEXT)
    assert len(ids) == len(TEXT)
    labels = torch.tensor(ids[1:] + [tokenizer.eod_id])
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, :, :cfg.vocab_size].double()
    nats = -logits.log_softmax(-1)[torch.arange(len(ids)), labels].sum().item()
    characters = len(TEXT) - 1
    assert result["predicted_tokens"] == len(ids) and result["characters"] == characters
    assert result["bpc"] == pytest.approx(nats / (math.log(2) * characters), rel=1e-5)
    assert result["loss"] == pytest.approx(nats / len(ids), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nats / len(ids)), rel=1e-5)
    # Both TP ranks computed the same figures; only rank 0 prints.
    assert evaluated["rank1"][0][0] == result and evaluated["rank1"][0][1] == ""


def test_text_report_and_objective_override(evaluated):
    result, stdout, _ = evaluated["rank0"][1]
    assert f"loss {result['loss']:.4f} nats/token" in stdout
    assert f"{result['bpc']:.4f} bits per character" in stdout and "causal_lm" in stdout
    # prompt_text: the loss is on the text only (and its end-of-text token).
    pairs, _, error = evaluated["rank0"][2]
    assert error is None and pairs["objective"] == "prompt_text"
    assert pairs["predicted_tokens"] == 2 * (len(TEXT) - 8 + 1)
    # An objective the model's record does not list: one line naming the ones it does.
    _, _, error = evaluated["rank0"][3]
    assert error == ("error: --objective span_corruption: a 'gpt' model is scored with "
                     "causal_lm, prompt_text")


def test_a_checkpoint_at_another_tp_size_says_how_to_run_it(evaluated, tmp_path):
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"text": TEXT}, ensure_ascii=False) + "\n", encoding="utf-8")
    (_, _, error), = run_distributed(_session, 1, [["--load", evaluated["ckpt"], "--input",
                                                    str(text)]])[0]
    assert "tensor-parallel size 2" in error and "change_mp.py" in error
