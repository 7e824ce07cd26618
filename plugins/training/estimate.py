"""The training stages' estimates for `llmforge plan` (pretrain, continued_pretrain, sft, dpo): their
options read into llmforge.planning's `Training`, and the core's arithmetic (`estimate_training`) applied
to the model they train. Light: no torch, so a plan answers in milliseconds.

Each stage's `estimate` calls `training_estimate` with the shape of the model it trains (the pretrain
stage's size preset, or the model input's shape through `env.shape_of("model")`), and its
`output_shape` calls `trained_shape`, so a stage downstream plans with the model this one writes.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from llmforge.planning import Estimate, PlanEnv, Shape, ShapeUnknown, Training, estimate_training


def training_setup(
    options: Any, env: PlanEnv, shape: Shape, pairs: bool = False, reference: bool | None = None
) -> Training:
    """How the stage trains, from its options: batch, sequence, precision as the training loop will choose
    it on this machine, LoRA/QLoRA, optimizer, checkpoints kept. `pairs` (DPO): chosen and rejected go
    through the model together, and without LoRA a frozen copy of the model is the reference; `reference`
    False: pairs without a reference model (a reward model's)."""
    lora = getattr(options, "lora", None)  # pretrain has no LoRA table
    if lora is not None and not lora.enabled:
        lora = None  # a LoRA table switched off trains all weights, like no table
    on = lora is not None
    return Training(
        micro_batch=options.micro_batch_size,
        seq=options.max_length,
        grad_accum=options.gradient_accumulation,
        precision=env.precision(options.precision, shape.params()),
        checkpointing=bool(getattr(options, "gradient_checkpointing", False)),
        optimizer=getattr(options, "optimizer", "adamw"),
        lora=on,
        lora_r=lora.r if lora is not None else 16,
        # On a MoE model PEFT adapts experts and router as parameters, without dropout: the training stage
        # drops the default dropout to 0 there (training/targets.py), so no dropped-out copies are kept.
        lora_dropout=0.0 if lora is None or (shape.moe and "dropout" not in lora.model_fields_set) else lora.dropout,
        lora_targets=lora.target_modules if lora is not None else "all-linear",
        qlora=lora is not None and bool(getattr(lora, "qlora", False)),
        pairs=pairs,
        reference_copy=pairs and not on and reference is not False,
        keep_last=getattr(options, "keep_last", 2),
        merge=on and bool(getattr(options, "merge", False)),
    )


def training_estimate(
    options: Any, env: PlanEnv, shape: Shape, pairs: bool = False, reference: bool | None = None
) -> Estimate:
    """Peak memory of one training process, host RAM and disk, for training `shape` with these options
    under the run's backend on this machine's device."""
    t = training_setup(options, env, shape, pairs, reference)
    est = estimate_training(shape, t, env.backend, env.device)
    if t.qlora and env.device != "cuda":
        est.notes.append("QLoRA needs a CUDA GPU (bitsandbytes); this estimate assumes one")
    return est


def trained_shape(options: Any, shape: Shape) -> Shape:
    """The model a training stage writes, given the one it trains: the same, except that QLoRA's merged
    model is written in bf16 (the adapter is merged onto the bf16 compute copy of the 4-bit base)."""
    lora = getattr(options, "lora", None)
    if lora is not None and getattr(lora, "enabled", False) and getattr(lora, "qlora", False):
        return replace(shape, dtype="bfloat16")
    return shape


def pretrain_shape(options: Any, env: PlanEnv) -> Shape:
    """The model the pretrain stage builds: its size preset with the `model` table's overrides, and the
    vocabulary of its tokenizer (a given one's, else `vocab_size`, an upper bound for a trained BPE)."""
    from llmforge_plugins.training.presets import PRESETS, preset_shape

    vocab = int(options.vocab_size)
    if options.tokenizer is not None:
        vocab = env.vocab_of("tokenizer") or vocab
    dims = options.model.model_dump()
    size = dims.pop("size", "mini")
    if size not in PRESETS:
        raise ShapeUnknown(f"unknown size preset {size!r}")
    return preset_shape(size, vocab, dims, f"{env.stage}: preset {size}")
