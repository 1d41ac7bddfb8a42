#!/usr/bin/env python
"""Evaluate a checkpoint on a jsonl file: loss, perplexity and bits per character.

    python tools/evaluate.py --load runs/tiny_MP1 --input data/sample/valid.jsonl
    deepspeed --num_gpus 2 tools/evaluate.py --load runs/demo --input data/sample/valid.jsonl --json
    python tools/evaluate.py --load runs/t5 --input data/sample/valid.jsonl --objective continuation

Any registered model, at the checkpoint's tensor-parallel size (one process for TP=1, the
launcher's ranks for TP=N; reshard with change_mp.py for another size). The input's {"text": ...}
lines are cleaned and tokenized as tools/preprocess_data.py does, then go once through the
model's own objective, built by its registry record's `build_data` (the record's `objective`,
or one of its `objectives` with --objective: T5's span corruption or continuation alone, GPT's
prompt_text on {"prompt", "text"} lines). Reported: the token-weighted mean loss in nats,
perplexity exp(loss), and, for a model predicting text, bits per character as every report in
megatron_lite defines it (data.contract.bits_per_character: summed nats / (ln 2 x the
characters the predicted tokens spell), so it compares across tokenizers where per-token figures
do not). A model with per-stream state (Transformer-XL) reads its streams from an empty memory.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import megatron_lite.models  # noqa: E402,F401  (registers the architectures)
from generate import read_model  # noqa: E402  (verifies the checkpoint, checks the TP size)
from megatron_lite.data.contract import (bits_per_character, is_stream,  # noqa: E402
                                         predicted_targets)
from megatron_lite.data.sampler import collate  # noqa: E402
from megatron_lite.data.tokenizer import load_tokenizer  # noqa: E402
from megatron_lite.models.registry import import_model_modules  # noqa: E402
from megatron_lite.parallel import ParallelState, RNGContext  # noqa: E402
from megatron_lite.parallel.launch import (  # noqa: E402
    destroy_distributed, exit_process, init_distributed)
from megatron_lite.training.config import RunConfig, TrainingConfig  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (the one holding 'latest')"
                   " or an export directory")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the one 'latest' names)")
    p.add_argument("--input", required=True, help='jsonl file, one {"text": ...} per line')
    p.add_argument("--objective", default=None,
                   help="objective to score with (default: the model's own)")
    p.add_argument("--seq-length", type=int, default=None,
                   help="tokens per sample (default 256, at most the model's positions)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="samples per forward pass")
    p.add_argument("--seed", type=int, default=1234,
                   help="seed of the objective's randomness (masking, span corruption)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--model-module", action="append", default=[], metavar="MODULE",
                   help="import MODULE first: the checkpoint's model is defined there")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def tokenize(input_path: str, tokenizer_dir: str, tokenizer, out_dir: str) -> str:
    """The input as an indexed dataset (cleaned and tokenized by tools/preprocess_data.py, with
    word boundaries for a character vocabulary, which whole-word masking needs)."""
    import tools.preprocess_data as preprocess
    prefix = os.path.join(out_dir, "input")
    argv = ["--input", input_path, "--output-prefix", prefix, "--tokenizer", tokenizer_dir,
            "--workers", "1", "--quiet"] + (["--word-boundaries"] if tokenizer.is_char_level
                                            else [])
    with contextlib.redirect_stdout(io.StringIO()):  # its summary would garble --json output
        try:
            preprocess.main(argv)
        except (ValueError, OSError, ImportError) as e:
            raise SystemExit(f"error: {input_path}: {e}") from None
    return prefix


def build_data(spec, objective: str, cfg, tokenizer, tokenizer_dir, prefix, args, ps):
    """The objective's samples over the input: the model's own `build_data`, with the input as
    both splits (its validation split when it makes one: no training-only randomness)."""
    positions = getattr(cfg, "max_position_embeddings", None)
    seq_length = args.seq_length or min(256, positions or 256)
    try:
        data = spec.data_config_cls(train_data_prefix=prefix, valid_data_prefix=prefix,
                                    tokenizer=tokenizer_dir, seq_length=seq_length)
        if objective != spec.objective:
            data = spec.objectives[objective](data, args.input)
        training = TrainingConfig(micro_batch_size=args.micro_batch_size,
                                  global_batch_size=args.micro_batch_size * ps.dp_size,
                                  seed=args.seed)
        datasets = spec.build_data(RunConfig(model=cfg, data=data, training=training),
                                   tokenizer, cfg, ps)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {args.input}: {e}") from None
    return datasets.valid if datasets.valid is not None else datasets.train


def batches(data, micro_batch_size: int):
    """(micro-batch slot, batch) once over the data: every sample of a map-style dataset, or one
    epoch of a stream."""
    if is_stream(data):
        slots = getattr(data, "slots", 1)
        for i in range(len(data) * slots):
            yield i % slots, next(data)
        return
    for start in range(0, len(data), micro_batch_size):
        stop = min(start + micro_batch_size, len(data))
        yield 0, collate([data[i] for i in range(start, stop)])


@torch.no_grad()
def evaluate(model, spec, data, tokenizer, micro_batch_size: int) -> dict:
    char_lengths = torch.from_numpy(tokenizer.char_lengths()) if spec.predicts_text else None
    total, count, characters, num_batches, states = 0.0, 0.0, 0.0, 0, {}
    for slot, batch in batches(data, micro_batch_size):
        if num_batches == 0:
            spec.check_batch(batch)
        num_batches += 1
        if spec.stream_state:
            loss, ntokens, states[slot] = model.loss(batch, states.get(slot))
        else:
            loss, ntokens = model.loss(batch)
        ntokens = float(ntokens)
        total += loss.item() * ntokens
        count += ntokens
        if char_lengths is not None:
            characters += float(char_lengths[predicted_targets(batch).long()].sum())
    if count == 0:
        raise SystemExit("error: the input gives the objective nothing to predict; give more "
                         "text or a shorter --seq-length")
    loss = total / count
    bpc = bits_per_character(total, characters) if char_lengths is not None else None
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bpc": bpc,
            "predicted_tokens": int(count), "characters": int(characters),
            "batches": num_batches}


def main(argv=None) -> dict:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.micro_batch_size < 1:
        raise SystemExit(f"--micro-batch-size {args.micro_batch_size} must be >= 1")
    if not os.path.isfile(args.input):
        raise SystemExit(f"error: --input {args.input}: no such file")
    try:
        import_model_modules(args.model_module)
    except ImportError as e:
        raise SystemExit(f"error: {e}") from None
    owns_dist = init_distributed()
    try:
        ps = ParallelState.from_world(dist.get_world_size())
        try:
            state, spec, model_config, tokenizer_dir = read_model(args.load, ps, args.tag)
        except FileNotFoundError as e:  # no checkpoint there, or no `latest`
            raise SystemExit(f"error: --load {args.load}: {e}") from None
        objective = args.objective or spec.objective
        if objective != spec.objective and objective not in spec.objectives:
            choices = ", ".join([spec.objective, *spec.objectives])
            raise SystemExit(f"error: --objective {objective}: a '{spec.name}' model is scored "
                             f"with {choices}")
        cfg = spec.make_config(model_config)
        model = spec.build(cfg, ps, RNGContext(args.seed, dp_rank=ps.dp_rank, tp_rank=ps.tp_rank))
        model.load_state_dict(state, strict=True)
        model.eval()
        tokenizer = load_tokenizer(tokenizer_dir)
        # Every rank tokenizes the same input into its own directory: nothing to share.
        with tempfile.TemporaryDirectory() as tmp:
            prefix = tokenize(args.input, tokenizer_dir, tokenizer, tmp)
            data = build_data(spec, objective, cfg, tokenizer, tokenizer_dir, prefix, args, ps)
            result = evaluate(model, spec, data, tokenizer, args.micro_batch_size)
        result = {"model": spec.name, "objective": objective, **result}
        if dist.get_rank() == 0:
            if args.json:
                print(json.dumps(result), flush=True)
            else:
                bpc = (f", {result['bpc']:.4f} bits per character"
                       if result["bpc"] is not None else "")
                print(f"{args.input}: loss {result['loss']:.4f} nats/token, perplexity "
                      f"{result['perplexity']:.4f}{bpc} ({spec.name}, objective {objective}, "
                      f"{result['predicted_tokens']} predicted tokens, {result['characters']} "
                      f"characters)", flush=True)
        return result
    finally:
        destroy_distributed(owns_dist)


if __name__ == "__main__":
    main()
    exit_process(0)
