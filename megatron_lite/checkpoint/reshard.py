"""Resharding a checkpoint to another tensor-parallel size: the library behind `change_mp.py`.

A checkpoint saved at TP=N (DeepSpeed's layout, our metadata under META_KEY) is rewritten at TP=M:

* Every TP-sharded tensor is re-cut by the partition tags recorded in the metadata
  (`partition_spec`: name -> [partition_dim, partition_stride]), never by its name. A target
  shard is assembled from slices of the memory-mapped source shards (`reshard_tensor`), so the
  full tensor is never built. Replicated tensors are copied.
* The metadata (model config, tokenizer hash, step, consumed samples, padded vocabulary) is kept
  with tp_size = M. The vocabulary padding does not depend on TP, so it is never redone: M must
  divide the recorded padded size, as it must divide the heads and the FFN width.
* With `keep_optimizer` the optimizer follows. ZeRO stage 0 keeps a torch optimizer state inside
  each model-state file: its Adam moments are resharded like the weights (resume at stage 0).
  ZeRO-1/2/3 shards are rewritten in DeepSpeed's universal checkpoint layout
  (`<tag>/zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt`, each a full, unsharded tensor), which
  DeepSpeed slices again for whatever TP and DP size loads it (`"checkpoint": {"load_universal":
  true}`, which the trainer sets by itself: `resume_engine_config`).

Memory: sources are opened memory-mapped (file-backed pages, which do not count as anonymous
memory and which the kernel drops as needed); target shards are built and written one at a time,
so anonymous memory peaks near one target shard (benchmarks/reshard.py measures it). DeepSpeed
is never imported: its ZeRO shards pickle three small DeepSpeed classes, which are read through
an explicit allowlist of stand-ins (`_DS_GLOBALS`), never with `weights_only=False`.

ZeRO-3 model-state files hold placeholders; the trainer's save also writes each TP rank's
gathered weights to `mp_rank_XX_model_states.pt` (see `checkpointing.save_checkpoint`), which is
what is read here.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch

import megatron_lite.models  # noqa: F401  (registers the architectures)
from megatron_lite.checkpoint.checkpointing import (META_KEY, TOKENIZER_DIR, list_step_tags,
                                                    model_state_path, read_latest_tag,
                                                    read_metadata, zero3_model_state_path)
from megatron_lite.checkpoint.metadata import CheckpointMeta, MetadataError
from megatron_lite.checkpoint.verify import CheckpointInvalid, verify_tag, write_manifest
from megatron_lite.models.registry import Layout, get_model_spec
from megatron_lite.parallel import take_shard

UNIVERSAL_INFO_KEY = "universal_checkpoint_info"  # DeepSpeed's key in the model states
UNIVERSAL_DIR = "zero"                             # DeepSpeed's universal layout: <tag>/zero/<param>/
UNIVERSAL_VERSION = 0.4
_STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")

# How our metadata records what change_mp.py did: meta["reshard"]["optimizer"] is one of these.
OPT_NONE, OPT_NATIVE, OPT_UNIVERSAL = "none", "native", "universal"


class ReshardError(ValueError):
    """A checkpoint that cannot be resharded as asked; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# Tensors

def reshard_tensor(shards: list[torch.Tensor], dim: int, stride: int, target_size: int,
                   target_rank: int) -> torch.Tensor:
    """Rank `target_rank`'s shard at TP=`target_size` of the tensor whose TP shards are `shards`.

    Equal to `take_shard(merge_shards(shards, dim, stride), dim, target_size, target_rank,
    stride)`, but built from slices of the sources: only the target shard is allocated, which
    keeps memory near one target shard when the sources are memory-mapped. The result owns its
    storage (never a view of a source), so saving it writes only its own bytes.
    """
    n = len(shards)
    local = shards[0].size(dim)
    if local % stride:
        raise ValueError(f"shard dimension {dim} of size {local} is not a multiple of stride {stride}")
    block = local // stride            # rows of one stride block held by one source rank
    full_block = block * n
    if full_block % target_size:
        raise ValueError(f"dimension {dim} of size {full_block * stride} (stride {stride}) cannot be "
                         f"split into {target_size} tensor-parallel shards")
    piece = full_block // target_size  # rows of one stride block held by one target rank
    parts = []
    for b in range(stride):
        pos, end = target_rank * piece, (target_rank + 1) * piece
        while pos < end:  # walk the source ranks that cover [pos, end) of this block
            rank, offset = divmod(pos, block)
            take = min(end - pos, block - offset)
            parts.append(shards[rank].narrow(dim, b * block + offset, take))
            pos += take
    if len(parts) > 1:
        return torch.cat(parts, dim=dim)
    if parts[0].shape == shards[0].shape:  # the same cut as a source shard: pass it through
        return _owned(shards[target_rank * piece // block])
    return parts[0].clone()


def shard_state_dict(full: dict, spec, config, tp_size: int) -> list[dict]:
    """Each TP rank's state dict, cut from a full (TP=1) one along the model's partition tags
    (a converter's output: tools/convert_hf.py). A missing key or a wrong shape is an error
    naming it."""
    layout = spec.layout(config, tp_size)
    shards = []
    for rank in range(tp_size):
        shard = {}
        for key, want in layout.shapes.items():
            if key not in full:
                raise ReshardError(f"no weights for '{key}'")
            t, tag = full[key], layout.tags[key]
            if tag is not None:
                t = take_shard(t, tag[0], tp_size, rank, tag[1])
            if tuple(t.shape) != want:
                raise ReshardError(f"'{key}' has shape {tuple(t.shape)} but the model expects "
                                   f"{want} on TP rank {rank} of {tp_size}")
            shard[key] = t.clone().contiguous()
        shards.append(shard)
    return shards


def _merge(shards: list[torch.Tensor], tag) -> torch.Tensor:
    """The full tensor (TP=1) from TP shards; `tag` is (dim, stride) or None if replicated."""
    if tag is None:
        return _owned(shards[0])
    return reshard_tensor(shards, tag[0], tag[1], 1, 0)


def _owned(t):
    """`t` with storage of its own. Saving a memory-mapped tensor writes its whole storage, which
    is right for a tensor loaded on its own but not for a view into a larger buffer."""
    if not torch.is_tensor(t):
        return t
    if t.untyped_storage().nbytes() == t.numel() * t.element_size() and t.is_contiguous():
        return t
    return t.clone(memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------
# Reading DeepSpeed's optimizer shards without DeepSpeed

class _FragmentAddress:
    """Stand-in for deepspeed.utils.tensor_fragment.fragment_address (numel, start)."""


class _LossScaler:
    """Stand-in for DeepSpeed's LossScaler; its state is kept as read, never written back."""

    def __setstate__(self, state):
        self.state = state


def _zero_stage(value):
    """Stand-in for DeepSpeed's ZeroStageEnum (an int enum)."""
    return int(value)


# The only non-torch globals DeepSpeed 0.19 pickles into its ZeRO optimizer shards.
_DS_GLOBALS = [
    (_FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
    (_LossScaler, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_zero_stage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
]


def _load(path: str, what: str, *, ds_classes: bool = False) -> dict:
    """torch.load(path) memory-mapped and weights-only, with errors that name the file."""
    if not os.path.isfile(path):
        raise ReshardError(f"{path} is missing: {what}. Copy the complete checkpoint directory "
                           f"(every mp_rank_* and *_optim_states.pt file of the tag)")
    try:
        if ds_classes:
            with torch.serialization.safe_globals(_DS_GLOBALS):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001  (a truncated zip, a foreign pickle, ...)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ReshardError(f"cannot read {path} ({what}): {reason}. The file is truncated or is "
                           f"not a checkpoint file; copy it again from where it was saved") from None


# ---------------------------------------------------------------------------------------------
# The source checkpoint

@dataclass
class Source:
    """A checkpoint opened for resharding (every file memory-mapped)."""
    load_dir: str
    tag: str
    ckpt_dir: str
    meta: CheckpointMeta
    tp_size: int
    modules: list            # per TP rank: the module state dict
    states: list             # per TP rank: the whole model-state record
    ds_fields: dict          # DeepSpeed's fields of the model states (rank 0)
    zero3: bool
    optimizer: str           # "none" | "stage0" | "zero12" | "zero3" | "universal"
    optim_files: dict = field(default_factory=dict)  # (tp, dp) -> path of a ZeRO shard


def open_checkpoint(load_dir: str, tag: str | None = None) -> Source:
    """Open the checkpoint `latest` (or `tag`) names in `load_dir`, checking it is complete."""
    if not os.path.isdir(load_dir):
        raise ReshardError(f"{load_dir} is not a directory: give the checkpoint directory (the "
                           f"--save directory of training, which holds 'latest')")
    if tag is None:
        try:
            tag = read_latest_tag(load_dir)
        except FileNotFoundError as e:
            raise ReshardError(str(e)) from None
    ckpt_dir = os.path.join(load_dir, tag)
    if not os.path.isdir(ckpt_dir):
        tags = ", ".join(t for _, t in list_step_tags(load_dir)) or "none"
        raise ReshardError(f"{ckpt_dir} does not exist (tags in {load_dir}: {tags})")
    try:
        warning = verify_tag(ckpt_dir)
    except CheckpointInvalid as e:
        raise ReshardError(str(e)) from None
    if warning:
        print(f"warning: {warning}", file=sys.stderr)

    zero3_file = zero3_model_state_path(ckpt_dir, 0)
    zero3 = os.path.isfile(zero3_file)
    first_path = model_state_path(ckpt_dir, 0)
    if zero3 and not os.path.isfile(first_path):
        raise ReshardError(f"{ckpt_dir} is a ZeRO-3 checkpoint without gathered weights (its "
                           f"model-state files hold placeholders): it was saved by an older "
                           f"trainer. Resume it at ZeRO-3 and save again, which writes "
                           f"{os.path.basename(first_path)}")
    first = _load(first_path, "the model states of tensor-parallel rank 0")
    raw = first.get(META_KEY) if isinstance(first, dict) else None
    if raw is None or "module" not in first:
        raise ReshardError(f"{first_path} has no '{META_KEY}' metadata: it was not written by "
                           f"megatron_lite's trainer, so its partition tags and config are unknown "
                           f"and it cannot be resharded")
    try:
        meta = CheckpointMeta.from_dict(raw, first_path)
    except MetadataError as e:
        raise ReshardError(str(e)) from None
    tp = meta.tp_size
    states = [first]
    for r in range(1, tp):
        path = model_state_path(ckpt_dir, r)
        state = _load(path, f"the model states of tensor-parallel rank {r} of {tp}")
        if not isinstance(state, dict) or META_KEY not in state or "module" not in state:
            raise ReshardError(f"{path} has no '{META_KEY}' metadata or no 'module' weights: it "
                               f"does not belong to this checkpoint")
        if state[META_KEY].get("tp_size") != tp or state[META_KEY].get("step") != meta.step:
            raise ReshardError(f"{path} comes from another checkpoint (tp_size "
                               f"{state[META_KEY].get('tp_size')}, step {state[META_KEY].get('step')}; "
                               f"rank 0 has tp_size {tp}, step {meta.step})")
        states.append(state)
    extra = model_state_path(ckpt_dir, tp)
    if os.path.exists(extra):
        raise ReshardError(f"{ckpt_dir} holds {os.path.basename(extra)}, but its metadata says "
                           f"tensor-parallel size {tp}: the directory mixes two checkpoints")

    ds_source = _load(zero3_file, "DeepSpeed's ZeRO-3 model states") if zero3 else first
    ds_fields = {k: v for k, v in ds_source.items() if k not in ("module", META_KEY)}
    src = Source(load_dir=load_dir, tag=tag, ckpt_dir=ckpt_dir, meta=meta, tp_size=tp,
                 modules=[s["module"] for s in states], states=states, ds_fields=ds_fields,
                 zero3=zero3, optimizer="none")
    _find_optimizer(src)
    return src


_OPTIM_RE = re.compile(r"^(?:bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def _find_optimizer(src: Source) -> None:
    """Which optimizer state the checkpoint holds, and where."""
    reshard_info = src.meta.reshard or {}
    if reshard_info.get("optimizer") == OPT_UNIVERSAL:
        src.optimizer = "universal"
        return
    for name in sorted(os.listdir(src.ckpt_dir)):
        m = _OPTIM_RE.match(name)
        if m:
            src.optim_files[(int(m.group(2)), int(m.group(1)))] = os.path.join(src.ckpt_dir, name)
    if src.optim_files:
        src.optimizer = "zero3" if src.zero3 else "zero12"
    elif isinstance(src.states[0].get("optimizer"), dict) and "state" in src.states[0]["optimizer"]:
        src.optimizer = "stage0"


# ---------------------------------------------------------------------------------------------
# Validation against the model code

def model_layout(meta: CheckpointMeta, tp_size: int) -> Layout:
    """The layout the registered model gives the checkpoint's config at `tp_size`."""
    spec = get_model_spec(meta.model, module=meta.model_module)
    return spec.layout(spec.make_config(meta.model_config), tp_size)


@dataclass
class Plan:
    src: Source
    target_tp: int
    tags: dict            # state-dict key -> (dim, stride) or None, from the recorded spec
    alias: dict
    param_order: list
    target_shapes: dict


def plan_reshard(src: Source, target_tp: int) -> Plan:
    """Check that `src` reshards to `target_tp`; every error is raised before anything is written."""
    meta = src.meta
    if not isinstance(target_tp, int) or target_tp < 1:
        raise ReshardError(f"TARGET_MP must be a positive integer, got {target_tp!r}")
    where = os.path.join(src.ckpt_dir, "mp_rank_00_model_states.pt")
    try:
        get_model_spec(meta.model, module=meta.model_module)
    except KeyError as e:
        raise ReshardError(f"{where}: {e.args[0]}") from None
    try:
        here = model_layout(meta, src.tp_size)
    except (TypeError, ValueError) as e:
        raise ReshardError(f"{where}: the model config in its metadata does not build at its own "
                           f"tensor-parallel size {src.tp_size}: {e}") from None
    try:
        there = model_layout(meta, target_tp)
    except (TypeError, ValueError) as e:
        raise ReshardError(f"cannot reshard {src.ckpt_dir} to tensor-parallel size {target_tp}: "
                           f"{e}") from None
    padded = int(meta.padded_vocab_size)
    if padded % target_tp:
        raise ReshardError(f"cannot reshard to tensor-parallel size {target_tp}: the padded "
                           f"vocabulary ({padded}, recorded in the checkpoint and never re-padded) "
                           f"is not divisible by it")

    recorded = {k: (int(v[0]), int(v[1])) for k, v in meta.partition_spec.items()}
    unknown = sorted(set(recorded) - set(here.shapes))
    if unknown:
        raise ReshardError(f"{where}: partition_spec names {unknown[:5]}, which the '{meta.model}' "
                           f"model does not have")
    tags = {}
    for key in here.shapes:
        canon = here.alias[key]
        tag = recorded.get(canon)
        if tag != here.tags[canon]:
            raise ReshardError(
                f"{where}: {canon} is recorded as {_describe(tag)} but the '{meta.model}' model "
                f"code shards it as {_describe(here.tags[canon])}; the checkpoint was written by "
                f"a different version of the model")
        tags[key] = tag

    for r, module in enumerate(src.modules):
        path = model_state_path(src.ckpt_dir, r)
        missing = [k for k in here.shapes if k not in module]
        extra = [k for k in module if k not in here.shapes]
        if missing or extra:
            raise ReshardError(f"{path}: its weights do not match the '{meta.model}' model of its "
                               f"config (missing {missing[:5]}, unexpected {extra[:5]})")
        for key, want in here.shapes.items():
            got = tuple(module[key].shape)
            if got != want:
                raise ReshardError(
                    f"{path}: {key} has shape {got}, but the config in the metadata "
                    f"({_config_summary(meta.model_config)}) gives {want} at tensor-parallel "
                    f"size {src.tp_size}: the weights and the metadata disagree")
    for key, tag in tags.items():
        if tag is not None:
            full = here.shapes[key][tag[0]] * src.tp_size
            if full % (tag[1] * target_tp):
                raise ReshardError(f"cannot reshard to tensor-parallel size {target_tp}: {key} has "
                                   f"{full} rows along dim {tag[0]} (stride {tag[1]}), not divisible")
    return Plan(src, target_tp, tags, here.alias, here.param_order, there.shapes)


def _describe(tag) -> str:
    return "replicated" if tag is None else f"sharded along dim {tag[0]} (stride {tag[1]})"


def _config_summary(cfg: dict) -> str:
    keys = [k for k in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                        "vocab_size") if k in cfg]
    return ", ".join(f"{k}={cfg[k]}" for k in keys)


# ---------------------------------------------------------------------------------------------
# Writing

@dataclass
class ReshardResult:
    out_dir: str
    tag: str
    source_tp: int
    target_tp: int
    optimizer: str
    bytes_written: int
    largest_shard_bytes: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.bytes_written / 1e6 / max(self.seconds, 1e-9)


def default_out_dir(load_dir: str, target_tp: int) -> str:
    """`<CKPT_DIR>_MP<TARGET_MP>`, as Chinese-Transformer-XL's change_mp.py names it."""
    return f"{os.path.normpath(load_dir)}_MP{target_tp}"


def reshard_checkpoint(load_dir: str, target_tp: int, out_dir: str | None = None, *,
                       tag: str | None = None, keep_optimizer: bool = False,
                       log: Callable[[str], None] | None = None) -> ReshardResult:
    """Write the checkpoint of `load_dir` (its `latest`, or `tag`) at TP=`target_tp` to `out_dir`.

    `out_dir` (default `<load_dir>_MP<target_tp>`) must not exist; it is written under a
    temporary name beside it and renamed at the end, so a failure leaves nothing behind."""
    log = log or (lambda msg: None)
    start = time.perf_counter()
    out_dir = out_dir or default_out_dir(load_dir, target_tp)
    if os.path.lexists(out_dir):
        raise ReshardError(f"{out_dir} already exists: remove it or choose another --out")
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise ReshardError(f"{parent} (where --out {out_dir} would go) does not exist")
    src = open_checkpoint(load_dir, tag)
    plan = plan_reshard(src, target_tp)
    opt_kind = OPT_NONE
    if keep_optimizer:
        if src.optimizer == "none":
            raise ReshardError(f"{src.ckpt_dir} holds no optimizer state (was it resharded "
                               f"without --keep-optimizer?); drop --keep-optimizer to reshard "
                               f"the weights only")
        _check_optimizer_files(src)
        opt_kind = OPT_NATIVE if src.optimizer == "stage0" else OPT_UNIVERSAL

    tmp_root = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        tag_dir = os.path.join(tmp_root, src.tag)
        os.makedirs(tag_dir)
        largest = 0
        for t in range(target_tp):
            path = model_state_path(tag_dir, t)
            torch.save(_target_record(plan, t, opt_kind), path)
            size = os.path.getsize(path)
            largest = max(largest, size)
            log(f"wrote {src.tag}/{os.path.basename(path)} ({size / 1e6:.1f} MB)")
            if opt_kind == OPT_UNIVERSAL:
                # DeepSpeed's ZeRO-3 reads the model states of a universal checkpoint under
                # ZeRO-3's file name: the same file, linked.
                _link_or_copy(path, zero3_model_state_path(tag_dir, t))
        if opt_kind == OPT_UNIVERSAL:
            _write_universal(plan, os.path.join(tag_dir, UNIVERSAL_DIR), log)
        tokenizer = os.path.join(src.ckpt_dir, TOKENIZER_DIR)
        if os.path.isdir(tokenizer):
            shutil.copytree(tokenizer, os.path.join(tag_dir, TOKENIZER_DIR))
        write_manifest(tag_dir)
        with open(os.path.join(tmp_root, "latest"), "w") as f:
            f.write(src.tag)
        files = {}  # inode -> size: a linked file is written once
        for d, _, names in os.walk(tmp_root):
            for n in names:
                st = os.stat(os.path.join(d, n))
                files[(st.st_dev, st.st_ino)] = st.st_size
        written = sum(files.values())
        if os.path.lexists(out_dir):
            raise ReshardError(f"{out_dir} appeared while resharding; remove it or choose another --out")
        os.rename(tmp_root, out_dir)
    except BaseException:
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise
    return ReshardResult(out_dir, src.tag, src.tp_size, target_tp, opt_kind, written, largest,
                         time.perf_counter() - start)


def merged_state_dict(load_dir: str, tag: str | None = None):
    """The TP=1 weights of a checkpoint saved at any TP size, checked like a reshard.

    Returns (state dict, metadata with tp_size 1, checkpoint dir, alias) where alias maps every
    key to the first key holding the same tensor (tied weights). Replicated tensors stay
    memory-mapped; sharded ones are merged."""
    src = open_checkpoint(load_dir, tag)
    plan = plan_reshard(src, 1)
    record = _target_record(plan, 0, OPT_NONE)
    meta = CheckpointMeta.from_dict(record[META_KEY], src.ckpt_dir).replace(reshard=None)
    return record["module"], meta, src.ckpt_dir, plan.alias


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copy2(src, dst)


def _target_record(plan: Plan, t: int, opt_kind: str) -> dict:
    """The model-state record of target rank `t`: DeepSpeed's fields, the weights, our metadata."""
    src, m = plan.src, plan.target_tp
    module = OrderedDict()
    for key, first in src.modules[0].items():
        canon = plan.alias[key]
        if canon != key and canon in module:  # tied weights stay one tensor
            module[key] = module[canon]
            continue
        tag = plan.tags[key]
        if tag is None:
            module[key] = _owned(first)
        else:
            module[key] = reshard_tensor([mod[key] for mod in src.modules], tag[0], tag[1], m, t)

    record = dict(src.ds_fields)
    record["module"] = module
    record["optimizer"] = _stage0_optimizer(plan, t) if opt_kind == OPT_NATIVE else None
    record["mp_world_size"] = m
    if isinstance(record.get("checkpoint_parallel_dimensions"), dict):
        record["checkpoint_parallel_dimensions"] = {**record["checkpoint_parallel_dimensions"],
                                                    "tp_degree": m}
    if record.get("param_shapes"):
        record["param_shapes"] = [OrderedDict((name, torch.Size(plan.target_shapes[name]))
                                              for name in group) for group in record["param_shapes"]]
    if UNIVERSAL_INFO_KEY in record:
        record[UNIVERSAL_INFO_KEY] = universal_checkpoint_info(
            plan.src.meta.partition_spec, plan.target_shapes, plan.param_order, m)
    # Per-rank stream state belongs to the source's rank layout: a resharded run starts its
    # streams afresh.
    record[META_KEY] = src.meta.replace(
        tp_size=m, reshard={"source_tp": src.tp_size, "optimizer": opt_kind},
        stream_state=None).to_dict()
    return record


def _stage0_optimizer(plan: Plan, t: int) -> dict:
    """ZeRO stage 0's torch optimizer state at target rank `t`: moments resharded like their
    parameters. Entries are numbered in `named_parameters()` order, as DeepSpeed built them."""
    sources = [s["optimizer"] for s in plan.src.states]
    src_state = sources[0]["state"]
    if any(not isinstance(i, int) or not 0 <= i < len(plan.param_order) for i in src_state):
        raise ReshardError(f"{plan.src.ckpt_dir}: the optimizer state has entries "
                           f"{sorted(src_state)[:5]}... for a model of {len(plan.param_order)} "
                           f"parameters; it does not match the model")
    state = {}
    for i, entry in src_state.items():
        name = plan.param_order[i]
        tag = plan.tags[name]
        shard_shape = tuple(plan.src.modules[0][name].shape)
        new = {}
        for k, v in entry.items():
            if torch.is_tensor(v) and v.dim() > 0:
                if tuple(v.shape) != shard_shape:
                    raise ReshardError(f"{plan.src.ckpt_dir}: optimizer state '{k}' of parameter "
                                       f"{i} has shape {tuple(v.shape)}, but parameter {i} "
                                       f"({name}) has shape {shard_shape}")
                new[k] = (_owned(v) if tag is None else
                          reshard_tensor([s["state"][i][k] for s in sources], tag[0], tag[1],
                                         plan.target_tp, t))
            else:
                new[k] = _owned(v)
        state[i] = new
    return {"state": state, "param_groups": sources[0]["param_groups"]}


def _check_optimizer_files(src: Source) -> None:
    """Every ZeRO shard present and readable, before anything is written."""
    if src.optimizer in ("zero12", "zero3"):
        dps = sorted({dp for (_, dp) in src.optim_files})
        want = {(tp, dp) for tp in range(src.tp_size) for dp in range(len(dps))}
        missing = sorted(want - set(src.optim_files))
        if missing or dps != list(range(len(dps))):
            tp, dp = (missing or [(0, len(dps))])[0]
            raise ReshardError(f"{src.ckpt_dir}: the ZeRO optimizer shard of tensor-parallel rank "
                               f"{tp}, data-parallel rank {dp} (zero_pp_rank_{dp}_mp_rank_{tp:02d}_"
                               f"optim_states.pt) is missing")
        for (tp, dp), path in sorted(src.optim_files.items()):
            _load(path, f"ZeRO optimizer shard of TP rank {tp}, DP rank {dp}", ds_classes=True)
    elif src.optimizer == "universal":
        path = os.path.join(src.ckpt_dir, UNIVERSAL_DIR, "optimizer_state.pt")
        if not os.path.isfile(path):
            raise ReshardError(f"{path} is missing: the universal optimizer state is incomplete")


# ---------------------------------------------------------------------------------------------
# ZeRO optimizer state -> DeepSpeed's universal layout

def _write_universal(plan: Plan, zero_dir: str, log) -> None:
    """Write `<tag>/zero/`: per parameter, its full fp32 master weight and Adam moments, and the
    optimizer's global state. The layout does not depend on TP or DP: DeepSpeed slices it for the
    run that loads it."""
    src = plan.src
    if src.optimizer == "universal":  # already TP-independent: carry it over
        shutil.copytree(os.path.join(src.ckpt_dir, UNIVERSAL_DIR), zero_dir)
        return
    os.makedirs(zero_dir)
    shards = {key: _load(path, "ZeRO optimizer shard", ds_classes=True)["optimizer_state_dict"]
              for key, path in src.optim_files.items()}
    dp_size = 1 + max(dp for (_, dp) in shards)
    if src.optimizer == "zero12":
        groups, step_of = _zero12_params(plan, shards, dp_size)
    else:
        groups, step_of = _zero3_params(plan, shards, dp_size)
    count = 0
    for group, params in enumerate(groups):
        for name, read in params:
            tag = plan.tags[name]
            out = os.path.join(zero_dir, name)
            os.makedirs(out)
            for key in _STATE_KEYS:
                full = _merge([read(tp, key) for tp in range(src.tp_size)], tag)
                record = {"param": full}
                if tag is not None:
                    # DeepSpeed re-cuts along cat_dim, in `param_n_sub_params` blocks: our stride.
                    record["cat_dim"] = tag[0]
                    if tag[1] > 1:
                        record["param_n_sub_params"] = tag[1]
                torch.save(record, os.path.join(out, f"{key}.pt"))
            step = step_of(group)
            if step is not None:
                torch.save(_owned(step), os.path.join(out, "step.pt"))
            count += 1
    torch.save(_universal_global_state(src, shards[(0, 0)], step_of(0)),
               os.path.join(zero_dir, "optimizer_state.pt"))
    log(f"wrote {count} parameters' fp32 weights and Adam moments in DeepSpeed's universal layout")


def _zero12_params(plan: Plan, shards: dict, dp_size: int):
    """ZeRO-1/2: each DP rank holds a slice of a flat fp32 buffer per parameter group;
    `param_slice_mappings` says where each parameter's piece lies in it."""
    src = plan.src
    shapes = src.ds_fields.get("param_shapes")
    first = shards[(0, 0)]
    if not shapes or len(shapes) != len(first["single_partition_of_fp32_groups"]):
        raise ReshardError(f"{src.ckpt_dir}: the model states lack DeepSpeed's param_shapes for "
                           f"its ZeRO optimizer groups")

    def reader(group, name):
        def read(tp, key):
            pieces = []
            for dp in range(dp_size):
                sd = shards[(tp, dp)]
                address = sd["param_slice_mappings"][group].get(name)
                if address is None:
                    continue
                flat = (sd["single_partition_of_fp32_groups"][group] if key == "fp32"
                        else sd["base_optimizer_state"]["state"][group][key])
                pieces.append(flat.narrow(0, address.start, address.numel))
            shape = tuple(src.modules[tp][name].shape)
            if sum(p.numel() for p in pieces) != math.prod(shape):
                raise ReshardError(f"{src.ckpt_dir}: the ZeRO shards of TP rank {tp} hold "
                                   f"{sum(p.numel() for p in pieces)} elements of {name}, which "
                                   f"has shape {shape}")
            return torch.cat(pieces).view(shape)
        return read

    groups = [[(name, reader(g, name)) for name in group] for g, group in enumerate(shapes)]

    def step_of(group):
        return first["base_optimizer_state"]["state"].get(group, {}).get("step")
    return groups, step_of


def _zero3_params(plan: Plan, shards: dict, dp_size: int):
    """ZeRO-3: each DP rank holds ceil(numel / dp) elements of every parameter (the last rank's
    piece padded), concatenated per sub-group in `param_shapes` order."""
    src = plan.src
    shapes = {}
    for tp in range(src.tp_size):
        path = zero3_model_state_path(src.ckpt_dir, tp)
        shapes[tp] = _load(path, "DeepSpeed's ZeRO-3 model states")["param_shapes"]
    first = shards[(0, 0)]
    if first.get("partition_count", dp_size) != dp_size:
        raise ReshardError(f"{src.ckpt_dir}: ZeRO-3 partition count {first['partition_count']} "
                           f"but {dp_size} data-parallel shards")

    offsets = {}  # (tp, group, name) -> where the parameter's piece starts in each DP rank's buffer
    for tp in range(src.tp_size):
        for group, group_shapes in enumerate(shapes[tp]):
            offset = 0
            for name, shape in group_shapes.items():
                offsets[(tp, group, name)] = offset
                offset += math.ceil(math.prod(shape) / dp_size)

    def reader(group, name):
        def read(tp, key):
            offset = offsets[(tp, group, name)]
            numel = math.prod(shapes[tp][group][name])
            part = math.ceil(numel / dp_size)
            pieces = []
            for dp in range(dp_size):
                sd = shards[(tp, dp)]
                flat = (sd["fp32_flat_groups"][group] if key == "fp32"
                        else sd["optimizer_state_dict"]["state"][group][key])
                pieces.append(flat.narrow(0, offset, part))
            return torch.cat(pieces)[:numel].view(tuple(shapes[tp][group][name]))
        return read

    groups = [[(name, reader(g, name)) for name in group] for g, group in enumerate(shapes[0])]

    def step_of(group):
        return first["optimizer_state_dict"]["state"].get(group, {}).get("step")
    return groups, step_of


def _universal_global_state(src: Source, sd: dict, step) -> dict:
    """`zero/optimizer_state.pt`: the optimizer's hyperparameters and flags, in the keys that
    DeepSpeed's ZeRO-1/2 and ZeRO-3 universal loaders read. The loss scaler is not carried over:
    fp32 training has none, and a dynamic fp16 scale re-learns itself within a few steps."""
    if src.optimizer == "zero12":
        param_groups = sd["base_optimizer_state"]["param_groups"]
    else:
        param_groups = sd["optimizer_state_dict"]["param_groups"]
    out = {"param_groups": param_groups,
           "optimizer_state_dict": {"state": {0: {"step": _owned(step)}},
                                    "param_groups": param_groups},
           "ds_version": sd.get("ds_version") or src.ds_fields.get("ds_version", "0.0.0")}
    for key in ("dynamic_loss_scale", "overflow", "clip_grad", "partition_count"):
        if key in sd:
            out[key] = sd[key]
    if "zero_stage" in sd:
        out["zero_stage"] = int(sd["zero_stage"])
    return out


# ---------------------------------------------------------------------------------------------
# DeepSpeed's universal-checkpoint info, and resuming from what change_mp.py wrote

def universal_checkpoint_info(partition_spec: dict, shapes: dict, param_names: list,
                              tp_size: int) -> dict:
    """DeepSpeed's `universal_checkpoint_info` for a model, from its partition tags.

    Lets DeepSpeed's own `ds_to_universal.py` convert our checkpoints: every parameter is named
    exactly (anchored patterns, no wildcards). Replicated parameters are TP-replicated; dim-1
    shards are row-parallel (cat_dim 1); dim-0 shards are DeepSpeed's default; other dims or
    strides are sub-parameters with their per-rank widths. No vocabulary patterns: our vocabulary
    padding does not depend on TP and must not be stripped.

    `shapes` are the local (per-rank) shapes at `tp_size`; `param_names` lists every parameter.
    """
    replicated, row, sub_params, widths = [], [], [], {}
    for name in param_names:
        pattern = f"^{re.escape(name)}$"
        tag = partition_spec.get(name)
        if tag is None:
            replicated.append(pattern)
            continue
        dim, stride = int(tag[0]), int(tag[1])
        if stride == 1 and dim == 0:
            continue
        if stride == 1 and dim == 1:
            row.append(pattern)
            continue
        full = list(shapes[name])
        full[dim] *= tp_size
        block = full[dim] // stride
        shape = list(full)
        shape[dim] = tuple([block] * stride)
        sub_params.append({"patterns": [pattern], "shape": shape, "partition_dim": dim})
        widths[pattern] = [[block // tp_size] * tp_size for _ in range(stride)]
    info = {"universal_checkpoint_version": UNIVERSAL_VERSION,
            "tp_replicated_parameter_patterns": replicated,
            "parameter_with_row_parallelism_patterns": row}
    if sub_params:
        info["parameter_with_sub_params"] = sub_params
        info["sub_param_shard_widths"] = widths
    return info


def layout_universal_checkpoint_info(layout: Layout, tp_size: int) -> dict:
    """`universal_checkpoint_info` of a model's layout at `tp_size` (DeepSpeed saves a module
    attribute of that name into every model-state file)."""
    return universal_checkpoint_info(layout.partition_spec, layout.shapes, layout.param_order,
                                     tp_size)


def resume_engine_config(load_dir: str, ds_config: dict, tp_size: int, *,
                         finetune: bool, tag: str | None = None) -> dict:
    """The DeepSpeed config to resume from `load_dir`, given what change_mp.py wrote there.

    A checkpoint resharded with --keep-optimizer from ZeRO-1/2/3 holds its optimizer in the
    universal layout, which DeepSpeed loads only with `checkpoint.load_universal`; one resharded
    without it holds weights only, fit to fine-tune (`--finetune`) but not to resume. Anything
    else (including checkpoints this cannot read) is left to the normal load path."""
    try:
        tag = tag or read_latest_tag(load_dir)
        info = read_metadata(load_dir, tag).reshard
    except Exception:  # noqa: BLE001  (the trainer's own load reports unreadable checkpoints)
        return ds_config
    if not info or finetune:
        return ds_config
    where = os.path.join(load_dir, tag)
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    kind = info.get("optimizer")
    if kind == OPT_NONE:
        raise ValueError(f"{where} was resharded by change_mp.py without --keep-optimizer: it holds "
                         f"the weights only. Fine-tune from it (--finetune), or reshard the "
                         f"original with --keep-optimizer to resume training")
    if kind == OPT_NATIVE and stage != 0:
        raise ValueError(f"{where} holds ZeRO stage 0 optimizer state (it was trained at stage 0); "
                         f"resume it at stage 0 (configs/deepspeed/zero0.json), not stage {stage}")
    if kind == OPT_UNIVERSAL:
        if stage == 0:
            raise ValueError(f"{where} holds its optimizer state in DeepSpeed's universal layout, "
                             f"which ZeRO stage 0 cannot load: resume with ZeRO stage 1 or 2 "
                             f"(e.g. --deepspeed_config configs/deepspeed/zero1.json)")
        if stage == 3 and tp_size > 1:
            raise ValueError(f"{where}: DeepSpeed's ZeRO-3 loads a universal checkpoint only at "
                             f"tensor-parallel size 1; resume at ZeRO stage 1 or 2 at TP={tp_size}")
        ds_config = dict(ds_config)
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    return ds_config
