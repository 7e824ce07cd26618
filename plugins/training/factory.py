"""The one way a training stage gets its trainer: `build_trainer(kind, ...)`.

pretrain, continued_pretrain and sft train with TRL's SFTTrainer, dpo with its DPOTrainer, reward_model
with its RewardTrainer; a new training stage (an RL stage with GRPOTrainer) adds one more TrainerKind.
Everything else is the same for every kind and lives here once: the TrainingArguments every stage shares
(`common_args`, with the precision choice), the checkpoint folder cleared for a fresh start, LoRA through
PEFT, the Lion optimizer, llmforge's callbacks (events, stop and checkpoint requests, profiling), and a
trainer subclass that counts trained tokens and samples for the throughput metrics.

What differs between kinds is a small declarative TrainerKind: the TRL config and trainer classes,
the config fields that belong to the kind (SFT's packing, DPO's beta), the constructor arguments that
belong to it (DPO's reference model), and whether the model's KV cache must be off. The rows handed
to build_trainer are in the kind's own format: SFT gets rows tokenized by llmforge ({input_ids, labels},
loss masks computed from the chat template), DPO gets preference rows that TRL tokenizes, the reward
trainer pairs tokenized by its stage ({chosen_ids, rejected_ids}).
"""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmforge_plugins.training import dist
from llmforge_plugins.training.callbacks import ForgeCallback
from llmforge_plugins.training.precision import resolve_precision
from llmforge_plugins.training.profiling import ProfileCallback

if TYPE_CHECKING:
    from transformers import TrainerCallback

    from llmforge.stage import StageContext
    from llmforge_plugins.training.options import LoraOptions, TrainOptions


def _no_trainer_args(opts: Any, ctx: Any) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class TrainerKind:
    """What one kind of trainer adds to what every training stage shares.

    `config_class` and `trainer_class` are "module:Name" strings, imported only when a trainer is built
    (TRL is heavy; the stage modules are imported at start-up). `config_args(opts)` gives the config
    fields of this kind, beside common_args'; `trainer_args(opts, ctx)` the constructor arguments beside
    model, args, processing_class, datasets, peft_config and callbacks (a reference model, reward
    functions). `disable_kv_cache` turns the model's KV cache off before training."""

    name: str
    config_class: str
    trainer_class: str
    config_args: Callable[[Any], dict[str, Any]]
    trainer_args: Callable[[Any, Any], dict[str, Any]] = _no_trainer_args
    disable_kv_cache: bool = False
    #: PEFT's task type for LoRA: a reward model is a sequence classifier (PEFT then trains its score
    #: head in full beside the adapter, and the head is saved with it).
    peft_task_type: str = "CAUSAL_LM"

    def classes(self) -> tuple[type, type]:
        """The config and trainer classes, imported now."""
        return _import(self.config_class), _import(self.trainer_class)


def _import(target: str) -> type:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _sft_config(opts: Any) -> dict[str, Any]:
    # The rows come tokenized with llmforge's loss masks (llmforge.chat), one masking implementation for
    # every template: TRL only packs (best-fit, padding-free), batches and trains. It must neither
    # recompute masks nor reorder the rows (the Trainer's sampler shuffles them, seeded by data_seed).
    return dict(
        max_length=opts.max_length,
        packing=opts.packing,
        packing_strategy="bfd",
        padding_free=opts.packing,
        dataset_num_proc=None,
        assistant_only_loss=False,
        completion_only_loss=None,
        shuffle_dataset=False,
    )


def _dpo_config(opts: Any) -> dict[str, Any]:
    # TRL takes a list of loss types (they can be combined); the stage offers one.
    return dict(beta=opts.beta, loss_type=[opts.loss_type], max_length=opts.max_length, dataset_num_proc=None)


def _dpo_trainer_args(opts: Any, ctx: Any) -> dict[str, Any]:
    # No second model in memory: with LoRA, TRL's reference is the base with the adapter switched off;
    # in full training TRL loads a frozen copy of the model from its folder.
    return {"ref_model": None}


#: SFTTrainer on rows tokenized by llmforge: pretrain, continued_pretrain and sft. With a KV cache in
#: play, transformers does not derive per-sample masks from restarting position ids, and packed samples
#: would attend to each other; training needs no cache, so it is turned off.
SFT = TrainerKind("sft", "trl:SFTConfig", "trl:SFTTrainer", _sft_config, disable_kv_cache=True)
#: DPOTrainer on preference rows (prompt, chosen, rejected): dpo.
DPO = TrainerKind("dpo", "trl:DPOConfig", "trl:DPOTrainer", _dpo_config, _dpo_trainer_args)


def _reward_config(opts: Any) -> dict[str, Any]:
    # The rows come tokenized by the stage (chosen_ids, rejected_ids), already cut to max_length, the way
    # RewardScorer formats them later: TRL pads, batches and trains.
    return dict(
        max_length=opts.max_length,
        dataset_num_proc=None,
        center_rewards_coefficient=opts.center_rewards or None,
    )


#: RewardTrainer on tokenized preference pairs (a sequence classifier with one output): reward_model.
REWARD = TrainerKind("reward", "trl:RewardConfig", "trl:RewardTrainer", _reward_config, peft_task_type="SEQ_CLS")


@dataclass
class Training:
    """A trainer built by build_trainer, and what running it needs: the callback that reports and
    stops it, the folder of its checkpoints, and its precision as the training log names it."""

    trainer: Any
    callback: ForgeCallback
    output_dir: Path
    precision: str


def common_args(
    opts: TrainOptions, ctx: StageContext, output_dir: Path, has_eval: bool, model: Any = None
) -> tuple[dict[str, Any], str]:
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


def trainer_config(
    kind: TrainerKind, opts: TrainOptions, ctx: StageContext, output_dir: Path, has_eval: bool, model: Any = None
) -> tuple[Any, str]:
    """The kind's TRL config (common_args plus the kind's own fields), and the precision as logged."""
    args, precision = common_args(opts, ctx, output_dir, has_eval, model=model)
    config_class, _ = kind.classes()
    return config_class(**args, **kind.config_args(opts)), precision


def build_trainer(
    kind: TrainerKind,
    *,
    ctx: StageContext,
    opts: TrainOptions,
    model: Any,
    tokenizer: Any,
    train_rows: list[dict],
    eval_rows: list[dict] | None,
    lora: LoraOptions | None = None,
    extra_callbacks: Sequence[TrainerCallback] = (),
) -> Training:
    """A trainer of `kind` for `model` on `train_rows` (and `eval_rows`, evaluated at the end and every
    `eval_every` steps), with llmforge's callbacks, then `extra_callbacks`; a LoRA adapter when
    `lora.enabled`. A fresh (not resumed) stage starts without the checkpoints of an earlier attempt."""
    import datasets
    from datasets import Dataset

    datasets.disable_progress_bars()
    output_dir = ctx.work_dir / "checkpoints"
    if kind.disable_kv_cache:
        model.config.use_cache = False
    # The config first: creating it sets up the process group under a launching backend, which the
    # clearing below waits on.
    config, precision = trainer_config(kind, opts, ctx, output_dir, bool(eval_rows), model=model)
    clear_checkpoints(ctx, output_dir)
    callback = ForgeCallback(ctx, precision, opts.save_minutes)
    callbacks = [callback, *extra_callbacks]
    if opts.profile:
        callbacks.append(ProfileCallback(ctx, ctx.stage_dir / "profile"))
    _, trainer_class = kind.classes()
    trainer = counting(trainer_class)(
        model=model,
        args=config,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        peft_config=lora_config(lora, model, ctx.log, kind.peft_task_type)
        if lora is not None and lora.enabled
        else None,
        callbacks=callbacks,
        **kind.trainer_args(opts, ctx),
    )
    # Not every trainer's constructor takes optimizer_cls_and_kwargs (DPOTrainer does not); the base
    # Trainer reads the attribute when it creates the optimizer at the start of training, so setting it
    # here works for every kind.
    trainer.optimizer_cls_and_kwargs = optimizer_spec(opts)
    if lora is not None and lora.enabled:
        from llmforge_plugins.training.targets import adapted

        ctx.log(f"LoRA adapts: {', '.join(adapted(trainer.model))}")
    callback.trainer = trainer
    quiet(trainer)
    return Training(trainer, callback, output_dir, precision)


def clear_checkpoints(ctx: StageContext, output_dir: Path) -> None:
    """A fresh start of the stage (not --resume) drops the checkpoints of an earlier attempt. One process
    deletes; the others wait for it, so that none of them writes into the folder being deleted."""
    if not ctx.resume and ctx.rank == 0 and output_dir.exists():
        shutil.rmtree(output_dir)
    dist.barrier()


def lora_config(lora: LoraOptions, model: Any = None, log: Any = None, task_type: str = "CAUSAL_LM") -> Any:
    """PEFT's LoraConfig for the stage's `lora` options, fitted to `model`'s family (fused MoE experts:
    see llmforge_plugins.training.targets)."""
    from llmforge_plugins.training.targets import lora_config as fitted

    config = fitted(lora, model, log)
    config.task_type = task_type
    return config


def optimizer_spec(opts: TrainOptions) -> tuple[type, dict[str, Any]] | None:
    """The Trainer's `optimizer_cls_and_kwargs` for `optimizer = "lion"`; None keeps its AdamW."""
    if opts.optimizer == "lion":
        from llmforge_plugins.training.lion import Lion

        return (Lion, {"lr": opts.learning_rate, "weight_decay": opts.weight_decay})
    return None


def counting(base: type) -> type:
    """A subclass of trainer class `base` that counts useful tokens (those with a label) and samples per
    step, for the throughput metrics ForgeCallback reports."""

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


def quiet(trainer: Any) -> None:
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
