"""Smoke run of benchmarks/train_throughput_t5.py at a toy size, so the script cannot rot.

Speed is not asserted (the machine is shared); the test checks that both models train through
their DeepSpeed engines with the same parameter count and that the report is complete."""
import math

import torch

from benchmarks import train_throughput_t5 as tt
from megatron_lite.models.t5 import t5_flops

torch.set_num_threads(1)


def test_smoke_run_reports_both_models(tmp_path, capsys):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n## Other section\n\nkept\n", encoding="utf-8")
    rows = tt.main(["--shapes", "tiny", "--seq-length", "24", "--decoder-seq-length", "8",
                    "--warmup", "1", "--steps", "1", "--threads", "1", "--peak-flops", "1e11",
                    "--out", str(out)])
    assert [r["key"] for r in rows] == ["ours", "ours-unfused", "hf"]
    assert rows[0]["params"] == rows[1]["params"] == rows[2]["params"]
    cfg = tt.load_shape("tiny")
    for r in rows:
        for field in ("step_s", "tokens_per_s", "mfu", "ours_over_theirs"):
            assert math.isfinite(r[field]) and r[field] > 0, (r["key"], field)
        # tokens/s counts both stacks; MFU is the per-sample FLOPs over the step time and peak.
        assert math.isclose(r["tokens_per_s"], 32 / r["step_s"], rel_tol=1e-9)
        assert math.isclose(r["mfu"], t5_flops(cfg, 24, 8) / r["step_s"] / 1e11, rel_tol=1e-9)
    assert rows[2]["ours_over_theirs"] == 1.0
    text = out.read_text(encoding="utf-8")
    assert "kept" in text and tt.SECTION in text and tt.BEGIN in text and tt.END in text
    assert "| tiny | HF T5ForConditionalGeneration |" in capsys.readouterr().out
    tt.update_markdown(str(out), "second run")  # a rerun replaces its block, nothing else
    text = out.read_text(encoding="utf-8")
    assert text.count(tt.BEGIN) == 1 and "second run" in text and "kept" in text
