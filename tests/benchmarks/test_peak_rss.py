"""benchmarks/report.py::peak_rss_bytes, the memory probes' peak: a probe started from a parent
with a large footprint reports its own peak. Linux's ru_maxrss carries the parent's peak across
fork and exec, which once made every model in a sparse-attention run read the parent's peak."""
import os
import subprocess
import sys

import pytest

from benchmarks.report import peak_rss_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHILD = ("import sys; sys.path.insert(0, sys.argv[1]); from benchmarks.report import "
         "peak_rss_bytes; print(peak_rss_bytes())")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss inheritance is Linux's")
def test_a_child_reports_its_own_peak_not_its_parent_s():
    ballast = bytearray(600 << 20)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # touch every page: resident
    parent_peak = peak_rss_bytes()
    assert parent_peak >= 600 << 20

    child = subprocess.run([sys.executable, "-c", CHILD, ROOT], capture_output=True, text=True,
                           check=True)
    child_peak = int(child.stdout)
    assert 0 < child_peak < 200 << 20, (child_peak, parent_peak)  # an interpreter: tens of MB
    del ballast
