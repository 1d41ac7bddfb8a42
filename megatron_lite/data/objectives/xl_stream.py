"""Contiguous streams for Transformer-XL: each batch row continues the text of the previous step.

The epoch's token stream (documents shuffled with (seed, epoch), eod after each; see causal_lm)
is cut into G equal contiguous slices, one per global stream row, where G is the global batch:
micro_batch x dp_size x accumulation. A step hands out every row once: micro-batch `slot` m of
DP rank r holds global rows g = (m * dp_size + r) * micro_batch + b (TrainingSampler's order: a
micro-step takes micro_batch x dp_size rows, DP rank r the r-th block). At step t of an epoch,
row g holds slice tokens [t*S, t*S + S + 1) (inputs the first S, labels the last S), so slot m of
step t+1 starts exactly where slot m of step t ended and a model's memory for that slot always
holds the true preceding text, whatever the accumulation.

Documents: `document_start` [b, S] marks the inputs that begin a document (those after an eod,
and every row's first input of an epoch, where the stream starts afresh in a new document
order), so a model hides from them whatever it remembers of the text before.

The position is (global step, slot within the step). `state_dict()` saves it with the number of
streams, the sequence length and the seed, so a run resumes at the same global batch with any
split into micro_batch x dp_size x accumulation (`rows(slot)` tells which global rows a slot
holds, which is how the trainer re-splits per-stream model state). Another global batch cuts
other streams: `load_state_dict(state, regroup=True)` then resumes as far into the same epoch.

Blended corpora (data.blend, `XLStreamBatcher.blend`): global row g belongs to one corpus, chosen
by the blending index over the G rows (each corpus gets weight x G rows, within 1), and row g is
its corpus's j-th slice (j = g's rank among that corpus's rows) of that corpus's own stream, in
that corpus's own epochs; documents never mix inside a row.
"""
from __future__ import annotations

import numpy as np
import torch

from megatron_lite.data.blend import BlendingIndex
from megatron_lite.data.objectives import dataset_name
from megatron_lite.data.objectives.causal_lm import TokenStream


class XLStreamBatcher:
    """Yields this DP rank's micro-batches [batch_size, seq_length], `accumulation` slots per
    step, forever. A `BatchStream` with per-stream rows (`global_rows`, `slots`, `rows`)."""

    def __init__(self, ds, batch_size: int, seq_length: int, eod_id: int, seed: int,
                 dp_rank: int = 0, dp_size: int = 1, *, accumulation: int = 1,
                 append_eod: bool = True, weights=None, names=None):
        """`ds`: one indexed dataset, or a list blended by `weights` (see `blend`)."""
        if batch_size < 1 or seq_length < 1 or accumulation < 1:
            raise ValueError(f"batch_size, seq_length and accumulation must be >= 1, got "
                             f"{batch_size}, {seq_length}, {accumulation}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
        self.batch_size = int(batch_size)
        self.seq_length = int(seq_length)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.slots = int(accumulation)
        self.seed = int(seed)
        self.eod_id = int(eod_id)
        datasets = list(ds) if isinstance(ds, (list, tuple)) else [ds]
        self.weights = None if weights is None else [float(w) for w in weights]
        # A TokenStream is taken as it is (a blend reuses its corpora's streams).
        self.streams = [d if isinstance(d, TokenStream)
                        else TokenStream(d, eod_id, seed, append_eod=append_eod) for d in datasets]
        self.names = (list(names) if names is not None
                      else [dataset_name(s.ds) for s in self.streams])
        self.global_rows = self.batch_size * self.dp_size * self.slots
        # Whole rows go to corpora, in proportion to their weights: a row never mixes corpora.
        self.row_corpus, self.row_local, self.corpus_rows = self._assign_rows(self.global_rows)
        self.row_lengths, self.corpus_steps = [], []
        for name, stream, rows in zip(self.names, self.streams, self.corpus_rows):
            row_length = stream.tokens_per_epoch // max(rows, 1)
            steps = (row_length - 1) // self.seq_length
            if rows and steps < 1:
                raise ValueError(
                    f"dataset {name} holds {stream.tokens_per_epoch} tokens: split into {rows} "
                    f"streams ({'its share of ' if self.weights else ''}the global batch)"
                    f" that is {row_length} each, less than one step of seq_length + 1 = "
                    f"{self.seq_length + 1}; lower the batch size or --seq-length, or add data")
            self.row_lengths.append(row_length)
            self.corpus_steps.append(max(steps, 1))
        # The first corpus's (the only one unless blended).
        self.stream, self.row_length = self.streams[0], self.row_lengths[0]
        self.steps_per_epoch = min(s for s, n in zip(self.corpus_steps, self.corpus_rows) if n)
        self.step, self.slot = 0, 0

    def _assign_rows(self, global_rows: int):
        """(corpus of each global row, its index among that corpus's rows, rows per corpus)."""
        if self.weights is None:
            return [0] * global_rows, list(range(global_rows)), [global_rows]
        owner = BlendingIndex(self.weights).owners(0, global_rows).tolist()
        per_corpus = [owner.count(c) for c in range(len(self.streams))]
        for name, w, n in zip(self.names, self.weights, per_corpus):
            if w > 0 and n == 0:
                raise ValueError(f"corpus {name} (weight {w:.4g}) gets none of the "
                                 f"{global_rows} stream rows (one per sample of the global "
                                 f"batch); raise its weight to at least 1/{global_rows} or the "
                                 f"global batch size")
        seen, local = [0] * len(self.streams), []
        for c in owner:
            local.append(seen[c])
            seen[c] += 1
        return owner, local, per_corpus

    @classmethod
    def blend(cls, batchers, weights, names) -> "XLStreamBatcher":
        """One stream of several corpora (data.blend): batchers built alike, one per corpus."""
        b = batchers[0]
        for other in batchers[1:]:
            for key in ("batch_size", "seq_length", "dp_rank", "dp_size", "slots", "seed",
                        "eod_id"):
                if getattr(other, key) != getattr(b, key):
                    raise ValueError(f"cannot blend XL streams with different {key}")
        return cls([x.stream for x in batchers], b.batch_size, b.seq_length, b.eod_id, b.seed,
                   b.dp_rank, b.dp_size, accumulation=b.slots, weights=weights, names=names)

    def corpus_epochs(self, consumed_samples: int) -> dict[str, float]:
        """Epochs each corpus has gone through after `consumed_samples` (one step consumes one
        sample per stream row); empty unless blended."""
        if self.weights is None:
            return {}
        step = int(consumed_samples) // self.global_rows
        return {name: step / steps if rows else 0.0  # a corpus without rows is never read
                for name, steps, rows in zip(self.names, self.corpus_steps, self.corpus_rows)}

    def describe(self) -> str | None:
        """The blend's corpora and their rows (None unless blended)."""
        if self.weights is None:
            return None
        return ", ".join(f"{w:.4g} x {name} ({n} of {self.global_rows} stream rows)"
                         for w, name, n in zip(self.weights, self.names, self.corpus_rows))

    @classmethod
    def for_run(cls, ds, run, eod_id: int, dp_rank: int, dp_size: int, *,
                validation: bool = False) -> "XLStreamBatcher":
        """The stream of a run (`run.training`'s batch sizes and seed, `run.data.seq_length`):
        one slot per micro-batch of an optimizer step. A validation stream has one slot, so its
        consecutive batches continue the same rows."""
        tcfg = run.training
        per_step = tcfg.micro_batch_size * dp_size
        accumulation = 1 if validation else max(1, tcfg.global_batch_size // per_step)
        return cls(ds, tcfg.micro_batch_size, run.data.seq_length, eod_id, tcfg.seed, dp_rank,
                   dp_size, accumulation=accumulation)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def rows(self, slot: int) -> list[int]:
        """Global stream rows of this rank's micro-batch `slot`, in batch order."""
        if not 0 <= slot < self.slots:
            raise IndexError(f"slot {slot} is outside [0, {self.slots})")
        first = (slot * self.dp_size + self.dp_rank) * self.batch_size
        return list(range(first, first + self.batch_size))

    def batch(self, step: int, slot: int = 0) -> dict:
        """Micro-batch `slot` of global step `step` for this rank (a pure function of both)."""
        rows, starts = [], []
        for g in self.rows(slot):
            corpus = self.row_corpus[g]
            stream = self.streams[corpus]
            epoch, t = divmod(int(step), self.corpus_steps[corpus])
            begin = self.row_local[g] * self.row_lengths[corpus] + t * self.seq_length
            # One token before the segment says whether its first input starts a document.
            before = stream.tokens(epoch, begin - 1, 1)[0] if t > 0 else self.eod_id
            rows.append(stream.tokens(epoch, begin, self.seq_length + 1))
            starts.append(before == self.eod_id)
        x = torch.from_numpy(np.stack(rows))
        inputs = x[:, :-1].contiguous()
        document_start = torch.empty_like(inputs, dtype=torch.bool)
        document_start[:, 0] = torch.tensor(starts)
        document_start[:, 1:] = inputs[:, :-1] == self.eod_id
        return {
            "input_ids": inputs,
            "labels": x[:, 1:].contiguous(),
            "loss_mask": torch.ones(self.batch_size, self.seq_length, dtype=torch.float32),
            # XL attends with relative positions; absolute ones are given for the contract only.
            "position_ids": torch.arange(self.seq_length).expand(self.batch_size, -1).clone(),
            "document_start": document_start,
        }

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        """The next micro-batch: slots 0..slots-1 of a step, then the next step."""
        batch = self.batch(self.step, self.slot)
        self.slot += 1
        if self.slot == self.slots:
            self.step, self.slot = self.step + 1, 0
        return batch

    def state_dict(self) -> dict:
        state = {"step": self.step, "slot": self.slot, "global_rows": self.global_rows,
                 "seq_length": self.seq_length, "seed": self.seed}
        if self.weights is not None:
            state["weights"] = list(self.weights)
        return state

    def load_state_dict(self, state: dict, *, regroup: bool = False) -> None:
        """Resume at `state` (any split of the same global batch). With `regroup`, a state saved
        with another number of streams is accepted: the new streams start as far into the same
        epoch as the old ones had gone (nothing the model remembers matches them: reset it)."""
        for key in ("step", "global_rows", "seq_length", "seed"):
            if key not in state:
                raise KeyError(f"XL stream state lacks '{key}'; it was not saved by "
                               "XLStreamBatcher.state_dict()")
        for key in ("global_rows", "seq_length", "seed"):
            if state[key] != getattr(self, key) and not (regroup and key == "global_rows"):
                raise ValueError(
                    f"XL stream state was saved with {key}={state[key]} but this run has "
                    f"{key}={getattr(self, key)}; the streams are defined by the global batch "
                    "size, the sequence length and the seed, so resume with the same values")
        if state.get("weights") != self.weights:
            raise ValueError(f"XL stream state was saved with blend weights {state.get('weights')}"
                             f" but this run has {self.weights}; the blend decides which corpus "
                             "each stream reads, so resume with the same --train-data-prefix")
        step, slot = int(state["step"]), int(state.get("slot", 0))
        if state["global_rows"] != self.global_rows:
            if slot:
                raise ValueError(f"XL stream state was saved at slot {slot} of step {step}: only "
                                 "a state saved between steps maps onto other streams")
            # Blended, the corpora's epochs differ: follow the corpus with the most rows.
            old_rows = self._assign_rows(int(state["global_rows"]))[2]
            c = max(range(len(self.streams)), key=lambda i: (old_rows[i], -i))
            old_row = self.streams[c].tokens_per_epoch // old_rows[c]
            old_steps = (old_row - 1) // self.seq_length
            epoch, t = divmod(step, old_steps)
            steps = self.corpus_steps[c]
            step = epoch * steps + min(t * self.row_lengths[c] // old_row, steps)
        elif not 0 <= slot < self.slots:
            raise ValueError(f"XL stream state was saved at slot {slot} of a step, but this run "
                             f"has {self.slots} slots per step; resume from a checkpoint saved "
                             "between steps")
        self.step, self.slot = step, slot
