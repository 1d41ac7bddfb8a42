"""The training loop every model shares, driven by its registry record alone.

`pretrain(argv)` is the generic driver (`pretrain.py --model NAME`; `pretrain_gpt.py` and
`pretrain_t5.py` only set a default model). It looks the model up (after importing any
`--model-module`), parses the run's config with the model's config classes, and runs a
`Trainer`:

    setup       ParallelState (TP x SP x DP), tokenizer, model (TP-invariant init), the DeepSpeed
                engine with our mpu, resume (weights, optimizer, data position, stream state),
                the spec's data, logs
    train_step  one optimizer step: grad accumulation, non-finite-loss skips
    evaluate    validation loss, unigram entropy of the targets, bits per character
    save        an atomic checkpoint with our metadata and per-stream state (by global row)

What the trainer knows of a model is its `ModelSpec`: the data it builds (map-style datasets
walked by `TrainingSampler`, or a `BatchStream` whose position is saved), the batch keys its loss
reads, its FLOPs per sample, whether it carries per-stream state and whether it splits sequences.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_lite.checkpoint.checkpointing import (CheckpointSaveError, list_step_tags,
                                                    load_checkpoint, read_latest_tag,
                                                    read_model_states, save_checkpoint,
                                                    stream_state_path)
from megatron_lite.checkpoint.metadata import CheckpointMeta
from megatron_lite.checkpoint.verify import CheckpointInvalid, select_tag
from megatron_lite.checkpoint.reshard import (layout_universal_checkpoint_info,
                                              resume_engine_config)
from megatron_lite.data.blend import build_datasets
from megatron_lite.data.contract import bits_per_character, is_stream, predicted_targets
from megatron_lite.data.sampler import TrainingSampler, collate
from megatron_lite.data.tokenizer import load_tokenizer
from megatron_lite.errors import ConfigError
from megatron_lite.models.registry import ModelSpec, get_model_spec, import_model_modules
from megatron_lite.parallel import ParallelState, RNGContext, initialize_parameters
from megatron_lite.parallel.kernels import resolve_fused_kernels, use_fused_kernels
from megatron_lite.parallel.launch import destroy_distributed, init_distributed
from megatron_lite.training.config import (RunConfig, build_deepspeed_config, check_batch_sizes,
                                           parse_config, parse_model_choice,
                                           zero_on_one_rank_note)
from megatron_lite.training.engine import begin_micro_batch, build_engine
from megatron_lite.training.logger import MetricsLogger
from megatron_lite.training.mfu import peak_flops_per_rank

# Model-config fields that may differ between a checkpoint and the run that loads it.
RUNTIME_MODEL_FIELDS = {"hidden_dropout", "attention_dropout", "append_eos_to_source"}


def run_main(main) -> int:
    """Run an entry point's `main()` as a command: bad configuration is a one-line error and exit
    status 2 (as argparse does), not a traceback."""
    try:
        main()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointSaveError as e:  # a full disk: earlier checkpoints are intact
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


class TrainingAborted(RuntimeError):
    """Raised when training cannot go on (e.g. too many non-finite losses in a row)."""


def resolve_model(argv: list[str], default_model: str | None = None) -> ModelSpec:
    """The spec `--model` names, after importing every `--model-module`."""
    name, modules = parse_model_choice(argv, default_model)
    try:
        import_model_modules(modules)
        return get_model_spec(name)
    except (ImportError, KeyError) as e:
        raise ConfigError(e.args[0] if e.args else str(e)) from None


def pretrain(argv: list[str] | None = None, *, default_model: str | None = None) -> dict:
    """Parse `argv`, train, and return a summary (final step, losses) for callers and tests."""
    argv = list(sys.argv[1:] if argv is None else argv)
    spec = resolve_model(argv, default_model)
    run = parse_config(argv, spec.config_cls, data_config_cls=spec.data_config_cls)
    owns_dist = init_distributed()
    try:
        return Trainer(run, spec).train()
    finally:
        destroy_distributed(owns_dist)


@dataclass
class StepResult:
    loss: float          # mean over the step's micro-batches and DP ranks; NaN when skipped
    skipped: bool
    seconds: float
    grad_norm: float | None


class Trainer:
    """One run of one model: build everything in `__init__`, then `train()`."""

    def __init__(self, run: RunConfig, spec: ModelSpec):
        self.run, self.spec = run, spec
        tcfg = self.tcfg = run.training
        self.ps = self._parallel_state()
        self.rank0 = dist.get_rank() == 0
        self.grad_acc = check_batch_sizes(tcfg, self.ps.dp_size)
        self.tokenizer = load_tokenizer(run.data.tokenizer) if run.data.tokenizer else None
        self.cfg = self._model_config()

        self.rng = RNGContext(tcfg.seed, dp_rank=self.ps.dp_rank, tp_rank=self.ps.tp_rank)
        self.notes: list[str] = []  # said once the log is open
        # Before the model is built: its layer norms are of the chosen kind.
        self.fused_kernels, why_not_apex = resolve_fused_kernels(tcfg.fused_kernels)
        use_fused_kernels(self.fused_kernels)
        if self.fused_kernels == "apex":
            self.notes.append("fused kernels: apex's FusedLayerNorm and FusedAdam")
        elif torch.cuda.is_available():  # on a CPU machine there is no choice to report
            self.notes.append(f"fused kernels: torch's ({why_not_apex})")
        model = spec.build(self.cfg, self.ps, self.rng)
        initialize_parameters(model, tcfg.seed, self.ps)
        model.checkpoint_activations = tcfg.checkpoint_activations
        self.layout = spec.layout(self.cfg, self.ps.tp_size)
        # DeepSpeed saves this attribute into every checkpoint, for its own ds_to_universal.
        model.universal_checkpoint_info = layout_universal_checkpoint_info(self.layout,
                                                                           self.ps.tp_size)
        ds_config = build_deepspeed_config(tcfg, self.ps.dp_size, run.deepspeed_config)
        idle_zero = zero_on_one_rank_note(ds_config, self.ps.dp_size)
        if idle_zero:
            self.notes.append(idle_zero)
        self.load_tag = self._select_checkpoint() if tcfg.load else None
        if tcfg.load:  # a checkpoint change_mp.py resharded may need DeepSpeed's universal load
            ds_config = resume_engine_config(tcfg.load, ds_config, self.ps.tp_size,
                                             finetune=tcfg.finetune, tag=self.load_tag)
        self.engine, self.skippable = build_engine(model, ds_config, self.ps, self.fused_kernels)
        # The trainer calls the model's loss, not its forward (which DeepSpeed's engine.compile()
        # would wrap): compile the loss itself.
        self._model_loss = (torch.compile(self.engine.module.loss) if tcfg.compile
                            else self.engine.module.loss)

        self.step, self.consumed, self.skipped_total = 0, 0, 0
        self.stream_states: dict[int, object] = {}  # micro-batch slot -> the model's state
        self.loaded_from = None  # the checkpoint directory resumed from
        meta = self._load() if tcfg.load else None
        try:
            self.data = build_datasets(spec.build_data, run, self.tokenizer, self.cfg, self.ps)
        except (ValueError, FileNotFoundError) as e:  # the data builders' bad-input errors
            raise ConfigError(f"data: {e}") from None
        describe = getattr(self.data.train, "describe", None)  # a blend names its corpora
        if describe is not None and describe():
            self.notes.append(f"training data blends {describe()}")
        self.train_batches = self._train_batches(meta)
        self.valid_start = self.data.valid.state_dict() if is_stream(self.data.valid) else None
        self._checked_batch = False

        log_dir = tcfg.log_dir or (os.path.join(tcfg.save, "logs") if tcfg.save else None)
        self.logger = MetricsLogger(log_dir, enabled=self.rank0, total_steps=tcfg.train_iters,
                                    initial_step=self.step,
                                    progress_bar=not tcfg.no_progress_bar)
        # Per sample, not seq_length x per token: an encoder-decoder's two stacks see different
        # numbers of tokens (its registry record counts both, cross-attention included).
        tokens, flops = spec.sample_cost(self.cfg, run.data)
        self.tokens_per_step = tcfg.global_batch_size * tokens
        self.flops_per_token = flops / tokens
        # Every rank has the same threads and cores; rank 0's probe stands for all (cached).
        self.peak = (peak_flops_per_rank(override=tcfg.peak_flops)
                     if self.rank0 and tcfg.log_interval else None)
        self.history = {"loss": [], "valid_loss": [], "valid_bpc": [], "valid_metrics": [],
                        "skipped_steps": 0}
        self.valid_entropy = None

    # ------------------------------------------------------------------------------ setup
    def _parallel_state(self) -> ParallelState:
        tcfg = self.tcfg
        if tcfg.sequence_parallel_size > 1 and not self.spec.splits_sequence:
            raise ConfigError(f"--sequence-parallel-size {tcfg.sequence_parallel_size}: model "
                              f"'{self.spec.name}' does not split sequences across ranks; use 1")
        try:
            return ParallelState.from_world(tcfg.tensor_model_parallel_size,
                                            tcfg.sequence_parallel_size)
        except ValueError as e:  # a launch that TP x SP x DP cannot fill: a usage error
            raise ConfigError(str(e)) from None

    def _model_config(self):
        cfg, tokenizer = self.run.model, self.tokenizer
        if tokenizer is not None and not getattr(cfg, "vocab_size", None):
            cfg = dataclasses.replace(cfg, vocab_size=tokenizer.vocab_size)
        if tokenizer is not None and cfg.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"model.vocab_size {cfg.vocab_size} is smaller than the tokenizer's "
                             f"{tokenizer.vocab_size} ({self.run.data.tokenizer}); leave it unset "
                             f"to take the tokenizer's")
        if self.spec.complete_config is not None:
            try:
                cfg = self.spec.complete_config(cfg, self.run, tokenizer)
            except (ValueError, FileNotFoundError) as e:
                raise ConfigError(f"data: {e}") from None
        return cfg

    def _select_checkpoint(self) -> str:
        """The tag to load: `latest`'s, or the newest older one that verifies (rank 0 reads the
        files, every rank gets its answer)."""
        load, answer = self.tcfg.load, [None]
        if self.rank0:
            try:
                latest = read_latest_tag(load)
                older = [t for _, t in reversed(list_step_tags(load))]
                answer[0] = select_tag(load, latest, older, fallback=self.tcfg.load_fallback)
            except (CheckpointInvalid, FileNotFoundError) as e:
                answer[0] = e
        dist.broadcast_object_list(answer, src=0)
        if isinstance(answer[0], CheckpointInvalid):
            raise ConfigError(f"--load {load}: {answer[0]}")
        if isinstance(answer[0], Exception):
            raise answer[0]
        tag, notes = answer[0]
        self.notes += notes
        return tag

    def _load(self) -> CheckpointMeta:
        tcfg = self.tcfg
        where = os.path.join(tcfg.load, self.load_tag)
        saved, source, _ = read_model_states(tcfg.load, 0, tag=self.load_tag)
        # Another model's checkpoint (ModelSpec.finetunes_from): the weights both have.
        partial = tcfg.finetune and source.model in self.spec.finetunes_from
        self._check_resume_metadata(source, where)
        meta = load_checkpoint(self.engine, tcfg.load, tag=self.load_tag, finetune=tcfg.finetune,
                               strict=not partial)
        if partial:
            ours = self.engine.module.state_dict().keys()
            dropped, fresh = sorted(set(saved) - set(ours)), sorted(set(ours) - set(saved))
            self.notes.append(f"started from the '{source.model}' weights of {where}: dropped "
                              f"{len(dropped)} tensor(s) this model has not ({', '.join(dropped)}"
                              f"); initialised fresh: {', '.join(fresh) or 'none'}")
        if not tcfg.finetune:
            self.step, self.consumed = meta.step, meta.consumed_samples
            self.skipped_total = meta.skipped_steps
        self.loaded_from = where
        return meta

    def _check_resume_metadata(self, meta: CheckpointMeta, where: str):
        finetunes_from = self.spec.finetunes_from if self.tcfg.finetune else ()
        if meta.model != self.spec.name and meta.model not in finetunes_from:
            starts = (f"; '{self.spec.name}' can be fine-tuned (--finetune) from "
                      f"{', '.join(repr(m) for m in self.spec.finetunes_from)} checkpoints"
                      if self.spec.finetunes_from else "")
            raise ValueError(f"{where} holds a '{meta.model}' model, not '{self.spec.name}'"
                             f"{starts}")
        if meta.tp_size != self.ps.tp_size:
            raise ValueError(
                f"{where} was saved at tensor-parallel size {meta.tp_size}, this run uses "
                f"{self.ps.tp_size}; reshard it first: python change_mp.py {self.tcfg.load} "
                f"{self.ps.tp_size}")
        tokenizer = self.tokenizer
        if tokenizer is not None and meta.tokenizer_hash not in (None, tokenizer.hash):
            raise ValueError(f"{where} was trained with tokenizer {meta.tokenizer_hash}, but "
                             f"--tokenizer gives {tokenizer.hash}: use the checkpoint's tokenizer "
                             f"({os.path.join(where, 'tokenizer')})")
        for key, value in dataclasses.asdict(self.cfg).items():
            if key in RUNTIME_MODEL_FIELDS or key not in meta.model_config:
                continue
            if meta.model_config[key] != value:
                raise ValueError(f"{where}: model.{key} is {meta.model_config[key]!r} in the "
                                 f"checkpoint but {value!r} in this run; drop the override or use "
                                 f"the checkpoint's value")

    # Per-stream state (ModelSpec.stream_state) is keyed by the stream's global rows: a slot's
    # state is saved with the rows it holds, and a resumed rank takes the rows its slots will
    # hold, whatever DP and micro-batch sizes split the same streams.
    def _stream_layout(self) -> dict:
        ps = self.ps
        return {"tp_size": ps.tp_size, "sp_size": ps.sp_size, "dp_size": ps.dp_size,
                "streams": self.data.train.global_rows}

    def _check_stream_rows(self, train):
        name = self.spec.name
        if not (is_stream(train) and all(hasattr(train, a) for a in ("global_rows", "slots",
                                                                     "rows"))):
            raise ConfigError(f"model '{name}' carries per-stream state, so its training data "
                              f"must be a BatchStream with global_rows, slots and rows(slot) "
                              f"(see data.contract.BatchStream); got {type(train).__name__}")
        if train.slots != self.grad_acc:
            raise ConfigError(f"model '{name}': its training stream has {train.slots} "
                              f"micro-batch slots per step but the run accumulates "
                              f"{self.grad_acc} (global batch / (micro batch x DP)); build it "
                              f"with XLStreamBatcher.for_run or accumulation={self.grad_acc}")

    def _load_stream_states(self, meta: CheckpointMeta, train) -> None:
        where, saved, layout = self.loaded_from, meta.stream_state, self._stream_layout()
        streams = None if saved is None else saved.get("streams")
        if self.tcfg.reset_stream_state:
            cut = (f": the checkpoint's {streams} streams are cut anew into {layout['streams']}"
                   if streams not in (None, layout["streams"]) else "")
            self.notes.append(f"every stream's model state starts afresh "
                              f"(--reset-stream-state){cut}")
            return
        if saved is None:
            self.notes.append(f"{where} holds no per-stream model state (resharded or "
                              f"converted): every stream starts afresh")
            return
        if streams is None:
            raise ConfigError(f"{where}: its per-stream model state was saved per micro-batch "
                              f"slot by an older megatron_lite and cannot be re-split; pass "
                              f"--reset-stream-state to start every stream afresh")
        if streams != layout["streams"]:
            raise ConfigError(f"{where}: its per-stream model state holds {streams} streams, "
                              f"this run has {layout['streams']} (the global batch size decides "
                              f"them); resume with the checkpoint's global batch size, or pass "
                              f"--reset-stream-state to start every stream afresh")
        if saved["sp_size"] != layout["sp_size"]:
            raise ConfigError(f"{where}: its per-stream model state was saved at sequence-parallel "
                              f"size {saved['sp_size']}, this run has {layout['sp_size']}; resume "
                              f"at that size, or pass --reset-stream-state")
        ps, sources = self.ps, []
        for dp_rank in range(saved["dp_size"]):
            path = stream_state_path(where, ps.tp_rank, ps.sp_rank, dp_rank)
            if not os.path.isfile(path):
                raise ConfigError(f"{path} is missing: the checkpoint's per-stream state is "
                                  f"incomplete; pass --reset-stream-state to start every stream "
                                  f"afresh")
            # Memory-mapped: a rank reads only the rows it takes.
            sources += torch.load(path, map_location="cpu", weights_only=True, mmap=True)["slots"]
        at = {r: (i, j) for i, src in enumerate(sources)
              for j, r in enumerate(src["rows"].tolist())}
        for slot in range(train.slots):
            missing = [r for r in train.rows(slot) if r not in at]
            if missing:
                raise ConfigError(f"{where}: no per-stream state for stream rows {missing}; pass "
                                  f"--reset-stream-state to start every stream afresh")
            self.stream_states[slot] = _gather_rows([src["state"] for src in sources],
                                                    [at[r] for r in train.rows(slot)])
        if saved["dp_size"] != layout["dp_size"]:
            self.notes.append(f"per-stream model state of {streams} streams re-split from DP size "
                              f"{saved['dp_size']} to {layout['dp_size']}")

    def _train_batches(self, meta: CheckpointMeta | None):
        train = self.data.train
        if self.spec.stream_state:
            self._check_stream_rows(train)
        if is_stream(train):
            if meta is not None and not self.tcfg.finetune:
                if self.spec.stream_state:
                    self._load_stream_states(meta, train)
                if meta.data_state is not None:
                    # With the state reset, a stream may map its position onto other streams.
                    regroup = self.spec.stream_state and self.tcfg.reset_stream_state
                    try:
                        train.load_state_dict(meta.data_state,
                                              **({"regroup": True} if regroup else {}))
                    except ValueError as e:
                        raise ConfigError(f"{self.loaded_from}: {e}") from None
            return train
        sampler = TrainingSampler(len(train), self.tcfg.micro_batch_size, self.ps.dp_rank,
                                  self.ps.dp_size, consumed_samples=self.consumed,
                                  seed=self.tcfg.seed,
                                  shuffle=not getattr(train, "ordered", False))
        return (collate([train[i] for i in indices]) for indices in sampler)

    def _valid_batches(self):
        """The validation batches, the same ones at every evaluation."""
        valid = self.data.valid
        if is_stream(valid):
            valid.load_state_dict(self.valid_start)
            return valid
        sampler = TrainingSampler(len(valid), self.tcfg.micro_batch_size, self.ps.dp_rank,
                                  self.ps.dp_size, consumed_samples=0, seed=self.tcfg.seed,
                                  shuffle=False)
        return (collate([valid[i] for i in indices]) for indices in sampler)

    # ------------------------------------------------------------------------------ steps
    def _loss(self, batch: dict, slot: int, states: dict):
        """(loss, predicted tokens) of one micro-batch; a stateful model's state for `slot`
        goes in and its successor, detached, comes back into `states`."""
        if not self._checked_batch:
            self.spec.check_batch(batch)
            self._checked_batch = True
        if not self.spec.stream_state:
            return self._model_loss(batch)
        loss, ntokens, state = self._model_loss(batch, states.get(slot))
        states[slot] = detached_state(state)
        return loss, ntokens

    def train_step(self) -> StepResult:
        engine, tcfg = self.engine, self.tcfg
        engine.train()
        start = time.perf_counter()
        losses, bad, grad_norm = [], False, None
        for micro in range(self.grad_acc):
            self.rng.set_step(self.step, micro)
            batch = _to_device(next(self.train_batches), engine.device)
            begin_micro_batch(engine)
            loss, _ = self._loss(batch, micro, self.stream_states)
            # Every rank must agree, or ranks would take different paths.
            (n_bad,) = _all_reduce([0.0 if torch.isfinite(loss).item() else 1.0])
            if n_bad:
                bad = True
            else:
                losses.append(loss.item())
            # A non-finite loss is still backpropagated: the gradient turns non-finite and the
            # optimizer skips the update as on fp16 overflow (no update, no scheduler step),
            # which keeps DeepSpeed's accumulation in step.
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary() and self.skippable is not None:
                grad_norm = _grad_norm(engine.module, self.ps)  # the plain path reports none
                self.skippable.overflow = bad
            engine.step()
        self.consumed += tcfg.global_batch_size
        self.step += 1
        mean = float("nan")  # a skipped step has no loss to report
        if not bad:
            # A sequence-splitting model's SP ranks each hold a part whose sum is the loss.
            total, count = _all_reduce([sum(losses), len(losses)], group=self.ps.sp_dp_group)
            mean = total / (count / self.ps.sp_size)
        if grad_norm is None and not bad:
            grad_norm = engine.get_global_grad_norm()
        return StepResult(mean, bad, time.perf_counter() - start,
                          float(grad_norm) if grad_norm is not None else None)

    def train(self) -> dict:
        """Train to `train_iters` (or a stop request); return the run's summary."""
        tcfg, consecutive_skips, last_saved, stop_reason = self.tcfg, 0, None, "train_iters"
        for note in self.notes:
            self.logger.write(note)
        with _Signals() as signals:
            while self.step < tcfg.train_iters:
                result = self.train_step()
                consecutive_skips = consecutive_skips + 1 if result.skipped else 0
                self._record(result, consecutive_skips)
                if (tcfg.eval_interval and self.data.valid is not None
                        and (self.step % tcfg.eval_interval == 0
                             or self.step == tcfg.train_iters)):
                    self.evaluate()
                (stop,) = _all_reduce([1.0 if signals.requested else 0.0], op=dist.ReduceOp.MAX)
                if stop:
                    stop_reason = "sigterm"
                elif tcfg.exit_interval and self.step % tcfg.exit_interval == 0:
                    stop_reason = "exit_interval"
                stopping = stop_reason != "train_iters"
                periodic = tcfg.save_interval and self.step % tcfg.save_interval == 0
                if (periodic or self.step == tcfg.train_iters or stopping) \
                        and last_saved != self.step:
                    self.save()
                    last_saved = self.step
                if stopping:
                    self.logger.write(f"stopping at step {self.step} ({stop_reason})")
                    break
        return self._finish(stop_reason)

    def _record(self, result: StepResult, consecutive_skips: int):
        tcfg, step = self.tcfg, self.step
        if result.skipped:
            self.skipped_total += 1
            self.logger.write(f"step {step}: non-finite loss, step skipped "
                              f"({consecutive_skips} in a row)")
            if consecutive_skips >= tcfg.max_skipped_steps:
                raise TrainingAborted(
                    f"{consecutive_skips} steps in a row had a non-finite loss (last at step "
                    f"{step}); training is diverging. Lower --lr, raise --lr-warmup-iters, or "
                    f"resume from an earlier checkpoint (--load {tcfg.save or '<save dir>'})")
        self.history["skipped_steps"] = self.skipped_total
        self.history["loss"].append(result.loss)
        if tcfg.log_interval and step % tcfg.log_interval == 0:
            tps = self.tokens_per_step / result.seconds
            mfu = (self.flops_per_token * tps / (self.peak * dist.get_world_size())
                   if self.peak else None)
            self.logger.log(step, loss=result.loss, lr=self.engine.get_lr()[0],
                            grad_norm=result.grad_norm, tokens_per_sec=tps, mfu=mfu,
                            consumed_samples=self.consumed, skipped_steps=self.skipped_total,
                            **self._corpus_epochs())
        self.logger.advance(1, loss=result.loss)

    def _corpus_epochs(self) -> dict:
        """`epochs/<corpus>` of a blend (data.blend): how far each corpus has been read."""
        epochs = getattr(self.data.train, "corpus_epochs", None)
        return {f"epochs/{name}": value for name, value in epochs(self.consumed).items()} \
            if epochs else {}

    # ------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation over `eval_iters` micro-batches per DP rank (always the same ones): the
        token-weighted mean loss, the unigram entropy of the targets (the loss of a model that
        knows only their frequencies, which a model that learned anything must beat) and, for a
        model predicting text, bits per character."""
        engine, ps = self.engine, self.ps
        engine.eval()
        need_entropy = self.valid_entropy is None
        total, count, characters, counts, states = 0.0, 0.0, 0.0, None, {}
        char_lengths = (torch.from_numpy(self.tokenizer.char_lengths())
                        if self.tokenizer is not None and self.spec.predicts_text else None)
        slots = getattr(self.data.valid, "slots", 1)  # a stream's micro-batches per step
        metrics: dict[str, list[float]] = {}  # name -> [numerator, denominator]
        for i, batch in enumerate(self._valid_batches()):
            if i >= self.tcfg.eval_iters:
                break
            batch = _to_device(batch, engine.device)
            loss, ntokens = self._loss(batch, i % slots, states)
            ntokens = float(ntokens)
            total += loss.item() * ntokens
            count += ntokens
            if self.spec.eval_metrics is not None:
                for name, (num, den) in self.spec.eval_metrics(engine.module, batch).items():
                    sums = metrics.setdefault(name, [0.0, 0.0])
                    sums[0], sums[1] = sums[0] + float(num), sums[1] + float(den)
            targets = predicted_targets(batch).long().cpu()
            if char_lengths is not None:
                characters += float(char_lengths[targets].sum())
            if need_entropy:
                binc = torch.bincount(targets.flatten(), minlength=self.cfg.padded_vocab_size)
                counts = binc if counts is None else counts + binc
        total, count, characters = _all_reduce([total, count, characters], group=ps.sp_dp_group)
        values = {}  # the spec's eval_metrics, numerator / denominator over every rank
        if self.spec.eval_metrics is not None:
            names = sorted(metrics)
            sums = _all_reduce([v for n in names for v in metrics[n]], group=ps.sp_dp_group)
            values = {n: sums[2 * i] / sums[2 * i + 1] if sums[2 * i + 1] else float("nan")
                      for i, n in enumerate(names)}
        # The SP ranks of a replica hold the same batch (a splitting model reports its replica's
        # count): counted once.
        count, characters = count / ps.sp_size, characters / ps.sp_size
        if need_entropy and counts is not None:
            counts = counts.double()
            dist.all_reduce(counts, group=ps.sp_dp_group)
            p = counts[counts > 0] / counts.sum()
            self.valid_entropy = float(-(p * p.log()).sum())
        engine.train()
        loss = total / max(count, 1.0)
        bpc = bits_per_character(total, characters) if char_lengths is not None else None
        self.history["valid_loss"].append((self.step, loss))
        self.history["valid_bpc"].append((self.step, bpc))
        if values:
            self.history["valid_metrics"].append((self.step, values))
        self.logger.log(self.step, valid_loss=loss, valid_unigram_entropy=self.valid_entropy,
                        **({"valid_bpc": bpc} if bpc is not None else {}),
                        **{f"valid_{n}": v for n, v in values.items()})
        self.logger.write(f"step {self.step}: validation loss {loss:.4f}"
                          + (f", {bpc:.4f} bits per character" if bpc is not None else "")
                          + "".join(f", {n} {v:.4f}" for n, v in values.items())
                          + f" (unigram entropy of the validation targets "
                            f"{self.valid_entropy:.4f})")
        return {"loss": loss, "bpc": bpc, "unigram_entropy": self.valid_entropy, **values}

    # ------------------------------------------------------------------------------ checkpoints
    def metadata(self) -> CheckpointMeta:
        ps = self.ps
        data_state = self.train_batches.state_dict() if is_stream(self.data.train) else None
        return CheckpointMeta.for_model(
            self.spec, self.cfg, ps.tp_size, self.tokenizer, dp_size=ps.dp_size,
            sp_size=ps.sp_size, step=self.step, consumed_samples=self.consumed,
            seed=self.tcfg.seed, skipped_steps=self.skipped_total, data_state=data_state,
            stream_state=self._stream_layout() if self.spec.stream_state else None)

    def save(self):
        tcfg, ps = self.tcfg, self.ps
        if not tcfg.save:
            return
        rank_files = None
        if self.spec.stream_state:
            name = os.path.basename(stream_state_path("", ps.tp_rank, ps.sp_rank, ps.dp_rank))
            rows = self.train_batches.rows
            rank_files = {name: {"slots": [{"rows": torch.tensor(rows(slot)), "state": state}
                                           for slot, state in sorted(self.stream_states.items())]}}
        path = save_checkpoint(self.engine, tcfg.save, self.step, self.metadata(),
                               tokenizer=self.tokenizer, keep_last=tcfg.keep_last,
                               rank_files=rank_files)
        self.logger.write(f"saved checkpoint {path}")

    def _finish(self, stop_reason: str) -> dict:
        if self.history["valid_loss"] and self.valid_entropy is not None:
            final = self.history["valid_loss"][-1][1]
            self.logger.write(
                f"final validation loss {final:.4f} nats/token; a unigram model of the "
                f"validation targets scores {self.valid_entropy:.4f}: "
                f"{self.valid_entropy - final:+.4f} nats better")
        self.logger.close()
        return dict(step=self.step, consumed_samples=self.consumed, stop_reason=stop_reason,
                    valid_unigram_entropy=self.valid_entropy, **self.history)


# ---------------------------------------------------------------------------------------------
# Helpers

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


def _all_reduce(values: list[float], op=dist.ReduceOp.SUM, group=None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=op, group=group)
    return t.tolist()


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def detached_state(state):
    """A model's per-stream state cut from the graph (tensors in dicts, lists or tuples)."""
    if torch.is_tensor(state):
        return state.detach()
    if isinstance(state, dict):
        return {k: detached_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(detached_state(v) for v in state)
    return state


def _gather_rows(states: list, picks: list[tuple[int, int]]):
    """A state whose row k is row picks[k][1] of states[picks[k][0]]: every tensor of a per-stream
    state has the stream-row dimension first (tensors in dicts, lists or tuples)."""
    first = states[0]
    if torch.is_tensor(first):
        return torch.stack([states[i][j] for i, j in picks])
    if isinstance(first, dict):
        return {k: _gather_rows([s[k] for s in states], picks) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_gather_rows([s[n] for s in states], picks) for n in range(len(first)))
    return first


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
