"""`pretrain_gpt.py --model longnet` end to end on the sample corpus: at sequence-parallel size 2
(each rank holding half of every sequence, the longest branch all-gathering across the two) its
training and validation losses follow the same run at SP=1 (rel 1e-4; DP=2 on the same two
ranks, the same global batch), resume at SP=2 is bit-identical, and bad input stops with one
line naming the value and the fix.

One spawn runs every call (process start-up and DeepSpeed's import cost more than the tiny
steps)."""
import contextlib
import io
import os

import pytest
import torch

from megatron_lite.testing import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs/longnet/tiny.yaml")


def args(data, save, *extra):
    return ["--model", "longnet", "--config", TINY, "--tokenizer", str(data / "tokenizer"),
            "--train-data-prefix", str(data / "train"), "--valid-data-prefix",
            str(data / "valid"), "--seq-length", "128", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "4", "--lr", "3e-3",
            "--lr-warmup-iters", "2", "--eval-interval", "4", "--eval-iters", "2",
            "--hidden-dropout", "0", "--save", str(save), "--peak-flops", "1e12",
            "--no-progress-bar", "--log-interval", "1", *extra]


def _runs(rank, world, calls):
    import pretrain_gpt
    from megatron_lite.errors import ConfigError
    torch.set_num_threads(1)
    out = []
    for argv in calls:
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                result = pretrain_gpt.main(argv)
            out.append(("ok", {k: result[k] for k in ("step", "loss", "valid_loss")}))
        except (ConfigError, ValueError) as e:
            out.append(("error", f"{type(e).__name__}: {e}"))
    return out


@pytest.fixture(scope="module")
def runs(gpt_data, tmp_path_factory):
    """Every call in one spawn of 2 ranks: SP=1 there is DP=2 with the same global batch."""
    root = tmp_path_factory.mktemp("longnet")
    sp2 = ["--sequence-parallel-size", "2"]
    # Validation reads eval_iters micro-batches per DP rank: 1 at DP=2 covers the samples 2
    # cover at DP=1.
    calls = {"sp1": args(gpt_data, root / "sp1", "--eval-iters", "1"),
             "sp2": args(gpt_data, root / "sp2", *sp2),
             "part": args(gpt_data, root / "part", *sp2, "--exit-interval", "2"),
             "resumed": args(gpt_data, root / "part", *sp2, "--load", str(root / "part")),
             "odd": args(gpt_data, root / "odd", *sp2, "--seq-length", "127"),
             "world": args(gpt_data, root / "world", "--sequence-parallel-size", "3"),
             "w0": args(gpt_data, root / "w0", "--segment-lengths", "0,64",
                        "--dilation-rates", "1,2")}
    results = run_distributed(_runs, 2, list(calls.values()))
    out = dict(zip(calls, results[0]))
    out["sp2_rank1"] = results[1][1]
    return out


def test_sp2_follows_the_sp1_loss_curve(runs):
    (s1, one), (s2, two) = runs["sp1"], runs["sp2"]
    assert s1 == s2 == "ok" and one["step"] == two["step"] == 4
    torch.testing.assert_close(torch.tensor(two["loss"]), torch.tensor(one["loss"]),
                               rtol=1e-4, atol=0)
    (step1, v1), = one["valid_loss"]
    (step2, v2), = two["valid_loss"]
    assert step1 == step2 == 4 and v2 == pytest.approx(v1, rel=1e-4)
    assert runs["sp2_rank1"][1]["loss"] == two["loss"]  # every rank reports the whole loss


def test_resume_at_sp2_is_exact(runs):
    (_, full), (_, part), (_, resumed) = runs["sp2"], runs["part"], runs["resumed"]
    assert part["step"] == 2 and resumed["step"] == 4
    assert part["loss"] + resumed["loss"] == full["loss"]  # bit-identical
    assert resumed["valid_loss"] == full["valid_loss"]


@pytest.mark.parametrize("case, words", [
    ("odd", ["--seq-length 127", "--sequence-parallel-size 2", "multiple of 2"]),
    ("world", ["world size 2", "sequence-parallel size 3"]),
    ("w0", ["segment_lengths", "0", ">= 1"]),
])
def test_bad_input_is_one_line(runs, case, words):
    status, message = runs[case]
    assert status == "error" and "\n" not in message, message
    for word in words:
        assert word in message, message
