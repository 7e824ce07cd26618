"""Looking at runs and steering them: `runs list`, `status`, `logs`, `stop`, `checkpoint`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from llmforge.cli.common import JSON_OPTION, sub_app, RUNS_DIR_OPTION, console, fmt_duration, print_json, runs_dir, styled

RUN_ARG = typer.Argument(None, help="Run id, unique prefix or folder (default: the latest run).")


def _store(dir_: Path | None):
    from llmforge.runs import RunStore

    return RunStore(runs_dir(dir_))


def runs_list(as_json: bool = JSON_OPTION, dir_: Optional[Path] = RUNS_DIR_OPTION) -> None:
    """List the runs of this project, oldest first."""
    runs = _store(dir_).list()
    if as_json:
        print_json([_row(r) for r in runs])
        return
    from rich.table import Table

    if not runs:
        console().print("no runs yet; start one with [bold]llmforge run[/]")
        return
    table = Table()
    for col in ("run", "started", "status", "stages", "duration"):
        table.add_column(col)
    for r in runs:
        row = _row(r)
        table.add_row(r.id, row["started"], styled(r.status), row["summary"], fmt_duration(row["duration"]))
    console().print(table)


def _row(r) -> dict:
    stages = r.manifest.get("stages", {})
    counts: dict[str, int] = {}
    for name in stages:
        s = r.stage_status(name)
        counts[s] = counts.get(s, 0) + 1
    created = r.manifest.get("created")
    end = r.manifest.get("finished")
    return {
        "id": r.id, "status": r.status, "config": r.config_path, "dir": str(r.dir),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) if created else "-",
        "duration": (end - created) if (end and created) else None,
        "stages": {n: r.stage_status(n) for n in stages},
        "summary": ", ".join(f"{v} {k}" for k, v in counts.items()),
        "exit_code": r.manifest.get("exit_code"),
    }


def status(run: Optional[str] = RUN_ARG, as_json: bool = JSON_OPTION, dir_: Optional[Path] = RUNS_DIR_OPTION) -> None:
    """Show a run: its status and each stage's status, time and artifacts."""
    r = _store(dir_).get(run)
    if as_json:
        print_json(r.to_json())
        return
    from rich.table import Table

    out = console()
    out.print(f"run [bold]{r.id}[/]  {styled(r.status)}  [dim]{r.dir}[/]")
    table = Table()
    for col in ("stage", "uses", "status", "time", "artifacts / error"):
        table.add_column(col)
    for name, st in r.manifest.get("stages", {}).items():
        detail = st.get("error") or ", ".join(a["path"] for a in st.get("artifacts", {}).values())
        if st.get("cached_from"):
            detail = f"(cached from {st['cached_from']}) {detail}"
        table.add_row(name, st.get("uses", ""), styled(r.stage_status(name)), fmt_duration(st.get("duration")),
                      detail)
    out.print(table)


def logs(
    run: Optional[str] = RUN_ARG,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new events until the run ends."),
    raw: bool = typer.Option(False, "--raw", help="Print the JSON lines as they are."),
    dir_: Optional[Path] = RUNS_DIR_OPTION,
) -> None:
    """Print a run's events (from events.jsonl); -f follows a running one."""
    from llmforge.events import read_events
    from llmforge.runs import EVENTS, RunInfo, read_lock, lock_is_live

    r: RunInfo = _store(dir_).get(run)
    path = r.dir / EVENTS
    if not path.exists():
        raise typer.Exit(0)
    from llmforge.cli.render import EventPrinter

    printer = EventPrinter(every=0.0)
    ended = False

    def finished() -> bool:
        return ended or not lock_is_live(read_lock(r.dir))

    for ev in read_events(path, follow=follow, stop=finished):
        if raw:
            import json

            typer.echo(json.dumps(ev))
        else:
            printer(ev)
        if ev.get("type") == "run_end":
            ended = True
            if follow:
                break


def stop(
    run: Optional[str] = RUN_ARG,
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until the run has stopped."),
    timeout: float = typer.Option(600, "--timeout", help="Seconds to wait."),
    dir_: Optional[Path] = RUNS_DIR_OPTION,
) -> None:
    """Ask a run to stop cleanly: the stage saves a checkpoint and the run exits with code 130."""
    from llmforge.errors import UsageError
    from llmforge.runs import STOP_REQUEST, RunStore, lock_is_live, read_lock, request

    store: RunStore = _store(dir_)
    r = store.get(run)
    if not lock_is_live(read_lock(r.dir)):
        raise UsageError(f"run {r.id} is not running (status: {r.status})")
    request(r.dir, STOP_REQUEST)
    out = console()
    out.print(f"stop requested for run {r.id}")
    if not wait:
        return
    deadline = time.time() + timeout
    while time.time() < deadline and lock_is_live(read_lock(r.dir)):
        time.sleep(0.2)
    r = store.get(str(r.dir))
    out.print(f"run {r.id}: {styled(r.status)} (exit code {r.manifest.get('exit_code')})")


def checkpoint(run: Optional[str] = RUN_ARG, dir_: Optional[Path] = RUNS_DIR_OPTION) -> None:
    """Ask a running training stage to save a checkpoint now, and go on."""
    from llmforge.errors import UsageError
    from llmforge.runs import CHECKPOINT_REQUEST, lock_is_live, read_lock, request

    r = _store(dir_).get(run)
    if not lock_is_live(read_lock(r.dir)):
        raise UsageError(f"run {r.id} is not running (status: {r.status})")
    request(r.dir, CHECKPOINT_REQUEST)
    console().print(f"checkpoint requested for run {r.id}")


def register(app: typer.Typer) -> None:
    runs_app = sub_app("Past and current runs.")
    runs_app.command("list")(runs_list)
    app.add_typer(runs_app, name="runs")
    app.command()(status)
    app.command()(logs)
    app.command()(stop)
    app.command()(checkpoint)
