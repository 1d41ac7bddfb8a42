"""The training loop every `pretrain_*.py` entry point shares.

An entry point names its model (a registry record) and supplies a datasets provider; this module
does the rest: distributed setup, the DeepSpeed engine with our mpu, checkpoint save/resume,
evaluation, logs, and the robustness a long run needs (NaN skips, SIGTERM saves, `--keep-last`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from megatron_lite.checkpoint.checkpointing import (load_checkpoint, read_latest_tag,
                                                    save_checkpoint)
from megatron_lite.checkpoint.reshard import model_universal_checkpoint_info, resume_engine_config
from megatron_lite.data.sampler import TrainingSampler, collate
from megatron_lite.data.tokenizer import load_tokenizer
from megatron_lite.models.registry import get_model_spec
from megatron_lite.parallel import ParallelState, RNGContext, initialize_parameters
from megatron_lite.testing import free_port
from megatron_lite.training.config import (ConfigError, RunConfig, build_deepspeed_config, check_batch_sizes,
                                           parse_config)
from megatron_lite.training.logger import MetricsLogger
from megatron_lite.training.mfu import peak_flops_per_rank

# Model-config fields that may differ between a checkpoint and the run that loads it.
RUNTIME_MODEL_FIELDS = {"hidden_dropout", "attention_dropout"}


def run_main(main) -> int:
    """Run an entry point's `main()` as a command: bad configuration is a one-line error and exit
    status 2 (as argparse does), not a traceback."""
    try:
        main()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


class TrainingAborted(RuntimeError):
    """Raised when training cannot go on (e.g. too many non-finite losses in a row)."""


@dataclass
class Datasets:
    """What a datasets provider returns: map-style datasets indexed by global sample index."""
    train: object
    valid: object | None = None


def init_distributed() -> bool:
    """Initialise torch.distributed (gloo on CPU) unless a caller already did; True if we did.

    Without a launcher this is a one-rank world, so the same code runs as one plain process."""
    if dist.is_initialized():
        return False
    if "RANK" not in os.environ:
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            raise ConfigError(
                "SLURM started several tasks, but no launcher set RANK/WORLD_SIZE: each task would "
                "train alone. Run one `deepspeed --no_ssh` launcher per node under srun (README, "
                "\"Launching\")")
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    import deepspeed
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               auto_mpi_discovery=False, verbose=False)
    # One rank per core group: ranks sharing a machine split its cores instead of
    # oversubscribing them (each would otherwise start a thread per core).
    local_ranks = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE")
                      or dist.get_world_size())
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, cores // max(1, local_ranks)))
    return True


def _all_reduce(values: list[float], op=dist.ReduceOp.SUM, group=None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=op, group=group)
    return t.tolist()


def _batches(dataset, sampler):
    for indices in sampler:
        yield collate([dataset[i] for i in indices])


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _partition_spec(model) -> dict:
    """name -> [partition_dim, partition_stride] for every TP-sharded parameter."""
    return {name: [p.partition_dim, p.partition_stride]
            for name, p in model.named_parameters() if getattr(p, "tensor_model_parallel", False)}


def _check_resume_metadata(meta: dict, spec_name: str, cfg, ps: ParallelState, load_dir: str,
                           tokenizer):
    where = os.path.join(load_dir, read_latest_tag(load_dir))
    if meta.get("model") != spec_name:
        raise ValueError(f"{where} holds a '{meta.get('model')}' model, not '{spec_name}'")
    if meta.get("tp_size") != ps.tp_size:
        raise ValueError(
            f"{where} was saved at tensor-parallel size {meta.get('tp_size')}, this run uses "
            f"{ps.tp_size}; reshard it first: python change_mp.py {load_dir} {ps.tp_size}")
    if tokenizer is not None and meta.get("tokenizer_hash") not in (None, tokenizer.hash):
        raise ValueError(f"{where} was trained with tokenizer {meta.get('tokenizer_hash')}, but "
                         f"--tokenizer gives {tokenizer.hash}: use the checkpoint's tokenizer "
                         f"({os.path.join(where, 'tokenizer')})")
    saved = meta.get("model_config", {})
    for key, value in dataclasses.asdict(cfg).items():
        if key in RUNTIME_MODEL_FIELDS or key not in saved:
            continue
        if saved[key] != value:
            raise ValueError(f"{where}: model.{key} is {saved[key]!r} in the checkpoint but "
                             f"{value!r} in this run; drop the override or use the checkpoint's "
                             f"value")


class _Signals:
    """SIGTERM (a scheduler's preemption notice) asks for a save and a clean exit."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. called from a thread in tests)
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def pretrain(argv: list[str] | None, *, model_name: str,
             datasets_provider: Callable[[RunConfig, object, object, ParallelState], Datasets],
             data_config_cls: type | None = None) -> dict:
    """Parse `argv`, train, and return a summary (final step, last losses) for callers and tests.

    `data_config_cls`: the `data:` section's dataclass when the model family adds fields to
    DataConfig (T5: the decoder length and the objectives' knobs)."""
    spec = get_model_spec(model_name)
    extra = {} if data_config_cls is None else {"data_config_cls": data_config_cls}
    run = parse_config(sys.argv[1:] if argv is None else argv, spec.config_cls, **extra)
    owns_dist = init_distributed()
    try:
        return _train(run, spec, datasets_provider)
    finally:
        if owns_dist and dist.is_initialized():
            dist.destroy_process_group()


def _train(run: RunConfig, spec, datasets_provider) -> dict:
    import deepspeed

    tcfg, dcfg = run.training, run.data
    try:
        ps = ParallelState.from_world(tcfg.tensor_model_parallel_size)
    except ValueError as e:  # a launch that TP x DP cannot fill: a usage error, not a crash
        raise ConfigError(str(e)) from None
    rank0 = dist.get_rank() == 0
    check_batch_sizes(tcfg, ps.dp_size)
    grad_acc = tcfg.global_batch_size // (tcfg.micro_batch_size * ps.dp_size)

    tokenizer = load_tokenizer(dcfg.tokenizer) if dcfg.tokenizer else None
    cfg = run.model
    if tokenizer is not None and not getattr(cfg, "vocab_size", None):
        cfg = dataclasses.replace(cfg, vocab_size=tokenizer.vocab_size)
    if tokenizer is not None and cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size {cfg.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} ({dcfg.tokenizer}); leave it unset to take the "
                         f"tokenizer's")

    rng = RNGContext(tcfg.seed, dp_rank=ps.dp_rank, tp_rank=ps.tp_rank)
    model = spec.build(cfg, ps, rng)
    initialize_parameters(model, tcfg.seed, ps)
    model.checkpoint_activations = tcfg.checkpoint_activations
    # DeepSpeed saves this attribute into every checkpoint, for its own ds_to_universal converter.
    model.universal_checkpoint_info = model_universal_checkpoint_info(model, ps.tp_size)

    ds_config = build_deepspeed_config(tcfg, ps.dp_size, run.deepspeed_config)
    if tcfg.load:  # a checkpoint change_mp.py resharded may need DeepSpeed's universal loading
        ds_config = resume_engine_config(tcfg.load, ds_config, ps.tp_size, finetune=tcfg.finetune)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=ds_config, mpu=ps)

    step, consumed = 0, 0
    skipped_total = 0
    if tcfg.load:
        meta = load_checkpoint(engine, tcfg.load, finetune=tcfg.finetune)
        _check_resume_metadata(meta, spec.name, cfg, ps, tcfg.load, tokenizer)
        if not tcfg.finetune:
            step, consumed = meta["step"], meta["consumed_samples"]
            skipped_total = meta.get("skipped_steps", 0)

    data = datasets_provider(run, tokenizer, cfg, ps)
    sampler = TrainingSampler(len(data.train), tcfg.micro_batch_size, ps.dp_rank, ps.dp_size,
                              consumed_samples=consumed, seed=tcfg.seed)
    train_iter = _batches(data.train, sampler)

    log_dir = tcfg.log_dir or (os.path.join(tcfg.save, "logs") if tcfg.save else None)
    logger = MetricsLogger(log_dir, enabled=rank0, total_steps=tcfg.train_iters, initial_step=step,
                           progress_bar=not tcfg.no_progress_bar)
    # Per sample, not seq_length x per token: an encoder-decoder's two stacks see different
    # numbers of tokens (its registry record counts both, cross-attention included).
    tokens_per_sample, flops_per_sample = spec.sample_cost(cfg, dcfg)
    tokens_per_step = tcfg.global_batch_size * tokens_per_sample
    flops_per_token = flops_per_sample / tokens_per_sample
    # Every rank has the same threads and cores; rank 0's probe stands for all (cached).
    peak = peak_flops_per_rank(override=tcfg.peak_flops) if rank0 and tcfg.log_interval else None

    def metadata():
        return dict(model=spec.name, model_config=dataclasses.asdict(cfg),
                    tokenizer_hash=tokenizer.hash if tokenizer else None,
                    vocab_size=cfg.vocab_size, padded_vocab_size=cfg.padded_vocab_size,
                    tp_size=ps.tp_size, dp_size=ps.dp_size, step=step,
                    consumed_samples=consumed, seed=tcfg.seed, skipped_steps=skipped_total,
                    partition_spec=_partition_spec(model))

    def save():
        if tcfg.save:
            path = save_checkpoint(engine, tcfg.save, step, metadata(), tokenizer=tokenizer,
                                   keep_last=tcfg.keep_last)
            logger.write(f"saved checkpoint {path}")

    history = {"loss": [], "valid_loss": [], "skipped_steps": 0}
    valid_entropy = None
    consecutive_skips = 0
    last_saved = None
    stop_reason = "train_iters"
    with _Signals() as signals:
        while step < tcfg.train_iters:
            engine.train()
            start = time.perf_counter()
            losses, bad = [], False
            plain_grad_norm = None
            for micro in range(grad_acc):
                rng.set_step(step, micro)
                batch = _to_device(next(train_iter), engine.device)
                loss, _ = engine.module.loss(batch)
                # Every rank must agree, or ranks would take different paths.
                (n_bad,) = _all_reduce([0.0 if torch.isfinite(loss).item() else 1.0])
                if n_bad:
                    bad = True
                else:
                    losses.append(loss.item())
                # A non-finite loss is still backpropagated: the gradient turns non-finite and
                # DeepSpeed's ZeRO optimizers skip the update as they do on fp16 overflow
                # (no update, no scheduler step), which keeps their accumulation in step.
                engine.backward(loss)
                if engine.is_gradient_accumulation_boundary() and not engine.zero_optimization():
                    plain_grad_norm = _grad_norm(engine.module, ps)
                    if bad:
                        _skip_plain_optimizer_step(engine)
                engine.step()
            consumed += tcfg.global_batch_size
            step += 1
            elapsed = time.perf_counter() - start

            if bad:
                consecutive_skips += 1
                skipped_total += 1
                history["skipped_steps"] = skipped_total
                logger.write(f"step {step}: non-finite loss, step skipped "
                             f"({consecutive_skips} in a row)")
                if consecutive_skips >= tcfg.max_skipped_steps:
                    raise TrainingAborted(
                        f"{consecutive_skips} steps in a row had a non-finite loss (last at step "
                        f"{step}); training is diverging. Lower --lr, raise --lr-warmup-iters, or "
                        f"resume from an earlier checkpoint (--load {tcfg.save or '<save dir>'})")
            else:
                consecutive_skips = 0
            mean_loss = float("nan")  # a skipped step has no loss to report
            if not bad:
                total, count = _all_reduce([sum(losses), len(losses)], group=ps.dp_group)
                mean_loss = total / count
            history["loss"].append(mean_loss)

            if tcfg.log_interval and step % tcfg.log_interval == 0:
                tps = tokens_per_step / elapsed
                grad_norm = engine.get_global_grad_norm() if plain_grad_norm is None \
                    else plain_grad_norm
                mfu = flops_per_token * tps / (peak * dist.get_world_size()) if peak else None
                logger.log(step, loss=mean_loss, lr=engine.get_lr()[0],
                           grad_norm=float(grad_norm) if grad_norm is not None else None,
                           tokens_per_sec=tps, mfu=mfu, consumed_samples=consumed,
                           skipped_steps=skipped_total)
            logger.advance(1, loss=mean_loss)

            if (tcfg.eval_interval and data.valid is not None
                    and (step % tcfg.eval_interval == 0 or step == tcfg.train_iters)):
                valid_loss, entropy = evaluate(engine, data.valid, tcfg, ps, rng,
                                               need_entropy=valid_entropy is None)
                valid_entropy = valid_entropy if entropy is None else entropy
                history["valid_loss"].append((step, valid_loss))
                logger.log(step, valid_loss=valid_loss, valid_unigram_entropy=valid_entropy)
                logger.write(f"step {step}: validation loss {valid_loss:.4f} "
                             f"(unigram entropy of the validation targets {valid_entropy:.4f})")

            (stop,) = _all_reduce([1.0 if signals.requested else 0.0], op=dist.ReduceOp.MAX)
            if stop:
                stop_reason = "sigterm"
            elif tcfg.exit_interval and step % tcfg.exit_interval == 0:
                stop_reason = "exit_interval"
            periodic = tcfg.save_interval and step % tcfg.save_interval == 0
            if periodic or step == tcfg.train_iters or stop or stop_reason == "exit_interval":
                if last_saved != step:
                    save()
                    last_saved = step
            if stop or stop_reason == "exit_interval":
                logger.write(f"stopping at step {step} ({stop_reason})")
                break
    if history["valid_loss"] and valid_entropy is not None:
        final = history["valid_loss"][-1][1]
        logger.write(f"final validation loss {final:.4f} nats/token; a unigram model of the "
                     f"validation targets scores {valid_entropy:.4f}: {valid_entropy - final:+.4f} "
                     f"nats better")
    logger.close()
    return dict(step=step, consumed_samples=consumed, stop_reason=stop_reason,
                valid_unigram_entropy=valid_entropy, **history)


def _skip_plain_optimizer_step(engine):
    """Skip the update of a step that saw a non-finite loss, where DeepSpeed would not.

    ZeRO stages 1-3 find the non-finite gradient norm themselves and skip the step. The plain
    (stage 0) fp32 path would apply it, so its gradients are zeroed (clipping still runs) and the
    optimizer's `step` is a no-op for this one call: parameters and Adam moments stay as they
    were. (The LR scheduler still advances one step on this path.)"""
    for p in engine.module.parameters():
        if p.grad is not None:
            p.grad.zero_()
    optimizer = engine.optimizer

    def skip(*args, **kwargs):
        del optimizer.step  # back to the class's step for the next iteration
    optimizer.step = skip


def _grad_norm(module, ps: ParallelState) -> float:
    """Global L2 norm of the gradients, counting each TP-replicated parameter once (DeepSpeed's
    plain fp32 path clips by it but does not report it)."""
    total = torch.zeros((), dtype=torch.float64)
    for p in module.parameters():
        if p.grad is not None and (ps.tp_rank == 0 or getattr(p, "tensor_model_parallel", False)):
            total += p.grad.detach().double().pow(2).sum()
    if ps.tp_size > 1:
        dist.all_reduce(total, group=ps.tp_group)
    return float(total.sqrt())


@torch.no_grad()
def evaluate(engine, dataset, tcfg, ps: ParallelState, rng: RNGContext, *, need_entropy: bool):
    """Mean validation loss over `eval_iters` micro-batches per DP rank (always the same ones),
    and, when asked, the unigram entropy of those target tokens: the loss of a model that knows
    only their frequencies, which a model that learned anything must beat."""
    engine.eval()
    sampler = TrainingSampler(len(dataset), tcfg.micro_batch_size, ps.dp_rank, ps.dp_size,
                              consumed_samples=0, seed=tcfg.seed, shuffle=False)
    total, count = 0.0, 0.0
    counts = None
    for i, indices in enumerate(sampler):
        if i >= tcfg.eval_iters:
            break
        batch = _to_device(collate([dataset[j] for j in indices]), engine.device)
        loss, ntokens = engine.module.loss(batch)
        ntokens = float(ntokens)
        total += loss.item() * ntokens
        count += ntokens
        if need_entropy:
            targets = batch["labels"][batch["loss_mask"].bool()]
            binc = torch.bincount(targets.flatten().long().cpu(),
                                  minlength=engine.module.cfg.padded_vocab_size)
            counts = binc if counts is None else counts + binc
    total, count = _all_reduce([total, count], group=ps.dp_group)
    entropy = None
    if need_entropy and counts is not None:
        counts = counts.double()
        dist.all_reduce(counts, group=ps.dp_group)
        p = counts[counts > 0] / counts.sum()
        entropy = float(-(p * p.log()).sum())
    engine.train()
    return total / max(count, 1.0), entropy
