"""Generate text from a checkpoint, at the tensor-parallel size it was saved with.

TP=1 checkpoint, one process:
    python generate.py --load runs/tiny --prompt "中国人民" --greedy --max-new-tokens 32
TP=2 checkpoint, two ranks (each holds half of every sharded layer):
    deepspeed --num_gpus 2 generate.py --load runs/demo --prompt "中国人民" --top-p 0.9
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

from megatron_lite.checkpoint.checkpointing import TOKENIZER_DIR, read_model_states
from megatron_lite.data.tokenizer import load_tokenizer
from megatron_lite.inference.generation import generate
from megatron_lite.models.registry import get_model_spec
from megatron_lite.parallel import ParallelState, RNGContext
from megatron_lite.training.trainer import init_distributed
import megatron_lite.models  # noqa: F401  (registers the architectures)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (the one holding 'latest')")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the one 'latest' names)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-eos-stop", action="store_true", help="do not stop at end of text")
    p.add_argument("--json", action="store_true", help="print one JSON line per prompt")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def load_model(load_dir: str, ps: ParallelState, tag: str | None = None):
    """(model, tokenizer, metadata) of a checkpoint, built at `ps`'s TP size."""
    state, meta, ckpt_dir = read_model_states(load_dir, ps.tp_rank, tag=tag)
    if meta["tp_size"] != ps.tp_size:
        raise SystemExit(
            f"{ckpt_dir} was saved at tensor-parallel size {meta['tp_size']} but this run has "
            f"{ps.tp_size} rank(s). Run it with {meta['tp_size']} rank(s) (deepspeed --num_gpus "
            f"{meta['tp_size']} generate.py ...), or reshard it: python change_mp.py {load_dir} "
            f"{ps.tp_size}")
    spec = get_model_spec(meta["model"])
    cfg = spec.config_cls(**meta["model_config"])
    model = spec.build(cfg, ps, RNGContext(0, dp_rank=ps.dp_rank, tp_rank=ps.tp_rank))
    model.load_state_dict(state, strict=True)
    model.eval()
    tokenizer = load_tokenizer(os.path.join(ckpt_dir, TOKENIZER_DIR))
    return model, tokenizer, meta


def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if not args.prompt:
        raise SystemExit("give at least one --prompt")
    owns_dist = init_distributed()
    try:
        ps = ParallelState.from_world(dist.get_world_size())
        model, tokenizer, meta = load_model(args.load, ps, args.tag)
        # A backward (LingLong-Backward) model writes the text that comes before the prompt.
        backward = bool(meta["model_config"].get("backward", False))
        prompts = [tokenizer.encode(p) for p in args.prompt]
        outputs = generate(model, prompts, args.max_new_tokens,
                           eos_id=None if args.no_eos_stop else tokenizer.eod_id,
                           greedy=args.greedy, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                           seed=args.seed)
        results = [{"prompt": p, "completion": tokenizer.decode(ids), "ids": ids}
                   for p, ids in zip(args.prompt, outputs)]
        if dist.get_rank() == 0:
            for r in results:
                if args.json:
                    print(json.dumps({"prompt": r["prompt"], "completion": r["completion"]},
                                     ensure_ascii=False), flush=True)
                else:
                    text = (r["completion"] + r["prompt"]) if backward else (r["prompt"] + r["completion"])
                    print(text, flush=True)
        return results
    finally:
        if owns_dist and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
