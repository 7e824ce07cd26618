"""Checkpoints you can stop and resume exactly: which ones count, and what resuming one means.

The Trainer writes `checkpoint-<step>/` folders under the stage's `work/checkpoints`. A process killed
mid-save leaves a half-written folder that looks like a checkpoint, so llmforge writes a marker file
(COMPLETE) into a folder once every process's part of it is on disk, and resumes only from marked ones.
The marker also records how many processes, and which backend, wrote the checkpoint: resuming under a
different launch is allowed where the state carries over and refused where it cannot (DeepSpeed).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from llmforge.errors import UsageError

COMPLETE = "llmforge-complete"  # written into a checkpoint folder once everything in it is on disk


class AlreadyTrained(Exception):
    """Raised from on_train_begin when the checkpoint resumed from is at (or past) max_steps."""


def step_of(ckpt: Path) -> int:
    """The global step a `checkpoint-<step>` folder was saved at."""
    return int(ckpt.name.split("-")[-1])


def latest_complete_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint whose save finished; half-written ones (killed mid-save) are ignored."""
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if (p / COMPLETE).exists() and (p / "trainer_state.json").exists()]
    return max(done, key=step_of, default=None)


def drop_incomplete_checkpoints(folder: Path) -> None:
    """Delete the checkpoint folders that lack the marker (a save that never finished)."""
    for p in folder.glob("checkpoint-*"):
        if not (p / COMPLETE).exists():
            shutil.rmtree(p, ignore_errors=True)


def mark_complete(ckpt: Path, step: int, ctx: Any) -> None:
    """Write the marker into `ckpt` (rank 0, after every rank's files are on disk), synced, so that a crash
    right after it still finds the checkpoint whole."""
    backend = getattr(ctx.backend, "name", "local")
    with open(ckpt / COMPLETE, "w") as fh:
        fh.write(json.dumps({"step": step, "time": time.time(), "world_size": ctx.world_size, "backend": backend}))
        fh.flush()
        os.fsync(fh.fileno())


def note_world_change(ckpt: Path, ctx: Any) -> None:
    """Resuming with another number of processes: say what carries over, refuse what cannot."""
    try:
        saved = json.loads((ckpt / COMPLETE).read_text())
    except (OSError, json.JSONDecodeError):
        return
    world, backend = saved.get("world_size", 1), saved.get("backend", "local")
    now = getattr(ctx.backend, "name", "local")
    if world == ctx.world_size and (backend == now or "deepspeed" not in (backend, now)):
        return
    if "deepspeed" in (backend, now):
        # DeepSpeed partitions the optimizer (and with ZeRO-3 the weights) per process in its own format.
        raise UsageError(
            f"{ckpt.name} was written by the {backend} backend with {world} process(es); this run "
            f"uses {now} with {ctx.world_size}: DeepSpeed checkpoints resume only under DeepSpeed "
            "with the same number of processes",
            hint="resume with the same [backend], or convert the checkpoint with DeepSpeed's ds_to_universal.py",
        )
    ctx.log(
        f"{ckpt.name} was written by {world} process(es), this run has {ctx.world_size}: the weights, the "
        "optimizer state, the learning-rate schedule and the position in the data carry over; each process's "
        "random state restarts, and the global batch is now micro_batch_size x gradient_accumulation x "
        f"{ctx.world_size}"
    )
