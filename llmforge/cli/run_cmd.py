"""`llmforge run`: execute the pipeline in this process, or detached in the background."""

# No `from __future__ import annotations`: Typer reads these commands' Annotated parameters at every start,
# and string annotations would be compiled and evaluated there (twice per command, ~15 ms in all).

from pathlib import Path
from typing import Annotated, Literal

import typer

from llmforge.cli.common import ConfigOption, SetOption, console, fmt_duration, print_table, status_style


def run(
    config: ConfigOption = Path("forge.toml"),
    stage: Annotated[
        list[str] | None, typer.Option("--stage", "-s", help="Run only this stage (and what it needs). Repeatable.")
    ] = None,
    from_stage: Annotated[str | None, typer.Option("--from", help="Re-run this stage and everything after it.")] = None,
    overrides: SetOption = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the last interrupted run from its checkpoints, with the --stage/--from/--force it was "
            "started with.",
        ),
    ] = False,
    run_ref: Annotated[
        str | None, typer.Option("--run", help="With --resume: which run. Otherwise: the new run's id.")
    ] = None,
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Run in the background; print the run id and return.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Ignore cached results and run every selected stage.")] = False,
    no_fit_check: Annotated[
        bool,
        typer.Option("--no-fit-check", help="Start even when `llmforge plan` says a stage cannot fit this machine."),
    ] = False,
) -> None:
    """Run the pipeline of forge.toml. Exit code: 0 done, 1 a stage failed, 2 bad input (or a stage that
    cannot fit this machine), 130 stopped."""
    from llmforge.cli.common import registry
    from llmforge.pipeline import load_pipeline

    pipe = load_pipeline(config, overrides or [], registry=registry())
    # The fit check is part of the run request: the runner makes it before any run folder exists (and a
    # detached launch before it starts the child, which is given the same decision on its command line).
    fit: Literal["check", "skip"] = "skip" if no_fit_check else "check"
    if detach:
        _detach(pipe, stage or [], from_stage, overrides or [], resume, run_ref, force, fit)
        return

    from llmforge.cli.render import EventPrinter
    from llmforge.runner import RunRequest, run_pipeline

    req = RunRequest(
        only=stage or [],
        from_stage=from_stage,
        resume=resume,
        run_ref=run_ref,
        force=force,
        fit=fit,
        listeners=[EventPrinter()],
    )
    result = run_pipeline(pipe, req, registry=registry())
    _summary(result)
    raise typer.Exit(result.exit_code)


def _summary(result) -> None:
    rows = []
    for name, st in result.stages.items():
        arts = ", ".join(a["path"] for a in st.get("artifacts", {}).values())
        rows.append([name, st.get("status", "?"), fmt_duration(st.get("duration")), arts])
    print_table(["stage", "status", "time", "artifacts"], rows, title=f"run {result.run_id}", styles={1: status_style})
    if result.status == "stopped":
        console().print(f"stopped; continue with llmforge run --resume --run {result.run_id}", markup=False)


def _detach(pipe, stages, from_stage, overrides, resume, run_ref, force, fit) -> None:
    """Start the same command in its own process session; the run outlives this terminal."""
    from llmforge.detach import Launch, start_detached

    launch = Launch(pipe.config.path, list(stages), from_stage, list(overrides), resume, run_ref, force, fit=fit)
    started = start_detached(launch, pipe=pipe)
    typer.echo(started.run_id)
    console(stderr=True).print(
        f"detached (pid {started.pid}); follow with llmforge logs {started.run_id} -f, "
        f"stop with llmforge stop {started.run_id}",
        markup=False,
    )


def register(app: typer.Typer) -> None:
    app.command()(run)
