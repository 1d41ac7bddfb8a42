"""The data of the learning benchmarks: the sample corpus (tools/prepare_sample_corpus.py), a
tokenizer trained on its training split (tools/train_tokenizer.py) and indexed train/valid
datasets (tools/preprocess_data.py), each step skipped when its output is already there.

The tools run in this process (their `main(argv)`), which saves each one an interpreter start-up
and a torch import. `quick` keeps only the first lines of the corpus files (QUICK_LINES) for a
smoke run, under `<work_dir>/quick`, so a quick run's data never stands in for a real run's.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import shutil

QUICK_LINES = {"train.jsonl": 150, "valid.jsonl": 12, "reviews.jsonl": 600, "finetune.jsonl": 100}


def run_tool(name: str, argv: list[str]):
    """tools/<name>.py's main(argv) in this process, its report to stdout dropped."""
    module = importlib.import_module(f"tools.{name}")
    with contextlib.redirect_stdout(io.StringIO()):
        return module.main(argv)


def _build_corpus(out_dir: str, quick: bool) -> None:
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    run_tool("prepare_sample_corpus", ["--out-dir", tmp])
    if quick:
        for name, n in QUICK_LINES.items():
            path = os.path.join(tmp, name)
            with open(path, encoding="utf-8") as f:
                head = [line for _, line in zip(range(n), f)]
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(head)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def prepare(work_dir: str, *, tokenizer: str, tokenizer_args: list[str], prefix: str = "",
            preprocess_args: tuple[str, ...] = (), quick: bool = False) -> dict:
    """Paths of the work directory (`root`: `work_dir`, or its `quick` subdirectory), the corpus
    directory, the tokenizer directory `tokenizer` (trained with
    `tokenizer_args` on train.jsonl) and the `<prefix>train` / `<prefix>valid` datasets
    (preprocessed with `preprocess_args`), all under `work_dir`."""
    work_dir = os.path.abspath(os.path.join(work_dir, "quick") if quick else work_dir)
    paths = dict(root=work_dir, corpus=os.path.join(work_dir, "sample"),
                 tokenizer=os.path.join(work_dir, tokenizer),
                 train=os.path.join(work_dir, f"{prefix}train"),
                 valid=os.path.join(work_dir, f"{prefix}valid"))
    os.makedirs(work_dir, exist_ok=True)
    if not os.path.exists(os.path.join(paths["corpus"], "valid.jsonl")):
        _build_corpus(paths["corpus"], quick)
    if not any(os.path.exists(os.path.join(paths["tokenizer"], f))
               for f in ("spiece.model", "vocab.txt")):
        run_tool("train_tokenizer", ["--input", os.path.join(paths["corpus"], "train.jsonl"),
                                     "--output-dir", paths["tokenizer"], *tokenizer_args])
    for split in ("train", "valid"):
        if not os.path.exists(paths[split] + ".idx"):
            run_tool("preprocess_data", [
                "--input", os.path.join(paths["corpus"], f"{split}.jsonl"),
                "--output-prefix", paths[split], "--tokenizer", paths["tokenizer"],
                *preprocess_args, "--workers", "1", "--quiet"])
    return paths
