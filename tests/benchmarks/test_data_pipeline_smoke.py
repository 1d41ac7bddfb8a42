"""Smoke run of benchmarks/data_pipeline.py at a toy size, so the script cannot rot.

Speed is not asserted: the machine is shared and a seconds-long run measures nothing. The test
checks that every tokenizer setting is preprocessed with every worker count, that every objective
of the package is read and set beside the tiny trainer, and that the report is complete.
"""
import math

import pytest
import torch

from benchmarks import data_pipeline as dp
from megatron_lite.data.objectives import OBJECTIVES

torch.set_num_threads(1)

OTHER = ("## Training throughput (GPT)\n\n<!-- train_throughput:begin -->\nfigures\n"
         "<!-- train_throughput:end -->\n")


def positive(x) -> bool:
    return math.isfinite(x) and x > 0


def test_smoke_run_reports_every_setting_and_objective(tmp_path, capsys):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text(f"# Benchmarks\n\n{OTHER}", encoding="utf-8")
    threads = torch.get_num_threads()
    result = dp.main(["--corpus-docs", "150", "--corpus-copies", "2", "--repeats", "1",
                      "--rounds", "1", "--min-time", "0.01", "--micro-batch-size", "2",
                      "--out", str(out)])
    assert torch.get_num_threads() == threads  # the benchmark's one-thread phase is undone

    pre = result["preprocessing"]
    assert [(r["tokenizer"].split()[0], r["word_boundaries"]) for r in pre] == \
        [("char", False), ("char", True), ("sentencepiece", False)]
    for r in pre:
        for w in (1, 2):
            assert positive(r["mb_per_s"][w]) and r["mb_per_s_best"][w] >= r["mb_per_s"][w]
            assert positive(r["cores"][w])
            assert positive(r["chars_per_cpu_s"][w])
            assert r["chars_per_s_core_best"][w] >= r["chars_per_s_core"][w] > 0
            # Per core: the characters over the tool's seconds and its workers.
            assert math.isclose(r["chars_per_s_core"][w] * w / r["mb_per_s"][w],
                                r["input_chars"] / r["input_mb"], rel_tol=1e-9)
        assert r["input_mb"] == pre[0]["input_mb"] > 0  # every setting read the same input
        # One round: the paired ratio is that round's 2-worker over 1-worker figure.
        assert math.isclose(r["ratio"], r["mb_per_s"][2] / r["mb_per_s"][1], rel_tol=1e-12)

    rows = result["objectives"]
    names = [r["objective"] for r in rows]
    for objective in OBJECTIVES:  # a new objective must get a row too
        assert any(n.startswith(objective) for n in names), (objective, names)
    assert {r["seq_length"] for r in rows if r["objective"] == "causal_lm"} == {128, 1024}
    for r in rows:
        for field in ("examples_per_s", "examples_per_s_best", "trainer_samples_per_s", "ratio"):
            assert positive(r[field]), (r["objective"], field, r[field])
        assert r["setup_s"] >= 0
        assert math.isclose(r["ratio"], r["examples_per_s"] / r["trainer_samples_per_s"],
                            rel_tol=1e-12)
    # Only GPT objectives have their own trainer; the others are compared against the tiny GPT.
    assert {r["objective"].split()[0] for r in rows if r["has_trainer"]} == {"causal_lm",
                                                                             "prompt_text"}
    # One tiny GPT per sequence length: rows of equal length share its figure.
    by_seq = {}
    for r in rows:
        by_seq.setdefault(r["seq_length"], set()).add(r["trainer_samples_per_s"])
    assert all(len(v) == 1 for v in by_seq.values()) and set(by_seq) == {128, 512, 1024}

    printed = capsys.readouterr().out
    assert "M chars/s per core, 1 worker" in printed and "Goal (issue 17): " in printed
    assert sum(line.startswith("| char (linglong preset)") for line in printed.splitlines()) == 2
    assert sum(line.startswith(("| causal_lm", "| xl_stream", "| span_corruption",
                                "| continuation", "| t5_mixed", "| wwm_mlm", "| prompt_text",
                                "| classify"))
               for line in printed.splitlines()) == len(rows)
    assert printed.count("†") == sum(not r["has_trainer"] for r in rows) + 1  # + the footnote

    text = out.read_text(encoding="utf-8")
    assert OTHER in text  # the other benchmark's section is untouched
    assert text.index(OTHER) < text.index(dp.SECTION) < text.index(dp.BEGIN) < text.index(dp.END)
    assert "--corpus-docs 150 --corpus-copies 2" in text and "torch " in text and "UTC" in text


def test_update_markdown_replaces_only_its_block(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    dp.update_markdown(str(path), "first run")  # a missing file is created
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks") and text.index(dp.SECTION) < text.index("first run")

    # Another script's section written later, and notes by hand in ours, survive a rerun.
    path.write_text(text.replace(dp.SECTION, dp.SECTION + "\n\nnotes by hand") + "\n" + OTHER,
                    encoding="utf-8")
    dp.update_markdown(str(path), "second run")
    text = path.read_text(encoding="utf-8")
    assert "first run" not in text and text.count("second run") == 1
    assert "notes by hand" in text and OTHER in text
    assert text.count(dp.SECTION) == 1 and text.count(dp.BEGIN) == 1


def test_section_without_generated_block_gets_one_at_its_end(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(f"# B\n\n{dp.SECTION}\n\nintro\n\n{OTHER}", encoding="utf-8")
    dp.update_markdown(str(path), "figures")
    text = path.read_text(encoding="utf-8")
    assert text.index("intro") < text.index("figures") < text.index("## Training throughput")


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "--workers"),
    (["--rounds", "0"], "--rounds"),
    (["--min-time", "0"], "--min-time"),
    (["--corpus-docs", "-1"], "--corpus-docs"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        dp.parse_args(argv)
    assert message in capsys.readouterr().err


def test_verdict_says_when_workers_did_not_get_their_cores():
    starved = [{"cores": {1: 0.98, 2: 1.02}}, {"cores": {1: 0.97, 2: 1.1}}]
    assert "machine's load" in dp.preprocessing_verdict(starved, 1, 2)
    served = [{"cores": {1: 0.99, 2: 1.9}}, {"cores": {1: 0.98, 2: 1.8}}]
    assert "tool's own scaling" in dp.preprocessing_verdict(served, 1, 2)
    assert "Only one worker count" in dp.preprocessing_verdict(served, 1, 1)


def test_goal_verdict_names_both_targets():
    fast = {"word_boundaries": True, "chars_per_s_core": {1: 2.5e6, 2: 2.3e6}, "ratio": 1.85,
            "cores": {1: 1.0, 2: 1.95}, "input_chars": 18e6}
    text = dp.goal_verdict([fast], 1, 2)
    assert "2.50M characters/s per core" in text and "met (goal >= 2M)" in text
    assert "2w / 1w 1.85 at worst: met (goal >= 1.80)" in text
    slow = dict(fast, chars_per_s_core={1: 1.5e6, 2: 1.4e6}, ratio=1.2, cores={1: 1.0, 2: 1.1})
    text = dp.goal_verdict([slow], 1, 2)
    assert text.count("NOT met") == 2 and "machine's load" in text
    assert "start-up weighs" in dp.goal_verdict([dict(fast, input_chars=1e5)], 1, 2)
