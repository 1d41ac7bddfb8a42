"""Checkpoints: DeepSpeed's layout plus our metadata, written atomically.

Layout (DeepSpeed's): `<save>/<tag>/mp_rank_XX_model_states.pt`, ZeRO optimizer shards beside
them, `<save>/latest` naming the newest complete tag. Our metadata (`META_KEY` in the client
state) holds plain types only, so tools read model states with `weights_only=True`.

Atomicity: every rank writes into `<save>/<tag>.tmp` (DeepSpeed's files, and our per-rank
stream-state files beside them); after a barrier rank 0 adds the tokenizer and the manifest
(`verify.write_manifest`: every file's size and crc32), renames it to `<tag>` and only then
replaces `latest` (write-then-rename). A crash at any point leaves the previous checkpoint
complete and `latest` pointing at it; a failed write (a full disk) on any rank removes the
partial tag on every rank's word (`CheckpointSaveError`). Older checkpoints are removed
(`keep_last`) only after the new one is complete. Loading verifies first (`verify.py`).

The metadata's schema is `metadata.CheckpointMeta`; every reader here returns one.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil

import torch
import torch.distributed as dist

from megatron_lite.checkpoint.metadata import META_KEY, CheckpointMeta
from megatron_lite.checkpoint.verify import write_manifest

TOKENIZER_DIR = "tokenizer"
_TAG_RE = re.compile(r"^global_step(\d+)$")


def step_tag(step: int) -> str:
    return f"global_step{step}"


def _write_synced(path: str, text: str):
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


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


class CheckpointSaveError(RuntimeError):
    """A save that could not be completed (a full disk, say): the message is one line naming the
    directory, and every earlier checkpoint and `latest` are as they were."""


class _DeferredWrites:
    """Records the first OSError of this rank's writes instead of raising it, so every rank still
    goes through the save's collectives; the ranks then agree on it (`first_failure`) and all
    raise together, none left waiting in a barrier."""

    def __init__(self):
        self.error: tuple[str, OSError] | None = None

    def run(self, fn, *args, what: str = "", **kwargs):
        if self.error is not None:  # the save is lost already: write nothing more
            return None
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            self.error = (what or getattr(e, "filename", None) or "a checkpoint file", e)
            return None

    def first_failure(self) -> str | None:
        """Every rank's first failure, agreed by all ranks (a collective): "<error> writing
        <file>" of the lowest failing rank, or None when every write succeeded."""
        mine = (None if self.error is None else
                f"{self.error[1].strerror or self.error[1]} writing {self.error[0]}")
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return mine
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        failed = [(r, m) for r, m in enumerate(every) if m is not None]
        return None if not failed else f"{failed[0][1]} (rank {failed[0][0]})"


def save_checkpoint(engine, save_dir: str, step: int, meta: CheckpointMeta, *, tokenizer=None,
                    keep_last: int | None = None, rank_files: dict | None = None):
    """Save `engine` at `step` atomically; `meta` goes into the client state under META_KEY.

    `rank_files`: {file name: object} this rank writes into the tag beside DeepSpeed's files
    (per-rank state DeepSpeed's client state, written by one rank, cannot hold). Rank 0 lists
    every file in the tag's manifest (`verify.write_manifest`) before `latest` moves. A write
    that fails on any rank (ENOSPC) removes the partial tag and raises CheckpointSaveError on
    every rank."""
    tag = step_tag(step)
    tmp_tag = f"{tag}.tmp"
    rank = dist.get_rank() if dist.is_initialized() else 0
    final_dir = os.path.join(save_dir, tag)
    tmp_dir = os.path.join(save_dir, tmp_tag)
    writes = _DeferredWrites()
    if rank == 0:
        writes.run(os.makedirs, save_dir, exist_ok=True)
        if os.path.exists(tmp_dir):  # left by a crash mid-save: never complete, safe to drop
            shutil.rmtree(tmp_dir)
    _barrier()
    # DeepSpeed writes through its checkpoint engine (and copies its recovery script); both go
    # through `writes`, so a full disk on one rank does not break the save's barriers.
    ckpt_engine = engine.checkpoint_engine
    ds_save, ds_copy = ckpt_engine.save, engine._copy_recovery_script
    ckpt_engine.save = lambda state_dict, path: writes.run(ds_save, state_dict, path, what=path)
    engine._copy_recovery_script = lambda path: writes.run(ds_copy, path, what=path)
    try:
        engine.save_checkpoint(save_dir, tag=tmp_tag, client_state={META_KEY: meta.to_dict()},
                               save_latest=False)
    finally:
        ckpt_engine.save = ds_save
        del engine._copy_recovery_script
    if engine.zero_optimization_partition_weights():
        _save_gathered_weights(engine, tmp_dir, writes)
    for name, obj in (rank_files or {}).items():
        path = os.path.join(tmp_dir, name)
        writes.run(torch.save, obj, path, what=path)
    failure = writes.first_failure()  # also the barrier before rank 0 completes the tag
    if rank == 0 and failure is None:
        if tokenizer is not None:
            writes.run(tokenizer.save, os.path.join(tmp_dir, TOKENIZER_DIR),
                       what=os.path.join(tmp_dir, TOKENIZER_DIR))
        writes.run(write_manifest, tmp_dir, what=os.path.join(tmp_dir, "manifest.json"))
        writes.run(_publish, save_dir, tmp_dir, final_dir, tag,
                   what=os.path.join(save_dir, "latest"))
    failure = failure or writes.first_failure()
    if failure is not None:
        if rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        raise CheckpointSaveError(_save_failure(save_dir, final_dir, failure, engine))
    if rank == 0 and keep_last:
        for _, old in list_step_tags(save_dir)[:-keep_last]:
            if old != tag:
                shutil.rmtree(os.path.join(save_dir, old), ignore_errors=True)
    _barrier()
    return final_dir


def _save_failure(save_dir: str, final_dir: str, cause: str, engine) -> str:
    """One line: what failed, how much a checkpoint needs and what is free."""
    tags = list_step_tags(save_dir)
    if tags:  # the newest complete checkpoint is the best measure of the next one
        needed = sum(os.path.getsize(os.path.join(d, n))
                     for d, _, names in os.walk(os.path.join(save_dir, tags[-1][1]))
                     for n in names)
        how = f"the size of {tags[-1][1]}"
    else:  # fp32 weights, master copy and two Adam moments over the whole model
        params = sum(p.numel() for p in engine.module.parameters())
        world = dist.get_world_size() if dist.is_initialized() else 1
        needed = 16 * params * world
        how = "16 bytes per parameter"
    try:
        free = f"{shutil.disk_usage(save_dir).free:,} bytes free"
    except OSError:
        free = "free space unknown"
    return (f"cannot save checkpoint {final_dir}: {cause}; it needs about {needed:,} bytes "
            f"({how}), the filesystem has {free}. Earlier checkpoints and 'latest' are "
            f"unchanged: free space (or --save elsewhere) and resume with --load {save_dir}")


def _publish(save_dir: str, tmp_dir: str, final_dir: str, tag: str) -> None:
    """Rename a complete `tmp_dir` to `final_dir`, then point `latest` at it. The new `latest`
    is written first, so the only write that can fail comes before anything moves."""
    latest = os.path.join(save_dir, "latest")
    try:
        _write_synced(f"{latest}.tmp", tag)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(f"{latest}.tmp")
        raise
    if os.path.exists(final_dir):  # re-saving a step: swap in the new one, then drop the old
        old_dir = f"{final_dir}.old"
        shutil.rmtree(old_dir, ignore_errors=True)
        os.replace(final_dir, old_dir)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old_dir)
    else:
        os.replace(tmp_dir, final_dir)
    os.replace(f"{latest}.tmp", latest)


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
    write_manifest(tmp)
    _publish(out_dir, tmp, final, tag)
    return final


def _save_gathered_weights(engine, ckpt_dir: str, writes: _DeferredWrites):
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
        if writes.error is not None:  # DeepSpeed's record was not written
            return
        record = torch.load(ds_path, map_location="cpu", weights_only=True)
        record["module"] = module
        path = model_state_path(ckpt_dir, tp_rank)
        writes.run(torch.save, record, path, what=path)


def load_checkpoint(engine, load_dir: str, *, tag: str | None = None, finetune: bool = False,
                    strict: bool = True) -> CheckpointMeta:
    """Load the checkpoint `tag` (default: the one `latest` names) into `engine`; return our
    metadata. Verify it first (`verify.select_tag`): DeepSpeed unpickles without weights_only.

    `finetune` loads the weights only (no optimizer, scheduler or data position); `strict=False`
    (with it) loads the parameters the checkpoint and the module both have, leaving the others."""
    tag = tag or read_latest_tag(load_dir)
    _, meta, ckpt_dir = read_model_states(load_dir, 0, tag=tag)
    if meta.weights_only and not finetune:
        # A converted checkpoint (tools/convert_hf.py) has no optimizer state to resume from.
        raise ValueError(f"{ckpt_dir} holds weights only (converted from "
                         f"{meta.converted_from or 'elsewhere'}), no optimizer state to "
                         f"resume: load it with --finetune")
    path, client_state = engine.load_checkpoint(
        load_dir, tag=tag, load_module_only=finetune, load_optimizer_states=not finetune,
        load_lr_scheduler_states=not finetune, load_module_strict=strict)
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
