"""Steps the training stages share around the trainer: data in, tokenizer and template ready, artifacts out."""

from __future__ import annotations

from pathlib import Path


def seed_of(opts, ctx) -> int:
    return opts.seed if opts.seed is not None else ctx.seed


def load_rows(data_opts, ctx, expect: tuple[str, ...], name: str = "data"):
    """Read the stage's data with the data plugins; record the report in the stage dir and the events.
    The main data's report is stage_dir/data-report.json; others (replay, heldout) get a folder each."""
    from llmforge.data import load_data, write_report

    ds = load_data(data_opts, base=ctx.project_dir, expect=expect)
    write_report(ds, ctx.stage_dir if name == "data" else ctx.stage_dir / name)
    msg = f"{name}: {len(ds.rows)} rows in the {ds.format} format from {len(ds.files)} file(s)"
    if ds.skipped:
        msg += f"; skipped {len(ds.skipped)} bad rows (first: {ds.skipped[0][0]}: {ds.skipped[0][1]}), " \
               f"see {ctx.stage_dir / 'data-report.json'}"
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
    tr = tokenized.tokenize(train_rows, kind, tokenizer, template, max_length=opts.max_length, train_on=train_on,
                            cache_dir=cache_dir(ctx))
    ev = tokenized.tokenize(eval_rows, kind, tokenizer, template, max_length=opts.max_length, train_on=train_on,
                            cache_dir=cache_dir(ctx)) if eval_rows else None
    s = tr.stats
    ctx.log(f"tokenized: {s['sequences']} sequences, {s['tokens']} tokens ({s['trained_tokens']} trained), "
            f"truncated {s['truncated']} ({100 * s['truncation_rate']:.1f}%) at max_length {opts.max_length}"
            + (" [cache hit]" if tr.cached else ""))
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
            raise UsageError("lora.qlora needs a CUDA GPU (bitsandbytes 4-bit kernels); this machine has none",
                             hint="use plain LoRA (lora.qlora = false) on CPU")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UsageError("lora.qlora needs the bitsandbytes package", hint="pip install bitsandbytes") from None


def qlora_kwargs(lora) -> dict:
    if lora is None or not (lora.enabled and lora.qlora):
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_compute_dtype=torch.bfloat16,
                                                      bnb_4bit_use_double_quant=True)}


def save_outputs(ctx, trainer_model, tokenizer, template, lora, merge: bool, base_path: str | None = None) -> None:
    """Write the stage's artifacts: the model (full training), or the adapter and, on request, the merged model."""
    from llmforge_plugins.training.models import save_model_dir

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
