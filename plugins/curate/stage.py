"""The `curate` stage: rows from one source (``data``) or several (``mix``) through curation steps,
written as a dataset artifact that a training stage reads with ``data = { path = "@curate" }``.

Artifacts:

* ``dataset``: ``data.jsonl`` (``data.parquet`` when the input is parquet files of one schema), the
  kept rows as they came in (every column, in its order; only the texts a rewrite step changed
  differ), and ``.llmforge-data.json``, the row format and column mapping they are read with, so that
  a training stage reads ``@curate`` as the curate stage read its source;
* ``report``: ``report.json`` (rows in and out, per step what it kept, removed by reason and rewrote,
  examples of removed rows; the mix's shares), ``report.md`` (the same for people) and
  ``reasons.jsonl`` (one line per removed row: ``source``, ``step``, ``code``, ``reason``).

With ``mix``, each source goes through the steps (one set of step instances, so deduplication also
works across sources), its kept rows are parked in the stage's work folder, and then the mix takes its
shares from them: shares are of curated data, and up-sampled repeats are not mistaken for duplicates.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import Field, model_validator

from llmforge.data import DataOptions
from llmforge.errors import Problem
from llmforge.stage import Artifact, Produced, Stage, StageContext, StageOptions
from llmforge_plugins.curate.mix import MixOptions

if TYPE_CHECKING:
    from llmforge.plugins import Registry
    from llmforge_plugins.curate.engine import Curator

DEFAULT_STEPS: list[str | dict[str, Any]] = ["normalize", "exact_dedup", "near_dedup", "quality"]


class CurateOptions(StageOptions):
    data: DataOptions | None = Field(None, description="The rows to curate (as a training stage's `data`).")
    mix: MixOptions | None = Field(
        None, description="Several sources, each curated, then mixed by ratio, budget or epochs (instead of `data`)."
    )
    steps: list[str | dict[str, Any]] = Field(
        default_factory=lambda: list(DEFAULT_STEPS),
        description='Curation steps in order: names, or tables {step = "name", option = value}. '
        "`llmforge data steps` lists them.",
    )
    examples: int = Field(5, ge=0, le=1000, description="Examples of removed rows kept per step in the report.")

    @model_validator(mode="after")
    def _one_source(self) -> CurateOptions:
        if (self.data is None) == (self.mix is None):
            raise ValueError(
                "give `data` (one source) or `mix` (several), not both"
                if self.data
                else "give `data` (one source) or `mix` (several sources)"
            )
        return self


class CurateStage(Stage[CurateOptions]):
    kind = "curate"
    summary = "Clean, deduplicate, filter, decontaminate and mix data; writes a dataset other stages read."
    Options = CurateOptions
    produces = ("dataset", "report")
    version = "1"
    cache_libraries = ("numpy",)
    #: under a launching backend (accelerate, deepspeed) curation still runs once, in the run's process
    distributed = False

    def check(
        self, options: CurateOptions, inputs: dict[str, Artifact], registry: Registry | None = None
    ) -> list[Problem]:
        from llmforge_plugins.curate.registry import parse_steps

        # the pipeline passes its registry to a check that names the parameter: the steps are its table
        assert registry is not None, "curate's check needs the registry (the pipeline passes it)"

        _, problems = parse_steps(options.steps, registry)
        return problems

    def cache_key_extra(
        self, options: CurateOptions, project_dir: Path, registry: Registry | None = None
    ) -> dict[str, Any]:
        from llmforge_plugins.curate.registry import fingerprints, parse_steps

        assert registry is not None, "curate's cache key needs the registry (the pipeline passes it)"

        # The sources and mix.tokenizer are inputs the pipeline fingerprints; files named inside step
        # options (evaluation sets, a tokenizer) are not, so they are fingerprinted here.
        parsed, problems = parse_steps(options.steps, registry)
        return {} if problems else fingerprints(parsed, project_dir)

    def run(self, options: CurateOptions, ctx: StageContext) -> Produced | None:
        from llmforge.data import ReadState, write_dataset_meta
        from llmforge_plugins.curate import engine
        from llmforge_plugins.curate import report as reports
        from llmforge_plugins.curate.api import StepEnv
        from llmforge_plugins.curate.registry import build_steps
        from llmforge_plugins.curate.source import Parking, open_writer, parquet_schema, records

        registry = ctx.registry
        env = StepEnv(base_dir=ctx.project_dir, registry=registry, seed=ctx.seed, log=ctx.log)
        steps = build_steps(options.steps, env, registry)
        ctx.log("steps: " + (" -> ".join(s.name for s in steps) or "none"))
        reasons_tmp = ctx.work_dir / "reasons.jsonl"
        reasons = engine.ReasonsFile(reasons_tmp)
        curator = engine.Curator(steps, reasons, examples=options.examples)
        started = time.monotonic()
        last = [0.0]

        def progress(rows_in: int, rows_out: int) -> None:
            now = time.monotonic()
            if now - last[0] >= 1.0:
                last[0] = now
                ctx.progress(rows_in, None, unit="row", kept=rows_out)

        def skipped(where: str, reason: str) -> None:
            reasons.add(where, "read", "bad_row", reason)

        sources: list[tuple[str | None, DataOptions]]
        if options.data is not None:
            sources = [(None, options.data)]
        else:
            assert options.mix is not None  # CurateOptions' validator: exactly one of data and mix
            sources = [(s.label(i), s.data) for i, s in enumerate(options.mix.sources)]
        reads: list[dict] = []
        committed = False
        try:
            curated: list[Path] = []
            schemas = []
            for label, data in sources:
                state = ReadState()
                rows = records(
                    data, None, registry, expect=("text", "chat", "preference"), state=state, on_skip=skipped
                )
                schemas.append(parquet_schema(data, registry.readers))
                target = ctx.work_dir / f"source-{len(curated)}.rows" if options.mix is not None else None
                if target is None:
                    schema = schemas[0]
                    with ctx.artifact("dataset") as out:
                        with open_writer(
                            out / ("data.parquet" if schema is not None else "data.jsonl"), schema
                        ) as writer:
                            layout: tuple[str, dict[str, str]] | None = None
                            for src in curator.run_records(rows, ctx.should_stop, progress):
                                writer.write(src.raw)
                                layout = layout or (src.fmt.name, src.columns)
                            if ctx.should_stop():
                                return None  # recorded stopped; nothing published
                            _nothing_kept(curator)
                            writer.commit()
                        assert layout is not None  # _nothing_kept raised unless a row was kept (and written)
                        write_dataset_meta(out, *layout)
                else:
                    with Parking(target) as parked:
                        for src in curator.run_records(rows, ctx.should_stop, progress):
                            parked.write(src)
                        if ctx.should_stop():
                            return None  # recorded stopped; nothing published
                        parked.commit()
                    curated.append(target)
                reads.append({"source": label, **state.to_json()})
                ctx.log(
                    f"read {state.rows} {state.kind} rows ({state.format} format) from "
                    f"{', '.join(state.files)}"
                    + (f" for source {label}" if label else "")
                    + (f"; {state.skipped} bad rows skipped" if state.skipped else "")
                )
            curator.finish()
            mixed = None
            if options.mix is not None:
                _nothing_kept(curator)
                same = all(x is not None and x.equals(schemas[0]) for x in schemas)
                mixed = self._mix(options.mix, curated, ctx, schemas[0] if same else None)
            report = curator.report()
            report["read"] = reads
            report["elapsed_s"] = round(time.monotonic() - started, 3)
            if mixed is not None:
                report["mix"] = mixed
                report["rows_out"] = mixed["rows"]
            reasons.commit()
            committed = True
        finally:
            if not committed:  # an error, or a stop request: no half-written reasons file stays behind
                reasons.discard()
        for line in engine.summary_lines(report):
            ctx.log(line.strip() if line.startswith("  ") else line)
        with ctx.artifact("report") as out:
            reasons_tmp.replace(out / "reasons.jsonl")
            engine.write_json(out / "report.json", report)
            (out / "report.md").write_text(reports.markdown(report), encoding="utf-8")
        ctx.info["curate"] = {
            "rows_in": report["rows_in"],
            "rows_out": report["rows_out"],
            "removed": {st["step"]: st["removed"] for st in report["steps"]},
            "changed": {st["step"]: st["changed"] for st in report["steps"] if st["changed"]},
        }
        ctx.emit(
            "curated",
            rows_in=report["rows_in"],
            rows_out=report["rows_out"],
            removed={st["step"]: st["removed"] for st in report["steps"]},
        )
        return ctx.published

    def _mix(self, options: MixOptions, curated: list[Path], ctx: StageContext, schema: Any) -> dict[str, Any]:
        from llmforge.data import write_dataset_meta
        from llmforge_plugins.curate import mix as mixing
        from llmforge_plugins.curate.source import open_writer, read_parked

        formats = ctx.registry.row_formats
        readers = [partial(read_parked, p, formats) for p in curated]
        layouts = {
            (src.fmt.name, tuple(sorted(src.columns.items())))
            for p in curated
            for src in _first(read_parked(p, formats))
        }
        if len(layouts) != 1:
            schema = None  # the rows are written in their normalised shapes (see mix.mix)
        with ctx.artifact("dataset") as out:
            with open_writer(out / ("data.parquet" if schema is not None else "data.jsonl"), schema) as writer:
                report = mixing.mix(
                    options, writer.write, ctx.registry, base=ctx.project_dir, seed=ctx.seed, readers=readers
                )
                writer.commit()
            fmt, columns = next(iter(layouts)) if len(layouts) == 1 else ("auto", ())
            write_dataset_meta(out, fmt, dict(columns))
        for src in report["sources"]:
            ctx.log(
                f"mix: {src['name']}: {src['rows']} rows, {src['units']:g} {report['unit']} "
                f"({src['share']:.1%} of the output, {src['epochs']:g} epochs)"
            )
        return report


T = TypeVar("T")


def _first(items: Iterable[T]) -> list[T]:
    for item in items:
        return [item]
    return []


def _nothing_kept(curator: Curator) -> None:
    """Fail the stage (before publishing an empty dataset) when the steps removed every row."""
    if curator.rows_out:
        return
    from llmforge.errors import DataError

    why = "; ".join(
        f"{b.name} removed {b.removed}"
        + (f" ({', '.join(f'{c} {n}' for c, n in b.by_code.most_common())})" if b.by_code else "")
        for b in curator.books
        if b.removed
    )
    raise DataError(
        f"curate kept none of the {curator.rows_in} rows: {why}",
        hint="loosen the steps' options; the report of a run with fewer steps shows what each removes",
    )
