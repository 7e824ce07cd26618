"""The Runs screen: the history of runs, and their loss curves side by side.

Everything comes from the run store, read without a lock as `llmforge runs list` reads it: the manifests for
the table, each run's events.jsonl for the curves. Both are read in a worker (a project may hold hundreds of
runs, a run 100k metric events), and the table is re-read every few seconds so a run started elsewhere
shows up and a running one ticks on.

Keys: enter opens the highlighted run in the monitor; space marks a run to compare (two at most: marking a
third drops the oldest mark); the chart shows the marked runs, or the highlighted run when none is marked.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Static

from llmforge.formatting import fmt_duration
from llmforge.tui.screens import read_runs_dir
from llmforge.tui.widgets.text import STATUS_STYLE, marked

# The metrics the chart overlays: what every training stage logs (see docs/training.md).
CURVE_METRICS = ("loss", "eval_loss")
MAX_POINTS = 400  # per curve: a terminal chart has no more columns than that, however long the run
REFRESH_SECONDS = 2.0
# The table's columns (keys, then headers), in the order of RunRow.cells.
# The long, variable column (final losses) goes last, so the others fit in 80-100 columns.
COLUMNS = ("mark", "id", "started", "status", "duration", "stages", "losses")
LABELS = ("", "run", "started", "status", "duration", "stages", "final loss")
COMPARE = 2


def styled_status(status: str) -> Text:
    return Text(marked(status), style=STATUS_STYLE.get(status, ""))


# ----------------------------------------------------------------------------------------------
# what the table shows, computed off the UI thread


@dataclass(frozen=True)
class RunRow:
    id: str
    started: str
    status: str
    stages: str  # "3 done, 1 cached"
    losses: str  # "sft 1.234 (eval 1.301)"; for a damaged run, what is wrong with its manifest
    duration: str
    dir: Path
    damaged: str | None = None  # "<path>/manifest.json: cannot be read (...)", as `llmforge runs list` says

    def cells(self, marked: bool) -> tuple:
        losses = Text(self.losses, style="red") if self.damaged else self.losses
        return (
            "●" if marked else " ",
            self.id,
            self.started,
            styled_status(self.status),
            self.duration,
            self.stages,
            losses,
        )


def final_losses(manifest: dict) -> str:
    """The final (and eval) loss each stage recorded in the manifest's `info`, in pipeline order."""
    parts = []
    for name, st in manifest.get("stages", {}).items():
        info = st.get("info") or {}
        loss, eval_loss = info.get("final_loss"), info.get("eval_loss")
        if loss is None and eval_loss is None:
            continue
        text = f"{name} {loss:.4g}" if isinstance(loss, (int, float)) else name
        if isinstance(eval_loss, (int, float)):
            text += f" (eval {eval_loss:.4g})"
        parts.append(text)
    return ", ".join(parts) or "-"


def run_row(run) -> RunRow:
    """One table row of a `llmforge.runs.RunInfo` (the columns of `llmforge runs list`, plus losses).
    A damaged run (its manifest unreadable) is a row too, naming the file in the last column, as
    `llmforge runs list` names it: a run that vanished from the list would look deleted."""
    if run.damaged:
        return RunRow(
            id=run.id,
            started="-",
            status="damaged",
            stages="-",
            losses=run.damaged,
            duration="-",
            dir=run.dir,
            damaged=run.damaged,
        )
    m = run.manifest
    counts: dict[str, int] = {}
    for name in m.get("stages", {}):
        status = run.stage_status(name)
        counts[status] = counts.get(status, 0) + 1
    created, finished = m.get("created"), m.get("finished")
    status = run.status
    if created and finished:
        duration = finished - created
    elif created and status == "running":
        duration = time.time() - created  # still going: how long so far
    else:
        duration = None
    return RunRow(
        id=run.id,
        started=time.strftime("%b %d %H:%M", time.localtime(created)) if created else "-",  # the id has the seconds
        status=status,
        stages=", ".join(f"{v} {k}" for k, v in counts.items()) or "-",
        losses=final_losses(m),
        duration=fmt_duration(duration),
        dir=run.dir,
    )


def newest_first(runs: list) -> list:
    """Runs newest first, by their start time (then id), as `llmforge runs list` lists them; said here
    rather than assumed from the store's order. A damaged run has no start time: its folder's time
    stands in, as in the store's own order."""

    def started(r) -> float:
        if getattr(r, "damaged", None):
            try:
                return r.dir.stat().st_mtime
            except OSError:
                return 0.0
        return r.manifest.get("created") or 0

    return sorted(runs, key=lambda r: (started(r), r.id), reverse=True)


def load_rows(runs_dir: Path) -> list[RunRow]:
    """The runs of a folder, newest first (the latest run is the one you look for), damaged ones included."""
    from llmforge.runs import RunStore

    return [run_row(r) for r in newest_first(RunStore(runs_dir).list(include_damaged=True))]


@dataclass
class Series:
    label: str
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)


def downsample(x: list[float], y: list[float], limit: int = MAX_POINTS) -> tuple[list[float], list[float]]:
    """At most `limit` evenly spaced points, always keeping the last one (the value you look at)."""
    n = len(x)
    if n <= limit:
        return x, y
    idx = [round(i * (n - 1) / (limit - 1)) for i in range(limit)]
    return [x[i] for i in idx], [y[i] for i in idx]


def loss_series(run_dir: Path, label: str = "", limit: int = MAX_POINTS) -> list[Series]:
    """The loss curves of a run from its events.jsonl: one series per (stage, metric in CURVE_METRICS)."""
    from llmforge.runs import EVENTS

    path = Path(run_dir) / EVENTS
    curves: dict[tuple[str, str], Series] = {}
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            # Most events of a training run are metrics and progress; skip the others before parsing JSON.
            if '"metric"' not in line:
                continue
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash, or one still being written
            if ev.get("type") != "metric":
                continue
            values = ev.get("values") or {}
            stage = ev.get("stage", "")
            for name in CURVE_METRICS:
                value = values.get(name)
                if not isinstance(value, (int, float)):
                    continue
                key = (stage, name)
                series = curves.get(key)
                if series is None:
                    series = curves[key] = Series(" ".join(p for p in (label, stage, name) if p))
                # Steps restart with each stage; a metric without a step gets the next index.
                series.x.append(ev["step"] if isinstance(ev.get("step"), (int, float)) else len(series.x))
                series.y.append(float(value))
    out = []
    for series in curves.values():
        series.x, series.y = downsample(series.x, series.y, limit)
        out.append(series)
    return out


# ----------------------------------------------------------------------------------------------
# widgets


class LossChart(Vertical):
    """Loss curves of one or two runs on one set of axes (textual-plotext; without it, the last values)."""

    DEFAULT_CSS = """
    LossChart { height: 1fr; min-height: 8; border: round $panel; }
    LossChart > .chart-plot { height: 1fr; }
    """

    def __init__(self, **kw):
        super().__init__(**kw)
        self.series: list[Series] = []
        self.chart_title = "loss"
        self._plot: Any = None  # a PlotextPlot, or a Static without the plot extra (hasattr "plt" tells)

    def compose(self) -> ComposeResult:
        self.border_title = self.chart_title
        try:
            from textual_plotext import PlotextPlot

            self._plot = PlotextPlot(classes="chart-plot")
        except ImportError:  # an optional extra: the table still works, the chart becomes a summary
            self._plot = Static("", classes="chart-plot")
        yield self._plot

    def show_series(self, series: list[Series], title: str) -> None:
        self.series, self.chart_title = series, title
        self.border_title = title
        if not hasattr(self._plot, "plt"):
            self._plot.update(Text("\n".join(f"{s.label}: {s.y[-1]:.4g} at step {s.x[-1]:g}" for s in series if s.y)))
            return
        plt = self._plot.plt
        plt.clear_data()
        plt.xlabel("step")
        for s in series:
            if s.x:
                plt.plot(s.x, s.y, label=s.label, marker="braille")
        self._plot.refresh()


class RunsScreen(Screen):
    """History of runs; enter opens one in the monitor, space marks runs to overlay their loss curves."""

    DEFAULT_CSS = """
    RunsScreen #runs-table { height: auto; max-height: 45%; min-height: 3; }
    RunsScreen #runs-hint { height: 1; color: $text-muted; padding: 0 1; }
    """

    HELP = """\
Every run of the runs folder, newest first, with its final losses; the chart shows the loss curves of
the highlighted run, or of the two marked runs on the same axes; o opens the highlighted run's stage reports."""

    BINDINGS = [
        # priority: shown in the footer and taken before the table's own enter (which would do the same).
        Binding(
            "enter", "open_run", "Open in monitor", priority=True, tooltip="follow the highlighted run in the Monitor"
        ),
        Binding("space", "mark", "Mark", tooltip="mark the run to compare its curves (two at most)"),
        Binding("r", "reload", "Refresh", tooltip="read the runs folder again now"),
        Binding(
            "v",
            "compare",
            "Compare evals",
            tooltip="the two marked runs' eval leaderboards side by side (runs compare)",
        ),
        Binding(
            "o", "report", "Report", tooltip="the highlighted run's stage reports (synth, curate, eval: report.md)"
        ),
    ]

    def __init__(self, app_state, **kw):
        super().__init__(**kw)
        self.state = app_state
        self.rows: list[RunRow] = []
        self.marked: list[str] = []  # run ids, oldest mark first
        self.loaded = False  # the store has been read once
        self._charted: tuple[str, ...] = ()

    def compose(self) -> ComposeResult:
        table: DataTable[str | Text] = DataTable(id="runs-table", cursor_type="row", zebra_stripes=True)
        for label, key in zip(LABELS, COLUMNS):
            table.add_column(label, key=key)
        yield table
        yield Static("", id="runs-hint")
        yield LossChart(id="runs-chart")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).focus()
        # The first load comes from on_screen_resume, which follows as the screen is shown.
        self.set_interval(REFRESH_SECONDS, self._tick)

    def on_screen_resume(self) -> None:
        self.action_reload()

    def _tick(self) -> None:
        if self.is_current:  # nobody looks at a hidden screen: no need to read the store for it
            self.action_reload()

    # ---- the table -----------------------------------------------------------------------------
    def action_reload(self) -> None:
        self._load()

    @work(exclusive=True, group="runs-table")
    async def _load(self) -> None:
        rows = await read_runs_dir(self, load_rows, self.state.runs_dir)
        if rows is not None:
            self._show_rows(rows)

    def _show_rows(self, rows: list[RunRow]) -> None:
        if rows == self.rows and self.loaded:
            return
        table = self.query_one(DataTable)
        if self.loaded and [r.id for r in rows] == [r.id for r in self.rows]:
            # The same runs, some of them changed (a running one ticks): update those cells in place, so
            # the cursor and the scroll position stay where the user left them.
            for old, new in zip(self.rows, rows):
                if old != new:
                    for key, value in zip(COLUMNS, new.cells(new.id in self.marked)):
                        table.update_cell(new.id, key, value)
            self.rows = rows
        else:
            current = self.highlighted
            self.rows = rows
            ids = {r.id for r in rows}
            self.marked = [m for m in self.marked if m in ids]
            table.clear()
            for row in rows:
                table.add_row(*row.cells(row.id in self.marked), key=row.id)
            if current in ids:
                table.move_cursor(row=table.get_row_index(current))
        self.loaded = True
        self._update_hint()
        self._chart()

    @property
    def highlighted(self) -> str | None:
        table = self.query_one(DataTable)
        if not self.rows or table.cursor_row < 0 or table.cursor_row >= len(self.rows):
            return None
        return self.rows[table.cursor_row].id

    def _highlighted_row(self) -> RunRow | None:
        run_id = self.highlighted
        return next((r for r in self.rows if r.id == run_id), None)

    def _update_hint(self) -> None:
        row = self._highlighted_row()
        if not self.rows:
            text = f"no runs in {self.state.runs_dir} yet: start one from the project screen or `llmforge run`"
        elif row is not None and row.damaged:
            text = f"run {row.id} is damaged: {row.damaged}"
        elif self.marked:
            text = "comparing " + " and ".join(self.marked) + " (space unmarks)"
        else:
            text = "space marks a run to compare (two at most); enter opens the run in the monitor"
        self.query_one("#runs-hint", Static).update(Text(text))

    # ---- actions -------------------------------------------------------------------------------
    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._update_hint()
        if not self.marked:
            self._chart()

    async def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        await self.action_open_run()

    async def action_open_run(self) -> None:
        """Make the highlighted run the selected one and show it in the monitor."""
        run_id = self.highlighted
        if run_id is None:
            return
        row = self._highlighted_row()
        if row is not None and row.damaged:
            # The monitor follows a run through its manifest: given this one it would show another run
            # without a word. Said as `llmforge runs status` says it.
            from llmforge.errors import UsageError

            error = UsageError(
                f"run {run_id} is damaged: {row.damaged}",
                hint=f"its events are still readable (`llmforge logs {run_id}`) and its stage "
                "folders may still hold artifacts",
            )
            show = getattr(self.app, "show_error", None)
            if callable(show):
                show(error)
            else:
                self.notify(str(error), severity="error", markup=False)
            return
        self.state.selected_run = run_id
        switch = getattr(self.app, "switch_area", None)
        if callable(switch):
            result = switch("monitor")
            if inspect.isawaitable(result):
                await result
        else:  # the app's own action for the keys 1..7
            await self.app.run_action("show('monitor')")

    def action_mark(self) -> None:
        run_id = self.highlighted
        if run_id is None:
            return
        if run_id in self.marked:
            self.marked.remove(run_id)
        else:
            self.marked.append(run_id)
            del self.marked[:-COMPARE]
        table = self.query_one(DataTable)
        for row in self.rows:  # a mark may have been dropped from another row
            table.update_cell(row.id, "mark", "●" if row.id in self.marked else " ")
        self._update_hint()
        self._chart()

    @work(exclusive=True, group="runs-compare")
    async def action_compare(self) -> None:
        """The two marked runs (the first marked as A), as `llmforge runs compare A B` shows them."""
        if len(self.marked) != COMPARE:
            self.notify("mark two runs with space first, then v compares their evaluations", markup=False)
            return
        from llmforge.leaderboard import compare_runs
        from llmforge.runs import RunStore

        a, b = self.marked

        def read(runs_dir: Path) -> dict:
            store = RunStore(runs_dir)
            return compare_runs(store.get(a), store.get(b))

        data = await read_runs_dir(self, read, self.state.runs_dir)
        if data is not None:
            self.app.push_screen(CompareScreen(compare_text(data)))

    @work(exclusive=True, group="runs-report")
    async def action_report(self) -> None:
        """The highlighted run's stage reports (report.md of each stage that has one), the last stage's first."""
        from llmforge.tui.screens.report import open_reports

        run_id = self.highlighted
        if run_id is None:
            self.notify("no run to show the reports of")
            return
        await open_reports(self, self.state.runs_dir, run_id)

    # ---- the chart -----------------------------------------------------------------------------
    def charted_runs(self) -> list[str]:
        if self.marked:
            return list(self.marked)
        return [self.highlighted] if self.highlighted else []

    def _chart(self) -> None:
        wanted = tuple(self.charted_runs())
        # Reload a running run's curves on every table refresh (its row changed); others only when the set changes.
        running = any(r.id in wanted and r.status == "running" for r in self.rows)
        if wanted == self._charted and not running:
            return
        self._charted = wanted
        self._load_chart(wanted)

    @work(exclusive=True, group="runs-chart")
    async def _load_chart(self, run_ids: tuple[str, ...]) -> None:
        dirs = {r.id: r.dir for r in self.rows}
        compare = len(run_ids) > 1

        def read() -> list[Series]:
            out = []
            for run_id in run_ids:
                out += loss_series(dirs[run_id], label=run_id if compare else "")
            return out

        try:
            series = await asyncio.to_thread(read)
        except OSError as exc:
            self.notify(f"cannot read the events: {exc}", severity="error", markup=False)
            return
        if not run_ids:
            title = "loss"
        elif not series:
            title = f"no loss metrics in {' and '.join(run_ids)}"
        else:
            title = "loss: " + " vs ".join(run_ids)
        self.query_one(LossChart).show_series(series, title)

    # ---- errors --------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# comparing two runs' evaluations


def compare_text(data: dict) -> Group:
    """`llmforge runs compare` in a panel: each eval metric of A and B with the change, then gates and picks."""
    from rich import box
    from rich.table import Table

    from llmforge.leaderboard import fmt_delta, fmt_value

    head = Text(f"A = {data['a']['id']} ({data['a']['status']}), B = {data['b']['id']} ({data['b']['status']})")
    if not data["evals"]:
        return Group(head, Text("no eval reports in either run (an eval stage writes one)"))
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for col in ("model", "metric", "A", "B", "B - A"):
        table.add_column(col, justify="left" if col in ("model", "metric") else "right")
    for e in data["evals"]:
        va, vb = e["a"] or {}, e["b"] or {}
        style = {True: "green", False: "red", None: ""}[e["better"]]
        table.add_row(
            str(e["model"]),
            str(e["name"]),
            fmt_value(va.get("value"), va.get("stderr")) if e["a"] else "-",
            fmt_value(vb.get("value"), vb.get("stderr")) if e["b"] else "-",
            Text(fmt_delta(e["delta"]) + {True: " better", False: " worse", None: ""}[e["better"]], style=style),
        )
    parts: list = [head, table]
    for g in data["gates"]:
        ok = bool(g.get("passed"))
        line = Text(f"{'✓' if ok else '✗'} {g['run'].upper()}: ", style="green" if ok else "red")
        line.append(str(g.get("message") or g.get("metric")))
        parts.append(line)
    for side in ("a", "b"):
        for sel in data["selected"][side]:
            parts.append(Text(f"★ {side.upper()} selected {sel.get('model')} ({sel.get('metric')})"))
    return Group(*parts)


class CompareScreen(ModalScreen):
    """`v` on the Runs area: the two marked runs' evaluations side by side; escape closes it."""

    DEFAULT_CSS = """
    CompareScreen { align: center middle; }
    CompareScreen > VerticalScroll {
        width: 90%; height: auto; max-height: 90%;
        border: round $accent; background: $surface; padding: 0 1;
    }
    """
    BINDINGS = [Binding("escape,v,q", "dismiss", "Close")]

    def __init__(self, content: Group) -> None:
        super().__init__()
        self.content = content

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(self.content, id="compare-text")
