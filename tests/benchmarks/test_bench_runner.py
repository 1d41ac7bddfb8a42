"""benchmarks/run.py (`make bench`, `make bench-quick`): its registry names real scripts with quick
arguments they accept, a section name it does not know is a one-line error, a missing script or a
failing section is reported as one, and the quick mode of every section runs.

Some sections' quick runs are already covered, in process and with checks of their results, by
their own smoke tests: data_pipeline, the train_throughput sections (one per model),
longformer_attention, longnet_attention and layer_levers (tests/benchmarks/test_*_smoke.py) and
reshard (tests/checkpoint/test_reshard_benchmark.py). Here their registered quick arguments are only
parsed; the other sections run their quick mode through run.py, as `make bench-quick` does."""
import importlib
import os
import signal

import pytest

from benchmarks import run as bench

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE_TESTED = {"data_pipeline", "reshard", "longformer_attention", "longnet_attention",
                "layer_levers", *(n for n in bench.SECTIONS if n.startswith("train_throughput"))}


def test_every_section_names_a_script_and_writes_its_block():
    for name, section in bench.SECTIONS.items():
        assert os.path.isfile(os.path.join(ROOT, "benchmarks", section.script)), name
        assert "--out" in section.full and section.minutes > 0, name
        assert "--out" not in section.quick and section.quick_seconds > 0, name


@pytest.mark.parametrize("name", sorted(SMOKE_TESTED))
def test_quick_arguments_of_smoke_tested_sections_parse(name, tmp_path):
    section = bench.SECTIONS[name]
    module = importlib.import_module(f"benchmarks.{section.script[:-3]}")
    args = [a.format(tmp=tmp_path) for a in section.quick] + ["--out", str(tmp_path / "B.md")]
    module.parse_args(args)  # an unknown or invalid flag exits


def test_quick_mode_of_every_other_section_runs(tmp_path, capsys):
    others = [n for n in bench.SECTIONS if n not in SMOKE_TESTED]
    code = bench.main(["--quick", "--section", ",".join(others), "--log-dir", str(tmp_path),
                       "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    for name in others:
        assert f"{name}: ok" in out


def test_unknown_section_is_a_one_line_error():
    assert bench.select(["reshard, t5_learning"]) == ["reshard", "t5_learning"]
    with pytest.raises(SystemExit) as err:
        bench.select(["reshard,nope"])
    assert "no section nope" in str(err.value) and "longnet_attention" in str(err.value)


FINE = f"""import datetime, sys
sys.path.insert(0, {ROOT!r})
from benchmarks.report import provenance, update_section
argv = sys.argv[1:]
block = "\\n".join(provenance(__file__, argv, datetime.datetime.now(datetime.timezone.utc)))
if "--out" in argv:
    update_section(argv[argv.index("--out") + 1], "## Fine", "<!-- b -->", "<!-- e -->", block)
"""


def test_failing_or_missing_sections_are_reported(tmp_path, monkeypatch, capsys):
    (tmp_path / "fine.py").write_text(FINE)
    (tmp_path / "bare.py").write_text(  # a block without its provenance lines
        "import sys\nif '--out' in sys.argv:\n"
        "    open(sys.argv[sys.argv.index('--out') + 1], 'w').write('## Bare\\n\\nfigures\\n')\n")
    (tmp_path / "broken.py").write_text("raise SystemExit('broken on purpose')\n")
    for name in ("fine", "bare", "broken"):
        monkeypatch.setitem(bench.SECTIONS, name, bench.Section(str(tmp_path / f"{name}.py"),
                                                                (), 0.01, (), 1))
    logs = str(tmp_path / "logs")
    assert bench.main(["--section", "bare", "--log-dir", logs, "--no-progress"]) == 0
    assert bench.main(["--quick", "--section", "fine,bare,broken", "--log-dir", logs,
                       "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "fine: ok" in out and "bare: FAILED" in out and "broken: FAILED" in out
    assert "failed: bare, broken" in out and "broken on purpose" in out  # the log's tail
    assert "no `- Command: `python benchmarks/bare.py` line" in out
    with open(os.path.join(logs, "broken_quick.log")) as f:  # it failed on its own too
        assert "the forked run exited with status 1; running it again" in f.read()

    # Killed by a signal, or failing silently, when forked only: rerun in a plain process.
    segv = int(signal.SIGSEGV)
    for name, failure, logged in (
            ("crashy", "os.kill(os.getpid(), signal.SIGSEGV)", f"ended by signal {segv}"),
            ("quitter", "os._exit(3)", "exited with status 3")):
        (tmp_path / f"{name}.py").write_text(
            "import multiprocessing, os, signal\n"
            f"if multiprocessing.parent_process() is not None:\n    {failure}\n" + FINE)
        monkeypatch.setitem(bench.SECTIONS, name, bench.Section(str(tmp_path / f"{name}.py"),
                                                                (), 0.01, (), 1))
        assert bench.main(["--quick", "--section", name, "--log-dir", logs, "--no-progress"]) == 0
        assert f"{name}: ok" in capsys.readouterr().out
        with open(os.path.join(logs, f"{name}_quick.log")) as f:
            assert f"the forked run {logged}; running it again" in f.read()

    monkeypatch.setitem(bench.SECTIONS, "gone", bench.Section("no_such_script.py", (), 1, (), 1))
    with pytest.raises(SystemExit) as err:
        bench.main(["--quick", "--section", "fine,gone", "--log-dir", logs, "--no-progress"])
    assert "benchmarks/no_such_script.py (section gone)" in str(err.value)
    assert capsys.readouterr().out == ""  # refused before anything ran


def test_every_section_s_full_run_is_the_command_its_block_names():
    """`make bench` reruns what BENCHMARKS.md says produced each figure, flag for flag."""
    import shlex
    with open(os.path.join(ROOT, "BENCHMARKS.md"), encoding="utf-8") as f:
        text = f.read()
    for name, section in bench.SECTIONS.items():
        command = shlex.join(["python", f"benchmarks/{section.script}", *section.full])
        assert f"- Command: `{command}`" in text, (name, command)
