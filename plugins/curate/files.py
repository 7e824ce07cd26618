"""Curation of files, for the `llmforge data dedup|filter|mix` commands: a file (or folder) in, a
file out (written under a temporary name and renamed), and a report. The output is parquet when its
name ends in ``.parquet`` (with the input's column types when the input is parquet too), else JSON
Lines. Rows are written as they came in: every column, in its order; only removed rows are missing
and only the texts a rewrite step changed differ."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmforge.data import DataOptions, ReadState
from llmforge_plugins.curate import engine
from llmforge_plugins.curate.api import StepEnv
from llmforge_plugins.curate.registry import build_steps
from llmforge_plugins.curate.source import open_writer, parquet_schema, records


def curate_file(
    src: Path,
    out: Path,
    specs: list,
    registry: Any,
    fmt: str = "auto",
    skip_bad: bool = False,
    reasons: Path | None = None,
    labels: list[str] | None = None,
    examples: int = 3,
    base: Path | None = None,
) -> dict:
    """Run ``src`` through the steps of ``specs`` (from ``registry``'s curation steps) into ``out``; return
    the report (engine.Curator's, plus what was read and where it went)."""
    base = base or Path.cwd()
    steps = build_steps(specs, StepEnv(base_dir=base, registry=registry), registry, labels=labels)
    book = engine.ReasonsFile(reasons) if reasons is not None else None
    state = ReadState()

    def skipped(where: str, reason: str) -> None:
        if book is not None:
            book.add(where, "read", "bad_row", reason)

    curator = engine.Curator(steps, book, examples=examples)
    options = DataOptions(path=str(src), format=fmt, on_bad_row="skip" if skip_bad else "error")
    schema = parquet_schema(options, registry.readers, base) if out.name.lower().endswith(".parquet") else None
    try:
        with open_writer(out, schema) as writer:
            for rec in curator.run_records(records(options, base, registry, state=state, on_skip=skipped)):
                writer.write(rec.raw)
            writer.commit()
        curator.finish()
        if book is not None:
            book.commit()
    except BaseException:
        if book is not None:
            book.discard()
        raise
    report = curator.report()
    report["read"] = [state.to_json()]
    report["output"] = str(out)
    if reasons is not None:
        report["reasons"] = str(reasons)
    return report


def mix_file(recipe: Path, out: Path, registry: Any, seed: int | None = None) -> dict:
    """`llmforge data mix -c mix.toml OUT`: the recipe's sources mixed into ``out``."""
    from llmforge_plugins.curate.mix import mix, read_recipe

    options = read_recipe(recipe)
    if seed is not None:
        options = options.model_copy(update={"seed": seed})
    base = recipe.parent.resolve()
    schema = None
    if out.name.lower().endswith(".parquet"):
        schemas = [parquet_schema(s.data, registry.readers, base) for s in options.sources]
        schema = schemas[0] if all(x is not None and x.equals(schemas[0]) for x in schemas) else None
    with open_writer(out, schema) as writer:
        report = mix(options, writer.write, registry, base=base)
        writer.commit()
    report["output"] = str(out)
    return report
