"""scripts/ds_finetune_gpt.sh CKPT DATA.jsonl: the launcher recipe for prompt/text fine-tuning.

One launcher run fine-tunes a TP=2 checkpoint (MP_SIZE comes from the checkpoint); its first
logged loss is recomputed here from the checkpoint's weights on the batches the trainer builds,
which shows that the weights were loaded and that the loss covers the text tokens only. The
scripts' own checks run without the launcher."""
import json
import os
import re
import subprocess

import pytest
import torch

from megatron_lite.testing import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FINETUNE = os.path.join(ROOT, "scripts", "ds_finetune_gpt.sh")
PRETRAIN = os.path.join(ROOT, "scripts", "ds_pretrain_gpt.sh")
SEQ, MICRO, GLOBAL, STEPS = 64, 8, 16, 6


def run_script(script, *args, env, timeout=60):
    return subprocess.run(["bash", script, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def merged_tp1_model(load_dir):
    """The checkpoint's TP shards merged into one TP=1 model (by the saved partition spec)."""
    from megatron_lite.checkpoint.checkpointing import read_model_states
    from megatron_lite.models.gpt import GPTConfig, GPTModel
    from megatron_lite.parallel import ParallelState
    from megatron_lite.parallel.init import merge_shards
    shards, meta = [], None
    for tp_rank in range(2):
        state, meta, _ = read_model_states(str(load_dir), tp_rank)
        shards.append(state)
    assert meta.tp_size == 2
    spec = meta.partition_spec
    full = {name: merge_shards([s[name] for s in shards], *spec[name]) if name in spec
            else shards[0][name] for name in shards[0]}
    model = GPTModel(GPTConfig(**meta.model_config), ParallelState.single())
    model.load_state_dict(full, strict=True)
    return model.eval(), meta


def _pretrain(rank, world, argv):
    import pretrain_gpt
    return pretrain_gpt.main(argv)


@pytest.fixture(scope="module")
def base_checkpoint(gpt_data, tmp_path_factory):
    """A tiny GPT saved at tensor-parallel size 2, the layout `make demo` leaves: a few full-rate
    steps on two in-process gloo ranks, enough to move every weight well away from the seed's
    initialisation (which a fine-tune that failed to load would start from)."""
    save = tmp_path_factory.mktemp("base_checkpoint") / "run"
    run_distributed(_pretrain, 2, [
        "--config", os.path.join(ROOT, "configs/gpt/tiny.yaml"),
        "--tokenizer", str(gpt_data / "tokenizer"), "--train-data-prefix", str(gpt_data / "train"),
        "--seq-length", "64", "--micro-batch-size", "4", "--global-batch-size", "4",
        "--train-iters", "3", "--lr", "5e-3", "--lr-warmup-iters", "0",
        "--lr-decay-style", "constant", "--tensor-model-parallel-size", "2",
        "--save", str(save), "--peak-flops", "1e12", "--no-progress-bar",
        "--eval-interval", "none"])
    return save


@pytest.fixture(scope="module")
def finetuned(base_checkpoint, sample_data, tmp_path_factory, launcher_env):
    root = tmp_path_factory.mktemp("finetune")
    data = root / "finetune.jsonl"
    with open(sample_data.finetune, encoding="utf-8") as f:
        data.write_text("".join(line for _, line in zip(range(64), f)), encoding="utf-8")
    save = root / "run"
    env = launcher_env(SAVE=str(save))
    proc = run_script(FINETUNE, str(base_checkpoint), str(data),
                      "--train-iters", str(STEPS), "--seq-length", str(SEQ),
                      "--lr", "1e-3", "--min-lr", "1e-3", "--lr-warmup-iters", "0",
                      "--lr-decay-style", "constant", "--hidden-dropout", "0",
                      "--attention-dropout", "0", "--log-interval", "1", "--no-progress-bar",
                      "--peak-flops", "1e12", env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(save / "logs" / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    return dict(data=str(data), save=save, metrics=metrics, output=proc.stderr)


@pytest.mark.launcher
def test_finetune_runs_at_the_checkpoints_tp_size(finetuned):
    from megatron_lite.checkpoint.checkpointing import read_model_states
    assert "tensor-parallel size 2" in finetuned["output"]   # MP_SIZE from the checkpoint
    save = finetuned["save"]
    assert (save / "latest").read_text() == f"global_step{STEPS}"
    assert sorted(n for n in os.listdir(save / f"global_step{STEPS}") if n.startswith("mp_rank"))[:2] == [
        "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]
    _, meta, _ = read_model_states(str(save), 1)
    # Schedule and data position start fresh: the base run's steps are not counted.
    assert meta.tp_size == 2 and meta.step == STEPS
    assert meta.consumed_samples == STEPS * GLOBAL
    assert [m["step"] for m in finetuned["metrics"]] == list(range(1, STEPS + 1))


@pytest.mark.launcher
def test_first_loss_is_the_checkpoints_loss_on_the_text_tokens(finetuned, base_checkpoint):
    from megatron_lite.models import get_model_spec
    from megatron_lite.checkpoint.checkpointing import read_latest_tag
    from megatron_lite.data.sampler import TrainingSampler, collate
    from megatron_lite.data.tokenizer import load_tokenizer
    from megatron_lite.models.gpt import GPTConfig
    from megatron_lite.parallel import ParallelState
    from megatron_lite.training.config import parse_config

    model, meta = merged_tp1_model(base_checkpoint)
    tag = read_latest_tag(str(base_checkpoint))
    tokenizer = load_tokenizer(os.path.join(base_checkpoint, tag, "tokenizer"))
    # The datasets exactly as the trainer builds them from these flags.
    run = parse_config(["--finetune-data", finetuned["data"], "--seq-length", str(SEQ),
                        "--load", str(base_checkpoint), "--finetune"], GPTConfig)
    spec = get_model_spec("gpt")
    dataset = spec.build_data(run, tokenizer, model.cfg, ParallelState.single()).train
    sampler = iter(TrainingSampler(len(dataset), MICRO, 0, 1, seed=run.training.seed))
    with open(finetuned["data"], encoding="utf-8") as f:
        records = [json.loads(line) for line in f]

    losses, prompt_too = [], []
    for _ in range(GLOBAL // MICRO):   # the micro-batches of step 1 (DP=1)
        indices = next(sampler)
        batch = collate([dataset[i] for i in indices])
        for row, i in enumerate(indices):
            record = records[i % len(records)]
            prompt = tokenizer.encode(record["prompt"])
            text = tokenizer.encode(record["text"]) + [tokenizer.eod_id]
            labels, mask = batch["labels"][row], batch["loss_mask"][row].bool()
            # The loss covers exactly the text and its end-of-document token ...
            assert labels[mask].tolist() == text
            # ... and the labels before it, which carry none, are the prompt (the tail kept by
            # left truncation, less the first token, which no label predicts).
            first = int(mask.nonzero()[0])
            assert labels[:first].tolist() == prompt[len(prompt) - first:]
        with torch.no_grad():
            losses.append(model.loss(batch)[0].item())
            everything = dict(batch, loss_mask=(batch["labels"] != tokenizer.pad_id).float())
            prompt_too.append(model.loss(everything)[0].item())
    expected = sum(losses) / len(losses)
    logged = finetuned["metrics"][0]["loss"]
    assert abs(logged - expected) < 1e-5, (logged, expected)
    # A loss that also counted the prompt would have been visibly different.
    assert abs(sum(prompt_too) / len(prompt_too) - expected) > 0.05


@pytest.mark.launcher
def test_finetune_loss_falls(finetuned):
    losses = [m["loss"] for m in finetuned["metrics"]]
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("script, args, variables, message", [
    (FINETUNE, ["CKPT"], {}, "usage:"),
    (FINETUNE, ["CKPT", "DATA"], {"MP_SIZE": "1"},
     "saved at tensor-parallel size 2: reshard it first"),
    (FINETUNE, ["CKPT", "DATA"], {"NUM_GPUS_PER_WORKER": "3"},
     "3 rank\\(s\\) cannot be split into tensor-parallel groups of MP_SIZE=2"),
    (FINETUNE, ["CKPT", "DATA"], {"NUM_WORKERS": "2"}, "NUM_WORKERS=2 needs HOST_FILE_PATH"),
    (FINETUNE, ["CKPT", "DATA"], {"HOST_FILE_PATH": "HOSTFILE", "NUM_WORKERS": "3"},
     "names only 2 host"),
    (FINETUNE, ["CKPT", "missing.jsonl"], {}, "missing.jsonl not found"),
    (FINETUNE, ["DATA", "DATA"], {}, "latest not found: CKPT must be a checkpoint directory"),
    (PRETRAIN, [], {"DATA_DIR": "DATADIR", "MP_SIZE": "2", "NUM_GPUS_PER_WORKER": "3"},
     "3 rank\\(s\\) cannot be split into tensor-parallel groups of MP_SIZE=2"),
    (PRETRAIN, [], {"DATA_DIR": "nowhere"}, "nowhere/train.idx not found"),
    (PRETRAIN, [], {"DATA_DIR": "DATADIR", "DS_CONFIG": "none.json"},
     "DS_CONFIG=none.json does not exist"),
])
def test_script_errors_before_launching(base_checkpoint, gpt_data, tmp_path, launcher_env,
                                        script, args, variables, message):
    """Bad recipes stop with one line that says what to change (exit 2), before the launcher."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two machines\nworker-1 slots=2\nworker-2 slots=2\n")
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "text": "b"}\n')
    subst = {"CKPT": str(base_checkpoint), "DATA": str(data), "HOSTFILE": str(hostfile),
             "DATADIR": str(gpt_data)}
    # Were the launcher reached, `false` would make the run fail with another status.
    env = launcher_env(**{k: subst.get(v, v) for k, v in variables.items()}, DEEPSPEED="false")
    proc = run_script(script, *[subst.get(a, a) for a in args], env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert re.search(message, proc.stderr), proc.stderr
    assert "launching" not in proc.stderr
