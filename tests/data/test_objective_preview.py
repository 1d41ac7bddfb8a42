"""tools/preview_data.py: jsonl output lets anyone check an objective from outside."""
import json

import pytest
import torch

import tools.preview_data as preview
from megatron_lite.data.tokenizer import TokenizerError

torch.set_num_threads(1)


def run(capsys, *argv):
    assert preview.main(list(argv)) == 0
    return capsys.readouterr().out


def run_jsonl(capsys, objective, prefix, tok_dir, num=20, seq=128):
    out = run(capsys, "--objective", objective, "--input", prefix, "--tokenizer", tok_dir,
              "--num", str(num), "--seq-length", str(seq), "--format", "jsonl", "--seed", "3")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["index"] for r in rows] == list(range(num))
    return rows


def test_t5_jsonl_rebuilds_sources(sample_data, capsys):
    tok = sample_data.char_tokenizer
    sentinels = {tok.sentinel_id(k) for k in range(tok.num_sentinels)}
    for objective in ("span_corruption", "continuation", "t5_mixed"):
        for r in run_jsonl(capsys, objective, sample_data.char_prefix,
                           sample_data.char_tokenizer_dir):
            spans, current = {}, None
            assert r["target_ids"][-1] == tok.eos_id
            for t in r["target_ids"][:-1]:
                if t in sentinels:
                    current = spans.setdefault(t, [])
                else:
                    current.append(t)
            rebuilt = [x for t in r["input_ids"] for x in (spans[t] if t in sentinels else [t])]
            assert rebuilt == r["source_ids"], objective


def test_lm_jsonl_rebuilds_sources(sample_data, capsys):
    for objective in ("causal_lm", "xl_stream"):
        for r in run_jsonl(capsys, objective, sample_data.char_prefix + ".bin",
                           sample_data.char_tokenizer_dir):
            assert r["input_ids"] + r["labels"][-1:] == r["source_ids"]
            assert r["input_ids"][1:] == r["labels"][:-1]
    for r in run_jsonl(capsys, "wwm_mlm", sample_data.bert_prefix, sample_data.bert_tokenizer_dir):
        body = [l if l != -100 else t for t, l in zip(r["input_ids"], r["labels"])][1:-1]
        assert body == r["source_ids"]
    for r in run_jsonl(capsys, "prompt_text", sample_data.finetune, sample_data.char_tokenizer_dir):
        assert r["input_ids"] + r["labels"][-1:] == r["source_ids"]


def test_text_shows_sentinels_and_masks(sample_data, capsys):
    out = run(capsys, "--objective", "span_corruption", "--input", sample_data.char_prefix,
              "--tokenizer", sample_data.char_tokenizer_dir, "--num", "2")
    assert "=== span_corruption #1 ===" in out and "<extra_id_1>" in out
    out = run(capsys, "--objective", "wwm_mlm", "--input", sample_data.bert_prefix,
              "--tokenizer", sample_data.bert_tokenizer_dir, "--num", "2")
    assert "[MASK]" in out and "[CLS]" in out


def test_wrong_tokenizer_is_a_clear_error(sample_data, capsys):
    with pytest.raises(TokenizerError, match=sample_data.char_prefix):
        preview.main(["--objective", "causal_lm", "--input", sample_data.char_prefix,
                      "--tokenizer", sample_data.spm_tokenizer_dir])
