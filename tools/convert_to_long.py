#!/usr/bin/env python
"""Make a BERT long: a Longformer checkpoint of ours with more positions and sliding-window
attention, as Longformer_ZH was made from a 512-position Roberta_zh (a BertModel).

    # a transformers BertForMaskedLM directory (config.json, weights, vocab.txt)
    python tools/convert_to_long.py chinese-bert-wwm runs/bert-long --max-positions 4096 \
        --attention-window 512 --tensor-model-parallel-size 2
    # or a Longformer checkpoint of ours with a shorter table
    python tools/convert_to_long.py runs/lf-512 runs/lf-4096 --max-positions 4096
    # then continue pretraining it (weights only: --finetune)
    python pretrain_longformer.py --config configs/longformer/longformer-zh-base.yaml \
        --load runs/bert-long --finetune ...

The position table is tiled (row i of the long table is row i mod P of the short one), every
layer's global query/key/value projections start as copies of its q/k/v, and the tokenizer is
copied alongside. At a length the short table covers, with no global token and a window of at
least twice the length, the converted model computes exactly what the BERT did.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from megatron_lite.checkpoint.checkpointing import (TOKENIZER_DIR,  # noqa: E402
                                                    write_weights_only_checkpoint)
from megatron_lite.checkpoint.metadata import CheckpointMeta  # noqa: E402
from megatron_lite.checkpoint.reshard import (ReshardError, merged_state_dict,  # noqa: E402
                                              shard_state_dict)
from megatron_lite.data.tokenizer import load_tokenizer  # noqa: E402
from megatron_lite.models import get_model_spec, model_names  # noqa: E402
from megatron_lite.models.longformer import LongformerConfig, hf_state_to_ours  # noqa: E402
from megatron_lite.models.registry import ConversionError  # noqa: E402
from tools.convert_hf import read_hf_config, read_hf_state_dict  # noqa: E402


def tile_positions(table: torch.Tensor, rows: int, source: str) -> torch.Tensor:
    if rows < table.shape[0]:
        raise ConversionError(f"--max-positions {rows} is shorter than the position table of "
                              f"{source} ({table.shape[0]} rows): give at least {table.shape[0]}")
    return table[torch.arange(rows) % table.shape[0]].clone()


def _long_config(base: LongformerConfig, args) -> LongformerConfig:
    windows = args.attention_window or base.attention_window
    try:
        return dataclasses.replace(base, max_position_embeddings=args.max_positions,
                                   attention_window=list(windows))
    except ValueError as e:
        raise ConversionError(str(e)) from None


def from_bert(src: str, args):
    """(config, full state, tokenizer) from a transformers BertForMaskedLM directory."""
    hf_cfg = read_hf_config(src)
    kind = hf_cfg.get("model_type")
    if kind != "bert" or hf_cfg.get("attention_window") is not None:
        importable = any(spec.hf is not None and kind in spec.hf.model_types
                         for spec in map(get_model_spec, model_names()))
        raise ConversionError(
            f"{src} holds a {kind!r} model{' with Longformer attention' if kind == 'bert' else ''},"
            f" not a plain BERT (BertForMaskedLM): "
            + ("import it with tools/convert_hf.py instead" if importable
               else "convert_to_long makes BERT checkpoints long"))
    if hf_cfg.get("hidden_act", "gelu") != "gelu":
        raise ConversionError(f"{src}/config.json: hidden_act {hf_cfg.get('hidden_act')!r} is "
                              "not supported (BERT uses 'gelu')")
    tokenizer = load_tokenizer(args.tokenizer or src)
    base = LongformerConfig(
        vocab_size=tokenizer.vocab_size, num_layers=int(hf_cfg["num_hidden_layers"]),
        hidden_size=int(hf_cfg["hidden_size"]), num_attention_heads=int(hf_cfg["num_attention_heads"]),
        ffn_hidden_size=int(hf_cfg["intermediate_size"]),
        max_position_embeddings=int(hf_cfg["max_position_embeddings"]),
        type_vocab_size=int(hf_cfg.get("type_vocab_size", 2)), attention_window=[2],
        layernorm_epsilon=float(hf_cfg.get("layer_norm_eps", 1e-12)),
        hidden_dropout=float(hf_cfg.get("hidden_dropout_prob", 0.1)),
        attention_dropout=float(hf_cfg.get("attention_probs_dropout_prob", 0.1)),
        init_std=float(hf_cfg.get("initializer_range", 0.02)))
    if not args.attention_window:
        raise ConversionError("--attention-window is required for a BERT (Longformer_ZH: 512)")
    cfg = _long_config(base, args)
    hf_sd = read_hf_state_dict(src)
    words = hf_sd.get("bert.embeddings.word_embeddings.weight")
    if words is not None and tokenizer.vocab_size > words.shape[0]:
        raise ConversionError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's "
                              f"embedding only {words.shape[0]} rows: they do not belong together")
    positions = tile_positions(hf_sd["bert.embeddings.position_embeddings.weight"],
                               args.max_positions, src)
    return cfg, hf_state_to_ours(hf_sd, cfg, global_from_local=True, positions=positions), tokenizer


def from_ours(src: str, args):
    """(config, full state, tokenizer) from a Longformer checkpoint of ours."""
    try:
        full, meta, ckpt_dir, _ = merged_state_dict(src, args.tag)
    except ReshardError as e:
        raise ConversionError(str(e)) from None
    try:
        spec = get_model_spec(meta.model, module=meta.model_module)
    except KeyError as e:
        raise ConversionError(e.args[0]) from None
    if spec.config_cls is not LongformerConfig:
        raise ConversionError(f"{ckpt_dir} holds a '{meta.model}' model, not a BERT-style "
                              f"encoder: convert_to_long makes Longformer / BERT checkpoints long")
    cfg = _long_config(spec.make_config(meta.model_config), args)
    full = dict(full)
    full["position_embeddings.weight"] = tile_positions(full["position_embeddings.weight"],
                                                        args.max_positions, ckpt_dir)
    for name in list(full):
        if name.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            full[name.replace("attn.qkv.", "attn.qkv_global.")] = full[name].clone()
    return cfg, full, load_tokenizer(os.path.join(ckpt_dir, TOKENIZER_DIR))


def convert(src: str, out: str, args) -> str:
    ours = os.path.isfile(os.path.join(src, "latest"))
    cfg, full, tokenizer = (from_ours if ours else from_bert)(src, args)
    spec = get_model_spec("longformer")  # what it writes
    try:
        shards = shard_state_dict(full, spec, cfg, args.tensor_model_parallel_size)
    except (ReshardError, ValueError) as e:
        raise ConversionError(f"cannot shard over --tensor-model-parallel-size "
                              f"{args.tensor_model_parallel_size}: {e}") from None
    meta = CheckpointMeta.for_model(spec, cfg, args.tensor_model_parallel_size, tokenizer,
                                    converted_from=os.path.abspath(src))
    return write_weights_only_checkpoint(out, meta, shards, tokenizer)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("src", help="a transformers BertForMaskedLM directory, or our checkpoint dir")
    p.add_argument("out", help="the Longformer checkpoint to write (a new directory)")
    p.add_argument("--max-positions", type=int, default=4096,
                   help="rows of the long position table (Longformer_ZH: 4096)")
    p.add_argument("--attention-window", type=lambda v: [int(w) for w in v.split(",")],
                   default=None, help="two-sided window, one or one per layer (comma-separated); "
                                      "required for a BERT, default: the checkpoint's")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--tokenizer", default=None, help="default: the source's vocab.txt")
    p.add_argument("--tag", default=None, help="checkpoint tag of ours (default: latest)")
    args = p.parse_args(argv)
    if args.tensor_model_parallel_size < 1:
        p.error("--tensor-model-parallel-size must be >= 1")
    try:
        path = convert(args.src, args.out, args)
    except (ConversionError, FileNotFoundError, FileExistsError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
