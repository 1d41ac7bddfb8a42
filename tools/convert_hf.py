#!/usr/bin/env python
"""Hugging Face interop: transformers T5 / LongLM directories <-> our checkpoints.

    # a T5ForConditionalGeneration directory (config.json, weights, spiece.model), e.g. LongLM
    python tools/convert_hf.py import LongLM-small runs/longlm-small --tensor-model-parallel-size 2
    # then fine-tune from it, or generate with it (at the TP size it was imported at)
    python pretrain_t5.py --config configs/t5/longlm-small.yaml --load runs/longlm-small --finetune ...
    deepspeed --num_gpus 2 generate.py --load runs/longlm-small --prompt "小咕噜对，<extra_id_1>"
    # ours -> a directory transformers loads (T5ForConditionalGeneration, T5Tokenizer)
    python tools/convert_hf.py export runs/t5-tiny runs/t5-tiny-hf

Import writes our checkpoint format (DeepSpeed's layout with our metadata, a `global_step0` tag
and `latest`), at any tensor-parallel size, the tokenizer included. It holds weights only: load it
with `--finetune`. Export merges the TP shards and writes config.json, model.safetensors and the
tokenizer (spiece.model + tokenizer_config.json).

Vocabulary: our `vocab_size` is the tokenizer's; the embedding is padded to a multiple of 128
(the HF table usually is too: t5's 32128 rows for 32100 ids). Import copies the HF rows that fit
and zero-fills the rest; export writes exactly `vocab_size` rows, so transformers never samples
a padding row. Sentinel ids are the tokenizer's own: an HF T5 vocabulary keeps its sentinels at
the top (`<extra_id_0>` highest), ours at 4..103.

T5 versions: v1.0 / LongLM (ReLU, tied head scaled by d_model^-0.5) and v1.1 (gated GELU,
separate unscaled head). transformers 5.x always writes `tie_word_embeddings: true` and records the
head's scaling as `scale_decoder_outputs`; a separate head is recognised by an `lm_head.weight`
that differs from `shared.weight`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from megatron_lite.checkpoint.checkpointing import (META_KEY, TOKENIZER_DIR,  # noqa: E402
                                                    model_state_path, read_latest_tag,
                                                    read_model_states, step_tag)
from megatron_lite.data.tokenizer import (SP_MODEL_FILE, SentencePieceTokenizer,  # noqa: E402
                                          load_tokenizer)
from megatron_lite.models.t5 import T5Config, T5Model  # noqa: E402
from megatron_lite.parallel import (ParallelState, is_sharded, merge_shards,  # noqa: E402
                                    take_shard)


class ConversionError(ValueError):
    """A directory or checkpoint that cannot be converted; the message says why and what to do."""


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


def _scaled_head(hf_cfg: dict) -> bool:
    # transformers 5.x stores the v1.0 / v1.1 switch as scale_decoder_outputs; older versions as
    # tie_word_embeddings (false for v1.1).
    if "scale_decoder_outputs" in hf_cfg:
        return bool(hf_cfg["scale_decoder_outputs"])
    return hf_cfg.get("tie_word_embeddings", True) is not False


def t5_config_from_hf(hf_cfg: dict, vocab_size: int, tied: bool) -> T5Config:
    if hf_cfg.get("model_type") not in (None, "t5"):
        raise ConversionError(f"config.json has model_type {hf_cfg.get('model_type')!r}; this "
                              "tool converts T5 (T5ForConditionalGeneration) models")
    proj = hf_cfg.get("feed_forward_proj", "relu")
    if proj not in ("relu", "gated-gelu"):
        raise ConversionError(f"config.json: feed_forward_proj {proj!r} is not supported; T5 "
                              "v1.0 / LongLM use 'relu', v1.1 'gated-gelu'")
    dropout = float(hf_cfg.get("dropout_rate", 0.1))
    start = hf_cfg.get("decoder_start_token_id")
    pad = int(hf_cfg.get("pad_token_id", 0) or 0)
    return T5Config(
        vocab_size=vocab_size, num_layers=int(hf_cfg["num_layers"]),
        num_decoder_layers=int(hf_cfg.get("num_decoder_layers") or hf_cfg["num_layers"]),
        hidden_size=int(hf_cfg["d_model"]), ffn_hidden_size=int(hf_cfg["d_ff"]),
        kv_channels=int(hf_cfg["d_kv"]), num_attention_heads=int(hf_cfg["num_heads"]),
        relative_attention_num_buckets=int(hf_cfg.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(hf_cfg.get("relative_attention_max_distance", 128)),
        layernorm_epsilon=float(hf_cfg.get("layer_norm_epsilon", 1e-6)),
        hidden_dropout=dropout, attention_dropout=dropout, feed_forward_proj=proj,
        tie_word_embeddings=tied, initializer_factor=float(hf_cfg.get("initializer_factor", 1.0)),
        pad_token_id=pad, decoder_start_token_id=None if start in (None, pad) else int(start))


# ---------------------------------------------------------------------------------------------
# Parameter layouts. HF keeps q, k, v as separate [inner, h] matrices; ours fuses k and v
# head-major ([heads, 2, d_kv] rows) so that a TP shard is a contiguous block of whole heads.

def _fuse_kv(k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    h = k.shape[1]
    return torch.stack([k.view(heads, -1, h), v.view(heads, -1, h)], dim=1).reshape(-1, h)


def _split_kv(kv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    h = kv.shape[1]
    k, v = kv.view(heads, 2, -1, h).unbind(1)
    return k.reshape(-1, h), v.reshape(-1, h)


def _layer_map(cfg: T5Config, stack: str, i: int) -> list[tuple[str, str]]:
    """(our name, HF name) of one layer's plain (1:1) parameters; q/k/v are handled apart."""
    hf = f"{stack}.block.{i}.layer"
    ours = f"{stack}.layers.{i}"
    ff = 2 if stack == "decoder" else 1
    pairs = [(f"{ours}.ln_attn.weight", f"{hf}.0.layer_norm.weight"),
             (f"{ours}.attn.q.weight", f"{hf}.0.SelfAttention.q.weight"),
             (f"{ours}.attn.o.weight", f"{hf}.0.SelfAttention.o.weight"),
             (f"{ours}.ln_mlp.weight", f"{hf}.{ff}.layer_norm.weight"),
             (f"{ours}.mlp.wo.weight", f"{hf}.{ff}.DenseReluDense.wo.weight")]
    if cfg.feed_forward_proj == "gated-gelu":
        pairs += [(f"{ours}.mlp.wi_0.weight", f"{hf}.{ff}.DenseReluDense.wi_0.weight"),
                  (f"{ours}.mlp.wi_1.weight", f"{hf}.{ff}.DenseReluDense.wi_1.weight")]
    else:
        pairs.append((f"{ours}.mlp.wi.weight", f"{hf}.{ff}.DenseReluDense.wi.weight"))
    if stack == "decoder":
        pairs += [(f"{ours}.ln_cross.weight", f"{hf}.1.layer_norm.weight"),
                  (f"{ours}.cross_attn.q.weight", f"{hf}.1.EncDecAttention.q.weight"),
                  (f"{ours}.cross_attn.o.weight", f"{hf}.1.EncDecAttention.o.weight")]
    return pairs


def _kv_map(stack: str, i: int) -> list[tuple[str, str]]:
    """(our fused kv name, HF attention prefix) of one layer's attentions."""
    hf = f"{stack}.block.{i}.layer"
    out = [(f"{stack}.layers.{i}.attn.kv.weight", f"{hf}.0.SelfAttention")]
    if stack == "decoder":
        out.append((f"{stack}.layers.{i}.cross_attn.kv.weight", f"{hf}.1.EncDecAttention"))
    return out


def _stacks(cfg: T5Config):
    return (("encoder", cfg.num_layers), ("decoder", cfg.decoder_layers))


def _resize_rows(table: torch.Tensor, rows: int) -> torch.Tensor:
    out = torch.zeros(rows, table.shape[1], dtype=table.dtype)
    n = min(rows, table.shape[0])
    out[:n] = table[:n]
    return out


def t5_state_from_hf(hf_sd: dict, cfg: T5Config) -> dict[str, torch.Tensor]:
    """Our full (TP=1) state dict from an HF T5 state dict."""
    def get(name):
        if name not in hf_sd:
            raise ConversionError(f"the HF weights lack '{name}'; is this a "
                                  f"T5ForConditionalGeneration with {cfg.num_layers} encoder and "
                                  f"{cfg.decoder_layers} decoder layers?")
        return hf_sd[name]

    heads = cfg.num_attention_heads
    sd = {"shared.weight": _resize_rows(get("shared.weight"), cfg.padded_vocab_size)}
    for stack, n in _stacks(cfg):
        sd[f"{stack}.relative_attention_bias"] = \
            get(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        sd[f"{stack}.final_ln.weight"] = get(f"{stack}.final_layer_norm.weight")
        for i in range(n):
            for ours, theirs in _layer_map(cfg, stack, i):
                sd[ours] = get(theirs)
            for ours, prefix in _kv_map(stack, i):
                sd[ours] = _fuse_kv(get(f"{prefix}.k.weight"), get(f"{prefix}.v.weight"), heads)
    if not cfg.tie_word_embeddings:
        head = hf_sd.get("lm_head.weight", hf_sd["shared.weight"])
        sd["lm_head.weight"] = _resize_rows(head, cfg.padded_vocab_size)
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def t5_state_to_hf(sd: dict, cfg: T5Config) -> dict[str, torch.Tensor]:
    """An HF T5 state dict (exactly vocab_size rows) from our full (TP=1) state dict."""
    heads, vocab = cfg.num_attention_heads, cfg.vocab_size
    hf = {"shared.weight": sd["shared.weight"][:vocab]}
    for stack, n in _stacks(cfg):
        hf[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = \
            sd[f"{stack}.relative_attention_bias"]
        hf[f"{stack}.final_layer_norm.weight"] = sd[f"{stack}.final_ln.weight"]
        for i in range(n):
            for ours, theirs in _layer_map(cfg, stack, i):
                hf[theirs] = sd[ours]
            for ours, prefix in _kv_map(stack, i):
                hf[f"{prefix}.k.weight"], hf[f"{prefix}.v.weight"] = _split_kv(sd[ours], heads)
    if not cfg.tie_word_embeddings:
        hf["lm_head.weight"] = sd["lm_head.weight"][:vocab]
    return {k: v.detach().clone().contiguous() for k, v in hf.items()}


def hf_config_from_t5(cfg: T5Config, eos_id: int) -> dict:
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
        "vocab_size": cfg.vocab_size, "d_model": cfg.hidden_size, "d_ff": cfg.ffn_hidden_size,
        "d_kv": cfg.kv_channels, "num_heads": cfg.num_attention_heads,
        "num_layers": cfg.num_layers, "num_decoder_layers": cfg.decoder_layers,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "dropout_rate": cfg.hidden_dropout, "layer_norm_epsilon": cfg.layernorm_epsilon,
        "initializer_factor": cfg.initializer_factor, "feed_forward_proj": cfg.feed_forward_proj,
        # Read by every transformers version: false means v1.1's separate, unscaled head.
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "is_encoder_decoder": True, "use_cache": True, "pad_token_id": cfg.pad_token_id,
        "eos_token_id": eos_id, "decoder_start_token_id": cfg.decoder_start_id,
    }


# ---------------------------------------------------------------------------------------------
# Sharding and our checkpoint files

def _meta_model(cfg: T5Config, tp_size: int, tp_rank: int = 0) -> T5Model:
    """The model's parameter names, shapes and partition tags, without allocating weights."""
    with torch.device("meta"):
        return T5Model(cfg, ParallelState.virtual(tp_size, tp_rank))


def partition_spec(cfg: T5Config, tp_size: int) -> dict[str, list[int]]:
    """name -> [partition_dim, partition_stride] of every sharded parameter (the trainer's form)."""
    return {n: [p.partition_dim, p.partition_stride]
            for n, p in _meta_model(cfg, tp_size).named_parameters() if is_sharded(p)}


def shard_state(full: dict, cfg: T5Config, tp_size: int) -> list[dict[str, torch.Tensor]]:
    """Each TP rank's state dict, cut along the model's own partition tags."""
    shards = []
    for rank in range(tp_size):
        shard = {}
        for name, p in _meta_model(cfg, tp_size, rank).named_parameters():
            if name not in full:
                raise ConversionError(f"no weights for parameter '{name}'")
            t = full[name]
            if is_sharded(p):
                t = take_shard(t, p.partition_dim, tp_size, rank, p.partition_stride)
            if tuple(t.shape) != tuple(p.shape):
                raise ConversionError(f"'{name}' has shape {tuple(t.shape)} but the model "
                                      f"expects {tuple(p.shape)} on TP rank {rank} of {tp_size}")
            shard[name] = t.clone().contiguous()
        shards.append(shard)
    return shards


def merge_state(shards: list[dict], spec: dict) -> dict[str, torch.Tensor]:
    """The full state dict from every rank's, using the checkpoint's partition spec."""
    full = {}
    for name, t in shards[0].items():
        if name in spec:
            dim, stride = spec[name]
            full[name] = merge_shards([s[name] for s in shards], dim, stride)
        else:
            full[name] = t
    return full


def write_checkpoint(out_dir: str, cfg: T5Config, shards: list[dict], tokenizer, source: str):
    """Our checkpoint layout (what the trainer writes), step 0, weights only; atomic like a save."""
    import deepspeed
    tp = len(shards)
    tag = step_tag(0)
    final, tmp = os.path.join(out_dir, tag), os.path.join(out_dir, f"{tag}.tmp")
    if os.path.exists(final):
        raise ConversionError(f"{final} already exists; choose an empty output directory")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    meta = dict(model="t5", model_config=dataclasses.asdict(cfg), tokenizer_hash=tokenizer.hash,
                vocab_size=cfg.vocab_size, padded_vocab_size=cfg.padded_vocab_size, tp_size=tp,
                dp_size=1, step=0, consumed_samples=0, seed=0, skipped_steps=0,
                partition_spec=partition_spec(cfg, tp), converted_from=os.path.abspath(source),
                weights_only=True)
    for rank, shard in enumerate(shards):
        # DeepSpeed's module-only load reads 'module' and 'dp_world_size'; the rest mirrors what
        # engine.save_checkpoint writes, minus optimizer and scheduler (hence --finetune).
        state = {"module": shard, "buffer_names": [], "optimizer": None, "lr_scheduler": None,
                 "skipped_steps": 0, "global_steps": 0, "global_samples": 0, "dp_world_size": 1,
                 "mp_world_size": tp, "ds_version": deepspeed.__version__, META_KEY: meta}
        torch.save(state, model_state_path(tmp, rank))
    tokenizer.save(os.path.join(tmp, TOKENIZER_DIR))
    os.replace(tmp, final)
    latest = os.path.join(out_dir, "latest")
    with open(f"{latest}.tmp", "w") as f:
        f.write(tag)
    os.replace(f"{latest}.tmp", latest)
    return final


# ---------------------------------------------------------------------------------------------
# The two commands

def import_hf(hf_dir: str, out_dir: str, tp_size: int = 1, tokenizer_dir: str | None = None) -> str:
    """Convert an HF T5 directory into our checkpoint at `tp_size`; returns the checkpoint dir."""
    hf_cfg = read_hf_config(hf_dir)
    hf_sd = read_hf_state_dict(hf_dir)
    try:
        tokenizer = load_tokenizer(tokenizer_dir or hf_dir)
    except ValueError as e:
        raise ConversionError(f"no tokenizer in {tokenizer_dir or hf_dir} ({e}); copy the model's "
                              "spiece.model there or pass --tokenizer DIR") from None
    rows = hf_sd["shared.weight"].shape[0] if "shared.weight" in hf_sd else None
    if rows is None:
        raise ConversionError(f"{hf_dir}: the weights have no shared.weight (the T5 embedding)")
    if tokenizer.vocab_size > rows:
        raise ConversionError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's "
                              f"embedding only {rows} rows: they do not belong together")
    scaled = _scaled_head(hf_cfg)
    head = hf_sd.get("lm_head.weight")
    separate = head is not None and not torch.equal(head, hf_sd["shared.weight"])
    if scaled and separate:
        raise ConversionError(f"{hf_dir}: the config scales the decoder output for a tied head "
                              "(T5 v1.0) but lm_head.weight differs from shared.weight; this "
                              "layout is not one T5 version uses")
    cfg = t5_config_from_hf(hf_cfg, tokenizer.vocab_size, tied=scaled)
    if tokenizer.pad_id is not None and tokenizer.pad_id != cfg.pad_token_id:
        raise ConversionError(f"config.json says pad_token_id={cfg.pad_token_id} but the "
                              f"tokenizer's pad id is {tokenizer.pad_id}")
    try:
        cfg.validate(tp_size)
    except ValueError as e:
        raise ConversionError(f"cannot shard over --tensor-model-parallel-size {tp_size}: {e}") from None
    shards = shard_state(t5_state_from_hf(hf_sd, cfg), cfg, tp_size)
    return write_checkpoint(out_dir, cfg, shards, tokenizer, hf_dir)


def export_hf(load_dir: str, out_dir: str, tag: str | None = None) -> str:
    """Write our checkpoint as an HF T5 directory; returns it."""
    tag = tag or read_latest_tag(load_dir)
    first, meta, ckpt_dir = read_model_states(load_dir, 0, tag=tag)
    if meta.get("model") != "t5":
        raise ConversionError(f"{ckpt_dir} holds a '{meta.get('model')}' model; export handles t5")
    shards = [first] + [read_model_states(load_dir, r, tag=tag)[0] for r in range(1, meta["tp_size"])]
    cfg = T5Config(**meta["model_config"])
    full = merge_state(shards, meta["partition_spec"])
    tokenizer = load_tokenizer(os.path.join(ckpt_dir, TOKENIZER_DIR))
    os.makedirs(out_dir, exist_ok=True)
    from safetensors.torch import save_file
    save_file(t5_state_to_hf(full, cfg), os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config_from_t5(cfg, tokenizer.eos_id), f, indent=2)
    _export_tokenizer(tokenizer, out_dir)
    return out_dir


def _export_tokenizer(tokenizer, out_dir: str):
    if not isinstance(tokenizer, SentencePieceTokenizer):
        # transformers' T5Tokenizer reads sentencepiece models only; keep ours beside the model.
        tokenizer.save(os.path.join(out_dir, "megatron_lite_tokenizer"))
        print(f"warning: a {tokenizer.kind} tokenizer has no transformers T5Tokenizer form; it is "
              f"saved in {out_dir}/megatron_lite_tokenizer (load it with "
              "megatron_lite.data.tokenizer.load_tokenizer)", file=sys.stderr)
        return
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:  # our saved form holds the model file as is
        tokenizer.save(tmp)
        shutil.copyfile(os.path.join(tmp, SP_MODEL_FILE), os.path.join(out_dir, "spiece.model"))
    specials = {f"{role}_token": tokenizer.id_to_token(i)
                for role, i in (("pad", tokenizer.pad_id), ("eos", tokenizer.eos_id),
                                ("unk", tokenizer.unk_id)) if i is not None}
    # extra_ids: sentinels appended above the model (HF layout); 0 when they are in the model.
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": tokenizer.num_extra_ids,
              "model_max_length": 1_000_000, **specials}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(specials, f, indent=2, ensure_ascii=False)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF T5 directory -> our checkpoint")
    imp.add_argument("hf_dir")
    imp.add_argument("out_ckpt")
    imp.add_argument("--tensor-model-parallel-size", type=int, default=1)
    imp.add_argument("--tokenizer", default=None,
                     help="tokenizer directory or spiece.model (default: the HF directory's)")
    exp = sub.add_parser("export", help="our checkpoint -> HF T5 directory")
    exp.add_argument("ckpt")
    exp.add_argument("out_hf_dir")
    exp.add_argument("--tag", default=None, help="checkpoint tag (default: the one 'latest' names)")
    args = p.parse_args(argv)
    try:
        if args.command == "import":
            if args.tensor_model_parallel_size < 1:
                p.error("--tensor-model-parallel-size must be >= 1")
            path = import_hf(args.hf_dir, args.out_ckpt, args.tensor_model_parallel_size,
                             args.tokenizer)
        else:
            path = export_hf(args.ckpt, args.out_hf_dir, args.tag)
    except (ConversionError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
