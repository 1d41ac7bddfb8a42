import contextlib
import io
import os
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Tests that launch commands (deepspeed, tools) find this environment's first, as under `make test`.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

# One thread in the test process: spawned ranks set their own, and 2 cores are shared.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `make test-gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _run_tool(module, argv):
    """Run a tool's main(argv) quietly; a non-zero exit is a fixture failure worth its output."""
    out, err = io.StringIO(), io.StringIO()
    rc = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            module.main(argv)
        except SystemExit as e:
            rc = e.code
    if rc not in (None, 0):
        raise RuntimeError(f"{module.__name__} {' '.join(argv)} failed ({rc}):\n"
                           f"{out.getvalue()}\n{err.getvalue()}")


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    """Real sample corpus -> tokenizers -> indexed datasets, built once per session."""
    import tools.prepare_sample_corpus as prepare
    import tools.preprocess_data as preprocess
    import tools.train_tokenizer as train_tok
    from megatron_lite.data.indexed_dataset import IndexedDataset
    from megatron_lite.data.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("sample_data")
    corpus = root / "sample"
    _run_tool(prepare, ["--out-dir", str(corpus)])
    train = str(corpus / "train.jsonl")
    valid = str(corpus / "valid.jsonl")

    out = types.SimpleNamespace(root=root, train=train, valid=valid,
                                finetune=str(corpus / "finetune.jsonl"))
    # name: (tokenizer flags, tokenizer training text, word boundaries). Sentencepiece learns
    # from the small valid split (1 s instead of 20 s); every dataset is the train split.
    builds = {
        "char": (["--type", "char", "--preset", "linglong"], train, True),
        "bert": (["--type", "char", "--preset", "bert"], train, True),
        "spm": (["--type", "sentencepiece", "--vocab-size", "4000", "--character-coverage",
                 "0.995"], valid, False),
    }
    for name, (tok_args, tok_text, word_boundaries) in builds.items():
        tok_dir = str(root / f"tok_{name}")
        _run_tool(train_tok, ["--input", tok_text, "--output-dir", tok_dir] + tok_args)
        prefix = str(root / f"{name}_text_document")
        argv = ["--input", train, "--output-prefix", prefix, "--tokenizer", tok_dir,
                "--workers", "1", "--quiet"]
        _run_tool(preprocess, argv + (["--word-boundaries"] if word_boundaries else []))
        setattr(out, f"{name}_tokenizer", load_tokenizer(tok_dir))
        setattr(out, f"{name}_tokenizer_dir", tok_dir)
        setattr(out, f"{name}_prefix", prefix)
        setattr(out, f"{name}_ds", IndexedDataset(prefix))
    # The validation split, for the trainer tests (char tokenizer).
    out.char_valid_prefix = str(root / "char_valid_document")
    _run_tool(preprocess, ["--input", valid, "--output-prefix", out.char_valid_prefix,
                           "--tokenizer", out.char_tokenizer_dir, "--workers", "1", "--quiet"])
    return out


@pytest.fixture(scope="session")
def gpt_data(sample_data, tmp_path_factory):
    """The trainer tests' data: the sample corpus through the LingLong char tokenizer, laid out
    as `tokenizer/`, `train.*`, `valid.*` (links into the shared build)."""
    out = tmp_path_factory.mktemp("gpt_data")
    os.symlink(sample_data.char_tokenizer_dir, out / "tokenizer")
    for split, prefix in (("train", sample_data.char_prefix), ("valid", sample_data.char_valid_prefix)):
        for ext in (".bin", ".idx", ".ws"):
            if os.path.exists(prefix + ext):
                os.symlink(prefix + ext, out / f"{split}{ext}")
    return out


@pytest.fixture(scope="session")
def t5_data(sample_data, tmp_path_factory):
    """The T5 tests' data: the sample corpus through the sentencepiece tokenizer (T5 layout:
    pad 0, eos 1, sentinels 4..103), laid out as `tokenizer/`, `train.*`, `valid.*`."""
    import tools.preprocess_data as preprocess
    out = tmp_path_factory.mktemp("t5_data")
    os.symlink(sample_data.spm_tokenizer_dir, out / "tokenizer")
    for ext in (".bin", ".idx"):
        os.symlink(sample_data.spm_prefix + ext, out / f"train{ext}")
    _run_tool(preprocess, ["--input", sample_data.valid, "--output-prefix", str(out / "valid"),
                           "--tokenizer", sample_data.spm_tokenizer_dir, "--workers", "1",
                           "--quiet"])
    return out


# Enough steps of the tiny T5 (no dropout, short sequences) for clear top-2 logit margins, so
# greedy generations compare exactly across implementations; about 20 s of compute.
T5_CHECKPOINT_ARGS = ["--seq-length", "64", "--decoder-seq-length", "32",
                      "--micro-batch-size", "8", "--global-batch-size", "8", "--train-iters", "60",
                      "--lr", "3e-3", "--lr-warmup-iters", "10", "--hidden-dropout", "0",
                      "--attention-dropout", "0", "--eval-interval", "none",
                      "--log-interval", "10", "--no-progress-bar", "--peak-flops", "1e12"]


@pytest.fixture(scope="session")
def t5_checkpoint(t5_data, tmp_path_factory):
    """A tiny T5 (configs/t5/tiny.yaml, TP=1) trained briefly on the sample corpus: the directory
    holding `latest`. Trained in a subprocess, as a user would run pretrain_t5.py."""
    import subprocess
    save = tmp_path_factory.mktemp("t5_checkpoint") / "run"
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_t5.py"),
           "--config", os.path.join(ROOT, "configs/t5/tiny.yaml"),
           "--tokenizer", str(t5_data / "tokenizer"), "--train-data-prefix",
           str(t5_data / "train"), "--valid-data-prefix", str(t5_data / "valid"),
           "--save", str(save), *T5_CHECKPOINT_ARGS]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"training the tiny T5 failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return save


# The tiny GPT (configs/gpt/tiny.yaml: 2 layers, h 64, 4 heads, FFN 256, a sparse odd layer) at
# tensor-parallel size 2, trained 60 steps on gpt_data: about 15 s on 2 CPU ranks.
TINY_GPT_CHECKPOINT_ARGS = ["--tensor-model-parallel-size", "2", "--seq-length", "64",
                            "--micro-batch-size", "8", "--global-batch-size", "16",
                            "--train-iters", "60", "--lr", "5e-3", "--lr-warmup-iters", "10",
                            "--eval-interval", "none", "--log-interval", "10",
                            "--no-progress-bar", "--peak-flops", "1e12"]


@pytest.fixture(scope="session")
def tiny_gpt_checkpoint(gpt_data, tmp_path_factory):
    """The session's one trained tiny GPT: the directory holding `latest` (global_step60) of a
    TP=2 checkpoint (two model-state files, ZeRO stage 0, dropout 0.1). Treat it as read-only:
    reshard or copy it (change_mp.py --out elsewhere) rather than writing into it."""
    from megatron_lite.testing import run_distributed, run_entry_point
    save = tmp_path_factory.mktemp("tiny_gpt_checkpoint") / "run"
    argv = ["--config", os.path.join(ROOT, "configs/gpt/tiny.yaml"),
            "--tokenizer", str(gpt_data / "tokenizer"),
            "--train-data-prefix", str(gpt_data / "train"), "--save", str(save),
            *TINY_GPT_CHECKPOINT_ARGS]
    run_distributed(run_entry_point, 2, "pretrain_gpt", argv)
    return save


# The tiny Transformer-XL (configs/transformer_xl/tiny.yaml: 2 layers, h 64, 4 heads, FFN 256) with
# segments of 32 and a memory of 32 at tensor-parallel size 2, trained 60 steps without dropout:
# clear top-2 logit margins for greedy comparisons across TP sizes.
TINY_XL_CHECKPOINT_ARGS = ["--model", "transformer_xl", "--tensor-model-parallel-size", "2",
                           "--seq-length", "32", "--mem-length", "32",
                           "--max-position-embeddings", "64", "--hidden-dropout", "0",
                           "--attention-dropout", "0", "--micro-batch-size", "8",
                           "--global-batch-size", "16", "--train-iters", "60", "--lr", "5e-3",
                           "--lr-warmup-iters", "10", "--eval-interval", "none",
                           "--log-interval", "10", "--save-interval", "60", "--no-progress-bar",
                           "--peak-flops", "1e12"]


@pytest.fixture(scope="session")
def tiny_xl_checkpoint(gpt_data, tmp_path_factory):
    """The session's one trained tiny Transformer-XL: the directory holding `latest`
    (global_step60) of a TP=2 checkpoint, char tokenizer. Read-only: copy or export it."""
    from megatron_lite.testing import run_distributed, run_entry_point
    save = tmp_path_factory.mktemp("tiny_xl_checkpoint") / "run"
    argv = ["--config", os.path.join(ROOT, "configs/transformer_xl/tiny.yaml"),
            "--tokenizer", str(gpt_data / "tokenizer"),
            "--train-data-prefix", str(gpt_data / "train"), "--save", str(save),
            *TINY_XL_CHECKPOINT_ARGS]
    run_distributed(run_entry_point, 2, "pretrain_gpt", argv)
    return save
