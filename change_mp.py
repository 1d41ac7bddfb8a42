"""Reshard a checkpoint to another tensor-parallel (model-parallel) size.

    python change_mp.py runs/demo 1                     # -> runs/demo_MP1, for one-process inference
    python change_mp.py runs/demo 4 --out runs/demo_tp4 --keep-optimizer   # resume training at TP=4

Reads a checkpoint saved at any TP size (the tag `latest` names, or --tag) and writes one at
TARGET_MP, which must divide the attention heads, the padded vocabulary and the FFN width. Sharded
tensors are re-cut by the partition tags recorded in the checkpoint; replicated ones are copied;
the metadata (config, tokenizer, step, consumed samples) is kept. The result loads at TARGET_MP
in `generate.py` and, with --keep-optimizer, resumes training (`--load`) at TARGET_MP and any DP
size: ZeRO stage 0 keeps its optimizer inside the model states (resume at stage 0); ZeRO-1/2/3
optimizer state is written in DeepSpeed's universal layout (resume at ZeRO-1/2, which the trainer
loads by itself). Without --keep-optimizer the result holds weights only: fine-tune from it with
--finetune. A checkpoint of a model defined outside megatron_lite needs the --model-module it was
trained with.

The output is written under a temporary name beside it and renamed when complete: on any error
nothing is left behind. This tool does not import DeepSpeed.
"""
from __future__ import annotations

import argparse
import sys

from megatron_lite.checkpoint.reshard import ReshardError, reshard_checkpoint
from megatron_lite.models.registry import import_model_modules


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("ckpt_dir", metavar="CKPT_DIR",
                   help="checkpoint directory (the one holding 'latest')")
    p.add_argument("target_mp", metavar="TARGET_MP", type=int,
                   help="tensor-parallel size to write")
    p.add_argument("--out", default=None,
                   help="output directory (default: CKPT_DIR_MP<TARGET_MP>); must not exist")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the one 'latest' names)")
    p.add_argument("--keep-optimizer", action="store_true",
                   help="also reshard the fp32 master weights and Adam moments, to resume training")
    p.add_argument("--model-module", action="append", default=[], metavar="MODULE",
                   help="import MODULE (dotted name or .py path) first: the checkpoint's model is "
                        "defined there (repeatable)")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    return p


def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    try:
        import_model_modules(args.model_module)
        result = reshard_checkpoint(args.ckpt_dir, args.target_mp, args.out, tag=args.tag,
                                    keep_optimizer=args.keep_optimizer, log=log)
    except (ReshardError, ImportError) as e:
        print(f"error: {e}\n(nothing was written)", file=sys.stderr)
        raise SystemExit(1) from None
    optimizer = {"none": "weights only (fine-tune with --finetune)",
                 "native": "with its ZeRO stage 0 optimizer state",
                 "universal": "with its optimizer state in DeepSpeed's universal layout"}
    log(f"resharded {args.ckpt_dir} ({result.tag}) from TP={result.source_tp} to "
        f"TP={result.target_tp}, {optimizer[result.optimizer]}: {result.out_dir}\n"
        f"{result.bytes_written / 1e6:.1f} MB in {result.seconds:.1f} s "
        f"({result.mb_per_s:.0f} MB/s)")
    return result


if __name__ == "__main__":
    main()
