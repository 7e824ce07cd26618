"""`profile = true`: the PyTorch profiler over a few training steps, as a Trainer callback.

It skips a warm-up step (the first one pays for allocations and kernel selection), records a few, and
leaves a Chrome trace and a table of the top operators in the stage folder, plus a `profile` event that
names the most expensive operators.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback


class ProfileCallback(TrainerCallback):
    """Profile `active` steps after `warmup` steps, once per run; write trace.json and top-operators.txt."""

    def __init__(self, ctx: Any, out_dir: Path, warmup: int = 1, active: int = 3):
        self.ctx, self.out_dir, self.warmup, self.active = ctx, out_dir, warmup, active
        self.prof: Any = None
        self.n = 0

    def on_step_begin(self, args, state, control, **kw):
        if self.n == self.warmup and self.prof is None:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts, record_shapes=True)
            self.prof.__enter__()

    def on_step_end(self, args, state, control, **kw):
        self.n += 1
        if self.prof is not None and self.n >= self.warmup + self.active:
            self._finish()

    def on_train_end(self, args, state, control, **kw):
        if self.prof is not None:  # training ended inside the profiled steps: keep what was recorded
            self._finish()

    def _finish(self) -> None:
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / "trace.json"
        prof.export_chrome_trace(str(trace))
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
        (self.out_dir / "top-operators.txt").write_text(table)
        top = [
            {"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1000, 3), "calls": e.count}
            for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
        ]
        self.ctx.emit("profile", trace=str(trace), top=top)
        self.ctx.log(f"profile written: {trace} (open in Perfetto or chrome://tracing)")
        self.warmup = 10**9  # once per run
