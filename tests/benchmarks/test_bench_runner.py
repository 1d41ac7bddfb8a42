"""benchmarks/run.py (`make bench`): its registry names real scripts, a section name it does not
know is a one-line error, and a section's failure is reported as one. (Each benchmark's own
smoke test in this directory runs it on tiny shapes.)"""
import os

import pytest

from benchmarks import run as bench

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_section_names_a_script_and_writes_its_block():
    for name, section in bench.SECTIONS.items():
        assert os.path.isfile(os.path.join(ROOT, "benchmarks", section.script)), name
        assert "--out" in section.full and section.minutes > 0, name


def test_unknown_section_is_a_one_line_error():
    assert bench.select(["reshard, t5_learning"]) == ["reshard", "t5_learning"]
    with pytest.raises(SystemExit) as err:
        bench.select(["reshard,nope"])
    assert "no section nope" in str(err.value) and "longnet_attention" in str(err.value)


def test_a_failing_section_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bench.SECTIONS, "fine", bench.Section("report.py", (), 0.01, ()))
    monkeypatch.setitem(bench.SECTIONS, "broken", bench.Section("no_such_script.py", (), 0.01, ()))
    assert bench.main(["--section", "fine", "--log-dir", str(tmp_path), "--no-progress"]) == 0
    assert bench.main(["--quick", "--section", "fine,broken", "--log-dir", str(tmp_path),
                       "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "fine: ok" in out and "broken: FAILED" in out and "failed: broken" in out
    assert "no_such_script.py" in (tmp_path / "broken_quick.log").read_text()
