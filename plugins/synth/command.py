"""`llmforge synth KIND`: one generator outside a pipeline, the synth stage's flow with a console.

    llmforge synth answer --data prompts.jsonl --model teacher.gguf --out rows.jsonl --samples 4 \\
        --set temperature=0.8 --set verify.verifier=numeric --max-rows 500
    llmforge synth answer --data prompts.jsonl --teacher local -c forge.toml --out rows.jsonl \\
        --judge local --set judge.min=6

``--set KEY=VALUE`` sets a generator option (``temperature=0.8``, ``topics=["a", "b"]``: values are read as
TOML, else as text); ``verify.KEY=VALUE`` and ``judge.KEY=VALUE`` set the verifier's and the judge's. The run
keeps its journal in ``OUT.synth/`` next to ``--out``: the same command again (after Ctrl-C or a kill) goes on
where it stopped, and once done writes ``--out`` (JSONL rows) and ``OUT.synth/report.json`` / ``report.md``.
"""

# No `from __future__ import annotations`: Typer reads these commands' Annotated parameters at every start.

from pathlib import Path
from typing import Annotated, Any

import typer

from llmforge.errors import ConfigError, Problem, UsageError


def parse_sets(values: list[str]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``--set`` values split into the generator's, the verifier's (``verify.``) and the judge's (``judge.``)
    tables; a value is read as TOML where it parses (numbers, booleans, lists), else kept as text."""
    from llmforge.config import parse_value

    tables: dict[str, dict[str, Any]] = {"": {}, "verify": {}, "judge": {}}
    problems = []
    for value in values:
        key, sep, raw = value.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(Problem(f"--set {value}", "expected KEY=VALUE (e.g. temperature=0.8)"))
            continue
        prefix, dot, rest = key.partition(".")
        table, name = (prefix, rest) if dot and prefix in ("verify", "judge") else ("", key)
        tables[table][name] = parse_value(raw)  # what `llmforge run --set` reads: TOML, else the bare text
    if problems:
        raise ConfigError(problems)
    return tables[""], tables["verify"], tables["judge"]


def synth_command(
    kind: Annotated[str, typer.Argument(help="The generator: self_instruct, from_documents, evolve, answer, ...")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the rows go (JSONL).")],
    data: Annotated[
        Path | None, typer.Option("--data", help="The generator's input (prompts, seed tasks, documents).")
    ] = None,
    model: Annotated[Path | None, typer.Option("--model", help="The teacher: a .gguf file or an HF folder.")] = None,
    teacher: Annotated[
        str | None, typer.Option("--teacher", help="The teacher: a [judges.NAME] of the forge.toml (-c).")
    ] = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Answers per unit (rejection sampling).")] = 1,
    keep: Annotated[str, typer.Option("--keep", help="best: the best answer per unit; all: every one that passed.")] = (
        "best"
    ),
    verify: Annotated[
        str | None, typer.Option("--verify", help="A verifier (numeric, regex, json_schema, python_tests).")
    ] = None,
    judge: Annotated[str | None, typer.Option("--judge", help="Score rows with this [judges.NAME].")] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option("--set", help="KEY=VALUE: a generator option; verify.KEY / judge.KEY for those tables."),
    ] = None,
    max_rows: Annotated[int | None, typer.Option("--max-rows", min=1, help="Budget: stop after N rows.")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", min=1, help="Budget: teacher tokens.")] = None,
    max_requests: Annotated[int | None, typer.Option("--max-requests", min=1, help="Budget: requests.")] = None,
    max_minutes: Annotated[float | None, typer.Option("--max-minutes", min=0.01, help="Budget: minutes.")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="Requests in flight at once.")] = 4,
    n_ctx: Annotated[int, typer.Option("--n-ctx", min=1, help="Context length of a .gguf teacher.")] = 2048,
    quant: Annotated[str | None, typer.Option("--quant", help="Which file of a folder of .gguf files.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="The run's seed (each request's seed derives from it).")] = 0,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="A forge.toml whose [judges] --teacher/--judge name (default ./forge.toml)."
        ),
    ] = None,
) -> None:
    """Make synthetic rows with one generator and a teacher model. Exit code: 0 done, 1 failed, 2 bad input."""
    from llmforge.cli.common import registry
    from llmforge.schema import validate_model
    from llmforge_plugins.eval.command import _judges
    from llmforge_plugins.synth.report import write_report
    from llmforge_plugins.synth.stage import SynthOptions, SynthRunner, synthesize, write_dataset

    generator, verify_table, judge_table = parse_sets(sets or [])
    generator["kind"] = kind
    if data is not None:
        if not data.exists():
            raise UsageError(f"--data: {data}: no such file or folder")
        generator["data"] = str(data.resolve())
    if model is not None and not model.exists():
        raise UsageError(f"--model: {model}: no such file or folder")
    if verify is not None:
        verify_table["verifier"] = verify
    elif verify_table:
        raise UsageError("--set verify.*: name the verifier with --verify NAME")
    if judge is not None:
        judge_table["judge"] = judge
    elif judge_table:
        raise UsageError("--set judge.*: name the judge with --judge NAME")
    budget = {"rows": max_rows, "tokens": max_tokens, "requests": max_requests, "minutes": max_minutes}
    table: dict[str, Any] = {
        "teacher": teacher,
        "model": str(model.resolve()) if model is not None else None,
        "generator": generator,
        "samples": samples,
        "keep": keep,
        "verify": verify_table or None,
        "judge": judge_table or None,
        "budget": {k: v for k, v in budget.items() if v is not None},
        "concurrency": concurrency,
        "n_ctx": n_ctx,
        "quant": quant,
    }
    options, problems = validate_model(SynthOptions, table, "")
    if problems:
        raise ConfigError([_flag(p) for p in problems])
    assert options is not None
    reg = registry()
    judges = _judges(config, reg) if (teacher or judge) else {}
    log = _log()
    work = out.parent / f"{out.name}.synth"  # made by the first unit journaled

    def progress(done, total=None, unit="unit", rows=0, rejected=0, **extra):
        of = f"/{total}" if total else ""
        log(f"{int(done)}{of} units: {rows} rows kept, {rejected} rejected")

    try:
        result = synthesize(
            options,
            SynthRunner(
                registry=reg,
                log=log,
                work_dir=work,
                progress=progress,
                seed=seed,
                base_dir=Path.cwd(),
                judges=judges,
            ),
        )
    except ConfigError as exc:
        raise ConfigError([_flag(p) for p in exc.problems], hint=exc.hint) from None
    assert result is not None  # nothing asks this run to stop (Ctrl-C ends it; the journal keeps what was made)
    if result.report["rows"] == 0:
        from llmforge_plugins.synth.stage import empty_result

        write_report(work, result.report)
        raise empty_result(result.report, work / "report.md")
    folder = work / "dataset"
    write_dataset(folder, result)
    out.parent.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").replace(out)
    write_report(work, result.report)
    report = result.report
    rejected = ", ".join(f"{k} {v}" for k, v in report["rejected"].items()) or "none"
    stopped = f"; stopped by the budget's {report['budget']['stopped_by']}" if report["budget"]["stopped_by"] else ""
    log(f"wrote {report['rows']} rows to {out} (rejected: {rejected}{stopped}); report: {work / 'report.md'}")


_FLAGS = {
    "generator.kind": "KIND",
    "generator.data": "--data",
    "samples": "--samples",
    "keep": "--keep",
    "teacher": "--teacher/--model",
    "model": "--model",
    "budget.rows": "--max-rows",
    "budget.tokens": "--max-tokens",
    "budget.requests": "--max-requests",
    "budget.minutes": "--max-minutes",
}


def _flag(problem: Problem) -> Problem:
    """A problem located by the option it came from: ``--keep``, ``--set temperature``."""
    where = problem.where
    if where in _FLAGS:
        return Problem(_FLAGS[where], problem.message)
    if where.startswith("generator."):
        return Problem(f"--set {where.removeprefix('generator.')}", problem.message)
    if where.startswith(("verify.", "judge.")):
        return Problem(f"--set {where}", problem.message)
    return problem


def _log():
    from llmforge.cli.render import stderr_logger

    return stderr_logger("synth")


def register(cli) -> None:
    cli.command("synth")(synth_command)
