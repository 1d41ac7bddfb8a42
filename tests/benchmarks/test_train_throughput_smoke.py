"""Smoke runs of benchmarks/train_throughput.py --model NAME at a toy size, one per registered
architecture, so the harness cannot rot.

Speed is not asserted: the machine is shared and a seconds-long run measures nothing. The tests
check that every row trains through its DeepSpeed engine, that the peer has our parameter count,
and that the report (rows, section markers, goal lines) is complete.
"""
import math
import os

import pytest
import torch

from benchmarks import train_throughput as tt
from megatron_lite import cpu_kernels
from megatron_lite.models import get_model_spec
from megatron_lite.parallel import gemm

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The lever-off row of ours' oneDNN GEMMs, for the models with a goal against their peer.
BLAS = ["ours-blas"] if gemm.onednn_available() else []
# ... and of our C++ attention kernel, where it builds.
KERNEL = ["ours-torch-attention"] if cpu_kernels.attention_kernel() is not None else []
# model -> (row keys, extra flags, peer class shown, memory probed). One model probes memory
# (a fresh process per row): the one with a single row.
CASES = {
    "gpt": (["ours", "ours-unfused", *BLAS, *KERNEL, "ours-sparse", "hf", "hf-tanh"], [],
            "HF GPT2LMHeadModel (gelu_new)", False),
    "t5": (["ours", "ours-unfused", *BLAS, *KERNEL, "hf"], ["--decoder-seq-length", "16"],
           "HF T5ForConditionalGeneration", False),
    "longformer": (["ours", "hf"], [], "HF LongformerForMaskedLM", False),
    "transformer_xl": (["ours"], [], None, True),
    "longnet": (["ours"], [], None, False),
}


@pytest.mark.parametrize("model", sorted(CASES))
def test_smoke_run_reports_every_row(model, tmp_path, capsys):
    keys, extra, peer, memory = CASES[model]
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n## Other section\n\nkept\n", encoding="utf-8")
    argv = ["--model", model, "--shapes", "tiny", "--seq-length", "64", "--warmup", "1",
            "--steps", "1", "--threads", "1", "--peak-flops", "1e11", "--out", str(out), *extra]
    rows = tt.main(argv + ([] if memory else ["--no-memory"]))

    assert [r["key"] for r in rows] == keys
    spec = get_model_spec(model)
    args = tt.parse_args(argv)
    cfg, data = tt.load_shape(model, "tiny", args)
    configs = {v.key: v.cfg for v in tt.variants(model, cfg, args)}
    for r in rows:
        for field in ("step_s", "cpu_s", "tokens_per_s", "mfu", "mfu_cpu", "mfu_dense_count"):
            assert math.isfinite(r[field]) and r[field] > 0, (r["key"], field, r[field])
        # tokens/s and MFU follow from the registry's sample cost of the row's config
        tokens, flops = spec.sample_cost(configs[r["key"]], data)
        assert math.isclose(r["tokens_per_s"], tokens / r["step_s"], rel_tol=1e-9)
        assert math.isclose(r["mfu"], flops / r["step_s"] / 1e11, rel_tol=1e-9)
        if memory:
            assert 0 < r["baseline_rss_mb"] <= r["peak_rss_mb"]
        else:
            assert math.isnan(r["peak_rss_mb"])
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("| tiny |")]
    assert len(table) == len(keys)
    text = out.read_text(encoding="utf-8")
    section, begin, end = tt.section_markers(model)
    assert "kept" in text and section in text and begin in text and end in text
    assert f"--model {model}" in text and "- Machine: " in text and "UTC" in text
    assert "- Allocator: glibc malloc " in text  # the rows ran under the trainer's process setup
    if peer:
        assert len({r["params"] for r in rows}) == 1  # the peer has our shape
        assert rows[keys.index("hf")]["ours_over_theirs"] == 1.0
        assert f"| tiny | {peer} |" in printed
        assert all(r["ours_over_theirs"] > 0 for r in rows)
        assert "No peer" not in text
        # the goal line's ceiling: ours' and the peer's shared kernels, profiled
        profiled = {r["key"] for r in rows if r["shared_kernel_s"] is not None}
        assert profiled == ({"ours", "hf"} if model in tt.GOALS else set())
        assert all(r["shared_kernel_s"] > 0 for r in rows if r["shared_kernel_s"] is not None)
    else:
        assert "No peer: " in text and all(r["ours_over_theirs"] is None for r in rows)
    goal = tt.GOALS.get(model)
    assert ("- Goal, tiny: ours/theirs ≥ " in text) == (goal is not None)
    if goal is not None:
        assert f"- Goal, tiny: ours/theirs ≥ {goal:.2f} in wall and CPU time: " in text
        assert "; ceiling " in text and "GEMM, attention, optimizer s |" in text
    if "ours-unfused" in keys:
        assert "lever off" in table[1]
    if "ours-sparse" in keys:  # fewer keys attended: its FLOPs count is below the dense one
        sparse = rows[keys.index("ours-sparse")]
        assert sparse["mfu"] < sparse["mfu_dense_count"]
        assert "sparse" in table[keys.index("ours-sparse")]
        assert "(gelu_pytorch_tanh)" in table[keys.index("hf-tanh")]
    if "ours-blas" in keys:
        assert "GEMMs on torch's BLAS (lever off)" in table[keys.index("ours-blas")]
    if "ours-torch-attention" in keys:
        assert "attention on torch's kernels (lever off)" in table[keys.index("ours-torch-attention")]

    tt.update_markdown(str(out), "second run", model)  # a rerun replaces its block, nothing else
    text = out.read_text(encoding="utf-8")
    assert text.count(begin) == 1 and "second run" in text and "kept" in text


def test_compile_run_has_its_own_rows_and_section():
    """Compiled rows slow every row of their process, so --compile is a run of its own: ours and
    the peer, eager and compiled, in a section of their own with no goal verdict."""
    args = tt.parse_args(["--model", "gpt", "--compile"])
    cfg, _ = tt.load_shape("gpt", "tiny", args)
    assert [v.key for v in tt.variants("gpt", cfg, args)] == ["ours", "hf", "ours+compile",
                                                              "hf+compile"]
    eager, compiled = tt.section_markers("gpt"), tt.section_markers("gpt", compiled=True)
    assert compiled[0] == "## Training throughput (GPT, torch.compile)"
    assert "--compile" in compiled[1] and not set(eager) & set(compiled)


def test_compile_rows_run(tmp_path):
    # LongNet: no peer, so one row compiles. aot_eager traces as inductor does, without its code
    # generation (about 50 s on CPU with a cold cache); tests/training/test_compile.py runs it.
    rows = tt.main(["--model", "longnet", "--shapes", "tiny", "--seq-length", "64", "--warmup",
                    "1", "--steps", "1", "--threads", "1", "--peak-flops", "1e11", "--no-memory",
                    "--compile", "--compile-backend", "aot_eager"])
    assert [r["key"] for r in rows] == ["ours", "ours+compile"]
    compiled = rows[1]
    assert "(torch.compile)" in compiled["model"] and compiled["step_s"] > 0
    assert compiled["first_step_s"] > compiled["step_s"]  # the compile


def test_an_objective_without_a_batch_maker_is_a_one_line_error():
    spec = get_model_spec("longformer_classifier")
    with pytest.raises(SystemExit) as err:
        tt.make_batch(spec.name, 0, None, None, 1, 0)
    message = str(err.value)
    assert "longformer_classifier" in message and f"'{spec.objective}'" in message
    assert "\n" not in message


def test_existing_blocks_are_replaced_in_place():
    # The GPT and T5 blocks of BENCHMARKS.md carry this harness's markers, so a rerun replaces
    # them where they are rather than appending new ones.
    with open(os.path.join(ROOT, "BENCHMARKS.md"), encoding="utf-8") as f:
        text = f.read()
    for model, tag in (("gpt", "train_throughput"), ("t5", "train_throughput_t5")):
        section, begin, end = tt.section_markers(model)
        assert f"<!-- {tag}:begin" in begin and end == f"<!-- {tag}:end -->"
        assert section in text and begin in text and end in text, model


def test_update_markdown_replaces_only_the_generated_block(tmp_path):
    section, begin, _ = tt.section_markers("gpt")
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Other\n\nkept\n", encoding="utf-8")
    tt.update_markdown(str(path), "first run")
    text = path.read_text(encoding="utf-8")
    assert text.index("## Other") < text.index(section) < text.index("first run")

    # Hand-written notes in the section and later sections survive a rerun.
    path.write_text(text.replace(section, section + "\n\nnotes by hand")
                    + "\n## Later\n\nalso kept\n", encoding="utf-8")
    tt.update_markdown(str(path), "second run")
    text = path.read_text(encoding="utf-8")
    assert "first run" not in text and text.count("second run") == 1
    for kept in ("## Other", "kept", "notes by hand", "## Later", "also kept"):
        assert kept in text
    assert text.count(begin) == 1 and text.count(section) == 1


def test_section_without_generated_block_gets_one_at_its_end(tmp_path):
    section = tt.section_markers("gpt")[0]
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(f"# B\n\n{section}\n\nintro\n\n## Next\n\nx\n", encoding="utf-8")
    tt.update_markdown(str(path), "figures")
    text = path.read_text(encoding="utf-8")
    assert text.index("intro") < text.index("figures") < text.index("## Next")


def test_shared_kernel_seconds_counts_the_matrix_products_not_the_pointwise_ops(monkeypatch):
    a = torch.randn(128, 128)
    monkeypatch.setattr(tt, "train_step", lambda engine, v, b, state: (a * 2).exp().sum())
    assert tt.shared_kernel_seconds(None, None, None) == 0
    monkeypatch.setattr(tt, "train_step", lambda engine, v, b, state: (a @ a).exp().sum())
    assert tt.shared_kernel_seconds(None, None, None) > 0


def test_each_round_starts_one_row_later(monkeypatch):
    """No row always runs right after the same other row (whose freed buffers it would fault in
    afresh every round)."""
    order = []
    monkeypatch.setattr(tt, "make_batch", lambda *a: None)
    monkeypatch.setattr(tt, "train_step", lambda engine, v, b, state: order.append(v.key))
    todo = [tt.Variant(k, "gpt", k, "dense", None) for k in "ABC"]
    args = tt.parse_args(["--model", "gpt", "--warmup", "1", "--steps", "3"])
    wall, cpu, first, failed = tt.timed_rounds("tiny", todo, {k: None for k in "ABC"}, None, args)
    assert "".join(order) == "ABC" + "ABC" + "BCA" + "CAB"  # warm-up, then three rounds
    assert all(len(wall[k]) == 3 for k in "ABC") and not failed


def test_each_shape_runs_at_its_own_length_and_micro_batch(tmp_path, capsys):
    """--seq-length and --micro-batch-size take one value per shape (issue 17 compares GPT-2 at
    256 tokens x 8 and at 1,024 x 1 in one section), or one value for every shape."""
    one = tt.parse_args(["--model", "gpt", "--shapes", "tiny", "small", "--seq-length", "32"])
    assert (one.seq_lengths, one.micro_batch_sizes) == ([32, 32], [1, 1])
    with pytest.raises(SystemExit):
        tt.parse_args(["--model", "gpt", "--shapes", "tiny", "small", "--seq-length", "8", "16",
                       "32"])
    assert "3 values for 2 shapes" in capsys.readouterr().err

    out = tmp_path / "BENCHMARKS.md"
    argv = ["--model", "gpt", "--shapes", "tiny", "small", "--seq-length", "32", "16",
            "--micro-batch-size", "1", "3", "--warmup", "0", "--steps", "1", "--threads", "1",
            "--peak-flops", "1e11", "--no-memory", "--out", str(out)]
    args = tt.parse_args(argv)
    setups = [(tt.for_shape(args, i), shape) for i, shape in enumerate(args.shapes)]
    assert [(a.seq_length, a.micro_batch_size) for a, _ in setups] == [(32, 1), (16, 3)]
    rows = tt.main(argv)
    spec = get_model_spec("gpt")
    for shape_args, shape in setups:
        cfg, data = tt.load_shape("gpt", shape, shape_args)
        assert data.seq_length == shape_args.seq_length
        ours = next(r for r in rows if r["shape"] == shape and r["key"] == "ours")
        tokens, _ = spec.sample_cost(cfg, data)
        assert math.isclose(ours["tokens_per_s"],
                            shape_args.micro_batch_size * tokens / ours["step_s"], rel_tol=1e-9)
    text = out.read_text(encoding="utf-8")
    assert "tiny: micro-batch 1, sequence 32; small: micro-batch 3, sequence 16;" in text
    assert "- Goal, tiny: " in text and "- Goal, small: " in text
