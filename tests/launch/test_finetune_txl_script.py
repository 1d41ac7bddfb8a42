"""scripts/ds_finetune_txl.sh CKPT DATA.jsonl: prompt/text fine-tuning of a Transformer-XL.

One launcher run fine-tunes the session's TP=2 tiny XL (MP_SIZE from the checkpoint, the XL
fine-tuning YAML and ZeRO-2 engine JSON): the loss falls, and its first logged value is
recomputed here from the checkpoint's weights on the batches the trainer builds, which shows
that the weights were loaded, that every pair starts a document of its own and that the loss
covers the text tokens only. ds_pretrain_txl.sh is the GPT recipe with the model switched
(checked without the launcher)."""
import json
import os
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FINETUNE = os.path.join(ROOT, "scripts", "ds_finetune_txl.sh")
PRETRAIN = os.path.join(ROOT, "scripts", "ds_pretrain_txl.sh")
SEQ, MICRO, STEPS = 32, 8, 8


def run_script(script, *args, env, timeout=60):
    return subprocess.run(["bash", script, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def finetuned(tiny_xl_checkpoint, sample_data, tmp_path_factory, launcher_env):
    root = tmp_path_factory.mktemp("finetune_txl")
    data = root / "finetune.jsonl"
    with open(sample_data.finetune, encoding="utf-8") as f:
        data.write_text("".join(line for _, line in zip(range(64), f)), encoding="utf-8")
    save = root / "run"
    proc = run_script(FINETUNE, str(tiny_xl_checkpoint), str(data),
                      "--train-iters", str(STEPS), "--seq-length", str(SEQ),
                      "--lr", "3e-3", "--min-lr", "3e-3", "--lr-warmup-iters", "0",
                      "--lr-decay-style", "constant", "--hidden-dropout", "0",
                      "--attention-dropout", "0", "--log-interval", "1", "--no-progress-bar",
                      "--peak-flops", "1e12", env=launcher_env(SAVE=str(save)), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(save / "logs" / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    return dict(data=str(data), save=save, metrics=metrics, output=proc.stderr)


@pytest.mark.launcher
def test_finetune_runs_at_the_checkpoints_tp_size_with_the_xl_engine(finetuned):
    from megatron_lite.checkpoint.checkpointing import read_model_states
    output = finetuned["output"]
    assert "tensor-parallel size 2" in output and "transformer_xl/ds_finetune.json" in output
    _, meta, _ = read_model_states(str(finetuned["save"]), 1)
    assert meta.model == "transformer_xl" and meta.tp_size == 2 and meta.step == STEPS
    assert meta.consumed_samples == STEPS * MICRO  # DP=1: 8 pairs a step, no accumulation
    assert [m["step"] for m in finetuned["metrics"]] == list(range(1, STEPS + 1))


@pytest.mark.launcher
def test_finetune_loss_falls(finetuned):
    losses = [m["loss"] for m in finetuned["metrics"]]
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.launcher
def test_first_loss_is_the_checkpoints_loss_on_the_text_tokens(finetuned, tiny_xl_checkpoint):
    from megatron_lite.checkpoint.reshard import merged_state_dict
    from megatron_lite.data.tokenizer import load_tokenizer
    from megatron_lite.models import get_model_spec
    from megatron_lite.models.transformer_xl import TransformerXLConfig
    from megatron_lite.parallel import ParallelState
    from megatron_lite.training.config import parse_config

    full, meta, ckpt_dir, _ = merged_state_dict(str(tiny_xl_checkpoint))
    spec = get_model_spec("transformer_xl")
    cfg = spec.make_config(dict(meta.model_config, hidden_dropout=0.0, attention_dropout=0.0))
    model = spec.build(cfg, ParallelState.single(), None)
    model.load_state_dict(full)
    model.eval()
    tokenizer = load_tokenizer(os.path.join(ckpt_dir, "tokenizer"))
    run = parse_config(["--config", os.path.join(ROOT, "configs/transformer_xl/finetune.yaml"),
                        "--finetune-data", finetuned["data"], "--seq-length", str(SEQ),
                        "--micro-batch-size", str(MICRO), "--global-batch-size", str(MICRO),
                        "--load", str(tiny_xl_checkpoint), "--finetune"], TransformerXLConfig)
    stream = spec.build_data(run, tokenizer, cfg, ParallelState.single()).train
    batch = next(stream)  # step 1 (one micro-batch at DP=1)
    with open(finetuned["data"], encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    texts = [tokenizer.encode(r["text"]) + [tokenizer.eod_id] for r in records]
    for row in range(MICRO):
        mask = batch["loss_mask"][row].bool()
        assert batch["labels"][row][mask].tolist() in texts  # exactly one pair's text + eod
    assert batch["document_start"][:, 0].all()  # no memory crosses pairs
    with torch.no_grad():
        expected = model.loss(batch, None)[0].item()
        prompt_too = model.loss(dict(batch, loss_mask=(batch["labels"] != tokenizer.pad_id)
                                     .float()), None)[0].item()
    logged = finetuned["metrics"][0]["loss"]
    assert abs(logged - expected) < 1e-4, (logged, expected)
    assert abs(prompt_too - expected) > 0.05


def test_pretrain_recipe_is_the_gpt_one_with_the_model_switched(gpt_data, launcher_env):
    """Reaching the launcher (`false` stands in for it), the command names transformer_xl and
    its tiny config."""
    proc = run_script(PRETRAIN, "--train-iters", "5",
                      env=launcher_env(DATA_DIR=str(gpt_data), DEEPSPEED="false"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "launching 1 rank(s)" in proc.stderr
    assert "--config " + os.path.join(ROOT, "configs/transformer_xl/tiny.yaml") in proc.stderr
    assert "--model transformer_xl" in proc.stderr and "--save runs/txl" in proc.stderr
