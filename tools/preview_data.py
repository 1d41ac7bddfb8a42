"""Print examples of a pretraining objective, readable or as jsonl, to check it from outside.

    python tools/preview_data.py --objective span_corruption --input data/sample/train_char \
        --tokenizer data/tokenizers/char --num 3
    python tools/preview_data.py --objective prompt_text --input data/sample/finetune.jsonl \
        --tokenizer data/tokenizers/char --num 5 --format jsonl

--input is an indexed-dataset prefix (P, or P.bin / P.idx) or, for prompt_text, a jsonl file.
Text output decodes every field, sentinels (<extra_id_k>) and [MASK] visible. Each jsonl line holds
`source_ids` (the original tokens the example was built from), `input_ids` (for T5 the encoder
input) and `target_ids` (T5) or `labels` (LM objectives; -100 = not predicted for wwm_mlm), all
without padding.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from megatron_lite.data.contract import IGNORE_INDEX, is_stream  # noqa: E402
from megatron_lite.data.objectives import OBJECTIVES  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--objective", required=True, choices=OBJECTIVES)
    p.add_argument("--input", required=True,
                   help="indexed dataset prefix (P, P.bin or P.idx), or a jsonl for prompt_text")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (or file)")
    p.add_argument("--num", type=int, default=3, help="number of examples")
    p.add_argument("--format", choices=("text", "jsonl"), default="text")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--seq-length", type=int, default=512,
                   help="sequence length (T5: encoder length; the target length is derived)")
    p.add_argument("--start", type=int, default=0, help="index of the first example")
    p.add_argument("--backward", action="store_true", help="causal_lm: reverse each document")
    return p.parse_args(argv)


def _prefix(path: str) -> str:
    for ext in (".bin", ".idx"):
        if path.endswith(ext):
            return path[:-len(ext)]
    return path


def _indexed(args, tokenizer):
    from megatron_lite.data.indexed_dataset import IndexedDataset
    from megatron_lite.data.tokenizer import check_tokenizer_hash
    prefix = _prefix(args.input)
    ds = IndexedDataset(prefix)
    check_tokenizer_hash(ds.tokenizer_hash, tokenizer, prefix)
    return ds


def _prompt_text(args, tokenizer):
    from megatron_lite.data.objectives.prompt_text import PromptTextDataset
    return PromptTextDataset(args.input, tokenizer, args.seq_length, return_source=True)


def _causal_lm(args, tokenizer):
    from megatron_lite.data.objectives.causal_lm import CausalLMDataset
    return CausalLMDataset(_indexed(args, tokenizer), args.seq_length, tokenizer.eod_id,
                           args.seed, backward=args.backward, return_source=True)


def _xl_stream(args, tokenizer):
    from megatron_lite.data.objectives.xl_stream import XLStreamBatcher
    return XLStreamBatcher(_indexed(args, tokenizer), 1, args.seq_length, tokenizer.eod_id,
                           args.seed)


def _span_corruption(args, tokenizer, ds=None):
    from megatron_lite.data.objectives.span_corruption import SpanCorruptionDataset
    return SpanCorruptionDataset(ds or _indexed(args, tokenizer), tokenizer, args.seed,
                                 max_source_length=args.seq_length, return_source=True)


def _continuation(args, tokenizer, ds=None):
    from megatron_lite.data.objectives.continuation import ContinuationDataset
    ds = ds or _indexed(args, tokenizer)
    return ContinuationDataset(
        ds, tokenizer, args.seed, max_source_length=args.seq_length,
        max_target_length=_span_corruption(args, tokenizer, ds).max_target_length,
        return_source=True)


def _t5_mixed(args, tokenizer):
    from megatron_lite.data.objectives.continuation import MixedT5Dataset
    ds = _indexed(args, tokenizer)
    return MixedT5Dataset([_span_corruption(args, tokenizer, ds),
                           _continuation(args, tokenizer, ds)], [1, 1], args.seed)


def _wwm_mlm(args, tokenizer):
    from megatron_lite.data.objectives.wwm_mlm import WholeWordMaskDataset
    return WholeWordMaskDataset(_indexed(args, tokenizer), tokenizer, args.seed,
                                seq_length=args.seq_length, return_source=True)


def _classify(args, tokenizer):
    from megatron_lite.data.objectives.classification import (ClassificationDataset,
                                                              label_names, read_examples)
    examples = read_examples(args.input)
    return ClassificationDataset(examples, tokenizer, args.seq_length, label_names(examples))


BUILDERS = {"causal_lm": _causal_lm, "xl_stream": _xl_stream,
            "span_corruption": _span_corruption, "continuation": _continuation,
            "t5_mixed": _t5_mixed, "wwm_mlm": _wwm_mlm, "prompt_text": _prompt_text,
            "classify": _classify}
"""Objective name (`megatron_lite.data.objectives.OBJECTIVES`) -> its dataset, return_source on."""


def build_dataset(args, tokenizer):
    """The objective named by args, with return_source on."""
    return BUILDERS[args.objective](args, tokenizer)


def example_ids(sample: dict, pad_id: int) -> dict:
    """A sample -> unpadded id lists: source_ids, input_ids, and target_ids or labels."""
    if "encoder_input_ids" in sample:
        enc = sample["encoder_input_ids"].tolist()
        while enc and enc[-1] == pad_id:
            enc.pop()
        n = int(sample["loss_mask"].sum())
        return {"source_ids": sample["source_ids"].tolist(), "input_ids": enc,
                "target_ids": sample["labels"][:n].tolist()}
    if sample["labels"].dim() == 0:  # classification: the text in [CLS] ... [SEP], its class
        n = int(sample["attention_mask"].sum())
        ids = sample["input_ids"][:n].tolist()
        return {"source_ids": ids[1:-1], "input_ids": ids, "label": int(sample["labels"])}
    if "loss_mask" not in sample:  # masked LM (-100 labels): the real tokens, [CLS] to [SEP]
        n = int(sample["attention_mask"].sum())
    else:  # causal LM, prompt/text: inputs and labels of the window, without padding
        n = len(sample["source_ids"]) - 1
    out = {"source_ids": sample["source_ids"].tolist(),
           "input_ids": sample["input_ids"][:n].tolist(), "labels": sample["labels"][:n].tolist()}
    if "loss_mask" in sample:
        out["loss_mask"] = [int(v) for v in sample["loss_mask"][:n].tolist()]
    return out


def examples(args, tokenizer):
    """Yield (index, id dict) for the requested examples."""
    ds = build_dataset(args, tokenizer)
    if is_stream(ds):
        for step in range(args.start, args.start + args.num):
            b = ds.batch(step)
            ids, labels = b["input_ids"][0].tolist(), b["labels"][0].tolist()
            yield step, {"source_ids": ids + labels[-1:], "input_ids": ids, "labels": labels}
        return
    for i in range(args.start, args.start + args.num):
        ids = example_ids(ds[i], tokenizer.pad_id)
        if "label" in ids:
            ids["label_name"] = ds.labels[ids["label"]]
        yield i, ids


def render_text(objective: str, index: int, ids: dict, tokenizer) -> str:
    lines = [f"=== {objective} #{index} ===", "source: " + tokenizer.decode(ids["source_ids"]),
             "input:  " + tokenizer.decode(ids["input_ids"])]
    if "label" in ids:
        lines.append(f"label:  {ids['label_name']} ({ids['label']})")
    elif "target_ids" in ids:
        lines.append("target: " + tokenizer.decode(ids["target_ids"]))
    elif "loss_mask" not in ids:  # masked LM (-100 labels)
        # Shown with the [CLS]-based position of each predicted token.
        predicted = [f"[{t}]{tokenizer.decode([l])}" for t, l in enumerate(ids["labels"])
                     if l != IGNORE_INDEX]
        lines.append("labels: " + " ".join(predicted))
    else:
        mask = ids.get("loss_mask", [1] * len(ids["labels"]))
        lines.append("labels: " + tokenizer.decode([l for l, m in zip(ids["labels"], mask) if m]))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.num < 1:
        raise SystemExit("--num must be >= 1")
    from megatron_lite.data.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(args.tokenizer)
    for index, ids in examples(args, tokenizer):
        if args.format == "jsonl":
            print(json.dumps({"index": index, **ids}, ensure_ascii=False))
        else:
            print(render_text(args.objective, index, ids, tokenizer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
