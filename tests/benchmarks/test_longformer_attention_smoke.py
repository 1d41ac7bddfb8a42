"""Smoke run of benchmarks/longformer_attention.py at its --quick toy shape, so the script cannot rot.

Speed and memory goals are not asserted: the machine is shared and a toy shape measures nothing.
The test checks that every layer runs, every memory probe reports, and the section is complete.
"""
import math

from benchmarks import longformer_attention as la


def test_quick_run_writes_the_section(tmp_path, capsys):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n## Other\n\nkept\n", encoding="utf-8")
    rows = la.main(["--quick", "--out", str(out)])

    assert [r["tokens"] for r in rows] == la.QUICK["sizes"]
    for r in rows:
        for v in la.VARIANTS:
            assert math.isfinite(r[f"{v}_s"]) and r[f"{v}_s"] > 0, (v, r)
            assert r[f"{v}_rss_mb"] >= r[f"{v}_baseline_mb"] > 0, (v, r)
        for key in ("speedup_hf", "speedup_sdpa", "speedup_hf_cpu", "rss_ours_over_sdpa"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        # Probes fork from one server holding the same imports, so their baselines agree.
        baselines = [r[f"{v}_baseline_mb"] for v in la.VARIANTS]
        assert max(baselines) - min(baselines) < 20, baselines

    text = out.read_text(encoding="utf-8")
    assert text.index("## Other") < text.index(la.SECTION) < text.index(la.BEGIN) < text.index(la.END)
    assert "kept" in text
    block = text[text.index(la.BEGIN):text.index(la.END)]
    assert "--quick" in block and "UTC" in block and "Load average" in block and "torch " in block
    header = next(line for line in block.splitlines() if line.startswith("| tokens"))
    for column in ("ours s", "transformers s", "full SDPA s", "ours vs transformers", "ours vs SDPA",
                   "peak RSS MB", "RSS ours / SDPA"):
        assert column in header, column
    table = [line for line in block.splitlines() if line.startswith(("| 256 ", "| 512 "))]
    assert len(table) == 2 and all(line.count("|") == header.count("|") for line in table)
    assert "time(512) / time(256)" in block
    assert sum(line.endswith(("| met |", "| NOT met |")) for line in block.splitlines()) == 4
    assert capsys.readouterr().out.strip().endswith(block.strip().splitlines()[-1])

    # A rerun replaces the generated block and leaves the rest alone.
    la.update_markdown(str(out), "second run")
    text = out.read_text(encoding="utf-8")
    assert text.count(la.BEGIN) == 1 and "second run" in text and "kept" in text
    assert "| 256 " not in text
