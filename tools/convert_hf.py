#!/usr/bin/env python
"""Hugging Face interop: transformers model directories <-> our checkpoints, for every model
whose registry record declares a converter (`ModelSpec.hf`; today T5 / LongLM, dense GPT as
GPT2LMHeadModel, Longformer).

    # a T5ForConditionalGeneration directory (config.json, weights, spiece.model), e.g. LongLM
    python tools/convert_hf.py import LongLM-small runs/longlm-small --tensor-model-parallel-size 2
    # then fine-tune from it, or generate with it (at the TP size it was imported at)
    python pretrain_t5.py --config configs/t5/longlm-small.yaml --load runs/longlm-small --finetune ...
    deepspeed --num_gpus 2 generate.py --load runs/longlm-small --prompt "小咕噜对，<extra_id_1>"
    # ours -> a directory transformers loads (T5ForConditionalGeneration, T5Tokenizer)
    python tools/convert_hf.py export runs/t5-tiny runs/t5-tiny-hf

Import picks the converter by config.json's `model_type` (or `--model NAME`) and writes our
checkpoint format (DeepSpeed's layout with our metadata, a `global_step0` tag and `latest`) at any
tensor-parallel size, the tokenizer included. It holds weights only: load it with `--finetune`.
Export merges the TP shards and writes config.json, model.safetensors and the tokenizer in the
form transformers reads. How each architecture maps its weights, config and tokenizer is in its
model file (for T5: megatron_lite/models/t5.py, "Hugging Face interop"). A model defined outside
the package takes part through `--model-module MODULE`.
"""
from __future__ import annotations

import argparse
import json
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
from megatron_lite.models.registry import (ConversionError, get_model_spec,  # noqa: E402
                                           import_model_modules, model_names)


EXPORTED_TOKENIZER_DIR = "megatron_lite_tokenizer"
"""Where an export keeps a tokenizer of ours that transformers has no class for."""

# ---------------------------------------------------------------------------------------------
# Reading a Hugging Face directory

def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{path} not found: give a transformers model directory (as written "
                              "by save_pretrained), holding config.json and the weights")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_hf_state_dict(hf_dir: str) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors / pytorch_model.bin, sharded (with an index) or not."""
    for name, index in (("model.safetensors", "model.safetensors.index.json"),
                        ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        files = []
        if os.path.isfile(os.path.join(hf_dir, index)):
            with open(os.path.join(hf_dir, index), encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(os.path.join(hf_dir, name)):
            files = [name]
        if not files:
            continue
        state = {}
        for file in files:
            path = os.path.join(hf_dir, file)
            if file.endswith(".safetensors"):
                from safetensors.torch import load_file
                state.update(load_file(path))
            else:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
        return state
    raise ConversionError(f"{hf_dir} holds no model.safetensors or pytorch_model.bin (nor a "
                          "sharded index of them)")


def converter_spec(model_name: str | None, hf_cfg: dict | None = None):
    """The spec whose converter handles `model_name`, or else config.json's model_type."""
    if model_name is not None:
        spec = get_model_spec(model_name)
        if spec.hf is None:
            raise ConversionError(f"model '{model_name}' declares no Hugging Face converter")
        return spec
    model_type = (hf_cfg or {}).get("model_type")
    for name in model_names():
        spec = get_model_spec(name)
        if spec.hf is not None and model_type in spec.hf.model_types:
            return spec
    known = {t: name for name in model_names() if get_model_spec(name).hf
             for t in get_model_spec(name).hf.model_types}
    raise ConversionError(f"config.json has model_type {model_type!r}, which no registered "
                          f"model converts (converters: {known or 'none'}); pass --model NAME "
                          f"(and --model-module for a model of your own)")


# ---------------------------------------------------------------------------------------------
# The two commands

def import_hf(hf_dir: str, out_dir: str, tp_size: int = 1, tokenizer_dir: str | None = None,
              model: str | None = None) -> str:
    """Convert an HF directory into our checkpoint at `tp_size`; returns the checkpoint dir."""
    hf_cfg = read_hf_config(hf_dir)
    spec = converter_spec(model, hf_cfg)
    hf_sd = read_hf_state_dict(hf_dir)
    # An export keeps a tokenizer transformers has no class for in megatron_lite_tokenizer/.
    ours = os.path.join(hf_dir, EXPORTED_TOKENIZER_DIR)
    tokenizer_dir = tokenizer_dir or (ours if os.path.isdir(ours) else hf_dir)
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
    except ValueError as e:
        raise ConversionError(f"no tokenizer in {tokenizer_dir} ({e}); copy the model's "
                              "tokenizer files there or pass --tokenizer DIR") from None
    try:
        cfg = spec.hf.config_from_hf(hf_cfg, hf_sd, tokenizer)
    except ConversionError as e:
        raise ConversionError(f"{hf_dir}: {e}") from None
    try:
        spec.layout(cfg, tp_size)  # the model's own checks: heads, widths, vocabulary split
    except ValueError as e:
        raise ConversionError(f"cannot shard over --tensor-model-parallel-size {tp_size}: {e}") from None
    try:
        shards = shard_state_dict(spec.hf.state_from_hf(hf_sd, cfg), spec, cfg, tp_size)
    except ReshardError as e:
        raise ConversionError(f"{hf_dir}: {e}") from None
    meta = CheckpointMeta.for_model(spec, cfg, tp_size, tokenizer,
                                    converted_from=os.path.abspath(hf_dir))
    return write_weights_only_checkpoint(out_dir, meta, shards, tokenizer)


def export_hf(load_dir: str, out_dir: str, tag: str | None = None) -> str:
    """Write our checkpoint as an HF directory; returns it."""
    try:
        full, meta, ckpt_dir, _ = merged_state_dict(load_dir, tag)
    except ReshardError as e:
        raise ConversionError(str(e)) from None
    spec = get_model_spec(meta.model, module=meta.model_module)
    if spec.hf is None:
        raise ConversionError(f"{ckpt_dir} holds a '{meta.model}' model, which declares no "
                              f"Hugging Face converter")
    cfg = spec.make_config(meta.model_config)
    tokenizer = load_tokenizer(os.path.join(ckpt_dir, TOKENIZER_DIR))
    try:  # converted before anything is written: a refusal leaves no directory behind
        hf_state, hf_config = spec.hf.state_to_hf(full, cfg, tokenizer), \
            spec.hf.config_to_hf(cfg, tokenizer)
    except ConversionError as e:
        raise ConversionError(f"{ckpt_dir} cannot be exported: {e}") from None
    os.makedirs(out_dir, exist_ok=True)
    from safetensors.torch import save_file
    save_file(hf_state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)
    spec.hf.save_tokenizer(tokenizer, out_dir)
    return out_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model-module", action="append", default=[], metavar="MODULE",
                        help="import MODULE (dotted name or .py path) first: a model of your own "
                             "registers itself there (repeatable)")
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF directory -> our checkpoint", parents=[common])
    imp.add_argument("hf_dir")
    imp.add_argument("out_ckpt")
    imp.add_argument("--tensor-model-parallel-size", type=int, default=1)
    imp.add_argument("--tokenizer", default=None,
                     help="tokenizer directory or spiece.model (default: the HF directory's)")
    imp.add_argument("--model", default=None,
                     help="registered model to convert to (default: by config.json's model_type)")
    exp = sub.add_parser("export", help="our checkpoint -> HF directory", parents=[common])
    exp.add_argument("ckpt")
    exp.add_argument("out_hf_dir")
    exp.add_argument("--tag", default=None, help="checkpoint tag (default: the one 'latest' names)")
    args = p.parse_args(argv)
    try:
        import_model_modules(args.model_module)
        if args.command == "import":
            if args.tensor_model_parallel_size < 1:
                p.error("--tensor-model-parallel-size must be >= 1")
            path = import_hf(args.hf_dir, args.out_ckpt, args.tensor_model_parallel_size,
                             args.tokenizer, args.model)
        else:
            path = export_hf(args.ckpt, args.out_hf_dir, args.tag)
    except (ConversionError, FileNotFoundError, FileExistsError, KeyError, ImportError) as e:
        raise SystemExit(f"error: {e.args[0] if isinstance(e, KeyError) else e}") from None
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
