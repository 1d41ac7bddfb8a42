"""The trainer end to end on the tiny GPT: resume exactness, TP/DP loss-curve parity, robustness.

Ranks are spawned in-process (gloo) and call `pretrain_gpt.main(argv)`; only the launcher test
goes through the `deepspeed` CLI."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from megatron_lite.testing import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def gpt_args(data, save, *extra, iters=8):
    return ["--config", os.path.join(ROOT, "configs/gpt/tiny.yaml"),
            "--tokenizer", str(data / "tokenizer"),
            "--train-data-prefix", str(data / "train"), "--valid-data-prefix", str(data / "valid"),
            "--seq-length", "64", "--micro-batch-size", "4", "--global-batch-size", "8",
            "--train-iters", str(iters), "--lr", "3e-3", "--lr-warmup-iters", "2",
            "--save", str(save), "--peak-flops", "1e12", "--no-progress-bar",
            "--log-interval", "1", "--eval-interval", "none", *extra]


def _train(rank, world, argv, patch_nan_steps=None):
    import pretrain_gpt
    if patch_nan_steps is not None:
        _make_loss_nan_at(patch_nan_steps)
    return pretrain_gpt.main(argv)


def _make_loss_nan_at(steps):
    """Turn the training loss of the given (0-based) steps into NaN, as a diverging batch would."""
    from megatron_lite.models.gpt import GPTModel
    original = GPTModel.loss

    def loss(self, batch):
        value, ntokens = original(self, batch)
        if self.training and self.rng.step in steps:
            value = value * float("nan")
        return value, ntokens
    GPTModel.loss = loss


def read_metrics(save):
    with open(os.path.join(save, "logs", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_is_exact_with_dropout(gpt_data, tmp_path):
    full = run_distributed(_train, 1, gpt_args(gpt_data, tmp_path / "full", iters=20))[0]
    part = tmp_path / "part"
    first = run_distributed(_train, 1, gpt_args(gpt_data, part, "--exit-interval", "10",
                                                 iters=20))[0]
    assert first["step"] == 10 and first["stop_reason"] == "exit_interval"
    second = run_distributed(_train, 1, gpt_args(gpt_data, part, "--load", str(part),
                                                  iters=20))[0]
    assert second["step"] == 20
    assert first["loss"] + second["loss"] == full["loss"]  # bit-identical
    assert (part / "latest").read_text() == "global_step20"


def test_dp2_zero2_matches_dp1(gpt_data, tmp_path):
    no_dropout = ["--hidden-dropout", "0", "--attention-dropout", "0", "--deepspeed",
                  "--deepspeed_config", os.path.join(ROOT, "configs/deepspeed/zero2.json")]
    dp1 = run_distributed(_train, 1, gpt_args(gpt_data, tmp_path / "dp1", *no_dropout, iters=5))
    dp2 = run_distributed(_train, 2, gpt_args(gpt_data, tmp_path / "dp2", *no_dropout, iters=5))
    assert dp2[0]["loss"] == dp2[1]["loss"]
    torch.testing.assert_close(torch.tensor(dp2[0]["loss"]), torch.tensor(dp1[0]["loss"]),
                               rtol=1e-4, atol=0)


@pytest.mark.launcher
def test_tp2_under_deepspeed_launcher_matches_tp1(gpt_data, tmp_path):
    """`deepspeed --num_gpus 2` at TP=2 follows the TP=1 loss curve (dropout off)."""
    no_dropout = ["--hidden-dropout", "0", "--attention-dropout", "0"]
    tp1 = run_distributed(_train, 1, gpt_args(gpt_data, tmp_path / "tp1", *no_dropout, iters=5))
    save = tmp_path / "tp2"
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2",
           "--master_port", str(_free_port()), os.path.join(ROOT, "pretrain_gpt.py"),
           *gpt_args(gpt_data, save, *no_dropout, "--tensor-model-parallel-size", "2", iters=5)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tp2_losses = [m["loss"] for m in read_metrics(save)]
    torch.testing.assert_close(torch.tensor(tp2_losses), torch.tensor(tp1[0]["loss"]),
                               rtol=1e-4, atol=0)
    assert sorted(n for n in os.listdir(save / "global_step5") if n.startswith("mp_rank"))[:2] == ["mp_rank_00_model_states.pt",
                                                               "mp_rank_01_model_states.pt"]


def _free_port():
    from megatron_lite.testing import free_port
    return free_port()


def test_nan_loss_skips_step_and_aborts_after_limit(gpt_data, tmp_path):
    # Step 2 is non-finite: skipped (weights and optimizer untouched), counted, training goes on.
    out = run_distributed(_train, 1, gpt_args(gpt_data, tmp_path / "a", iters=5), {2})[0]
    assert out["skipped_steps"] == 1 and out["step"] == 5
    metrics = read_metrics(tmp_path / "a")
    assert metrics[2]["loss"] is None and metrics[2]["skipped_steps"] == 1
    assert all(m["loss"] is not None for i, m in enumerate(metrics) if i != 2)
    # Three in a row with --max-skipped-steps 3: a clear abort.
    with pytest.raises(Exception, match="non-finite loss"):
        run_distributed(_train, 1, gpt_args(gpt_data, tmp_path / "b", "--max-skipped-steps", "3",
                                            iters=8), {1, 2, 3})


@pytest.mark.parametrize("engine", ["plain", "zero2"])
def test_skipped_step_leaves_weights_untouched(gpt_data, tmp_path, engine):
    """A run whose only step was skipped ends with the initial weights (lr 0), while the same
    step taken for real moves them: on DeepSpeed's plain path, where the trainer skips the
    update, and under ZeRO, where DeepSpeed's own overflow check does."""
    flat = ["--lr-warmup-iters", "0", "--lr-decay-style", "constant"]
    if engine == "zero2":
        flat += ["--deepspeed", "--deepspeed_config",
                 os.path.join(ROOT, "configs/deepspeed/zero2.json")]
    run_distributed(_train, 1, gpt_args(gpt_data, tmp_path / "skip", *flat, iters=1), {0})
    run_distributed(_train, 1, gpt_args(gpt_data, tmp_path / "init", *flat, "--lr", "0", "--min-lr", "0",
                                        iters=1))
    run_distributed(_train, 1, gpt_args(gpt_data, tmp_path / "step", *flat, iters=1))

    def weights(name):
        path = tmp_path / name / "global_step1" / "mp_rank_00_model_states.pt"
        return torch.load(path, weights_only=True)["module"]
    skip, init, step = weights("skip"), weights("init"), weights("step")
    assert all(torch.equal(skip[k], init[k]) for k in init)
    assert not all(torch.equal(step[k], init[k]) for k in init)


def test_keep_last_removes_only_older_complete_checkpoints(gpt_data, tmp_path):
    save = tmp_path / "ckpt"
    run_distributed(_train, 1, gpt_args(gpt_data, save, "--save-interval", "2", "--keep-last",
                                        "2", iters=6))
    assert sorted(p for p in os.listdir(save) if p.startswith("global_step")) == [
        "global_step4", "global_step6"]
    assert (save / "latest").read_text() == "global_step6"


def test_sigterm_saves_a_checkpoint_and_exits(gpt_data, tmp_path):
    save = tmp_path / "term"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"),
                             *gpt_args(gpt_data, save, iters=100000)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = save / "logs" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    tag = (save / "latest").read_text()
    step = int(tag.removeprefix("global_step"))
    assert step >= 2 and (save / tag / "mp_rank_00_model_states.pt").exists()
    assert "sigterm" in out


def test_metrics_and_checkpoint_metadata(gpt_data, tmp_path):
    save = tmp_path / "m"
    out = run_distributed(_train, 1, gpt_args(gpt_data, save, "--eval-interval", "3",
                                              "--eval-iters", "2", iters=3))[0]
    m = read_metrics(save)
    train_rows = [r for r in m if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "consumed_samples"):
        assert train_rows[-1][key] is not None, key
    assert train_rows[-1]["consumed_samples"] == 24
    assert any("valid_loss" in r and "valid_unigram_entropy" in r for r in m)
    assert out["valid_unigram_entropy"] > 0
    state = torch.load(save / "global_step3/mp_rank_00_model_states.pt", weights_only=True)
    meta = state["megatron_lite"]
    assert meta["model"] == "gpt" and meta["step"] == 3 and meta["consumed_samples"] == 24
    assert meta["padded_vocab_size"] % 128 == 0 and meta["vocab_size"] <= meta["padded_vocab_size"]
    assert (save / "global_step3" / "tokenizer").is_dir()


def test_blended_corpora_resume_exactly_and_log_epochs(gpt_data, tmp_path):
    """`--train-data-prefix 0.3 A 0.7 B` (data/blend.py): a resumed run continues the very same
    blend, and each corpus's epochs are logged."""
    train, valid = str(gpt_data / "train"), str(gpt_data / "valid")
    blend = ["--train-data-prefix", "0.3", train, "0.7", valid,
             "--valid-data-prefix", "1", valid, "1", train, "--eval-iters", "1"]
    full_dir = tmp_path / "full"
    full = run_distributed(_train, 1, gpt_args(gpt_data, full_dir, *blend, "--save-interval", "3",
                                                iters=6))[0]
    (full_dir / "latest").write_text("global_step3")  # resume from the middle of the run
    second = run_distributed(_train, 1, gpt_args(gpt_data, tmp_path / "part", *blend, "--load",
                                                  str(full_dir), iters=6))[0]
    assert second["loss"] == full["loss"][3:]  # bit-identical
    rows = [r for r in read_metrics(full_dir) if "loss" in r][:6]
    # 6 steps of 8 samples: 0.3 x 48 = 14.4 from train, 33.6 from valid (within 1).
    last = rows[-1]
    assert last["consumed_samples"] == 48
    assert {k for k in last if k.startswith("epochs/")} == {"epochs/train", "epochs/valid"}
    assert last["epochs/valid"] > rows[0]["epochs/valid"] > 0


def test_srun_without_a_launcher_is_refused(monkeypatch):
    """Several SLURM tasks but no launcher: each would silently train alone; refuse instead."""
    from megatron_lite.training.config import ConfigError
    from megatron_lite.parallel.launch import init_distributed
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    with pytest.raises(ConfigError, match="srun"):
        init_distributed()
