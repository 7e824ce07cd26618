"""Curation of files, for the `llmforge data dedup|filter|mix` commands: a file (or folder) in, a
JSON Lines file out (written under a temporary name and renamed), and a report."""

from __future__ import annotations

from pathlib import Path

from llmforge_plugins.curate import engine
from llmforge_plugins.curate.registry import build_steps
from llmforge_plugins.curate.source import JsonlWriter

from llmforge.curation import StepEnv
from llmforge.data import DataOptions, ReadState, iter_rows


def curate_file(src: Path, out: Path, specs: list, fmt: str = "auto", skip_bad: bool = False,
                reasons: Path | None = None, labels: list[str] | None = None, examples: int = 3,
                base: Path | None = None) -> dict:
    """Run ``src`` through the steps of ``specs`` into ``out``; return the report (engine.Curator's,
    plus what was read and where it went)."""
    base = base or Path.cwd()
    steps = build_steps(specs, StepEnv(base_dir=base), labels=labels)
    book = engine.ReasonsFile(reasons) if reasons is not None else None
    state = ReadState()

    def skipped(where: str, reason: str) -> None:
        if book is not None:
            book.add(where, "read", "bad_row", reason)

    curator = engine.Curator(steps, book, examples=examples)
    options = DataOptions(path=str(src), format=fmt, on_bad_row="skip" if skip_bad else "error")
    try:
        with JsonlWriter(out) as writer:
            for _, row in curator.run(iter_rows(options, base, state=state, on_skip=skipped)):
                writer.write(row)
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


def mix_file(recipe: Path, out: Path, seed: int | None = None) -> dict:
    """`llmforge data mix -c mix.toml OUT`: the recipe's sources mixed into ``out``."""
    from llmforge_plugins.curate.mix import mix, read_recipe

    options = read_recipe(recipe)
    if seed is not None:
        options = options.model_copy(update={"seed": seed})
    with JsonlWriter(out) as writer:
        report = mix(options, lambda where, row: writer.write(row), base=recipe.parent.resolve())
        writer.commit()
    report["output"] = str(out)
    return report
