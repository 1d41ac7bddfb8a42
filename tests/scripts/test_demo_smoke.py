"""`make demo`'s path, a few steps long: corpus -> tokenizer -> indexed data -> the deepspeed
launcher at TP=2 on 2 CPU ranks -> checkpoint + logs -> generation at TP=2."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.launcher
def test_demo_script_end_to_end(tmp_path):
    env = dict(os.environ, DEMO_DATA=str(tmp_path / "data"), DEMO_RUN=str(tmp_path / "run"),
               DEMO_TRAIN_ITERS="4", DEMO_TRAIN_ARGS="--lr-warmup-iters 2", DEMO_NEW_TOKENS="8", DEMO_CHECK_LEARNING="0",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "demo.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run = tmp_path / "run"
    assert (run / "latest").read_text() == "global_step4"
    assert sorted(n for n in os.listdir(run / "global_step4") if n.startswith("mp_rank"))[:2] == ["mp_rank_00_model_states.pt",
                                                              "mp_rank_01_model_states.pt"]
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any("valid_loss" in r for r in rows)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run / "logs"))
    # The generation line: the prompt followed by at least one generated character.
    lines = [l for l in proc.stdout.splitlines() if l.startswith("中国人民")]
    assert lines and len(lines[-1]) > len("中国人民"), proc.stdout[-2000:]
    assert "demo finished" in proc.stdout
