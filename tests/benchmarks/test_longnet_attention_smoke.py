"""Smoke run of benchmarks/longnet_attention.py at a toy shape, so the script cannot rot: every
length runs in its own process, the SP=2 probe reports both ranks, the section and the plot are
written. Speed and memory goals are not asserted (a toy shape on a shared machine measures
nothing); the real curve is in BENCHMARKS.md."""
import math

from benchmarks import longnet_attention as la


def test_quick_run_writes_the_section_and_the_plot(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n## Other\n\nkept\n", encoding="utf-8")
    result = la.main(["--quick", "--max-tokens", "512", "--sp-tokens", "512", "--out", str(out)])

    rows = result["rows"]
    assert [r["tokens"] for r in rows] == [256, 512]
    for r in rows:
        assert math.isfinite(r["seconds"]) and r["seconds"] > 0
        assert r["peak"] >= r["baseline"] > 0
    sp = result["sp"]
    assert sp["tokens"] == 512 and len(sp["peaks"]) == 2 and sp["ratio"] > 0
    assert result["stop"] == "reached --max-tokens 512"

    text = out.read_text(encoding="utf-8")
    assert "kept" in text and text.index("## Other") < text.index(la.SECTION)
    block = text[text.index(la.BEGIN):text.index(la.END)]
    assert "| 256 |" in block and "| 512 |" in block and "SP=2 at 512 tokens" in block
    assert sum(line.endswith(("| met |", "| NOT met |")) for line in block.splitlines()) == 2
    try:
        import matplotlib  # noqa: F401  (the benchmark extra)
    except ImportError:
        return
    assert (tmp_path / la.PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
