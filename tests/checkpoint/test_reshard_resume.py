"""change_mp.py --keep-optimizer on real checkpoints: training resumes at the new TP (and DP)
size where it stopped.

* ZeRO stage 0, TP=2 trained 10 steps, resharded to TP=1, resumed 10 steps: follows the
  uninterrupted TP=2 run (the issue's acceptance 3).
* ZeRO-1, TP=2 x DP=1 -> universal layout -> resumed at TP=1 x DP=2; the universal files equal
  what DeepSpeed's own ds_to_universal.py makes of the same checkpoint.
* ZeRO-3, TP=2: the trainer's save gathers the weights; the checkpoint reshards to TP=1 and
  resumes at ZeRO-3.

Dropout is off, so runs at different TP/DP sizes follow the same curve (DESIGN.md: losses within
1e-4 relative)."""
import argparse
import os

import pytest
import torch

import change_mp
from megatron_lite.checkpoint.checkpointing import META_KEY, model_state_path
from megatron_lite.testing import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train(rank, world, argv):
    import pretrain_gpt
    return pretrain_gpt.main(argv)


def gpt_args(data, save, *extra, iters, tp=1, zero=None):
    args = ["--config", os.path.join(ROOT, "configs/gpt/tiny.yaml"),
            "--tokenizer", str(data / "tokenizer"), "--train-data-prefix", str(data / "train"),
            "--seq-length", "64", "--micro-batch-size", "4", "--global-batch-size", "8",
            "--train-iters", str(iters), "--lr", "3e-3", "--lr-warmup-iters", "2",
            "--hidden-dropout", "0", "--attention-dropout", "0",
            "--tensor-model-parallel-size", str(tp), "--save", str(save), "--peak-flops", "1e12",
            "--no-progress-bar", "--log-interval", "1", "--eval-interval", "none", *extra]
    if zero is not None:
        args += ["--deepspeed", "--deepspeed_config",
                 os.path.join(ROOT, f"configs/deepspeed/zero{zero}.json")]
    return args


def reshard(src, target, out, *extra):
    change_mp.main([str(src), str(target), "--out", str(out), "--keep-optimizer", "--quiet",
                    *extra])


def assert_follows(resumed, reference):
    assert len(resumed) == len(reference)
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(reference), rtol=1e-4, atol=0)


@pytest.fixture(scope="module")
def tp2_run(gpt_data, tmp_path_factory):
    """The uninterrupted run: ZeRO stage 0, TP=2, 20 steps, saved at step 10 and step 20."""
    save = tmp_path_factory.mktemp("tp2_run") / "run"
    out = run_distributed(_train, 2, gpt_args(gpt_data, save, "--save-interval", "10",
                                              iters=20, tp=2))
    return save, out[0]["loss"]


def test_stage0_tp2_to_tp1_resumes_on_the_uninterrupted_curve(gpt_data, tmp_path, tp2_run):
    save, reference = tp2_run
    resharded = tmp_path / "tp1"
    reshard(save, 1, resharded, "--tag", "global_step10")
    state = torch.load(model_state_path(resharded / "global_step10", 0), weights_only=True)
    assert state[META_KEY]["reshard"] == {"source_tp": 2, "optimizer": "native"}
    assert state["optimizer"]["state"][0]["exp_avg"].shape == state["module"]["word_embeddings.weight"].shape
    out = run_distributed(_train, 1, gpt_args(gpt_data, tmp_path / "resumed", "--load",
                                              str(resharded), iters=20))[0]
    assert out["step"] == 20 and out["consumed_samples"] == 160
    assert_follows(out["loss"], reference[10:])


def test_zero1_universal_resumes_at_another_tp_and_dp(gpt_data, tmp_path, tp2_run):
    _, reference = tp2_run
    save = tmp_path / "zero1"
    first = run_distributed(_train, 2, gpt_args(gpt_data, save, "--exit-interval", "10",
                                                iters=20, tp=2, zero=1))[0]
    assert first["step"] == 10
    assert_follows(first["loss"], reference[:10])  # ZeRO-1 follows stage 0
    resharded = tmp_path / "zero1_tp1"
    reshard(save, 1, resharded)
    tag = resharded / "global_step10"
    assert (tag / "zero" / "optimizer_state.pt").is_file()
    assert not any(n.endswith("_optim_states.pt") for n in os.listdir(tag))

    # The same universal files as DeepSpeed's own converter makes (it reads the
    # universal_checkpoint_info the trainer records).
    from deepspeed.checkpoint import ds_to_universal
    theirs = tmp_path / "ds_universal" / "global_step10"
    ds_to_universal.main(argparse.Namespace(
        input_folder=str(save / "global_step10"), output_folder=str(theirs),
        num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
        inject_missing_state=False))
    names = sorted(os.listdir(theirs / "zero"))
    assert names == sorted(os.listdir(tag / "zero")) and len(names) == 29
    for name in names:
        if name == "optimizer_state.pt":
            continue
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            a = torch.load(theirs / "zero" / name / f"{key}.pt", weights_only=False)
            b = torch.load(tag / "zero" / name / f"{key}.pt", weights_only=False)
            assert torch.equal(a["param"], b["param"]) and a.get("cat_dim") == b.get("cat_dim"), (name, key)
        assert torch.equal(torch.load(theirs / "zero" / name / "step.pt", weights_only=False),
                           torch.load(tag / "zero" / name / "step.pt", weights_only=False))

    # Resumed at TP=1 x DP=2: DeepSpeed re-partitions the universal state itself.
    out = run_distributed(_train, 2, gpt_args(gpt_data, tmp_path / "resumed", "--load",
                                              str(resharded), iters=20, zero=1))
    assert out[0]["loss"] == out[1]["loss"] and out[0]["step"] == 20
    assert_follows(out[0]["loss"], reference[10:])


def test_zero3_checkpoint_reshards_and_resumes(gpt_data, tmp_path):
    iters, stop = 8, 4
    save = tmp_path / "zero3"
    run = run_distributed(_train, 2, gpt_args(gpt_data, save, "--save-interval", str(stop),
                                              iters=iters, tp=2, zero=3))[0]["loss"]
    tag = save / f"global_step{stop}"
    # DeepSpeed's own ZeRO-3 model states hold placeholders; the trainer's gathered copies don't.
    placeholder = torch.load(tag / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=True)
    assert placeholder["module"]["word_embeddings.weight"].numel() == 0
    gathered = [torch.load(model_state_path(tag, r), weights_only=True) for r in range(2)]
    assert gathered[0]["module"]["word_embeddings.weight"].shape == (2432, 64)
    assert not torch.equal(gathered[0]["module"]["word_embeddings.weight"],
                           gathered[1]["module"]["word_embeddings.weight"])

    resharded = tmp_path / "zero3_tp1"
    reshard(save, 1, resharded, "--tag", f"global_step{stop}")
    merged = torch.load(model_state_path(resharded / f"global_step{stop}", 0), weights_only=True)
    for name, weight in merged["module"].items():  # fp32 training: module == master weights
        fp32 = torch.load(resharded / f"global_step{stop}" / "zero" / name / "fp32.pt",
                          weights_only=False)["param"]
        assert torch.equal(weight, fp32), name
    out = run_distributed(_train, 1, gpt_args(gpt_data, tmp_path / "resumed", "--load",
                                              str(resharded), iters=iters, zero=3))[0]
    assert_follows(out["loss"], run[stop:])
