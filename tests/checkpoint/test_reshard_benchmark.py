"""Smoke run of benchmarks/reshard.py at the tiny size, so the script cannot rot.

Memory and speed are not asserted against the issue's bound here (a 1 MB checkpoint measures
the interpreter, not the tool); the test checks that every target is measured, checked and
reported, and that only the script's own section of BENCHMARKS.md changes."""
import math

import torch

from benchmarks import reshard as bench

torch.set_num_threads(1)

OTHER = ("## Data pipeline\n\n<!-- data_pipeline:begin -->\nfigures\n<!-- data_pipeline:end -->\n")


def test_smoke_run_measures_and_reports_every_target(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text(f"# Benchmarks\n\n{OTHER}", encoding="utf-8")
    argv = ["--config", "configs/gpt/tiny.yaml", "--vocab-size", "300", "--targets", "1", "4",
            "--out", str(out)]
    result = bench.main(argv)
    rows = result["rows"]
    assert [r["target"] for r in rows] == [1, 4]
    for r in rows:
        assert r["peak_anon"] > 0 and r["peak_file"] > 0  # the child was sampled
        assert r["largest_shard"] > 0 and r["written"] >= r["largest_shard"]
        assert math.isfinite(r["seconds"]) and r["seconds"] > 0
    # TP=1 holds everything in one shard; TP=4 splits the sharded tensors four ways.
    assert rows[0]["largest_shard"] > rows[1]["largest_shard"]
    text = out.read_text(encoding="utf-8")
    assert OTHER in text and "## Resharding" in text
    assert text.count(bench.BEGIN) == 1 and "TP=2 -> TP=4" in text
    bench.update_markdown(str(out), "new figures")  # a rerun replaces the block, keeps the rest
    text = out.read_text(encoding="utf-8")
    assert text.count(bench.BEGIN) == 1 and "new figures" in text and "TP=2 -> TP=4" not in text
    assert OTHER in text
