"""`llmforge run`: execute the pipeline in this process, or detached in the background."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from llmforge.cli.common import CONFIG_OPTION, SET_OPTION, console, fmt_duration, styled


def run(
    config: Path = CONFIG_OPTION,
    stage: Optional[List[str]] = typer.Option(None, "--stage", "-s",
                                              help="Run only this stage (and what it needs). Repeatable."),
    from_stage: Optional[str] = typer.Option(None, "--from", help="Re-run this stage and everything after it."),
    overrides: Optional[List[str]] = SET_OPTION,
    resume: bool = typer.Option(False, "--resume", help="Continue the last interrupted run from its checkpoints."),
    run_ref: Optional[str] = typer.Option(None, "--run", help="With --resume: which run. Otherwise: the new run's id."),
    detach: bool = typer.Option(False, "--detach", "-d", help="Run in the background; print the run id and return."),
    force: bool = typer.Option(False, "--force", help="Ignore cached results and run every selected stage."),
) -> None:
    """Run the pipeline of forge.toml. Exit code: 0 done, 1 a stage failed, 2 bad input, 130 stopped."""
    from llmforge.pipeline import load_pipeline

    pipe = load_pipeline(config, overrides or [])
    if detach:
        _detach(pipe, stage or [], from_stage, overrides or [], resume, run_ref, force)
        return

    from llmforge.cli.render import EventPrinter
    from llmforge.runner import RunRequest, run_pipeline

    req = RunRequest(only=stage or [], from_stage=from_stage, resume=resume, run_ref=run_ref, force=force,
                     listeners=[EventPrinter()])
    result = run_pipeline(pipe, req)
    _summary(result)
    raise typer.Exit(result.exit_code)


def _summary(result) -> None:
    from rich.table import Table

    table = Table(title=f"run {result.run_id}", title_justify="left")
    for col in ("stage", "status", "time", "artifacts"):
        table.add_column(col)
    for name, st in result.stages.items():
        arts = ", ".join(a["path"] for a in st.get("artifacts", {}).values())
        table.add_row(name, styled(st.get("status", "?")), fmt_duration(st.get("duration")), arts)
    out = console()
    out.print(table)
    if result.status == "stopped":
        out.print(f"stopped; continue with [bold]llmforge run --resume --run {result.run_id}[/]")


def _detach(pipe, stages, from_stage, overrides, resume, run_ref, force) -> None:
    """Start the same command in its own process session; the run outlives this terminal."""
    from llmforge.errors import ForgeError
    from llmforge.runner import find_resumable
    from llmforge.runs import MANIFEST, RunStore, new_run_id

    store = RunStore(pipe.config.runs_dir)
    if resume:
        run_id = find_resumable(store, pipe.config, run_ref).id
    else:
        run_id = run_ref or new_run_id()
    run_dir = store.dir / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "llmforge", "run", "-c", str(pipe.config.path), "--run", run_id]
    for s in stages:
        argv += ["--stage", s]
    if from_stage:
        argv += ["--from", from_stage]
    for o in overrides:
        argv += ["--set", o]
    if resume:
        argv.append("--resume")
    if force:
        argv.append("--force")
    log = open(run_dir / "process.log", "ab")  # noqa: SIM115 - handed to the child
    started = time.time()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=Path.cwd())
    log.close()
    # Wait until the child owns the run (or failed early) so that what we print is true.
    while time.time() - started < 30:
        code = proc.poll()
        if code is not None and code != 0 and not (run_dir / MANIFEST).exists():
            tail = (run_dir / "process.log").read_text(errors="replace").strip().splitlines()[-5:]
            raise ForgeError(f"the detached run exited with code {code}:\n" + "\n".join(tail))
        if (run_dir / MANIFEST).exists() or code is not None:
            break
        time.sleep(0.05)
    typer.echo(run_id)
    console(stderr=True).print(f"detached (pid {proc.pid}); follow with [bold]llmforge logs {run_id} -f[/], "
                               f"stop with [bold]llmforge stop {run_id}[/]")


def register(app: typer.Typer) -> None:
    app.command()(run)
