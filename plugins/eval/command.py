"""`llmforge eval MODEL... --task T`: the eval stage's evaluation outside a pipeline.

MODEL: an HF model folder, a LoRA adapter folder, a .gguf file, or a folder of .gguf files (each file is a
model, labelled <folder>:<type>). T: the path of a .toml task spec, or ``KIND:DATAFILE`` for a task with its
kind's defaults (``multiple_choice:qa.jsonl``: the task is named after the file, ``qa``). The leaderboard goes
to stdout (``--json``: report.json); progress and log lines to stderr. ``--out DIR`` writes the report folder
(report.json, report.md, items/) as the stage does. Judge tasks use the judges of ``--config`` (or of
./forge.toml).
"""

# No `from __future__ import annotations`: Typer reads these commands' Annotated parameters at every start,
# and string annotations would be compiled and evaluated there (twice per command, ~15 ms in all).

from pathlib import Path
from typing import Annotated, Any

import typer

from llmforge.errors import ConfigError, Problem, UsageError


def task_values(tasks: list[str], kinds: Any) -> list[Any]:
    """What ``--task`` values mean for load_task_specs: a spec file's path, or ``KIND:DATAFILE`` as an inline
    spec named after the file. A value that is neither is named with the installed kinds."""
    out: list[Any] = []
    problems = []
    for i, value in enumerate(tasks):
        kind, sep, data = value.partition(":")
        if value.lower().endswith(".toml"):
            out.append(value)
        elif sep and kind in kinds and data:
            name = Path(data).name.split(".")[0] or kind
            out.append({"name": name, "kind": kind, "data": data})
        else:
            problems.append(
                Problem(
                    f"--task {value}",
                    f"expected a .toml task spec or KIND:DATAFILE (kinds: {', '.join(sorted(kinds)) or 'none'})",
                )
            )
        del i
    if problems:
        raise ConfigError(problems)
    return out


def eval_command(
    models: Annotated[
        list[Path],
        typer.Argument(
            help="Models: HF folders, LoRA adapters, .gguf files, or folders of .gguf files (each file a model).",
            metavar="MODEL",
            show_default=False,
        ),
    ],
    task: Annotated[
        list[str],
        typer.Option(
            "--task",
            "-t",
            help="A .toml task spec, or KIND:DATAFILE (multiple_choice:qa.jsonl). Repeat for several tasks.",
            show_default=False,
        ),
    ],
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Use at most N items of every task.")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write the report folder here (report.json, report.md, items/).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Requests run together.")] = None,
    n_ctx: Annotated[
        int | None,
        typer.Option(
            "--n-ctx",
            min=1,
            help="Context length: what a .gguf file is opened with, and the longest input an HF model scores.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print report.json instead of the leaderboard.")] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="A forge.toml whose [judges] the judge tasks use (default: ./forge.toml if any)."
        ),
    ] = None,
) -> None:
    """Evaluate MODELs on tasks and print the leaderboard (each metric: value ± standard error (items)).
    Exit code: 0 done, 1 a model failed, 2 bad input."""
    from llmforge.cli.common import print_json, print_table, registry
    from llmforge_plugins.eval.api import EVAL_TASKS
    from llmforge_plugins.eval.report import leaderboard_rows
    from llmforge_plugins.eval.spec import load_task_specs
    from llmforge_plugins.eval.stage import Runner, evaluate, expand_models, write_evaluation

    reg = registry()
    table = reg.table(EVAL_TASKS)
    specs, problems = load_task_specs(task_values(task, table), table, Path.cwd(), "--task")
    if problems:
        raise ConfigError(problems)
    for m in models:
        if not m.exists():
            raise UsageError(f"{m}: no such file or folder", hint="give an HF model folder, an adapter or a .gguf file")
    if out is not None and out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not empty", hint="give a new folder to --out")
    entries = expand_models([str(m.resolve()) for m in models], {}, {})
    judges = _judges(config, reg)
    log = _log()
    ev = evaluate(
        entries,
        specs,
        Runner(registry=reg, log=log, progress=_progress(), judges=judges),
        limit=limit,
        n_ctx=n_ctx,
        batch_size=batch_size,
    )
    assert ev is not None  # nothing asks this evaluation to stop
    if out is not None:
        write_evaluation(out, ev.report, ev.items)
        log(f"wrote {out / 'report.json'}, {out / 'report.md'} and {out / 'items'}")
    if as_json:
        from llmforge_plugins.eval.report import _finite

        print_json(_finite({"version": 1, **ev.report}))
        return
    columns, rows = leaderboard_rows(ev.report)
    print_table(columns, rows, title="leaderboard")


def _judges(config: Path | None, reg) -> dict:
    """The judges a forge.toml declares (``--config``, else ./forge.toml when there is one): judge tasks name
    them, as in a pipeline. Only the [judges] table is read and validated."""
    from llmforge.config import read_toml
    from llmforge.judging import JUDGE_BACKENDS, validate_judges

    path = config if config is not None else Path("forge.toml")
    if not path.exists():
        if config is not None:
            raise UsageError(f"{config}: no such file", hint="give the forge.toml that declares the judges")
        return {}
    judges, problems = validate_judges(
        read_toml(path).get("judges", {}), path.resolve().parent, reg.table(JUDGE_BACKENDS)
    )
    if problems:
        raise ConfigError(problems)
    return judges


def _log():
    from llmforge.cli.render import stderr_logger

    return stderr_logger("eval")


def _progress():
    """Progress per finished (model, task) on stderr; item-level progress stays quiet."""
    log = _log()

    def progress(done, total=None, unit="task", **extra):
        if unit == "task":
            log(f"{extra.get('model')} × {extra.get('task')} done ({int(done)}/{int(total or 0)})")

    return progress


def register(cli) -> None:
    cli.command("eval")(eval_command)
