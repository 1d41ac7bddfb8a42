"""The loopback multi-node launch (tests/launch/multinode.sh) as part of the suite.

The script does the launching and checks each checkpoint; here its status decides: 0 passes,
77 skips with the reason it printed (no root, no apt, sshd refused), anything else fails with
its log. The --no_ssh launch needs neither sshd nor pdsh, so it never skips."""
import os
import subprocess
import sys

import pytest

from megatron_lite.checkpoint.checkpointing import read_model_states

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "launch", "multinode.sh")
SKIP = 77


def run_multinode(mode, gpt_data, work, launcher_env):
    env = launcher_env(WORK=str(work), DATA_DIR=str(gpt_data), PYTHON=sys.executable)
    proc = subprocess.run(["bash", SCRIPT, mode], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    if proc.returncode == SKIP:
        reasons = [line for line in proc.stdout.splitlines() if line.startswith("SKIP:")]
        assert reasons, f"exit {SKIP} without a SKIP: line\n{proc.stdout}\n{proc.stderr}"
        pytest.skip(reasons[-1][len("SKIP:"):].strip())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc


def assert_checkpoint(save, tp, dp):
    """Independent of the script's own check: one model-state file per TP rank, sizes recorded."""
    assert (save / "latest").read_text() == "global_step3"
    files = sorted(f for f in os.listdir(save / "global_step3") if f.startswith("mp_rank"))
    assert files == [f"mp_rank_{r:02d}_model_states.pt" for r in range(tp)]
    for r in range(tp):
        _, meta, _ = read_model_states(str(save), r)
        assert (meta.tp_size, meta.dp_size) == (tp, dp)


@pytest.mark.launcher
def test_no_ssh_launch_one_command_per_host(gpt_data, tmp_path, launcher_env):
    run_multinode("no_ssh", gpt_data, tmp_path, launcher_env)
    assert_checkpoint(tmp_path / "no_ssh_tp2", tp=2, dp=1)
    for node in (0, 1):
        assert f"node_rank={node}" in (tmp_path / f"no_ssh_node{node}.log").read_text()


@pytest.mark.launcher
def test_hostfile_launch_over_ssh_tp_and_dp_across_hosts(gpt_data, tmp_path, launcher_env):
    proc = run_multinode("ssh", gpt_data, tmp_path, launcher_env)
    assert_checkpoint(tmp_path / "ssh_tp2", tp=2, dp=1)
    assert_checkpoint(tmp_path / "ssh_dp2", tp=1, dp=2)
    for name in ("ssh_tp2", "ssh_dp2"):
        log = (tmp_path / f"{name}.log").read_text()
        # pdsh prefixes every line with the host it came from: one rank started on each.
        assert "127.0.0.2: " in log and "127.0.0.3: " in log, log[-3000:]
    assert "passed (ssh)" in proc.stderr
