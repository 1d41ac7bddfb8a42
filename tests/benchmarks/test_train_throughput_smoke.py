"""Smoke run of benchmarks/train_throughput.py at a toy size, so the script cannot rot.

Speed is not asserted: the machine is shared and a seconds-long run measures nothing. The test
checks that every model trains through its DeepSpeed engine and that the report is complete.
"""
import math

import torch

from benchmarks import train_throughput as tt

torch.set_num_threads(1)


def test_smoke_run_reports_every_model(tmp_path, capsys):
    out = tmp_path / "BENCHMARKS.md"
    rows = tt.main(["--shapes", "tiny", "--seq-length", "64", "--warmup", "1", "--steps", "1",
                    "--threads", "1", "--peak-flops", "1e11", "--out", str(out)])

    assert [r["key"] for r in rows] == ["ours-dense", "ours-unfused", "ours-sparse", "hf",
                                        "hf-tanh"]
    for r in rows:
        for field in ("step_s", "tokens_per_s", "mfu", "mfu_dense_count", "peak_rss_mb",
                      "baseline_rss_mb", "ours_over_theirs"):
            assert math.isfinite(r[field]) and r[field] > 0, (r["key"], field, r[field])
        assert r["peak_rss_mb"] >= r["baseline_rss_mb"]
        # 64 tokens per step at 1e11 FLOP/s peak: MFU follows from tokens/s and the FLOPs count.
        assert math.isclose(r["tokens_per_s"], 64 / r["step_s"], rel_tol=1e-9)
    assert rows[0]["params"] == rows[1]["params"] == rows[3]["params"] == rows[4]["params"]
    # The sparse pattern attends fewer keys, so its FLOPs count (and MFU) is below the dense one.
    assert rows[2]["mfu"] < rows[2]["mfu_dense_count"]
    assert rows[3]["ours_over_theirs"] == 1.0

    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("| tiny |")]
    assert len(table) == 5
    assert "lever off" in table[1] and "sparse" in table[2] and "(gelu_new)" in table[3]
    assert "(gelu_pytorch_tanh)" in table[4]
    text = out.read_text(encoding="utf-8")
    assert tt.SECTION in text and tt.BEGIN in text and tt.END in text
    assert "--seq-length 64" in text and "torch " in text and "UTC" in text
    assert "- Goal, tiny: ours/theirs ≥ 1.15 in wall and CPU time: " in text
    assert all(0 < r["mfu_cpu"] for r in rows)


def test_update_markdown_replaces_only_the_generated_block(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Other\n\nkept\n", encoding="utf-8")
    tt.update_markdown(str(path), "first run")
    text = path.read_text(encoding="utf-8")
    assert text.index("## Other") < text.index(tt.SECTION) < text.index("first run")

    # Hand-written notes in the section and later sections survive a rerun.
    path.write_text(text.replace(tt.SECTION, tt.SECTION + "\n\nnotes by hand")
                    + "\n## Later\n\nalso kept\n", encoding="utf-8")
    tt.update_markdown(str(path), "second run")
    text = path.read_text(encoding="utf-8")
    assert "first run" not in text and text.count("second run") == 1
    for kept in ("## Other", "kept", "notes by hand", "## Later", "also kept"):
        assert kept in text
    assert text.count(tt.BEGIN) == 1 and text.count(tt.SECTION) == 1


def test_section_without_generated_block_gets_one_at_its_end(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(f"# B\n\n{tt.SECTION}\n\nintro\n\n## Next\n\nx\n", encoding="utf-8")
    tt.update_markdown(str(path), "figures")
    text = path.read_text(encoding="utf-8")
    assert text.index("intro") < text.index("figures") < text.index("## Next")
