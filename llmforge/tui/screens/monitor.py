"""The run monitor: live charts, progress with ETA, stages, log tail; stop and checkpoint-now.

The log tail hides `debug` lines (library chatter: deprecation warnings, transformers' and DeepSpeed's
routine log lines, see llmforge/chatter.py) as `llmforge logs` does without --debug; `d` shows them, and
the log's title says how many are hidden.

It follows `state.selected_run` (set by the Runs screen, or by the Project screen after a launch), or
else the latest run, running or finished. A worker thread tails the run's files into a `RunModel`
(follow.py); a timer redraws from the model twice a second, and only what changed: text when any
event arrived, charts at most once a second when a metric did. That keeps the app's CPU low while
a run writes 100 events a second, and the UI responsive while a long history loads.

The charts need height to be read: where the terminal leaves each chart of the 3x2 grid fewer than
`MIN_PLOT_ROWS` rows (80x24 gives 4), the screen shows them two at a time, side by side with the full
height, and `m` pages through them (the grid's title says which page).
"""

from __future__ import annotations

import threading
import time

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Log, ProgressBar, Static

from llmforge.tui.follow import CHARTS, RunModel, follow, progress_extras
from llmforge.tui.state import AppState
from llmforge.tui.widgets.charts import MetricChart
from llmforge.tui.widgets.text import fmt_duration, styled

REDRAW_S = 0.5
CHART_REDRAW_S = 1.0
MIN_PLOT_ROWS = 8  # rows of plot (inside the border) below which the grid pages its charts
# The pages of the paged layout: the loss first, the learning rate beside it, then the rest.
PAGES = [("loss", "learning_rate"), ("grad_norm", "tokens_per_s"), ("eval_loss",)]
# What the screen's fixed rows take: tabs, head (3), progress, footer.
FIXED_ROWS = 6


class MonitorScreen(Screen):
    """Follows one run: `s` asks it to stop (the running stage stops at its next safe point, a training
    stage saving a checkpoint first; the run ends with exit code 130), `c` asks for a checkpoint now, `l`
    goes back to following the latest run, `o` opens the run's stage reports, `d` shows or hides the debug lines
    of the log."""

    DEFAULT_CSS = """
    MonitorScreen { layout: vertical; }
    #mon-head { height: 3; padding: 0 1; }
    #mon-title { height: 1; }
    #mon-stages { height: 2; }
    #mon-progress-row { height: 1; padding: 0 1; }
    #mon-progress { width: 40; }
    #mon-eta { width: 1fr; padding-left: 1; }
    #mon-charts { grid-size: 3 2; grid-gutter: 0; height: 2fr; min-height: 10; }
    #mon-charts.paged { grid-size: 2 1; border-top: hkey $primary-darken-2; border-title-align: right; }
    #mon-log { height: 1fr; min-height: 4; border: round $primary-darken-2; }
    """
    HELP = """\
Follows one run: the run picked in the Runs area, or the latest one. Charts of the training metrics (or of
another stage's own: rows, acceptance, tokens/s of a synth stage), the progress of the current stage with its
ETA and what else it reports (rows kept, rejected), and the log; o opens the stage reports. The log hides
debug lines (library chatter) until d shows them."""

    BINDINGS = [
        Binding(
            "s",
            "stop",
            "Stop run",
            tooltip="stop the run at the stage's next safe point (a training stage "
            "saves a checkpoint first); it ends stopped, exit code 130",
        ),
        Binding("c", "checkpoint", "Checkpoint now", tooltip="ask the running stage to save a checkpoint now"),
        Binding("l", "latest", "Latest", tooltip="follow the latest run again"),
        Binding("m", "more_charts", "Charts", tooltip="show the next charts (when they are shown a few at a time)"),
        Binding(
            "o",
            "report",
            "Report",
            tooltip="open the run's stage reports (synth, curate, eval: report.md), the current stage's first",
        ),
        Binding(
            "d",
            "toggle_debug",
            "Debug",
            tooltip="show or hide the log's debug lines (library chatter: deprecation warnings, library log lines)",
        ),
    ]

    def __init__(self, app_state: AppState) -> None:
        super().__init__()
        self.state = app_state
        self.model: RunModel | None = None
        self._lock = threading.Lock()
        self._cancel: threading.Event | None = None
        self._shown_version = -1
        self._shown_series = -1
        self._chart_time = 0.0
        self._log_seen = 0  # log lines of the model already written to the Log widget
        self.show_debug = False  # the log shows `debug` lines (library chatter) too
        self._texts: dict[str, str] = {}  # what each Static shows: update only on change
        self.paged = False  # charts shown a page at a time (a small terminal)
        self.page = 0

    def compose(self) -> ComposeResult:
        with Vertical(id="mon-head"):
            yield Static("no run to follow yet", id="mon-title")
            yield Static("", id="mon-stages")
        with Horizontal(id="mon-progress-row"):
            # A known total from the start: an indeterminate bar animates, costing CPU for nothing.
            yield ProgressBar(total=1, show_eta=False, id="mon-progress")
            yield Static("", id="mon-eta")
        with Grid(id="mon-charts"):
            for metric, title in CHARTS.items():
                yield MetricChart(metric, title, id=f"chart-{metric}")
        yield Log(max_lines=100, id="mon-log")

    def on_mount(self) -> None:
        self.query_one("#mon-log", Log).border_title = "log"
        self.set_interval(REDRAW_S, self._redraw)
        self.set_interval(2.0, self._maybe_follow_latest)
        self._layout_charts()

    def on_screen_resume(self) -> None:
        self.attach()
        self._layout_charts()

    def on_resize(self) -> None:
        self._layout_charts()

    # -- the charts' layout ----------------------------------------------------------------------------

    def _layout_charts(self) -> None:
        """All five charts in a 3x2 grid when each gets MIN_PLOT_ROWS rows, else a page of two at full height."""
        height = self.size.height or self.app.size.height
        charts_rows = (height - FIXED_ROWS) * 2 / 3  # the grid is 2fr beside the log's 1fr
        paged = charts_rows / 2 - 2 < MIN_PLOT_ROWS  # two rows of charts, each with a border
        self.paged = paged
        grid = self.query_one("#mon-charts", Grid)
        grid.set_class(paged, "paged")
        shown = set(PAGES[self.page % len(PAGES)]) if paged else set(CHARTS)
        for metric in CHARTS:
            self.query_one(f"#chart-{metric}", MetricChart).display = metric in shown
        grid.border_title = f"charts {self.page % len(PAGES) + 1}/{len(PAGES)} (m: more)" if paged else ""
        if paged:
            self._chart_time = 0.0  # the charts just shown draw at their new size on the next redraw
            self._shown_series = -1

    def action_more_charts(self) -> None:
        if not self.paged:
            self.notify("every chart is shown (a taller terminal shows them all at once)")
            return
        self.page = (self.page + 1) % len(PAGES)
        self._layout_charts()

    def on_unmount(self) -> None:
        self._stop_following()

    # -- which run -----------------------------------------------------------------------------------

    def attach(self, run_id: str | None = None) -> None:
        """Follow `run_id`, else the selected run, else the latest; no-op if that one is followed."""
        if run_id is None:
            run = self.state.run_to_follow()
            if run is None:
                return
            run_id, run_dir = run.id, run.dir
        else:
            run_dir = self.state.store.get(run_id).dir
        if self.model is not None and self.model.run_id == run_id:
            return
        self._stop_following()
        self.model = RunModel(run_id, run_dir)
        self._lock = threading.Lock()
        self._shown_version = self._shown_series = -1
        self._chart_time = 0.0  # the new run's charts (or their emptiness) show at once
        self._log_seen = 0
        self.query_one("#mon-log", Log).clear()
        self.query_one("#mon-progress", ProgressBar).update(total=1, progress=0)
        cancel = self._cancel = threading.Event()
        model, lock = self.model, self._lock
        self.run_worker(
            lambda: self._follow(run_dir, model, lock, cancel), thread=True, group="follow", name=f"follow {run_id}"
        )
        self._redraw()

    @staticmethod
    def _follow(run_dir, model, lock, cancel: threading.Event) -> None:
        from textual.worker import get_current_worker

        worker = get_current_worker()
        follow(run_dir, model, lock, lambda: cancel.is_set() or worker.is_cancelled)

    def _stop_following(self) -> None:
        if self._cancel is not None:
            self._cancel.set()
            self._cancel = None

    def _maybe_follow_latest(self) -> None:
        # Without a selection the screen shows "the latest run": when that one has ended and a newer one
        # exists (started from the CLI, say), move on to it.
        if self.state.selected_run is None and (self.model is None or self.model.ended):
            latest = self.state.latest_run()
            if latest is not None and (self.model is None or latest.id != self.model.run_id):
                self.attach(latest.id)

    # -- drawing -------------------------------------------------------------------------------------

    def _redraw(self) -> None:
        m = self.model
        if m is None or not self.is_attached:
            return
        with self._lock:
            charts_due = (
                m.series_version != self._shown_series and time.monotonic() - self._chart_time >= CHART_REDRAW_S
            )
            # While running, the elapsed time and ETA change without events.
            if m.version == self._shown_version and m.status != "running" and not charts_due:
                return
            self._shown_version = m.version
            head, stages = self._head_text(m), self._stages_text(m)
            p = m.progress
            done, total, unit, eta = p.done, p.total, p.unit, m.eta()
            extras = progress_extras(p.extra)
            new_logs = self._take_logs(m)
            debug_count = m.debug_count
            points = {}
            if charts_due:
                self._shown_series = m.series_version
                self._chart_time = time.monotonic()
                # Each chart widget is a slot: the training metrics, or another stage's own (chart_slots).
                for slot, (metric, title) in zip(CHARTS, m.chart_slots()):
                    s = m.chart(metric) if metric is not None else None
                    points[slot] = (title, *(s.points() if s is not None else ([], [])))
        self._set_text("mon-title", head)
        self._set_text("mon-stages", stages)
        bar = self.query_one("#mon-progress", ProgressBar)
        if total:
            if (bar.total, bar.progress) != (total, done):
                bar.update(total=total, progress=done)
            left = f"ETA {fmt_duration(eta)}" if eta is not None else ""
            self._set_text("mon-eta", "  ".join(x for x in (f"{done:g}/{total:g} {unit}", extras, left) if x))
        elif m.ended:
            bar.update(total=1, progress=1 if m.status == "done" else 0)
            self._set_text("mon-eta", f"{done:g} {unit}  {extras}" if extras else "")
        elif extras or done:
            # No total (a synth stage stopped only by a budget): the count and the extras still say how far.
            self._set_text("mon-eta", "  ".join(x for x in (f"{done:g} {unit}".strip(), extras) if x))
        if new_logs:
            self.query_one("#mon-log", Log).write_lines(new_logs)
        self._title_log(debug_count)
        for slot, (title, xs, ys) in points.items():
            chart = self.query_one(f"#chart-{slot}", MetricChart)
            chart.title = title
            chart.set_points(xs, ys)

    def _set_text(self, widget_id: str, text: str) -> None:
        if self._texts.get(widget_id) != text:
            self._texts[widget_id] = text
            # Fixed-size widgets: no layout pass for a new text (layout is what costs at 100 events/s).
            self.query_one(f"#{widget_id}", Static).update(text, layout=False)

    def _take_logs(self, m: RunModel) -> list[str]:
        # The model keeps the last 500 lines in a deque; count what was appended since the last redraw.
        total = m.log_count
        fresh = min(total - self._log_seen, len(m.logs))
        self._log_seen = total
        if fresh <= 0:
            return []
        lines = list(zip(m.logs, m.log_debug))[-fresh:]
        return [text for text, debug in lines if self.show_debug or not debug]

    def _title_log(self, debug_count: int) -> None:
        log = self.query_one("#mon-log", Log)
        if not debug_count:
            title = "log"
        elif self.show_debug:
            title = f"log, with {debug_count} debug line{'s' * (debug_count != 1)} (d hides them)"
        else:
            title = f"log ({debug_count} debug line{'s' * (debug_count != 1)} hidden: d shows them)"
        if log.border_title != title:
            log.border_title = title

    def action_toggle_debug(self) -> None:
        """Show or hide the debug lines: the log is written again from the lines the model keeps."""
        self.show_debug = not self.show_debug
        log = self.query_one("#mon-log", Log)
        log.clear()
        m = self.model
        if m is None:
            self._title_log(0)
            return
        with self._lock:
            self._log_seen = m.log_count - len(m.logs)
            lines = self._take_logs(m)
            debug_count = m.debug_count
        if lines:
            log.write_lines(lines)
        self._title_log(debug_count)
        self.notify("debug lines shown" if self.show_debug else "debug lines hidden")

    def _head_text(self, m: RunModel) -> str:
        parts = [f"run [b]{m.run_id}[/b]", styled(m.status)]
        if m.exit_code is not None:
            parts.append(f"exit {m.exit_code}")
        if m.current_stage:
            parts.append(f"stage [b]{m.current_stage}[/b]")
        if m.step is not None:
            parts.append(f"step {m.step}")
        if m.started:
            parts.append(f"elapsed {fmt_duration((m.finished or time.time()) - m.started)}")
        if m.checkpoints:
            parts.append(f"last checkpoint: step {m.checkpoints[-1]['step']}")
        return "  ".join(parts)

    @staticmethod
    def _stages_text(m: RunModel) -> str:
        items = []
        for st in m.stages.values():
            t = f" {fmt_duration(st.duration)}" if st.duration is not None else ""
            items.append(f"{st.name} {styled(st.status)}{t}")
        return "stages: " + ", ".join(items) if items else ""

    # -- actions -------------------------------------------------------------------------------------

    @work(exclusive=True, group="monitor-report")
    async def action_report(self) -> None:
        """The followed run's stage reports in a panel: the current (or last reporting) stage's first."""
        from llmforge.tui.screens.report import open_reports

        m = self.model
        if m is None:
            self.notify("no run to show the reports of")
            return
        await open_reports(self, self.state.runs_dir, m.run_id, m.current_stage or m.metric_stage)

    def action_latest(self) -> None:
        self.state.selected_run = None
        latest = self.state.latest_run()
        if latest is None:
            self.notify("no runs yet")
            return
        self.attach(latest.id)

    def action_stop(self) -> None:
        from llmforge.tui.launch import request_stop

        if self.model is None:
            self.notify("no run to stop")
            return
        request_stop(self.model.run_dir)  # UsageError when it is not running: shown by the app
        # What a stop does depends on the stage (as `llmforge stop` says): a training stage saves a
        # checkpoint first, a shell or copy stage just stops and runs again on resume.
        stage = self.model.current_stage
        who = f"stage {stage}" if stage else "the running stage"
        self.notify(
            f"stop requested for run {self.model.run_id}: {who} stops at its next safe point "
            "(training stages save a checkpoint first)",
            markup=False,
        )

    def action_checkpoint(self) -> None:
        from llmforge.tui.launch import request_checkpoint

        if self.model is None:
            self.notify("no run")
            return
        request_checkpoint(self.model.run_dir)
        self.notify(f"checkpoint requested for run {self.model.run_id}")
