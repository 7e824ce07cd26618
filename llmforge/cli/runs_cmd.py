"""Looking at runs and steering them: `runs list`, `status`, `logs`, `stop`, `checkpoint`."""

# No `from __future__ import annotations`: Typer reads these commands' Annotated parameters at every start,
# and string annotations would be compiled and evaluated there (twice per command, ~15 ms in all).

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from llmforge.cli.common import (
    JsonOption,
    RunsDirOption,
    console,
    fmt_duration,
    print_json,
    print_table,
    runs_dir,
    status_style,
    styled,
    sub_app,
)

if TYPE_CHECKING:
    from llmforge.runs import RunInfo

RunArg = Annotated[str | None, typer.Argument(help="Run id, unique prefix or folder (default: the latest run).")]


def _store(dir_: Path | None):
    from llmforge.runs import RunStore

    return RunStore(runs_dir(dir_))


def runs_list(as_json: JsonOption = False, dir_: RunsDirOption = None) -> None:
    """List the runs of this project, newest first (as the TUI's Runs screen does)."""
    # A run folder whose manifest cannot be read is listed as damaged (naming the file), never dropped.
    runs = list(reversed(_store(dir_).list(include_damaged=True)))
    if as_json:
        print_json([_row(r) for r in runs])
        return
    if not runs:
        console().print("no runs yet; start one with [bold]llmforge run[/]")
        return
    rows = []
    for r in runs:
        row = _row(r)
        summary = f"{r.damaged}" if r.damaged else row["summary"]
        rows.append([r.id, row["started"], r.status, summary, fmt_duration(row["duration"])])
    print_table(["run", "started", "status", "stages", "duration"], rows, styles={2: status_style})


def _row(r: "RunInfo") -> dict:
    stages = r.record.stages
    counts: dict[str, int] = {}
    for name in stages:
        s = r.stage_status(name)
        counts[s] = counts.get(s, 0) + 1
    created = r.record.created
    end = r.record.finished
    return {
        "id": r.id,
        "status": r.status,
        "config": r.config_path,
        "dir": str(r.dir),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) if created else "-",
        "duration": (end - created) if (end and created) else None,
        "stages": {n: r.stage_status(n) for n in stages},
        "summary": ", ".join(f"{v} {k}" for k, v in counts.items()),
        "exit_code": r.record.exit_code,
        **({"damaged": r.damaged} if r.damaged else {}),
    }


def status(run: RunArg = None, as_json: JsonOption = False, dir_: RunsDirOption = None) -> None:
    """Show a run: its status and each stage's status, time and artifacts."""
    r = _store(dir_).get(run)
    if as_json:
        print_json(r.to_json())
        return
    from rich.markup import escape

    out = console()
    out.print(f"run [bold]{r.id}[/]  {styled(r.status)}  [dim]{escape(str(r.dir))}[/]")
    rows = []
    for name, st in r.record.stages.items():
        detail = st.error or ", ".join(str(a.get("path")) for a in st.artifacts.values())
        if st.cached_from:
            detail = f"(cached from {st.cached_from}) {detail}"
        rows.append([name, st.uses or "", r.stage_status(name), fmt_duration(st.duration), detail])
    print_table(["stage", "uses", "status", "time", "artifacts / error"], rows, styles={2: status_style})


def logs(
    run: RunArg = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events until the run ends.")
    ] = False,
    raw: Annotated[bool, typer.Option("--raw", help="Print the JSON lines as they are.")] = False,
    dir_: RunsDirOption = None,
) -> None:
    """Print a run's events (from events.jsonl); -f follows a running one. --debug also shows the
    libraries' chatter (debug-level events)."""
    from llmforge.events import RunEnd, read_events, read_records
    from llmforge.runs import EVENTS, lock_is_live, read_lock

    r: RunInfo = _store(dir_).get(run, allow_damaged=True)  # the events do not need the manifest
    path = r.dir / EVENTS
    if not path.exists():
        raise typer.Exit(0)
    from llmforge.cli.render import EventPrinter

    printer = EventPrinter(every=0.0)
    ended = False

    def finished() -> bool:
        return ended or not lock_is_live(read_lock(r.dir))

    if raw:  # the lines as written, not as this version understands them
        import json

        for record in read_records(path, follow=follow, stop=finished):
            typer.echo(json.dumps(record))
            if record.get("type") == "run_end":
                ended = True
                if follow:
                    break
        return
    for ev in read_events(path, follow=follow, stop=finished):
        printer.show(ev)
        if isinstance(ev, RunEnd):
            ended = True
            if follow:
                break


def stop(
    run: RunArg = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until the run has stopped.")] = True,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait.")] = 600,
    dir_: RunsDirOption = None,
) -> None:
    """Ask a run to stop cleanly: a training stage saves a checkpoint first, other stages just stop; the
    run exits with code 130 and `llmforge run --resume` continues it."""
    from llmforge.errors import UsageError
    from llmforge.runs import STOP_REQUEST, RunStore, lock_is_live, read_lock, request
    from llmforge.status import Status

    store: RunStore = _store(dir_)
    r = store.get(run)
    if not lock_is_live(read_lock(r.dir)):
        raise UsageError(f"run {r.id} is not running (status: {r.status})")
    request(r.dir, STOP_REQUEST)
    out = console()
    running = [n for n in r.record.stages if r.stage_status(n) == Status.RUNNING]
    # What a stop does depends on the stage: the stage itself says it (a training stage logs "saving a
    # checkpoint at step N", a shell stage "ending the command"); here only which stage is asked.
    out.print(f"stop requested for run {r.id}" + (f": stage {running[0]} is stopping" if running else ""), markup=False)
    if not wait:
        return
    deadline = time.time() + timeout
    while time.time() < deadline and lock_is_live(read_lock(r.dir)):
        time.sleep(0.2)
    r = store.get(str(r.dir))
    from rich.markup import escape

    out.print(f"run {escape(r.id)}: {styled(r.status)} (exit code {r.record.exit_code})")


def checkpoint(run: RunArg = None, dir_: RunsDirOption = None) -> None:
    """Ask a running training stage to save a checkpoint now, and go on."""
    from llmforge.errors import UsageError
    from llmforge.runs import CHECKPOINT_REQUEST, lock_is_live, read_lock, request

    r = _store(dir_).get(run)
    if not lock_is_live(read_lock(r.dir)):
        raise UsageError(f"run {r.id} is not running (status: {r.status})")
    request(r.dir, CHECKPOINT_REQUEST)
    console().print(f"checkpoint requested for run {r.id}", markup=False)


def compare(
    a: Annotated[str, typer.Argument(help="A run: id, unique prefix or folder.")],
    b: Annotated[str, typer.Argument(help="The run to compare with A.")],
    as_json: JsonOption = False,
    dir_: RunsDirOption = None,
) -> None:
    """Two runs side by side: their eval leaderboards (each model's task metrics in A and B, and the change
    B - A), their gates and selected models, and each stage's status, time and final loss."""
    from llmforge.leaderboard import compare_runs, fmt_delta, fmt_value

    store = _store(dir_)
    run_a, run_b = store.get(a), store.get(b)  # an unknown or damaged run: a UsageError naming it (exit 2)
    data = compare_runs(run_a, run_b)
    if as_json:
        print_json(data)
        return
    out = console()
    out.print(f"A = {run_a.id} ({run_a.status}), B = {run_b.id} ({run_b.status})", markup=False)

    def loss(side: dict | None) -> str:
        if not side or side.get("final_loss") is None:
            return "-"
        text = f"{side['final_loss']:.4f}"
        return text + (f" (eval {side['eval_loss']:.4f})" if side.get("eval_loss") is not None else "")

    rows = []
    for st in data["stages"]:
        sa, sb = st["a"] or {}, st["b"] or {}
        rows.append(
            [
                st["name"],
                sa.get("status", "-"),
                sb.get("status", "-"),
                fmt_duration(sa.get("duration")),
                fmt_duration(sb.get("duration")),
                loss(st["a"]),
                loss(st["b"]),
            ]
        )
    print_table(
        ["stage", "A", "B", "time A", "time B", "final loss A", "final loss B"],
        rows,
        styles={1: status_style, 2: status_style},
    )
    if not data["evals"]:
        out.print("no eval reports in either run (an `eval` stage writes one)", markup=False)
        return
    rows = []
    for e in data["evals"]:
        va, vb = e["a"] or {}, e["b"] or {}
        mark = {True: " better", False: " worse", None: ""}[e["better"]]
        rows.append(
            [
                e["model"],
                e["name"],
                fmt_value(va.get("value"), va.get("stderr"), va.get("n")) if e["a"] else "not measured",
                fmt_value(vb.get("value"), vb.get("stderr"), vb.get("n")) if e["b"] else "not measured",
                fmt_delta(e["delta"]) + mark,
                e["stage"],
            ]
        )

    def delta_style(text: str) -> str:
        return "green" if text.endswith("better") else "red" if text.endswith("worse") else ""

    print_table(["model", "metric", "A", "B", "B - A", "stage"], rows, styles={4: delta_style})
    for g in data["gates"]:
        verdict = "passed" if g.get("passed") else "FAILED"
        run_id = run_a.id if g["run"] == "a" else run_b.id
        out.print(
            f"gate {g.get('metric')} on {g.get('model')} in {run_id}: {verdict}. {g.get('message') or ''}".rstrip(),
            markup=False,
        )
    for side, run in (("a", run_a), ("b", run_b)):
        for sel in data["selected"][side]:
            out.print(
                f"selected in {run.id}: {sel.get('model')} ({sel.get('metric')} {fmt_value(sel.get('value'))})",
                markup=False,
            )


def register(app: typer.Typer) -> None:
    runs_app = sub_app("Past and current runs.")
    runs_app.command("list")(runs_list)
    runs_app.command("compare")(compare)
    app.add_typer(runs_app, name="runs")
    app.command()(status)
    app.command()(logs)
    app.command()(stop)
    app.command()(checkpoint)
