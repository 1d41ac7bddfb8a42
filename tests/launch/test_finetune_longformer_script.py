"""scripts/ds_finetune_longformer.sh CKPT DATA.jsonl: the launcher recipe for classification
fine-tuning of a pretrained Longformer. One launcher run on a tiny pretrained checkpoint; its
own checks run without the launcher."""
import json
import os
import subprocess

import pytest

from megatron_lite.testing import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "scripts", "ds_finetune_longformer.sh")
STEPS = 2


def run_script(*args, env, timeout=60):
    return subprocess.run(["bash", RECIPE, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _pretrain(rank, world, argv):
    import pretrain_longformer
    return pretrain_longformer.main(argv)


@pytest.fixture(scope="module")
def pretrained(sample_data, tmp_path_factory):
    save = tmp_path_factory.mktemp("lf_recipe") / "pre"
    run_distributed(_pretrain, 1, [
        "--config", os.path.join(ROOT, "configs/longformer/tiny.yaml"),
        "--tokenizer", sample_data.bert_tokenizer_dir,
        "--train-data-prefix", sample_data.bert_prefix, "--hidden-size", "64",
        "--ffn-hidden-size", "256", "--attention-window", "16,32",
        "--max-position-embeddings", "64", "--seq-length", "64", "--micro-batch-size", "4",
        "--global-batch-size", "4", "--train-iters", "1", "--lr-warmup-iters", "0",
        "--save", str(save),
        "--peak-flops", "1e12", "--no-progress-bar", "--eval-interval", "none"])
    return save


@pytest.fixture
def reviews(sample_data, tmp_path):
    with open(os.path.join(os.path.dirname(sample_data.train), "reviews.jsonl"),
              encoding="utf-8") as f:
        lines = [line for _, line in zip(range(64), f)]
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.mark.launcher
def test_recipe_finetunes_a_classifier_from_the_pretrained_encoder(pretrained, reviews, tmp_path,
                                                                   launcher_env):
    from megatron_lite.checkpoint.checkpointing import read_metadata
    save = tmp_path / "run"
    proc = run_script(str(pretrained), str(reviews), "--train-iters", str(STEPS),
                      "--eval-interval", str(STEPS), "--eval-iters", "1", "--micro-batch-size",
                      "8", "--global-batch-size", "8", "--log-interval", "1", "--lr-warmup-iters", "0",
                      "--no-progress-bar", "--peak-flops", "1e12",
                      env=launcher_env(SAVE=str(save)), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The sequence length follows the checkpoint's 64-position table (the recipe's 256 would not
    # fit), and the log names what was dropped and what starts fresh.
    assert "--seq-length 64" in proc.stderr
    assert "dropped" in proc.stderr and "initialised fresh: classifier." in proc.stderr
    meta = read_metadata(str(save))
    assert meta.model == "longformer_classifier" and meta.step == STEPS
    assert meta.model_config["labels"] == ["neg", "pos"]
    assert meta.model_config["hidden_size"] == 64  # the checkpoint's shape, not tiny.yaml's
    with open(save / "logs" / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    (valid,) = [m for m in metrics if "valid_accuracy" in m]
    assert valid["step"] == STEPS and 0.0 <= valid["valid_accuracy"] <= 1.0


@pytest.mark.parametrize("args, message", [
    (["CKPT"], "usage:"),
    (["CKPT", "missing.jsonl"], "missing.jsonl not found"),
    (["DATA", "DATA"], "latest not found: CKPT must be a checkpoint directory"),
])
def test_recipe_errors_before_launching(pretrained, reviews, launcher_env, args, message):
    subst = {"CKPT": str(pretrained), "DATA": str(reviews)}
    proc = run_script(*[subst.get(a, a) for a in args], env=launcher_env(DEEPSPEED="false"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "launching" not in proc.stderr
