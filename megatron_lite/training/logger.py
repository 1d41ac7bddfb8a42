"""Rank-0 training logs: a tqdm bar on stderr, TensorBoard events and `metrics.jsonl`."""
from __future__ import annotations

import json
import math
import os
import sys


class MetricsLogger:
    """Writes one JSON object per logged step to `<log_dir>/metrics.jsonl` and the same scalars to
    TensorBoard. On ranks other than 0 every method is a no-op, so callers need no rank checks."""

    def __init__(self, log_dir: str | None, *, enabled: bool, total_steps: int, initial_step: int,
                 progress_bar: bool = True):
        self.enabled = enabled
        self.bar = None
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        if progress_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=initial_step, file=sys.stderr,
                            dynamic_ncols=True, desc="train")
        if log_dir is None:
            return
        os.makedirs(log_dir, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir)
        self.jsonl = open(os.path.join(log_dir, "metrics.jsonl"), "a", encoding="utf-8")

    def advance(self, steps: int = 1, **postfix):
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                                      for k, v in postfix.items()}, refresh=False)

    def log(self, step: int, **metrics):
        """Log scalars for `step` (None values are dropped; NaN is written as null in JSON)."""
        metrics = {k: v for k, v in metrics.items() if v is not None}
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"train/{key}" if "/" not in key else key, value, step)
        if self.jsonl is not None:
            record = {"step": step}
            record.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                           for k, v in metrics.items()})
            self.jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.jsonl.flush()

    def write(self, message: str):
        """A line of text for the user, printed without breaking the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
