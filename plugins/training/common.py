"""Steps the training stages share around the trainer: data in, tokenizer and template ready, artifacts out."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmforge.chat import ChatTemplate
    from llmforge.stage import StageContext
    from llmforge_plugins.training.options import LoraOptions


def seed_of(opts, ctx) -> int:
    return opts.seed if opts.seed is not None else ctx.seed


def load_rows(data_opts, ctx, expect: tuple[str, ...], name: str = "data"):
    """Read the stage's data with the data plugins; record the report in the stage dir and the events.
    The main data's report is stage_dir/data-report.json; others (replay, heldout) get a folder each."""
    from llmforge.data import load_data, write_report

    ds = load_data(data_opts, ctx.registry.readers, ctx.registry.row_formats, base=ctx.project_dir, expect=expect)
    if ctx.rank == 0:  # every process of a launch reads the same data; one report is enough
        write_report(ds, ctx.stage_dir if name == "data" else ctx.stage_dir / name)
    msg = f"{name}: {len(ds.rows)} rows in the {ds.format} format from {len(ds.files)} file(s)"
    if ds.skipped:
        msg += (
            f"; skipped {len(ds.skipped)} bad rows (first: {ds.skipped[0][0]}: {ds.skipped[0][1]}), "
            f"see {ctx.stage_dir / 'data-report.json'}"
        )
    ctx.log(msg, level="warning" if ds.skipped else "info")
    ctx.emit("dataset", rows=len(ds.rows), format=ds.format, kind=ds.kind, skipped=len(ds.skipped), files=ds.files)
    return ds


def cache_dir(ctx) -> Path:
    """Tokenized datasets live beside the runs, shared by every run of the project."""
    return ctx.run_dir.parent / ".cache" / "tokenized"


def tokenize_split(ctx, rows, kind, tokenizer, template, opts, train_on="assistant"):
    from llmforge_plugins.training import tokenized

    seed = seed_of(opts, ctx)
    train_rows, eval_rows = tokenized.split_eval(rows, opts.eval_split, seed)
    tr = tokenized.tokenize(
        train_rows, kind, tokenizer, template, max_length=opts.max_length, train_on=train_on, cache_dir=cache_dir(ctx)
    )
    ev = (
        tokenized.tokenize(
            eval_rows,
            kind,
            tokenizer,
            template,
            max_length=opts.max_length,
            train_on=train_on,
            cache_dir=cache_dir(ctx),
        )
        if eval_rows
        else None
    )
    s = tr.stats
    ctx.log(
        f"tokenized: {s['sequences']} sequences, {s['tokens']} tokens ({s['trained_tokens']} trained), "
        f"truncated {s['truncated']} ({100 * s['truncation_rate']:.1f}%) at max_length {opts.max_length}"
        + (" [cache hit]" if tr.cached else "")
    )
    ctx.emit("tokenized", cached=tr.cached, key=tr.key, **{k: v for k, v in s.items() if k != "key"})
    if not tr.rows:
        from llmforge.errors import DataError

        raise DataError("no trainable sequences after tokenization (every row was masked out or empty)")
    return tr.rows, (ev.rows if ev else None)


def record_template(ctx, template) -> None:
    ctx.info["chat_template"] = {"name": template.name, "hash": template.hash, "eos": template.eos}
    ctx.emit("template", name=template.name, hash=template.hash)


def check_qlora(lora) -> None:
    if lora is not None and lora.enabled and lora.qlora:
        import torch

        from llmforge.errors import UsageError

        if not torch.cuda.is_available():
            raise UsageError(
                "lora.qlora needs a CUDA GPU (bitsandbytes 4-bit kernels); this machine has none",
                hint="use plain LoRA (lora.qlora = false) on CPU",
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UsageError("lora.qlora needs the bitsandbytes package", hint="pip install bitsandbytes") from None


def qlora_kwargs(lora) -> dict:
    if lora is None or not (lora.enabled and lora.qlora):
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
    }


def save_outputs(
    ctx: StageContext,
    trainer: Any,
    tokenizer: Any,
    template: ChatTemplate | None,
    lora: LoraOptions | None,
    merge: bool,
) -> None:
    """Write the stage's artifacts from the trainer that trained the model: the model (full training), or
    the adapter and, on request, the merged model."""
    from llmforge_plugins.training.models import save_model_dir

    # Sharded weights (DeepSpeed ZeRO-3, FSDP) must be gathered even in one process: rank 0's own
    # tensors are empty shells there.
    sharded = getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False)
    if ctx.world_size > 1 or sharded:
        save_outputs_distributed(ctx, trainer, tokenizer, template, lora, merge)
        return
    trainer_model = trainer.model
    if lora is not None and lora.enabled:
        with ctx.artifact("adapter") as out:
            trainer_model.save_pretrained(str(out), safe_serialization=True)
            tokenizer.save_pretrained(str(out))
        if merge:
            merged = trainer_model.merge_and_unload()
            with ctx.artifact("model") as out:
                save_model_dir(merged, tokenizer, out, template)
    else:
        with ctx.artifact("model") as out:
            save_model_dir(trainer_model, tokenizer, out, template)


def gathered_state_dict(trainer):
    """The full weights, gathered on every rank's call when they are sharded (FSDP, DeepSpeed ZeRO-3);
    None when rank 0's own copy is already whole (DDP). Every rank must call it: it is a collective."""
    if trainer.is_fsdp_enabled:
        return trainer.accelerator.get_state_dict(trainer.model)
    if trainer.is_deepspeed_enabled:
        return trainer.accelerator.get_state_dict(trainer.deepspeed)
    return None


def save_outputs_distributed(ctx, trainer, tokenizer, template, lora, merge: bool) -> None:
    """save_outputs for a launch of several processes: every rank joins the gathers, rank 0 writes (the
    other ranks' artifact folders are scratch, see StageContext.artifact)."""
    from llmforge_plugins.training.models import save_model_dir

    model = trainer.accelerator.unwrap_model(trainer.model)
    if (getattr(model, "tp_size", None) or 1) > 1:
        # Tensor-parallel weights are gathered by transformers' own save, which every rank calls.
        kind = "adapter" if lora is not None and lora.enabled else "model"
        model.config.use_cache = True
        with ctx.artifact(kind) as out:
            trainer.save_model(str(out))
            if ctx.rank == 0:
                (out / "training_args.bin").unlink(missing_ok=True)
                save_template_meta(out, template)
        return
    state = gathered_state_dict(trainer)
    if lora is not None and lora.enabled:
        with ctx.artifact("adapter") as out:
            if ctx.rank == 0:
                model.save_pretrained(str(out), state_dict=state, safe_serialization=True)
                tokenizer.save_pretrained(str(out))
        if merge:  # DDP only (validation refuses merge under FSDP and ZeRO-3): rank 0's model is whole
            with ctx.artifact("model") as out:
                if ctx.rank == 0:
                    save_model_dir(model.merge_and_unload(), tokenizer, out, template)
    else:
        with ctx.artifact("model") as out:
            if ctx.rank == 0:
                save_model_dir(model, tokenizer, out, template, state_dict=state)


def save_template_meta(out, template) -> None:
    import json

    if template is not None:
        meta = {"name": template.name, "hash": template.hash, "eos": template.eos}
        (out / "llmforge.json").write_text(json.dumps({"chat_template": meta}, indent=2))
