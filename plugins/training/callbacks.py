"""ForgeCallback: the bridge between the HF Trainer and a llmforge run.

The Trainer calls it at every step, log, evaluation and save. It turns the trainer's progress into
llmforge events (progress with an ETA, metrics with throughput and memory), honours `llmforge stop` and
`llmforge checkpoint` and the time-based saves (`save_minutes`), marks checkpoints complete, beats the
watchdog, and ends a resumed run that has nothing left to train.

Under a launching backend every process runs its own callback: stop, checkpoint and timed-save
decisions are agreed by all ranks at the same step (dist.agree), and only rank 0 writes the markers,
once every rank's part of the checkpoint is on disk.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import TrainerCallback

from llmforge_plugins.training import dist
from llmforge_plugins.training.checkpoints import AlreadyTrained, mark_complete
from llmforge_plugins.training.watchdog import Watchdog, minutes_for


class ForgeCallback(TrainerCallback):
    """Turns the trainer's progress into llmforge events and honours stop/checkpoint requests.

    `precision` is the precision as the training log names it. The factory sets `trainer` once the
    trainer exists (the callback is created first, as the trainer's constructor takes it), and
    run_trainer sets `start_step` when it resumes, for the ETA."""

    def __init__(self, ctx: Any, precision: str, save_minutes: float | None = None):
        self.ctx = ctx
        self.precision = precision
        self.trainer: Any = None
        self.start_step = 0
        self.save_seconds = save_minutes * 60 if save_minutes else None
        self.last_save = time.monotonic()
        self.stopped = False
        self.t0 = time.monotonic()
        self.last_t = self.t0
        self.last_step = 0
        self.last_tokens = 0
        self.last_samples = 0
        self.proc = psutil.Process()
        self.step = 0
        self.watchdog = Watchdog(minutes_for(ctx), ctx.stage_dir, ctx.rank, ctx.emit, step=lambda: self.step)

    def on_train_begin(self, args, state, control, **kw):
        if state.global_step and state.global_step >= state.max_steps:
            # Resumed from the final checkpoint (stopped or killed while the outputs were written). The
            # Trainer would run one more step before it looks at max_steps (step 61 of 60, a changed
            # model); nothing is left to train. By now it has loaded the weights, the optimizer and the
            # state from the checkpoint, so run_trainer goes straight to the outputs.
            self.ctx.log(f"step {state.global_step} of {state.max_steps} already trained: writing the outputs")
            raise AlreadyTrained()
        self.t0 = self.last_t = time.monotonic()
        self.last_step = state.global_step
        if self.trainer is not None:
            self.last_tokens = self.trainer.useful_tokens
            self.last_samples = self.trainer.samples_seen
        world = f", {self.ctx.world_size} processes" if self.ctx.world_size > 1 else ""
        self.ctx.log(
            f"training: {state.max_steps} steps, precision {self.precision}{world}"
            + (f", resuming at step {state.global_step}" if state.global_step else "")
        )
        self.step = state.global_step
        self.watchdog.start()

    def on_step_end(self, args, state, control, **kw):
        self.step = state.global_step
        self.watchdog.beat()
        stop = self.ctx.should_stop()
        checkpoint = not stop and self.ctx.checkpoint_requested()
        # Rank 0's clock decides time-based saves, so that the ranks never disagree by a step.
        timed = (
            self.save_seconds is not None
            and self.ctx.rank == 0
            and time.monotonic() - self.last_save >= self.save_seconds
        )
        stop, checkpoint, timed = dist.agree([stop, checkpoint, timed])
        if stop:
            self.ctx.stop_seen = True  # a stop another rank saw is this rank's stop too
            self.stopped = True
            control.should_save = True  # save a full checkpoint, then leave the loop
            control.should_training_stop = True
            self.ctx.log(f"stop requested: saving a checkpoint at step {state.global_step}")
        elif checkpoint:
            control.should_save = True
            self.ctx.log(f"checkpoint requested: saving at step {state.global_step}")
        elif timed:
            control.should_save = True
        elapsed = time.monotonic() - self.t0
        done = state.global_step - self.start_step
        eta = elapsed / done * (state.max_steps - state.global_step) if done else None
        self.ctx.progress(state.global_step, state.max_steps, unit="step", eta_s=round(eta, 1) if eta else None)

    def on_log(self, args, state, control, logs=None, **kw):
        logs = dict(logs or {})
        now = time.monotonic()
        trainer = self.trainer
        values: dict[str, float] = {}
        for key in ("loss", "eval_loss", "learning_rate", "grad_norm", "epoch"):
            if key in logs and logs[key] is not None:
                values[key] = float(logs[key])
        for key, v in logs.items():  # DPO reports rewards/margins/accuracies, the reward trainer accuracy/margin
            if (
                key.startswith(("rewards/", "logps/", "eval_rewards/"))
                or key in ("accuracy", "margin", "eval_accuracy", "eval_margin")
            ) and isinstance(v, (int, float)):
                values[key] = float(v)
        dt = now - self.last_t
        steps = state.global_step - self.last_step
        if trainer is not None and dt > 0 and steps > 0 and "loss" in logs:
            if trainer.useful_tokens:  # DPO batches carry no labels tensor to count from
                values["tokens_per_s"] = (trainer.useful_tokens - self.last_tokens) / dt
            values["samples_per_s"] = (trainer.samples_seen - self.last_samples) / dt
            values["step_time_s"] = dt / steps
            self.last_tokens, self.last_samples = trainer.useful_tokens, trainer.samples_seen
            self.last_t, self.last_step = now, state.global_step
        values["ram_gb"] = self.proc.memory_info().rss / 2**30
        if torch.cuda.is_available():
            values["vram_allocated_gb"] = torch.cuda.memory_allocated() / 2**30
            values["vram_reserved_gb"] = torch.cuda.memory_reserved() / 2**30
        if set(values) - {"epoch", "ram_gb", "vram_allocated_gb", "vram_reserved_gb"}:
            self.ctx.metric(step=state.global_step, **values)

    def on_prediction_step(self, args, state, control, **kw):
        self.watchdog.beat()  # evaluation is progress too

    def on_evaluate(self, args, state, control, **kw):
        self.watchdog.beat()

    def on_train_end(self, args, state, control, **kw):
        self.watchdog.stop()

    def on_save(self, args, state, control, **kw):
        self.last_save = time.monotonic()
        self.watchdog.beat()
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        # Each rank wrote its own files (its RNG state, its shard); the checkpoint is complete only when
        # all of them are on disk.
        dist.barrier()
        if self.ctx.rank == 0 and ckpt.is_dir():
            mark_complete(ckpt, state.global_step, self.ctx)
            self.ctx.emit("checkpoint", step=state.global_step, path=str(ckpt))
