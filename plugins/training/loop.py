"""The training loop every training stage shares: TRL's SFTTrainer on pre-tokenized rows, with
llmforge's events, cooperative stop/checkpoint, complete-checkpoint resume and precision choice.

Rows arrive tokenized ({"input_ids", "labels"}): we compute the loss masks ourselves (llmforge.chat),
so TRL only packs, batches and trains. That keeps one masking implementation for every template.

Under a launching backend the same code runs in every process (`ctx.rank`, `ctx.world_size`): decisions
that change the control flow (stop, save) are agreed by all ranks at the same step, and only rank 0
writes checkpoint markers, once every rank's part of the checkpoint is on disk.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import TrainerCallback

from llmforge.errors import UsageError
from llmforge_plugins.training import dist
from llmforge_plugins.training.watchdog import Watchdog, minutes_for

COMPLETE = "llmforge-complete"  # written into a checkpoint folder once everything in it is on disk
# The trainer of the stage running in this process, for the gathered save of a launch. Weak: it must not
# keep a finished stage's model and optimizer alive while the next stage trains.
ACTIVE: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()


# ----------------------------------------------------------------------------------------------
# precision


def resolve_precision(precision: str, params: int | None = None) -> dict[str, Any]:
    """TrainingArguments fields for a precision choice. `auto` is llmforge.precision's decision (the one
    `llmforge plan` shows), from what torch says about the device and the model's parameter count."""
    from llmforge.hardware import cpu_features
    from llmforge.precision import choose_precision

    cuda = torch.cuda.is_available()
    mps = torch.backends.mps.is_available()
    device = "cuda" if cuda else ("mps" if mps else "cpu")
    choice = choose_precision(precision, device=device, gpu_bf16=cuda and torch.cuda.is_bf16_supported(),
                              cpu_bf16_fast=device == "cpu" and cpu_features()["bf16_fast"], params=params)
    if choice.name == "fp16" and not cuda:
        raise UsageError("precision = \"fp16\" needs a CUDA GPU", hint="use precision = \"auto\", \"bf16\" or \"fp32\"")
    return {"use_cpu": not (cuda or mps), "bf16": choice.name == "bf16", "fp16": choice.name == "fp16",
            "_name": choice.name, "_reason": choice.reason}


# ----------------------------------------------------------------------------------------------
# checkpoints


def latest_complete_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint whose save finished; half-written ones (killed mid-save) are ignored."""
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if (p / COMPLETE).exists() and (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def drop_incomplete_checkpoints(folder: Path) -> None:
    for p in folder.glob("checkpoint-*"):
        if not (p / COMPLETE).exists():
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# callbacks


class AlreadyTrained(Exception):
    """Raised from on_train_begin when the checkpoint resumed from is at (or past) max_steps."""


class ForgeCallback(TrainerCallback):
    """Turns the trainer's progress into llmforge events and honours stop/checkpoint requests."""

    def __init__(self, ctx, trainer_ref: dict, stage_kind: str, save_minutes: float | None = None):
        self.ctx = ctx
        self.save_seconds = save_minutes * 60 if save_minutes else None
        self.last_save = time.monotonic()
        self.ref = trainer_ref
        self.kind = stage_kind
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
        trainer = self.ref.get("trainer")
        if trainer is not None:
            self.last_tokens = trainer.useful_tokens
            self.last_samples = trainer.samples_seen
        world = f", {self.ctx.world_size} processes" if self.ctx.world_size > 1 else ""
        self.ctx.log(f"training: {state.max_steps} steps, precision {self.ref.get('precision')}{world}"
                     + (f", resuming at step {state.global_step}" if state.global_step else ""))
        self.step = state.global_step
        self.watchdog.start()

    def on_step_end(self, args, state, control, **kw):
        self.step = state.global_step
        self.watchdog.beat()
        stop = self.ctx.should_stop()
        checkpoint = not stop and self.ctx.checkpoint_requested()
        # Rank 0's clock decides time-based saves, so that the ranks never disagree by a step.
        timed = bool(self.save_seconds) and self.ctx.rank == 0 and \
            time.monotonic() - self.last_save >= self.save_seconds
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
        done = state.global_step - self.ref.get("start_step", 0)
        eta = elapsed / done * (state.max_steps - state.global_step) if done else None
        self.ctx.progress(state.global_step, state.max_steps, unit="step", eta_s=round(eta, 1) if eta else None)

    def on_log(self, args, state, control, logs=None, **kw):
        logs = dict(logs or {})
        now = time.monotonic()
        trainer = self.ref.get("trainer")
        values: dict[str, float] = {}
        for key in ("loss", "eval_loss", "learning_rate", "grad_norm", "epoch"):
            if key in logs and logs[key] is not None:
                values[key] = float(logs[key])
        for key, v in logs.items():  # DPO reports rewards/margins/accuracies
            if key.startswith(("rewards/", "logps/", "eval_rewards/")) and isinstance(v, (int, float)):
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
            marker = ckpt / COMPLETE
            backend = getattr(self.ctx.backend, "name", "local")
            with open(marker, "w") as fh:
                fh.write(json.dumps({"step": state.global_step, "time": time.time(),
                                     "world_size": self.ctx.world_size, "backend": backend}))
                fh.flush()
                os.fsync(fh.fileno())
            self.ctx.emit("checkpoint", step=state.global_step, path=str(ckpt))


class ProfileCallback(TrainerCallback):
    """Profile a few steps (after a warm-up step) and leave a trace and a top-operators table."""

    def __init__(self, ctx, out_dir: Path, warmup: int = 1, active: int = 3):
        self.ctx, self.out_dir, self.warmup, self.active = ctx, out_dir, warmup, active
        self.prof = None
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
        if self.prof is not None:
            self._finish()

    def _finish(self):
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / "trace.json"
        prof.export_chrome_trace(str(trace))
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
        (self.out_dir / "top-operators.txt").write_text(table)
        top = [{"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1000, 3), "calls": e.count}
               for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]]
        self.ctx.emit("profile", trace=str(trace), top=top)
        self.ctx.log(f"profile written: {trace} (open in Perfetto or chrome://tracing)")
        self.warmup = 10**9  # once per run


# ----------------------------------------------------------------------------------------------
# trainer


def _counting(base):
    """A trainer subclass that counts useful tokens (those with a label) and samples per step."""

    class Counting(base):
        useful_tokens = 0
        samples_seen = 0

        def training_step(self, model, inputs, *args, **kwargs):
            labels = inputs.get("labels")
            if labels is not None:
                self.useful_tokens += int((labels[..., 1:] != -100).sum())
            pos = inputs.get("position_ids")
            if pos is not None and "attention_mask" not in inputs:
                self.samples_seen += int((pos == 0).sum())
            elif "input_ids" in inputs:
                self.samples_seen += int(inputs["input_ids"].shape[0])
            return super().training_step(model, inputs, *args, **kwargs)

    Counting.__name__ = f"Forge{base.__name__}"
    return Counting


@dataclass
class TrainOutcome:
    trainer: Any
    stopped: bool
    final_loss: float | None
    eval_loss: float | None
    steps: int
    trained_tokens: int = 0  # tokens that carried a label, this session
    train_seconds: float = 0.0

    def record(self, ctx) -> None:
        ctx.info.update(final_loss=self.final_loss, eval_loss=self.eval_loss, steps=self.steps,
                        trained_tokens=self.trained_tokens, train_seconds=round(self.train_seconds, 3))


def common_args(opts, ctx, output_dir: Path, has_eval: bool, model=None) -> tuple[dict[str, Any], str]:
    """The TrainingArguments every stage shares, and the precision as the training log names it (with
    why, for "auto"). `model` (the one being trained) decides what "auto" becomes on a CPU."""
    prec = resolve_precision(opts.precision, model.num_parameters() if model is not None else None)
    seed = opts.seed if opts.seed is not None else ctx.seed
    args = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=opts.micro_batch_size,
        per_device_eval_batch_size=opts.micro_batch_size,
        gradient_accumulation_steps=opts.gradient_accumulation,
        num_train_epochs=opts.epochs,
        max_steps=opts.max_steps or -1,
        learning_rate=opts.learning_rate,
        warmup_steps=opts.warmup_ratio,
        lr_scheduler_type=opts.lr_schedule if opts.lr_schedule != "constant" else "constant_with_warmup",
        weight_decay=opts.weight_decay,
        max_grad_norm=opts.max_grad_norm,
        logging_steps=opts.log_every,
        # Without save_every, checkpoints are time-based (ForgeCallback): short runs don't spend their
        # time writing checkpoints, long ones never lose more than save_minutes of work.
        save_strategy="steps" if opts.save_every else "no",
        save_steps=opts.save_every or 500,
        save_total_limit=opts.keep_last,
        eval_strategy=("steps" if opts.eval_every else "no") if has_eval else "no",
        eval_steps=opts.eval_every,
        seed=seed,
        data_seed=seed,
        report_to="none",
        disable_tqdm=True,
        activation_checkpointing=opts.gradient_checkpointing,
        use_cpu=prec["use_cpu"],
        bf16=prec["bf16"],
        fp16=prec["fp16"],
        dataloader_num_workers=0,
    )
    if ctx.backend is not None:
        args.update(ctx.backend.trainer_args(ctx))  # e.g. deepspeed=<the launch's JSON>
    return args, prec["_name"] + (f" ({prec['_reason']})" if prec["_reason"] else "")


def lora_config(lora):
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM")


def optimizer_spec(opts):
    if opts.optimizer == "lion":
        from llmforge_plugins.training.lion import Lion

        return (Lion, {"lr": opts.learning_rate, "weight_decay": opts.weight_decay})
    return None


def run_trainer(trainer, ctx, callback: ForgeCallback, output_dir: Path) -> TrainOutcome:
    """Train, resuming from the last complete checkpoint when the stage is resumed."""
    ACTIVE["trainer"] = trainer
    check_tensor_parallel(trainer, ctx)
    fsdp = getattr(getattr(getattr(ctx.backend, "settings", None), "fsdp", None), "enabled", False)
    if fsdp and not trainer.is_fsdp_enabled:
        ctx.log("backend.fsdp.enabled is set but accelerate did not shard the model: FSDP needs GPUs (on CPUs "
                "the processes train as plain data parallel, over gloo)", level="warning")
    resume_from = None
    if ctx.resume:
        if ctx.rank == 0:
            drop_incomplete_checkpoints(output_dir)  # only complete ones count, so the others need not wait
        ckpt = latest_complete_checkpoint(output_dir)
        if ckpt is not None:
            resume_from = str(ckpt)
            callback.ref["start_step"] = int(ckpt.name.split("-")[-1])
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
    return TrainOutcome(trainer, callback.stopped, losses[-1] if losses else getattr(result, "training_loss", None),
                        eval_loss, trainer.state.global_step, getattr(trainer, "useful_tokens", 0), seconds)


def note_world_change(ckpt: Path, ctx) -> None:
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
        raise UsageError(f"{ckpt.name} was written by the {backend} backend with {world} process(es); this run "
                         f"uses {now} with {ctx.world_size}: DeepSpeed checkpoints resume only under DeepSpeed "
                         "with the same number of processes",
                         hint="resume with the same [backend], or convert the checkpoint with DeepSpeed's "
                              "ds_to_universal.py")
    ctx.log(f"{ckpt.name} was written by {world} process(es), this run has {ctx.world_size}: the weights, the "
            "optimizer state, the learning-rate schedule and the position in the data carry over; each process's "
            "random state restarts, and the global batch is now micro_batch_size x gradient_accumulation x "
            f"{ctx.world_size}")


def check_tensor_parallel(trainer, ctx) -> None:
    settings = getattr(ctx.backend, "settings", None)
    tp = getattr(settings, "tp_size", 1)
    if tp > 1 and (getattr(trainer.model, "tp_size", None) or 1) != tp:
        raise UsageError(f"stage {ctx.stage_name}: tp_size = {tp}, but its model was not loaded with tensor "
                         "parallelism (only models loaded from a folder whose config declares a "
                         "base_model_tp_plan are; a model built from scratch, as in pretrain, is not)",
                         hint="run this stage with tp_size = 1")


def current_trainer():
    """The trainer of the stage running in this process, once run_trainer was called."""
    return ACTIVE.get("trainer")


def build_sft_trainer(*, ctx, opts, model, tokenizer, train_rows: list[dict], eval_rows: list[dict] | None,
                      lora=None, stage_kind: str = "sft", extra_callbacks=()):
    """SFTTrainer over pre-tokenized rows ({input_ids, labels}); TRL packs (best-fit, padding-free)."""
    import datasets
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()

    output_dir = ctx.work_dir / "checkpoints"
    if not ctx.resume and output_dir.exists() and ctx.rank == 0:  # one process clears, the others write later
        shutil.rmtree(output_dir)
    # With a KV cache in play, transformers does not derive per-sample masks from restarting position
    # ids, and packed samples would attend to each other. Training needs no cache: turn it off.
    model.config.use_cache = False
    args, precision = common_args(opts, ctx, output_dir, bool(eval_rows), model=model)
    config = SFTConfig(**args, max_length=opts.max_length, packing=opts.packing, packing_strategy="bfd",
                       padding_free=opts.packing, dataset_num_proc=None, assistant_only_loss=False,
                       completion_only_loss=None, shuffle_dataset=False)
    ref: dict = {"precision": precision}
    callback = ForgeCallback(ctx, ref, stage_kind, opts.save_minutes)
    callbacks = [callback, *extra_callbacks]
    if opts.profile:
        callbacks.append(ProfileCallback(ctx, ctx.stage_dir / "profile"))
    trainer = _counting(SFTTrainer)(
        model=model, args=config, processing_class=tokenizer,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        peft_config=lora_config(lora) if lora is not None and lora.enabled else None,
        optimizer_cls_and_kwargs=optimizer_spec(opts), callbacks=callbacks,
    )
    ref["trainer"] = trainer
    quiet(trainer)
    return trainer, callback, output_dir


def quiet(trainer) -> None:
    """Our events replace the trainer's printed dicts and the datasets progress bars."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    # transformers added its stderr handler when first imported, inside the stage: extend the runner's
    # diversion of library chatter (debug events, see llmforge/chatter.py) to it, so that the trainer's
    # routine lines (`missing keys ... ['lm_head.weight']` on resuming a tied-embedding model, which is
    # expected: the head is the embedding) stay in the run's events and out of the terminal.
    from llmforge.chatter import cover_late_handlers

    cover_late_handlers()


def perplexity(model, rows: list[dict], batch_size: int = 4) -> float:
    """exp(mean token loss) over rows of {input_ids, labels}, one sequence at a time group (no packing)."""
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            for row in rows[i:i + batch_size]:
                ids = torch.tensor([row["input_ids"]], device=device)
                labels = torch.tensor([row["labels"]], device=device)
                n = int((labels[:, 1:] != -100).sum())
                if n == 0:
                    continue
                out = model(input_ids=ids, labels=labels)
                total += float(out.loss) * n
                count += n
    return math.exp(total / max(count, 1))
