"""Exporting a checkpoint as safetensors: merged TP=1 weights, config and tokenizer, no pickle.

    <dir>/model.safetensors   every tensor of the model at TP=1 (tied weights stored once)
    <dir>/config.json         model name and config, vocabulary sizes, partition spec, aliases
    <dir>/tokenizer/          the checkpoint's tokenizer (plain files)

Nothing in it is unpickled when read back, so it is safe to load from an untrusted source.
`read_export` gives any TP rank its shard (cut by the partition spec), so `generate.py --load
<dir>` runs at any tensor-parallel size without resharding.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from safetensors import safe_open
from safetensors.torch import save_file

from megatron_lite.checkpoint.checkpointing import TOKENIZER_DIR
from megatron_lite.checkpoint.reshard import merged_state_dict
from megatron_lite.parallel import ParallelState, take_shard

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
EXPORT_FORMAT = "megatron_lite.safetensors"
# Metadata fields that describe the model (not the run that produced it) go into config.json.
_CONFIG_FIELDS = ("model", "model_module", "model_config", "vocab_size", "padded_vocab_size",
                  "partition_spec",
                  "tokenizer_hash", "step", "consumed_samples", "seed")


def is_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, WEIGHTS_FILE)) and \
        os.path.isfile(os.path.join(path, CONFIG_FILE))


def export_safetensors(load_dir: str, out_dir: str, *, tag: str | None = None) -> str:
    """Write the checkpoint of `load_dir` (any TP size) to `out_dir` as safetensors.

    `out_dir` must not exist; it is written under a temporary name and renamed when complete."""
    if os.path.lexists(out_dir):
        raise FileExistsError(f"{out_dir} already exists: remove it or choose another directory")
    state, meta, ckpt_dir, alias = merged_state_dict(load_dir, tag)
    tensors = {k: v.contiguous() for k, v in state.items() if alias[k] == k}
    fields = meta.to_dict()
    config = {"format": EXPORT_FORMAT, **{k: fields[k] for k in _CONFIG_FIELDS},
              "aliases": {k: a for k, a in alias.items() if a != k}}
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)
        if os.path.isdir(os.path.join(ckpt_dir, TOKENIZER_DIR)):
            shutil.copytree(os.path.join(ckpt_dir, TOKENIZER_DIR), os.path.join(tmp, TOKENIZER_DIR))
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_export(path: str, ps: ParallelState) -> tuple[dict, dict]:
    """(this TP rank's state dict, config) from an exported directory, at `ps.tp_size`."""
    with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
        config = json.load(f)
    if config.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{os.path.join(path, CONFIG_FILE)} is not a megatron_lite export "
                         f"(format {config.get('format')!r}); write one with generate.py --export")
    spec = config["partition_spec"]
    state = {}
    with safe_open(os.path.join(path, WEIGHTS_FILE), framework="pt") as f:
        for key in f.keys():
            full = f.get_tensor(key)
            if key in spec:
                dim, stride = spec[key]
                full = take_shard(full, dim, ps.tp_size, ps.tp_rank, stride).clone()
            state[key] = full
    for key, canon in config.get("aliases", {}).items():
        state[key] = state[canon]
    return state, config

