"""Running a built trainer: resume from the last complete checkpoint, train, evaluate, sum up.

A training stage reads as: load the data and the model, `factory.build_trainer(...)`,
`loop.run_trainer(training, ctx)`, then write its outputs (common.save_outputs) unless the run was
stopped. The other concerns are one file each: factory.py (the trainer and its arguments),
callbacks.py (events, stop and checkpoint requests), checkpoints.py (which checkpoint counts, resuming
under another launch), precision.py, profiling.py, evaluation.py (perplexity).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmforge.errors import UsageError
from llmforge_plugins.training.checkpoints import (
    AlreadyTrained,
    drop_incomplete_checkpoints,
    latest_complete_checkpoint,
    note_world_change,
    step_of,
)

if TYPE_CHECKING:
    from llmforge.stage import StageContext
    from llmforge_plugins.training.factory import Training


@dataclass
class TrainOutcome:
    """How a training session ended: stopped (a checkpoint was saved, no outputs are due) or finished."""

    trainer: Any
    stopped: bool
    final_loss: float | None
    eval_loss: float | None
    steps: int
    trained_tokens: int = 0  # tokens that carried a label, this session
    train_seconds: float = 0.0

    def record(self, ctx: StageContext) -> None:
        """Put the figures into the run manifest (ctx.info)."""
        ctx.info.update(
            final_loss=self.final_loss,
            eval_loss=self.eval_loss,
            steps=self.steps,
            trained_tokens=self.trained_tokens,
            train_seconds=round(self.train_seconds, 3),
        )


def run_trainer(training: Training, ctx: StageContext) -> TrainOutcome:
    """Train, resuming from the last complete checkpoint when the stage is resumed; then evaluate on the
    eval rows unless the run was stopped."""
    trainer, callback, output_dir = training.trainer, training.callback, training.output_dir
    check_tensor_parallel(trainer, ctx)
    fsdp = getattr(getattr(getattr(ctx.backend, "settings", None), "fsdp", None), "enabled", False)
    if fsdp and not trainer.is_fsdp_enabled:
        ctx.log(
            "backend.fsdp.enabled is set but accelerate did not shard the model: FSDP needs GPUs (on CPUs "
            "the processes train as plain data parallel, over gloo)",
            level="warning",
        )
    resume_from = None
    if ctx.resume:
        if ctx.rank == 0:
            drop_incomplete_checkpoints(output_dir)  # only complete ones count, so the others need not wait
        ckpt = latest_complete_checkpoint(output_dir)
        if ckpt is not None:
            resume_from = str(ckpt)
            callback.start_step = step_of(ckpt)
            ctx.log(f"resuming from {ckpt.name}")
            note_world_change(ckpt, ctx)
        else:
            ctx.log("no complete checkpoint to resume from: starting this stage afresh", level="warning")
    t0 = time.monotonic()
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except AlreadyTrained:
        result = None
        trainer.is_in_train = False  # what train() would have reset on its way out
    finally:
        callback.watchdog.stop()
    seconds = time.monotonic() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    eval_loss = None
    if trainer.eval_dataset is not None and not callback.stopped:
        eval_loss = trainer.evaluate().get("eval_loss")  # logged as a metric event by ForgeCallback.on_log
    return TrainOutcome(
        trainer,
        callback.stopped,
        losses[-1] if losses else getattr(result, "training_loss", None),
        eval_loss,
        trainer.state.global_step,
        getattr(trainer, "useful_tokens", 0),
        seconds,
    )


def check_tensor_parallel(trainer: Any, ctx: StageContext) -> None:
    """Refuse tp_size > 1 for a model that was not loaded tensor-parallel (it would train unsharded)."""
    settings = getattr(ctx.backend, "settings", None)
    tp = getattr(settings, "tp_size", 1)
    if tp > 1 and (getattr(trainer.model, "tp_size", None) or 1) != tp:
        raise UsageError(
            f"stage {ctx.stage_name}: tp_size = {tp}, but its model was not loaded with tensor "
            "parallelism (only models loaded from a folder whose config declares a "
            "base_model_tp_plan are; a model built from scratch, as in pretrain, is not)",
            hint="run this stage with tp_size = 1",
        )
