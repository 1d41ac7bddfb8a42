"""Checkpoints: DeepSpeed's layout plus our metadata, written atomically.

Layout (DeepSpeed's): `<save>/<tag>/mp_rank_XX_model_states.pt`, ZeRO optimizer shards beside
them, `<save>/latest` naming the newest complete tag. Our metadata (`META_KEY` in the client
state) holds plain types only, so tools read model states with `weights_only=True`.

Atomicity: every rank writes into `<save>/<tag>.tmp` (DeepSpeed's files, and our per-rank
stream-state files beside them); after a barrier rank 0 renames it to `<tag>` and only then
replaces `latest` (write-then-rename). A crash at any point leaves the previous checkpoint
complete and `latest` pointing at it. Older checkpoints are removed (`keep_last`) only after the
new one is complete.

The metadata's schema is `metadata.CheckpointMeta`; every reader here returns one.
"""
from __future__ import annotations

import os
import re
import shutil

import torch
import torch.distributed as dist

from megatron_lite.checkpoint.metadata import META_KEY, CheckpointMeta

TOKENIZER_DIR = "tokenizer"
_TAG_RE = re.compile(r"^global_step(\d+)$")


def step_tag(step: int) -> str:
    return f"global_step{step}"


def _atomic_write_text(path: str, text: str):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_latest_tag(load_dir: str) -> str:
    """The tag `latest` names, with errors that say what to do."""
    if not os.path.isdir(load_dir):
        raise FileNotFoundError(f"checkpoint directory {load_dir} does not exist")
    latest = os.path.join(load_dir, "latest")
    if not os.path.isfile(latest):
        raise FileNotFoundError(
            f"{latest} not found: {load_dir} holds no complete checkpoint (pass --load the "
            f"directory given to --save, which holds 'latest')")
    with open(latest) as f:
        tag = f.read().strip()
    if not os.path.isdir(os.path.join(load_dir, tag)):
        raise FileNotFoundError(f"{latest} names '{tag}', but {os.path.join(load_dir, tag)} is missing")
    return tag


def list_step_tags(save_dir: str) -> list[tuple[int, str]]:
    """Complete `global_stepN` tags in `save_dir`, sorted by step."""
    if not os.path.isdir(save_dir):
        return []
    tags = []
    for name in os.listdir(save_dir):
        m = _TAG_RE.match(name)
        if m and os.path.isdir(os.path.join(save_dir, name)):
            tags.append((int(m.group(1)), name))
    return sorted(tags)


def save_checkpoint(engine, save_dir: str, step: int, meta: CheckpointMeta, *, tokenizer=None,
                    keep_last: int | None = None, rank_files: dict | None = None):
    """Save `engine` at `step` atomically; `meta` goes into the client state under META_KEY.

    `rank_files`: {file name: object} this rank writes into the tag beside DeepSpeed's files
    (per-rank state DeepSpeed's client state, written by one rank, cannot hold)."""
    tag = step_tag(step)
    tmp_tag = f"{tag}.tmp"
    rank = dist.get_rank() if dist.is_initialized() else 0
    final_dir = os.path.join(save_dir, tag)
    tmp_dir = os.path.join(save_dir, tmp_tag)
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        if os.path.exists(tmp_dir):  # left by a crash mid-save: never complete, safe to drop
            shutil.rmtree(tmp_dir)
    _barrier()
    engine.save_checkpoint(save_dir, tag=tmp_tag, client_state={META_KEY: meta.to_dict()},
                           save_latest=False)
    if engine.zero_optimization_partition_weights():
        _save_gathered_weights(engine, tmp_dir)
    for name, obj in (rank_files or {}).items():
        torch.save(obj, os.path.join(tmp_dir, name))
    _barrier()
    if rank == 0:
        if tokenizer is not None:
            tokenizer.save(os.path.join(tmp_dir, TOKENIZER_DIR))
        _publish(save_dir, tmp_dir, final_dir, tag)
        if keep_last:
            for _, old in list_step_tags(save_dir)[:-keep_last]:
                if old != tag:
                    shutil.rmtree(os.path.join(save_dir, old), ignore_errors=True)
    _barrier()
    return final_dir


def _publish(save_dir: str, tmp_dir: str, final_dir: str, tag: str) -> None:
    """Rename a complete `tmp_dir` to `final_dir`, then point `latest` at it."""
    if os.path.exists(final_dir):  # re-saving a step: swap in the new one, then drop the old
        old_dir = f"{final_dir}.old"
        shutil.rmtree(old_dir, ignore_errors=True)
        os.replace(final_dir, old_dir)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old_dir)
    else:
        os.replace(tmp_dir, final_dir)
    _atomic_write_text(os.path.join(save_dir, "latest"), tag)


def write_weights_only_checkpoint(out_dir: str, meta: CheckpointMeta, shards: list[dict],
                                  tokenizer) -> str:
    """A checkpoint in the trainer's layout holding weights only (a converter's output), tag
    `global_step0`, written atomically like a save. Load it with `--finetune`."""
    import deepspeed
    tag = step_tag(0)
    final, tmp = os.path.join(out_dir, tag), os.path.join(out_dir, f"{tag}.tmp")
    if os.path.exists(final):
        raise FileExistsError(f"{final} already exists; choose an empty output directory")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    meta = meta.replace(tp_size=len(shards), weights_only=True)
    for rank, shard in enumerate(shards):
        # DeepSpeed's module-only load reads 'module' and 'dp_world_size'; the rest mirrors what
        # engine.save_checkpoint writes, minus optimizer and scheduler (hence --finetune).
        state = {"module": shard, "buffer_names": [], "optimizer": None, "lr_scheduler": None,
                 "skipped_steps": 0, "global_steps": 0, "global_samples": 0, "dp_world_size": 1,
                 "mp_world_size": len(shards), "ds_version": deepspeed.__version__,
                 META_KEY: meta.to_dict()}
        torch.save(state, model_state_path(tmp, rank))
    tokenizer.save(os.path.join(tmp, TOKENIZER_DIR))
    _publish(out_dir, tmp, final, tag)
    return final


def _save_gathered_weights(engine, ckpt_dir: str):
    """ZeRO-3's model-state files hold placeholders: write each TP rank's full weights, gathered
    over its DP group, to `mp_rank_XX_model_states.pt` (with our metadata), where our tools
    (generate.py, change_mp.py) read them. DeepSpeed's ZeRO-3 loader never opens that name."""
    import deepspeed

    ps = engine.mpu
    writer = ps.get_data_parallel_rank() == 0  # one copy per TP rank
    gathered = {}
    module = {}
    for name, tensor in engine.module.state_dict(keep_vars=True).items():
        if id(tensor) not in gathered:
            if hasattr(tensor, "ds_id"):  # a partitioned parameter: every DP rank joins the gather
                with deepspeed.zero.GatheredParameters([tensor]):
                    gathered[id(tensor)] = tensor.detach().cpu().clone() if writer else None
            else:
                gathered[id(tensor)] = tensor.detach().cpu().clone() if writer else None
        module[name] = gathered[id(tensor)]
    if writer:
        # DeepSpeed's own record of this rank (placeholders in "module"), with the real weights:
        # its zero_to_fp32.py reads every *_model_states.pt and expects DeepSpeed's fields.
        tp_rank = ps.get_tensor_model_parallel_rank()
        ds_path = zero3_model_state_path(ckpt_dir, tp_rank)
        record = torch.load(ds_path, map_location="cpu", weights_only=True)
        record["module"] = module
        torch.save(record, model_state_path(ckpt_dir, tp_rank))


def load_checkpoint(engine, load_dir: str, *, finetune: bool = False) -> CheckpointMeta:
    """Load the checkpoint `latest` names into `engine`; return our metadata.

    `finetune` loads the weights only (no optimizer, scheduler or data position)."""
    tag = read_latest_tag(load_dir)
    _, meta, ckpt_dir = read_model_states(load_dir, 0, tag=tag)
    if meta.weights_only and not finetune:
        # A converted checkpoint (tools/convert_hf.py) has no optimizer state to resume from.
        raise ValueError(f"{ckpt_dir} holds weights only (converted from "
                         f"{meta.converted_from or 'elsewhere'}), no optimizer state to "
                         f"resume: load it with --finetune")
    path, client_state = engine.load_checkpoint(
        load_dir, tag=tag, load_module_only=finetune, load_optimizer_states=not finetune,
        load_lr_scheduler_states=not finetune)
    if path is None or client_state is None or META_KEY not in client_state:
        raise ValueError(f"{os.path.join(load_dir, tag)} is not a megatron_lite checkpoint "
                         f"(no '{META_KEY}' metadata in its model states)")
    return CheckpointMeta.from_dict(client_state[META_KEY], os.path.join(load_dir, tag))


def model_state_path(ckpt_dir: str, tp_rank: int) -> str:
    return os.path.join(ckpt_dir, f"mp_rank_{tp_rank:02d}_model_states.pt")


def zero3_model_state_path(ckpt_dir: str, tp_rank: int) -> str:
    """DeepSpeed's ZeRO-3 model-state file (placeholders for the weights) of one TP rank."""
    return os.path.join(ckpt_dir, f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_model_states.pt")


def stream_state_path(ckpt_dir: str, tp_rank: int, sp_rank: int, dp_rank: int) -> str:
    """One rank's per-stream model state (`ModelSpec.stream_state`)."""
    return os.path.join(ckpt_dir, f"stream_state_dp_rank_{dp_rank}_sp_rank_{sp_rank}_"
                                  f"mp_rank_{tp_rank:02d}.pt")


def read_model_states(load_dir: str, tp_rank: int, *, tag: str | None = None
                      ) -> tuple[dict, CheckpointMeta, str]:
    """(module state dict, our metadata, checkpoint dir) of one TP rank, without DeepSpeed.

    Read with `weights_only=True` and memory-mapped, as our metadata holds plain types only."""
    tag = tag or read_latest_tag(load_dir)
    ckpt_dir = os.path.join(load_dir, tag)
    path = model_state_path(ckpt_dir, tp_rank)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: the checkpoint in {ckpt_dir} has no "
                                f"model-state file for tensor-parallel rank {tp_rank}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(state, dict) or META_KEY not in state:
        raise ValueError(f"{path} has no '{META_KEY}' metadata: not a megatron_lite checkpoint")
    return state["module"], CheckpointMeta.from_dict(state[META_KEY], path), ckpt_dir


def read_metadata(load_dir: str, tag: str | None = None) -> CheckpointMeta:
    """The metadata of a checkpoint (its TP rank 0 file)."""
    return read_model_states(load_dir, 0, tag=tag)[1]


def _barrier():
    if dist.is_initialized():
        dist.barrier()
