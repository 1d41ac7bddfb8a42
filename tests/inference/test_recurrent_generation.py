"""Transformer-XL generation with a rolling memory (inference/recurrent.py, generate.py's
`recurrent` strategy).

- Cached memory keys/values give the logits of recomputing them from the hidden-state memory at
  every step (float64), for prompts shorter and longer than a segment, and a cached step projects
  only its new token.
- On the session's trained tiny XL (TP=2, exported once), greedy tokens are identical at TP 1, 2
  and 4 (TP=4 through generate.py --input-file, and interactively); cache and recompute agree
  there too; the sampling options (top-k / top-p / temperature / repetition penalty) apply.
- One-line errors: a prompt empty after tokenization, a model-parallel size that does not divide
  the heads, a segment length the position encoding does not cover.
TP=1 runs in the test process, TP 2 and 4 in one spawn of 4 gloo ranks."""
import contextlib
import io
import json
import sys

import pytest
import torch

from megatron_lite.inference.export import export_safetensors
from megatron_lite.inference.recurrent import RollingMemory, generate_recurrent
from megatron_lite.parallel import ParallelState
from megatron_lite.testing import run_distributed
from tests.models.test_transformer_xl import build, make_cfg

PROMPTS = ["中国人民", "北京是中华人民共和国的首都，也是全国的政治中心和文化中心。"]  # 4, 29 chars
SEGMENT = 8  # the long prompt takes four segments
NEW = 8       # tokens generated
GREEDY = dict(greedy=True)
SAMPLED = dict(top_k=20, top_p=0.9, temperature=0.8, repetition_penalty=1.2, seed=5)


def _qkv_rows(model):
    """Rows each qkv projection of layer 0 saw, call by call."""
    rows = []
    model.layers[0].attn.qkv.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[1]))
    return rows


@pytest.mark.parametrize("prompt_length", [5, 23])
def test_cached_memory_gives_the_recomputed_logits_at_every_step(prompt_length):
    cfg = make_cfg(mem_length=8, max_position_embeddings=32)
    model = build(cfg, ParallelState.single(), dtype=torch.float64)
    g = torch.Generator().manual_seed(prompt_length)
    text = torch.randint(0, cfg.vocab_size, (2, prompt_length + 12), generator=g)
    seg = 6  # 5 tokens: one short segment; 23: 6 + 6 + 6 + 5
    cached, recomputed = RollingMemory(model, use_cache=True), RollingMemory(model, use_cache=False)
    rows = _qkv_rows(model)
    with torch.no_grad():
        for start in range(0, prompt_length, seg):
            ids = text[:, start:min(start + seg, prompt_length)]
            torch.testing.assert_close(cached.feed(ids), recomputed.feed(ids), atol=1e-10, rtol=0)
        for t in range(prompt_length, text.shape[1]):  # then one token at a time
            rows.clear()
            a = cached.feed(text[:, t:t + 1])
            b = recomputed.feed(text[:, t:t + 1])
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=f"step {t}")
            # The cache projects the new token only; the reference all remembered positions too.
            assert rows == [1, 1 + min(t, cfg.mem_length)], rows
    assert cached.cache.seq_len == cfg.mem_length  # the window rolled


def test_segment_length_and_a_model_without_memory_are_checked():
    model = build(make_cfg(mem_length=8, max_position_embeddings=32), ParallelState.single())
    with pytest.raises(ValueError, match=r"--segment-length 25 must be in \[1, 24\]"):
        generate_recurrent(model, [1, 2, 3], 2, segment_length=25)
    no_memory = build(make_cfg(mem_length=0), ParallelState.single())
    with pytest.raises(ValueError, match="mem_length=0"):
        generate_recurrent(no_memory, [1, 2, 3], 2)


# ---------------------------------------------------------------------------------------------
# The trained checkpoint, at TP 1, 2 and 4

def _generate(model, tokenizer, **kw):
    ids = [tokenizer.encode(p) for p in PROMPTS]
    return generate_recurrent(model, ids, NEW, segment_length=SEGMENT, **kw)


def _generate_at_tp_2_and_4(rank, world, export, prompts_file, out_file):
    import generate
    model, tokenizer, _ = generate.load_model(export, ParallelState.from_world(2))
    out = {"tp2": _generate(model, tokenizer, **GREEDY)}
    # TP=4 through generate.py itself: a file of prompts, a typed prompt, an empty prompt.
    cli = ["--load", export, "--greedy", "--max-new-tokens", str(NEW), "--segment-length",
           str(SEGMENT), "--no-eos-stop"]
    calls = {"file": (["--input-file", prompts_file, "--output-file", out_file], None),
             "typed": ([], PROMPTS[0] + "\n\nstop\n"),
             "empty": (["--prompt", ""], None)}
    for name, (argv, stdin) in calls.items():
        buf, saved = io.StringIO(), sys.stdin
        if stdin is not None and rank == 0:
            sys.stdin = io.StringIO(stdin)
        try:
            with contextlib.redirect_stdout(buf):
                results = generate.main(cli + argv)
            out[name] = [r["ids"] for r in results]
        except SystemExit as e:
            out[name] = str(e.code)
        finally:
            sys.stdin = saved
    return out


@pytest.fixture(scope="module")
def everywhere(tiny_xl_checkpoint, tmp_path_factory):
    import generate
    root = tmp_path_factory.mktemp("xl_generation")
    export = str(root / "export")
    export_safetensors(str(tiny_xl_checkpoint), export)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    # TP=1 here (no collectives), cached and recomputed; TP 2 and 4 in one world of 4 ranks.
    model, tokenizer, _ = generate.load_model(export, ParallelState.single())
    tp1 = {"greedy": _generate(model, tokenizer, **GREEDY),
           "sampled": _generate(model, tokenizer, **SAMPLED),
           "recomputed": _generate(model, tokenizer, use_cache=False, **GREEDY)}
    ranks = run_distributed(_generate_at_tp_2_and_4, 4, export, str(prompts),
                            str(root / "out.jsonl"))
    return dict(export=export, tp1=tp1, ranks=ranks, out=root / "out.jsonl")


def test_greedy_and_sampled_tokens_are_identical_at_tp_1_2_4(everywhere):
    tp1 = everywhere["tp1"]
    want = tp1["greedy"]
    assert [len(t) for t in want] == [NEW, NEW]
    assert tp1["recomputed"] == want  # cache or recompute, the same text
    assert tp1["sampled"] != want     # the sampling options take effect
    for r in everywhere["ranks"]:
        assert r["tp2"] == want and r["file"] == want  # TP=4: generate.py --input-file


def test_generate_py_runs_xl_from_a_file_and_interactively(everywhere):
    want = everywhere["tp1"]["greedy"]
    for r in everywhere["ranks"]:  # TP=4 under generate.py: the same tokens on every rank
        assert r["file"] == want and r["typed"] == want[:1]  # one typed prompt, then "stop"
    with open(everywhere["out"], encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert [row["prompt"] for row in rows] == PROMPTS and all(row["completion"] for row in rows)


def test_an_empty_prompt_is_one_line(everywhere):
    message = everywhere["ranks"][0]["empty"]
    assert isinstance(message, str) and "\n" not in message
    assert "prompt '' encodes to no tokens" in message


def test_a_model_parallel_size_that_does_not_divide_the_heads_is_one_line(everywhere):
    import generate
    with pytest.raises(SystemExit) as e:
        generate.load_model(everywhere["export"], ParallelState.virtual(3, 0))
    message = str(e.value.code)
    assert "\n" not in message
    assert "model-parallel size 3" in message and "num_attention_heads=4" in message, message


def test_generate_text_script_launches_an_xl_checkpoint_at_its_tp_size(tiny_xl_checkpoint):
    """scripts/generate_text.sh reads the TP size (2) from the XL checkpoint (what it launches,
    generate.py on an XL model, is tested above)."""
    import os
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(["bash", "scripts/generate_text.sh", str(tiny_xl_checkpoint),
                           "--segment-length", "16"], cwd=root, capture_output=True, text=True,
                          env=dict(os.environ, DRY_RUN="1"), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("deepspeed --num_gpus 2 ")
    assert "--segment-length 16" in proc.stdout
