"""Training throughput of one of our models against its transformers twin, on one rank.

    python benchmarks/train_throughput.py                        # --model gpt: tiny + linglong-106m
    python benchmarks/train_throughput.py --model t5 --steps 15 --threads 1 --out BENCHMARKS.md
    python benchmarks/train_throughput.py --model longformer --shapes tiny --compile

`--model NAME` is a registry name (gpt, t5, longformer, transformer_xl, longnet). For each shape
(configs/<NAME>/<shape>.yaml, or a path to such a YAML) the rows train on the same random batches
of the model's objective, each wrapped by the trainer's engine (`build_engine`) with the same
config (our build_deepspeed_config over configs/deepspeed/zero<N>.json, ZeRO stage 0 by default:
one rank has nothing to partition; fp32, torch AdamW, fused):
  - ours, built by the registry record (`spec.build`) and initialised as the trainer does;
  - ours with the fused head and loss off (`fused_head_loss = False`), where the module has it;
  - ours with the config's sparse attention, where it has one (the first row is then dense);
  - the record's `benchmark_peer` (transformers' model of the same shape), where it has one;
    GPT-2 also with the fused tanh GELU ours uses;
  - with --compile, instead: ours and the peer, eager and through DeepSpeed's
    `engine.compile()`, in a section of their own (a compiled row that fails is reported with
    its error and leaves the table). Compiled rows slow every row of their process, so they are
    kept out of the main run.
Dropout is off everywhere: the timing compares the math, not random masks. A step is forward +
backward + optimizer step through the engine. After the warm-up the rows are timed in rounds of
one step each, in turn, each round starting one row later (A B C, B C A, C A B ...), so a slow
spell on a shared machine hits all of them and no row always follows the same other one; the
table gives medians, and ours/theirs is the median of the per-round throughput ratios. MFU
uses the registry's FLOPs per sample for every row (one formula, so the ratio is fair). Peak
memory is each row's RSS high-water mark in a fresh process: in a shared process the high-water
mark only grows, so later rows would inherit earlier ones' peaks.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.metadata
import inspect
import logging
import math
import multiprocessing
import os
import statistics
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/train_throughput.py` from a checkout
    sys.path.insert(0, ROOT)

from benchmarks.report import (allocator_line, peak_rss_bytes, provenance,  # noqa: E402
                               update_section)

import psutil  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from megatron_lite import cpu_kernels  # noqa: E402
from megatron_lite.models import get_model_spec, model_names  # noqa: E402
from megatron_lite.parallel import ParallelState, RNGContext, gemm, initialize_parameters  # noqa: E402
from megatron_lite.parallel.launch import free_port, keep_freed_memory  # noqa: E402
from megatron_lite.training.config import (TrainingConfig, build_deepspeed_config,  # noqa: E402
                                           parse_config)
from megatron_lite.training.engine import build_engine  # noqa: E402
from megatron_lite.training.mfu import peak_flops_per_rank  # noqa: E402
from megatron_lite.training.trainer import detached_state  # noqa: E402

# Per-model defaults, looked up by registry name (configs live in configs/<name>/). `vocab`
# stands in for configs that leave vocab_size to the tokenizer; `marker` keeps the BENCHMARKS.md
# blocks of the scripts this one replaced where they are.
MODELS = {
    "gpt": dict(title="GPT", marker="train_throughput", shapes=["tiny", "linglong-106m"],
                seq_length=1024, vocab=13312),  # LingLong's vocabulary
    "t5": dict(title="T5", shapes=["tiny", "longlm-small"], seq_length=512,
               decoder_seq_length=128, vocab=32128),  # LongLM's: 32000 pieces + 100 sentinels
    "longformer": dict(title="Longformer", shapes=["tiny", "longformer-zh-base"],
                       seq_length=1024, vocab=21128),  # BERT-Chinese's vocab.txt
    "transformer_xl": dict(title="Transformer-XL", shapes=["tiny"], seq_length=512,
                           vocab=50001),  # Chinese-Transformer-XL's
    "longnet": dict(title="LongNet", shapes=["tiny", "longnet-base"], seq_length=2048,
                    vocab=13312),
}
DEFAULT_VOCAB = 32000  # a model registered from elsewhere (--model-module), without a preset

# Goals of issue 17: ours at least this many times its transformers twin's speed, in wall and CPU
# time (goal 2: GPT against GPT-2 with its own gelu_new; goal 3: T5).
GOALS = {"gpt": 1.15, "t5": 1.10}

# Kernels ours and its peer run alike: GEMMs of the same shapes (ours' partly on oneDNN,
# `megatron_lite.parallel.gemm`, the peer's on torch's BLAS), the flash attention
# kernels and the fused optimizer. No model lever takes work out of them, so the peer's step over
# the time ours spends in them is the most ours/theirs can reach (the ceiling of each goal line).
SHARED_KERNELS = frozenset({
    "aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm",
    "mkldnn::_linear_pointwise",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::_fused_adamw_"})

# Why a model has no peer row (the registry record has no benchmark_peer).
NO_PEER = {
    "transformer_xl": "transformers removed TransfoXL after 4.35 (this machine has "
                      "{transformers}), and no other package here implements it",
    "longnet": "transformers has no LongNet, and torchscale (Microsoft's reference) is not "
               "installed",
}


def section_markers(model: str, compiled: bool = False) -> tuple[str, str, str]:
    """(section title, begin marker, end marker) of `model`'s BENCHMARKS.md section; `compiled`:
    of its --compile run's section."""
    preset = MODELS.get(model, {})
    tag = preset.get("marker", f"train_throughput_{model}") + ("_compile" if compiled else "")
    title = preset.get("title", model) + (", torch.compile" if compiled else "")
    return (f"## Training throughput ({title})",
            f"<!-- {tag}:begin (generated by benchmarks/train_throughput.py --model {model}"
            f"{' --compile' if compiled else ''}; edits inside are overwritten) -->",
            f"<!-- {tag}:end -->")


@dataclasses.dataclass
class Variant:
    key: str
    """"ours" | "ours-unfused" | "ours-sparse" | "hf" | "hf-tanh", "+compile" appended to the
    compiled rows."""
    model_name: str
    """Registry name (rebuilt from it in the memory probe's fresh process)."""
    label: str
    """Model shown in the table."""
    attention: str
    """Attention kind shown in the table."""
    cfg: Any
    """Our config of this shape; it sizes the peer and gives the FLOPs count of the row."""
    peer_args: tuple | None = None
    """None: ours; else the peer, built with benchmark_peer(cfg, *peer_args)."""
    fused_head_loss: bool = True
    """Ours: the module's fused head and loss lever, where it has one."""
    compile: str = ""
    """The torch.compile backend of a row compiled through DeepSpeed's engine.compile(); "":
    eager."""
    onednn: bool = True
    """Ours: the layers' GEMMs on oneDNN where they apply (`megatron_lite.parallel.gemm`);
    False: on torch's BLAS."""
    attention_kernel: bool = True
    """Ours: attention on our C++ kernel where it applies (`megatron_lite.cpu_kernels`); False:
    on torch's kernels."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="gpt",
                   help=f"registry name: {', '.join(model_names())}")
    p.add_argument("--shapes", nargs="+", default=None,
                   help="configs/<model>/<name>.yaml names or YAML paths (their model: section); "
                        "default: the model's preset list")
    p.add_argument("--seq-length", type=int, nargs="+", default=None,
                   help="tokens per sample (T5: encoder tokens): one value for every shape, or "
                        "one per shape; default: the model's preset")
    p.add_argument("--decoder-seq-length", type=int, default=None,
                   help="decoder tokens per sample, for an encoder-decoder (T5: 128 by default)")
    p.add_argument("--micro-batch-size", type=int, nargs="+", default=[1],
                   help="samples per step: one value for every shape, or one per shape")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model")
    p.add_argument("--steps", type=int, default=5, help="timed rounds (one step per model each)")
    p.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3],
                   help="engine config configs/deepspeed/zero<N>.json (0: what the trainer "
                        "advises for one data-parallel rank; ZeRO there only adds copies)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch threads; every core this process may use unless set")
    p.add_argument("--peak-flops", type=float, default=None,
                   help="peak FLOP/s for MFU; unset: the cached fp32 matmul probe")
    p.add_argument("--hf-activation", default="gelu_new", choices=["gelu_new", "gelu_pytorch_tanh"],
                   help="GPT only: GPT-2's own tanh GELU written as pointwise ops (gelu_new), or "
                        "the same function as one fused torch kernel, as ours uses")
    p.add_argument("--compile", action="store_true",
                   help="a run of its own: ours and the peer, eager and through DeepSpeed's "
                        "engine.compile() (torch.compile; compiled in the first warm-up step), "
                        "written to the section '<model>, torch.compile'. A model whose "
                        "state grows (Transformer-XL's memory) recompiles until it is full: "
                        "give it --warmup >= mem_length / seq-length + 2")
    p.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager"],
                   help="with --compile: torch.compile's backend. aot_eager traces the same "
                        "graphs (dynamo and AOT autograd) without generating kernels, in seconds "
                        "instead of a minute: for smoke runs, not for figures")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the peak-RSS probes (a fresh process per row, seconds of imports "
                        "each): for smoke runs")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default=None,
                   help="markdown file whose 'Training throughput (<model>)' section gets the "
                        "results (created if missing; the generated block is replaced on rerun)")
    args = p.parse_args(argv)
    if args.model not in model_names():
        p.error(f"--model {args.model}: unknown; known models: {', '.join(model_names())}")
    if args.hf_activation != "gelu_new" and not _peer_takes_activation(get_model_spec(args.model)):
        p.error(f"--hf-activation: the {args.model} peer has no activation choice; drop the flag")
    preset = MODELS.get(args.model, {})
    args.shapes = args.shapes or preset.get("shapes", ["tiny"])
    args.decoder_seq_length = args.decoder_seq_length or preset.get("decoder_seq_length")
    for name in ("seq_length", "micro_batch_size"):  # one value per shape
        values = getattr(args, name) or [preset.get(name)]
        if len(values) not in (1, len(args.shapes)):
            p.error(f"--{name.replace('_', '-')}: {len(values)} values for {len(args.shapes)} "
                    "shapes; give one value for every shape, or one per shape")
        setattr(args, name + "s", values * len(args.shapes) if len(values) == 1 else values)
    for name in ("seq_lengths", "micro_batch_sizes"):
        for value in getattr(args, name):
            if value is not None and value < 1:
                p.error(f"--{name[:-1].replace('_', '-')} must be >= 1, got {value}")
    for name in ("decoder_seq_length", "steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    # The first shape's values; `for_shape` gives each shape's own.
    args.seq_length, args.micro_batch_size = args.seq_lengths[0], args.micro_batch_sizes[0]
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.compile and args.warmup < 1:
        p.error("--compile needs --warmup >= 1: the compile happens in the first step, which "
                "must not be timed")
    return args


# ---------------------------------------------------------------------------- shapes
def for_shape(args, index: int) -> argparse.Namespace:
    """`args` with the sequence length and micro-batch size of the index-th shape of --shapes."""
    return argparse.Namespace(**{**vars(args), "seq_length": args.seq_lengths[index],
                                 "micro_batch_size": args.micro_batch_sizes[index]})


def load_shape(model: str, shape: str, args) -> tuple[Any, Any]:
    """(model config, data config) of configs/<model>/<shape>.yaml at the run's lengths, dropout
    off, the position table long enough."""
    spec = get_model_spec(model)
    config_dir = os.path.join(ROOT, "configs", model)
    path = shape if shape.endswith((".yaml", ".yml")) else os.path.join(config_dir, f"{shape}.yaml")
    if not os.path.isfile(path):
        known = (sorted(n[:-5] for n in os.listdir(config_dir) if n.endswith(".yaml"))
                 if os.path.isdir(config_dir) else [])
        raise SystemExit(f"--shapes: {path} does not exist; known shapes of {model}: "
                         f"{', '.join(known) or 'none'} (or pass a path to a YAML with a model: "
                         "section)")
    run = parse_config(["--config", path], spec.config_cls, data_config_cls=spec.data_config_cls)
    cfg, data = run.model, run.data
    lengths = {"seq_length": args.seq_length or data.seq_length}
    if args.decoder_seq_length is not None:
        if not hasattr(data, "decoder_seq_length"):
            raise SystemExit(f"--decoder-seq-length: the '{model}' data config has no decoder; "
                             "drop the flag")
        lengths["decoder_seq_length"] = args.decoder_seq_length
    data = dataclasses.replace(data, **lengths)
    changes = {"vocab_size": cfg.vocab_size or MODELS.get(model, {}).get("vocab", DEFAULT_VOCAB)}
    # Dropout draws random masks that only one side would pay for; the timing compares the math.
    for name in ("hidden_dropout", "attention_dropout"):
        if hasattr(cfg, name):
            changes[name] = 0.0
    if hasattr(cfg, "max_position_embeddings"):  # room for the segment (and XL's memory)
        need = data.seq_length + getattr(cfg, "mem_length", 0)
        changes["max_position_embeddings"] = max(cfg.max_position_embeddings, need)
    return dataclasses.replace(cfg, **changes), data


def attention_label(cfg) -> str:
    """What a row's attention computes, from the config's fields."""
    if getattr(cfg, "sparse_attention", False):
        return (f"sparse on odd layers (stride {cfg.sparse_stride}, summary "
                f"{cfg.sparse_summary})")
    if hasattr(cfg, "attention_window"):
        return f"sliding window {'/'.join(map(str, cfg.attention_window))}"
    if hasattr(cfg, "segment_lengths"):
        return (f"dilated, segments {'/'.join(map(str, cfg.segment_lengths))}, rates "
                f"{'/'.join(map(str, cfg.dilation_rates))}")
    if hasattr(cfg, "mem_length"):
        return f"relative, memory {cfg.mem_length}"
    return "dense"


def _peer_takes_activation(spec) -> bool:
    return spec.benchmark_peer is not None and \
        "activation" in inspect.signature(spec.benchmark_peer).parameters


def variants(model: str, cfg, args) -> list[Variant]:
    spec = get_model_spec(model)
    sparse = getattr(cfg, "sparse_attention", False)
    base = dataclasses.replace(cfg, sparse_attention=False) if sparse else cfg
    title = f"megatron_lite {MODELS.get(model, {}).get('title', model)}"
    with torch.device("meta"):  # does the module have the fused head lever? (no memory)
        probe = spec.build(base, ParallelState.virtual(1, 0), RNGContext(0))
    out = [Variant("ours", model, title, attention_label(base), base)]
    if hasattr(probe, "fused_head_loss"):
        out.append(Variant("ours-unfused", model, f"{title}, logits then loss (lever off)",
                           attention_label(base), base, fused_head_loss=False))
    if gemm.onednn_available() and model in GOALS:  # the GEMM lever where a goal is at stake
        out.append(Variant("ours-blas", model, f"{title}, GEMMs on torch's BLAS (lever off)",
                           attention_label(base), base, onednn=False))
    if cpu_kernels.attention_kernel() is not None and model in GOALS:  # the attention lever
        out.append(Variant("ours-torch-attention", model,
                           f"{title}, attention on torch's kernels (lever off)",
                           attention_label(base), base, attention_kernel=False))
    if sparse:
        out.append(Variant("ours-sparse", model, title, attention_label(cfg), cfg))
    peers = []
    if spec.benchmark_peer is not None:
        if _peer_takes_activation(spec):
            activations = [args.hf_activation]
            if args.hf_activation == "gelu_new":  # for honesty: GPT-2 with the fused GELU ours uses
                activations.append("gelu_pytorch_tanh")
            peers = [Variant(key, model, "", attention_label(base), base, (act,))
                     for key, act in zip(("hf", "hf-tanh"), activations)]
        else:
            peers = [Variant("hf", model, "", attention_label(base), base, ())]
    out += peers
    if args.compile:
        # A run of its own, ours and the peer eager and compiled: in a process where inductor's
        # kernels have run, every row's step slowed (tiny GPT: 0.12 s to 1.1 s), so compiled rows
        # would distort the other rows' figures.
        eager = [out[0], *peers[:1]]
        out = eager + [dataclasses.replace(v, key=v.key + "+compile",
                                           compile=args.compile_backend) for v in eager]
    return out


# ---------------------------------------------------------------------------- batches
# One synthetic batch maker per objective (docs/ARCHITECTURE.md, the batch contract): `(step, cfg, data
# config, micro batch, generator) -> batch`. Ids are of the true vocabulary.
def _causal_lm(step, cfg, data, b, g):
    s = data.seq_length
    tokens = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=g)
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(b, s),
            "position_ids": torch.arange(s).expand(b, s)}


def _t5_mixed(step, cfg, data, b, g):
    # No pad id (0) in the ids; the decoder input is the labels shifted right behind id 0.
    enc = torch.randint(1, cfg.vocab_size, (b, data.seq_length), generator=g)
    labels = torch.randint(1, cfg.vocab_size, (b, data.decoder_seq_length), generator=g)
    dec = torch.cat([torch.zeros(b, 1, dtype=torch.long), labels[:, :-1]], dim=1)
    return {"encoder_input_ids": enc, "decoder_input_ids": dec, "labels": labels,
            "loss_mask": torch.ones(b, data.decoder_seq_length)}


def _wwm_mlm(step, cfg, data, b, g):
    n = data.seq_length
    ids = torch.randint(1, cfg.vocab_size, (b, n), generator=g)  # 0 is [PAD]
    predicted = torch.rand(b, n, generator=g) < data.masked_lm_prob
    predicted[:, 1] = True  # at least one target per row, whatever the draw
    glob = torch.zeros(b, n, dtype=torch.long)
    if data.global_attention_cls:  # [CLS] global, as the FLOPs count assumes
        glob[:, 0] = 1
    return {"input_ids": ids, "labels": torch.where(predicted, ids, torch.full_like(ids, -100)),
            "attention_mask": torch.ones(b, n, dtype=torch.long), "global_attention_mask": glob,
            "token_type_ids": torch.zeros(b, n, dtype=torch.long)}


def _xl_stream(step, cfg, data, b, g):
    batch = _causal_lm(step, cfg, data, b, g)
    # One long document per row: it starts at the first segment, later segments read the memory
    # (a document start in every row's first column would make the model skip the memory).
    start = torch.zeros(b, data.seq_length, dtype=torch.bool)
    start[:, 0] = step == 0
    return {**batch, "document_start": start}


BATCHES = {"causal_lm": _causal_lm, "t5_mixed": _t5_mixed, "wwm_mlm": _wwm_mlm,
           "xl_stream": _xl_stream}


def make_batch(model: str, step: int, cfg, data, micro_batch: int, seed: int) -> dict:
    """The batch of `step`: every row sees the same one."""
    spec = get_model_spec(model)
    maker = BATCHES.get(spec.objective)
    if maker is None:
        raise SystemExit(f"--model {model}: no synthetic batch for its objective "
                         f"'{spec.objective}'; add one to BATCHES in benchmarks/train_throughput.py")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return maker(step, cfg, data, micro_batch, g)


# ---------------------------------------------------------------------------- engines and steps
class LossForward(nn.Module):
    """The model's loss as a forward: the step goes through the engine's forward, and
    engine.compile() (which compiles forward) then covers the whole loss."""

    def __init__(self, inner: nn.Module, stream_state: bool):
        super().__init__()
        self.inner, self.stream_state = inner, stream_state

    def forward(self, batch, state=None):
        if self.stream_state:
            return self.inner.loss(batch, state)
        return (*self.inner.loss(batch), None)


def build_module(v: Variant, ps: ParallelState, seed: int) -> nn.Module:
    spec = get_model_spec(v.model_name)
    if v.peer_args is not None:
        torch.manual_seed(seed)
        return spec.benchmark_peer(v.cfg, *v.peer_args)
    module = spec.build(v.cfg, ps, RNGContext(seed, ps.dp_rank, ps.tp_rank))
    if hasattr(module, "fused_head_loss"):
        module.fused_head_loss = v.fused_head_loss
    initialize_parameters(module, seed, ps)
    return module


def make_engine(v: Variant, tcfg: TrainingConfig, ds_path: str, ps: ParallelState, seed: int):
    spec = get_model_spec(v.model_name)
    module = LossForward(build_module(v, ps, seed), spec.stream_state and v.peer_args is None)
    engine, _ = build_engine(module, build_deepspeed_config(tcfg, ps.dp_size, ds_path), ps)
    engine.train()
    if v.compile:
        # Graph breaks (our label checks read a tensor's value) would print a warning each.
        torch._logging.set_logs(dynamo=logging.ERROR)
        engine.compile(backend=v.compile)  # lazy: traced and compiled in the first step
    return engine


def train_step(engine, v: Variant, batch: dict, state):
    """One step; the model's next per-stream state (XL memory), detached, or None."""
    gemm.use_onednn(v.onednn)
    cpu_kernels.use_attention_kernel(v.attention_kernel)
    loss, _, state = engine(batch, state)
    engine.backward(loss)
    engine.step()
    value = loss.item()
    if not math.isfinite(value):
        raise RuntimeError(f"{v.key}: non-finite loss {value}; the timing would be meaningless")
    return detached_state(state)


def shared_kernel_seconds(engine, v: Variant, batch: dict) -> float:
    """Seconds one profiled training step of `v` (a model without per-stream state) spends in
    SHARED_KERNELS, their own time (not their callers')."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train_step(engine, v, batch, None)
    return sum(e.self_cpu_time_total for e in prof.key_averages()
               if e.key in SHARED_KERNELS) / 1e6


def count_params(module) -> int:
    # parameters() lists a tied weight once; under ZeRO-3 a parameter is an empty placeholder
    # whose full size DeepSpeed keeps in ds_numel.
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def peer_label(module: nn.Module, v: Variant) -> str:
    label = f"HF {type(getattr(module, 'model', module)).__name__}"
    return label + (f" ({v.peer_args[0]})" if v.peer_args else "")


# ---------------------------------------------------------------------------- process setup
def _quiet(peer: bool):
    from deepspeed.utils import logger as ds_logger
    # Its per-engine banners and the "lr before the first step" warning would bury the table.
    ds_logger.setLevel(logging.ERROR)
    if peer:  # a second of imports that a model without a peer need not pay
        import transformers
        transformers.logging.set_verbosity_error()


_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _init_single_rank() -> bool:
    """A one-rank gloo world for DeepSpeed; True if we created it (and must destroy it)."""
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise SystemExit("train_throughput measures one rank: run it as a plain process, not "
                             f"under a launcher with {dist.get_world_size()} ranks")
        return False
    # A fresh port, never an inherited MASTER_PORT: memory probes run while the parent holds its.
    port = free_port()
    # deepspeed.initialize insists on the launcher's variables even for one plain process.
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    return True


def _memory_probe(v: Variant, data, tcfg: TrainingConfig, ds_path: str, micro_batch: int,
                  threads: int, seed: int, steps: int) -> tuple[int, int]:
    """(RSS before building, RSS high-water mark after `steps` steps) of `v`, in bytes.

    Runs in a fresh process, set up as the parent."""
    keep_freed_memory()
    torch.set_num_threads(threads)
    # Every probe of a model imports the same packages, so the baselines agree.
    _quiet(get_model_spec(v.model_name).benchmark_peer is not None)
    _init_single_rank()
    try:
        ps = ParallelState.from_world(1)
        baseline = psutil.Process().memory_info().rss
        engine = make_engine(v, tcfg, ds_path, ps, seed)
        state = None
        # Two steps: the first allocates Adam's moments, the second is a steady-state step.
        for step in range(steps):
            state = train_step(engine, v, make_batch(v.model_name, step, v.cfg, data, micro_batch,
                                                     seed), state)
        return baseline, peak_rss_bytes()
    finally:
        dist.destroy_process_group()


def measure_memory(v: Variant, data, tcfg, ds_path, args) -> tuple[int, int]:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_memory_probe, (v, data, tcfg, ds_path, args.micro_batch_size,
                                          args.threads, args.seed, 2))


# ---------------------------------------------------------------------------- the benchmark
def timed_rounds(shape, todo, engines, data, args) -> tuple[dict, dict, dict, dict]:
    """Wall and CPU seconds of each row's timed steps, taken in turn, one step per round, the
    wall seconds of each row's first step (a compiled row's compile), and why a compiled row
    failed (it leaves the table; the eager rows go on)."""
    cfg = todo[0].cfg
    todo = list(todo)
    failed = {}

    def batch(step):
        return make_batch(args.model, step, cfg, data, args.micro_batch_size, args.seed)

    states = {v.key: None for v in todo}  # per-stream state, carried as the trainer does
    first = {}

    def step(v, b) -> bool:
        """One step of `v`; False if it is a compiled row that failed (it leaves the table)."""
        start = time.perf_counter()
        try:
            states[v.key] = train_step(engines[v.key], v, b, states[v.key])
        except Exception as e:  # inductor's failures are many and deep; the report says which
            if not v.compile:
                raise
            failed[v.key] = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
            print(f"[{shape}] {v.key}: torch.compile failed: {failed[v.key]}", file=sys.stderr,
                  flush=True)
            todo.remove(v)
            return False
        first.setdefault(v.key, time.perf_counter() - start)
        return True

    for s in range(args.warmup):
        b = batch(s)
        for v in list(todo):
            step(v, b)
    wall = {v.key: [] for v in todo}
    # CPU time of the process (all threads) is a second opinion on a loaded machine: time spent
    # descheduled inflates the wall clock, not the CPU clock (spinning threads blur it somewhat).
    cpu = {v.key: [] for v in todo}
    for r in range(args.steps):
        b = batch(args.warmup + r)
        # Each round starts at the next row: a step runs after whichever row freed its memory
        # before it (a different model's buffers, faulted in afresh), and that cost moves
        # around instead of always falling on the same row.
        for v in todo[r % len(todo):] + todo[:r % len(todo)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            if step(v, b):
                wall[v.key].append(time.perf_counter() - start)
                cpu[v.key].append(time.process_time() - start_cpu)
        print(f"[{shape}] round {r + 1}/{args.steps}: "
              + ", ".join(f"{v.key} {wall[v.key][-1]:.2f}s (cpu {cpu[v.key][-1]:.2f}s)"
                          for v in todo), file=sys.stderr, flush=True)
    return wall, cpu, first, failed


def bench_shape(shape: str, cfg, data, args, tcfg: TrainingConfig, ds_path: str,
                ps: ParallelState, peak: float) -> list[dict]:
    spec = get_model_spec(args.model)
    todo = variants(args.model, cfg, args)
    memory = {v.key: (float("nan"), float("nan")) for v in todo}
    for v in todo if not args.no_memory else ():
        if v.compile:  # inductor's own memory is not the model's; and a second compile is slow
            continue
        print(f"[{shape}] memory probe: {v.key}", file=sys.stderr, flush=True)
        memory[v.key] = measure_memory(v, data, tcfg, ds_path, args)

    engines = {}
    try:
        for v in todo:
            engines[v.key] = make_engine(v, tcfg, ds_path, ps, args.seed)
            if v.peer_args is not None:
                v.label = peer_label(engines[v.key].module.inner, v) + (
                    " (torch.compile)" if v.compile else "")
            elif v.compile:
                v.label += " (torch.compile)"
        params = {k: count_params(e.module) for k, e in engines.items()}
        if "hf" in params and params["hf"] != params["ours"]:
            raise RuntimeError(f"{shape}: the peer has {params['hf']:,} parameters but ours "
                               f"{params['ours']:,}; the shapes differ, so the comparison is not "
                               "like for like")
        wall, cpu, first, failed = timed_rounds(shape, todo, engines, data, args)
        kernel_s = {}
        # The goal line's ceiling (SHARED_KERNELS), where a goal is set against the peer
        if args.model in GOALS and "hf" in wall and not args.compile:
            b = make_batch(args.model, args.warmup + args.steps, cfg, data,
                           args.micro_batch_size, args.seed)
            kernel_s = {v.key: shared_kernel_seconds(engines[v.key], v, b)
                        for v in todo if v.key in ("ours", "hf")}
    finally:
        # Engines sit in DeepSpeed's registries until destroyed; the next shape needs the memory.
        for engine in engines.values():
            engine.destroy()
        del engines
        gc.collect()

    b = args.micro_batch_size
    dense_flops = spec.sample_cost(todo[0].cfg, data)[1]
    # A compiled row that failed is reported as such (its key, label and the error).
    rows = [dict(shape=shape, key=v.key, model=v.label, failed=failed[v.key])
            for v in todo if v.key in failed]
    for v in todo:
        if v.key in failed:
            continue
        tokens, flops = spec.sample_cost(v.cfg, data)
        median = statistics.median(wall[v.key])
        baseline, peak_rss = memory[v.key]
        row = dict(
            shape=shape, key=v.key, model=v.label, attention=v.attention, params=params[v.key],
            step_s=median, step_s_min=min(wall[v.key]), step_s_max=max(wall[v.key]),
            first_step_s=first[v.key], cpu_s=statistics.median(cpu[v.key]),
            tokens_per_s=b * tokens / median, mfu=b * flops / median / peak,
            # The same FLOPs over the step's CPU seconds, against one thread's share of the peak:
            # time other jobs took from us does not count against the model.
            mfu_cpu=b * flops / statistics.median(cpu[v.key]) / (peak / args.threads),
            mfu_dense_count=b * dense_flops / median / peak, peak_rss_mb=peak_rss / 2**20,
            baseline_rss_mb=baseline / 2**20, ours_over_theirs=None, ours_over_theirs_cpu=None,
            shared_kernel_s=kernel_s.get(v.key))
        if "hf" in wall:  # paired per round: the rows ran back to back, under the same load
            row["ours_over_theirs"] = statistics.median(
                h / o for h, o in zip(wall["hf"], wall[v.key]))
            row["ours_over_theirs_cpu"] = statistics.median(
                h / o for h, o in zip(cpu["hf"], cpu[v.key]))
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- report
def _lengths(cfg, data, args) -> str:
    if getattr(data, "decoder_seq_length", None) is not None:
        text = f"encoder {data.seq_length} + decoder {data.decoder_seq_length} tokens"
    else:
        text = f"sequence {data.seq_length}"
    if getattr(cfg, "mem_length", 0):
        text += f" (+ a memory of {cfg.mem_length} positions, carried from step to step)"
    return text


def render(rows: list[dict], args, argv: list[str], ds_path: str, tcfg: TrainingConfig,
           peak: float, started: datetime.datetime, load: tuple[float, float],
           shapes: list[tuple]) -> str:
    """The section's block; `shapes`: (name, its args, model config, data config) per shape."""
    spec = get_model_spec(args.model)
    failures = [r for r in rows if "failed" in r]
    rows = [r for r in rows if "failed" not in r]
    peak_source = ("--peak-flops" if args.peak_flops else "best of 5 fp32 4096³ matmuls on torch's BLAS "
                   "and on oneDNN, cached")
    has_peer = any(r["key"] == "hf" for r in rows)
    sparse = any(r["key"] == "ours-sparse" for r in rows)
    decoder = getattr(shapes[0][3], "decoder_seq_length", None) is not None
    setups = [f"micro-batch {a.micro_batch_size}, {_lengths(cfg, data, a)}"
              for _, a, cfg, data in shapes]
    if len(set(setups)) > 1:
        setups = [f"{name}: {setup}" for (name, *_), setup in zip(shapes, setups)]
    cols = ["shape", "model", "attention", "params", "step s, median (min–max)", "CPU s / step",
            "tokens/s (enc+dec)" if decoder else "tokens/s", "MFU", "MFU by CPU time"]
    cols += ["MFU, dense count"] if sparse else []
    cols += ["first step s (compile)"] if args.compile else []
    cols += ["peak RSS MB (before build)"]
    kernels = any(r.get("shared_kernel_s") is not None for r in rows)
    cols += ["GEMM, attention, optimizer s"] if kernels else []
    cols += ["ours/theirs: wall (CPU)"] if has_peer else []
    lines = [
        *provenance(__file__, argv, started, load_start=load[0], threads=args.threads,
                    note="The machine is shared with other people's jobs, so absolute figures "
                    "wander; the interleaved, per-round ours/theirs ratio is the figure to rely "
                    "on."),
        f"- Peak: {peak / 1e9:.1f} GFLOP/s fp32 ({peak_source})",
        f"- Engine: DeepSpeed, {os.path.relpath(ds_path, ROOT)} (ZeRO stage {args.zero_stage}), "
        f"fp32, torch AdamW (fused), gradient clipping {tcfg.clip_grad}; "
        f"{'; '.join(dict.fromkeys(setups))}; {args.warmup} warm-up step(s), "
        f"{args.steps} timed round(s) per model",
        allocator_line(args.kept_freed_memory),
        "",
        "| " + " | ".join(cols) + " |",
        "|---|---|---|" + "---:|" * (len(cols) - 3),
    ]
    for r in rows:
        cells = [r["shape"], r["model"], r["attention"], f"{r['params'] / 1e6:.1f} M",
                 f"{r['step_s']:.3f} ({r['step_s_min']:.3f}–{r['step_s_max']:.3f})",
                 f"{r['cpu_s']:.3f}", f"{r['tokens_per_s']:,.0f}", f"{100 * r['mfu']:.1f}%",
                 f"{100 * r['mfu_cpu']:.1f}%"]
        cells += [f"{100 * r['mfu_dense_count']:.1f}%"] if sparse else []
        cells += [f"{r['first_step_s']:.2f}"] if args.compile else []
        cells += ["not measured" if math.isnan(r["peak_rss_mb"]) else
                  f"{r['peak_rss_mb']:,.0f} ({r['baseline_rss_mb']:,.0f})"]
        if kernels:
            cells += ["" if r.get("shared_kernel_s") is None else f"{r['shared_kernel_s']:.3f}"]
        if has_peer:
            cells += ["1 (reference)" if r["key"] == "hf" else
                      f"{r['ours_over_theirs']:.2f} ({r['ours_over_theirs_cpu']:.2f})"]
        lines.append("| " + " | ".join(cells) + " |")
    flops_fn = f"`{spec.flops_per_sample.__module__}.{spec.flops_per_sample.__name__}`"
    notes = [f"*MFU* counts the `{spec.name}` registry record's model FLOPs per sample "
             f"({flops_fn}; its docstring says what it counts) for every row, so the rows compare "
             "like for like."]
    if sparse:
        notes.append("On the sparse row it counts the keys the sparse pattern attends (its "
                     "block-sparse kernel computes only those), and *MFU, dense count* is what the "
                     "dense formula would claim.")
    if any(r["key"] == "ours-unfused" for r in rows):
        notes.append("The *logits then loss* row is ours with the full logits made first and the "
                     "cross entropy after them, as before the fused head (`fused_head_loss = "
                     "False`).")
    if any(r["key"] == "ours-blas" for r in rows):
        notes.append("The *GEMMs on torch's BLAS* row is ours with every matrix product on "
                     "torch's BLAS (MKL), where the other rows of ours run the layers' products "
                     "on oneDNN where it is faster (`megatron_lite.parallel.gemm`; "
                     "`MEGATRON_LITE_CPU_GEMM=blas` does the same).")
    if any(r["key"] == "ours-torch-attention" for r in rows):
        notes.append("The *attention on torch's kernels* row is ours with our C++ attention "
                     "kernel off (`megatron_lite.cpu_kernels`; "
                     "`MEGATRON_LITE_CPU_ATTENTION_KERNEL=0` does the same), its attention on "
                     "the torch paths it falls back to.")
    if has_peer:
        notes.append("*ours/theirs* is tokens/s of the row over tokens/s of the transformers "
                     "model (the reference row), the median of per-round ratios of wall-clock "
                     "step times; in brackets the same ratio of process CPU times, which time "
                     "spent descheduled by other jobs does not inflate.")
    if kernels:
        notes.append("*GEMM, attention, optimizer s* is the time one profiled step of the row "
                     "spends in the kernels both sides run alike (`SHARED_KERNELS` in the "
                     "script: matrix products of the same shapes, the flash attention kernels, "
                     "the fused AdamW). "
                     "No model lever removes that time, so the reference row's step over ours' "
                     "figure is the most ours/theirs can reach: the *ceiling* of the goal line, "
                     "were every other op of ours' step free.")
    if args.compile:
        notes.append("The *torch.compile* rows go through DeepSpeed's `engine.compile()` "
                     f"(backend {args.compile_backend}); their first step, which compiles, is a "
                     "warm-up step and its seconds are in *first step s*; they have no memory "
                     "probe.")
    notes.append("*Peak RSS* is the high-water mark of a fresh process that builds the model and "
                 "its engine and runs two steps; in brackets its RSS before building "
                 "(interpreter, torch, deepspeed, transformers). *MFU by CPU time* divides the "
                 "same FLOPs by the step's CPU seconds and one thread's share of the peak.")
    lines += ["", "Columns: " + " ".join(notes), ""]
    lines += [f"- torch.compile failed, {r['shape']}, {r['model']}: {r['failed']}"
              for r in failures]
    if not has_peer:
        reason = NO_PEER.get(spec.name, f"the `{spec.name}` registry record has no "
                             "benchmark_peer").format(transformers=f"transformers "
                                                      f"{importlib.metadata.version('transformers')}")
        lines.append(f"No peer: {reason}; the table times ours alone.")
    lines += [] if args.compile else goal_lines(rows, args)  # goals: the eager run's
    return "\n".join(lines).rstrip("\n")


def goal_lines(rows: list[dict], args) -> list[str]:
    """The goal's verdict per shape: ours against the peer's reference row."""
    goal = GOALS.get(args.model)
    spec = get_model_spec(args.model)
    # A peer with an activation choice (GPT-2): the goal is stated against its own activation.
    if goal is None or (_peer_takes_activation(spec) and args.hf_activation != "gelu_new"):
        return []
    theirs = {r["shape"]: r for r in rows if r["key"] == "hf"}
    lines = []
    for r in rows:
        if r["key"] != "ours" or r.get("ours_over_theirs") is None:
            continue
        line = (f"- Goal, {r['shape']}: ours/theirs ≥ {goal:.2f} in wall and CPU time: "
                f"{r['ours_over_theirs']:.2f} / {r['ours_over_theirs_cpu']:.2f}, "
                + ("pass" if min(r["ours_over_theirs"], r["ours_over_theirs_cpu"]) >= goal
                   else "FAIL"))
        if r.get("shared_kernel_s"):
            line += (f"; ceiling {theirs[r['shape']]['step_s'] / r['shared_kernel_s']:.2f} "
                     f"(theirs' {theirs[r['shape']]['step_s']:.3f} s step over ours' "
                     f"{r['shared_kernel_s']:.3f} s of GEMM, attention and optimizer kernels)")
        lines.append(line)
    return lines


def update_markdown(path: str, block: str, model: str = "gpt", compiled: bool = False) -> None:
    """Write `block` into `model`'s section (or its --compile run's) of `path`
    (benchmarks/report.py)."""
    update_section(path, *section_markers(model, compiled), block)


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    ds_path = os.path.join(ROOT, "configs", "deepspeed", f"zero{args.zero_stage}.json")
    if not os.path.isfile(ds_path):
        raise SystemExit(f"--zero-stage {args.zero_stage}: engine config {ds_path} is missing")
    # Read every shape first: a typo should fail now, not after the first shape's run.
    shapes = []
    for index, shape in enumerate(args.shapes):
        shape_args = for_shape(args, index)
        shapes.append((shape, shape_args, *load_shape(args.model, shape, shape_args)))
    _, _, first_cfg, first_data = shapes[0]
    make_batch(args.model, 0, first_cfg, first_data, 1, args.seed)  # an objective without a maker

    def training_config(micro_batch_size: int) -> TrainingConfig:
        # One micro-batch per step on one rank; a constant LR, so no schedule runs out.
        return TrainingConfig(micro_batch_size=micro_batch_size,
                              global_batch_size=micro_batch_size,
                              train_iters=args.warmup + args.steps + 2,
                              lr_decay_style="constant", seed=args.seed)

    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = os.getloadavg()[0]
    # The trainer's process setup on CPU (`init_distributed`), for every row alike.
    args.kept_freed_memory = keep_freed_memory()
    previous_threads = torch.get_num_threads()
    previous_kernel = cpu_kernels.use_attention_kernel(True)
    torch.set_num_threads(args.threads)
    _quiet(get_model_spec(args.model).benchmark_peer is not None)
    env_before = {k: os.environ.get(k) for k in _LAUNCHER_ENV}
    owns_dist = _init_single_rank()
    try:
        peak = peak_flops_per_rank(torch.float32, override=args.peak_flops)
        ps = ParallelState.from_world(1)
        rows = []
        for shape, shape_args, cfg, data in shapes:
            rows += bench_shape(shape, cfg, data, shape_args,
                                training_config(shape_args.micro_batch_size), ds_path, ps, peak)
    finally:
        if owns_dist:
            dist.destroy_process_group()
            for key, value in env_before.items():  # leave a calling test's environment as it was
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        torch.set_num_threads(previous_threads)
        cpu_kernels.use_attention_kernel(previous_kernel)
    block = render(rows, args, argv, ds_path, training_config(1), peak, started,
                   (load_start, os.getloadavg()[0]), shapes)
    print(block)
    if args.out:
        update_markdown(args.out, block, args.model, args.compile)
    return rows


if __name__ == "__main__":
    main()
