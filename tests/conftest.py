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
