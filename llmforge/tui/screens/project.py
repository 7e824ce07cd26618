"""The Project screen: the forge.toml pipeline, each stage's status in the latest run, and hardware.

Loading the pipeline imports pydantic and every plugin, so it happens in a worker after the screen
has painted. The stages' status comes from the latest run of this forge.toml (re-read every second
by a worker, which also samples the hardware every two). Runs are started detached, exactly as
`llmforge run --detach` starts them, and the Monitor takes over to follow them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.markup import escape
from textual.screen import Screen
from textual.widgets import DataTable, Static

from llmforge.tui.state import AppState
from llmforge.tui.widgets.text import fmt_duration, styled

if TYPE_CHECKING:
    from llmforge.tui.app import LlmforgeApp

STATUS_EVERY_S = 1.0
HARDWARE_EVERY_S = 2.0


@dataclass
class StageRow:
    name: str
    uses: str
    index: int  # position in forge.toml: problems are located as stages[index]
    needs: list[str] = field(default_factory=list)


@dataclass
class PipelineView:
    """What the screen knows of forge.toml: its stages (even when invalid) and its problems."""

    stages: list[StageRow]
    problems: list = field(default_factory=list)  # llmforge.errors.Problem
    error: str | None = None  # the file itself could not be read


def load_view(config, registry) -> PipelineView:
    """Validate forge.toml like `llmforge validate` (with the app's plugin registry); on problems, list the
    stages as written."""
    from llmforge.errors import ConfigError, ForgeError
    from llmforge.pipeline import load_pipeline

    try:
        pipe = load_pipeline(config, registry=registry)
    except ConfigError as exc:
        return PipelineView(_raw_stages(config), exc.problems)
    except ForgeError as exc:
        return PipelineView(_raw_stages(config), [], exc.render())
    return PipelineView([StageRow(s.name, s.uses, s.index, sorted(pipe.deps.get(s.name, ()))) for s in pipe.stages])


def _raw_stages(config) -> list[StageRow]:
    from llmforge.config import read_toml

    try:
        raw = read_toml(config)
    except Exception:  # noqa: BLE001 - unreadable: the problem is already reported
        return []
    stages = raw.get("stages")
    entries = stages if isinstance(stages, list) else []
    return [
        StageRow(str(e.get("name", f"#{i}")), str(e.get("uses", "?")), i)
        for i, e in enumerate(entries)
        if isinstance(e, dict)
    ]


class ProjectScreen(Screen):
    """The pipeline of forge.toml with each stage's status in the latest run of it.
    `v` validates, `r` starts a run, `e` resumes the last interrupted run, `f` re-runs from the selected
    stage. Runs start detached: they go on when the TUI closes."""

    DEFAULT_CSS = """
    ProjectScreen { layout: vertical; }
    #proj-head { height: auto; padding: 0 1; }
    #proj-body { height: 1fr; }
    #proj-stages { width: 1fr; height: 1fr; }
    #proj-hardware { width: 36; height: auto; min-height: 6; border: round $primary-darken-2; padding: 0 1; }
    #proj-problems { height: auto; max-height: 12; border: round $error; padding: 0 1; display: none; }
    """
    HELP = """\
The stages of forge.toml, each with its status in the latest run of this file, and the hardware.
Runs start in the background: they go on when you quit."""

    BINDINGS = [
        Binding("v", "validate", "Validate", tooltip="check forge.toml again, as llmforge validate does"),
        Binding("r", "run", "Run", tooltip="start a run and follow it in the Monitor"),
        Binding("e", "resume", "Resume", tooltip="resume the last interrupted run"),
        Binding(
            "f",
            "run_from",
            "Run from stage",
            tooltip="run again from the highlighted stage (it and the stages after it)",
        ),
    ]

    def __init__(self, app_state: AppState) -> None:
        super().__init__()
        self.state = app_state
        self.view: PipelineView | None = None
        self.run_info = None  # the latest RunInfo of this forge.toml
        self.launching = False
        self._cells: dict[tuple[str, str], str] = {}  # what the table shows: update only on change
        self._cancel = threading.Event()
        self._visible = threading.Event()

    def compose(self) -> ComposeResult:
        yield Static(self._head_text(), id="proj-head")
        with Horizontal(id="proj-body"):
            table: DataTable[str] = DataTable(id="proj-stages", cursor_type="row", zebra_stripes=True)
            for col in ("stage", "kind", "status", "time", "needs", "problems"):
                table.add_column(col, key=col)
            yield table
            with Vertical(id="proj-hardware"):
                yield Static("sampling...", id="proj-hw-text")
        yield Static("", id="proj-problems", markup=False)

    def on_mount(self) -> None:
        self.query_one("#proj-hardware").border_title = "hardware"
        self.query_one("#proj-problems").border_title = "problems"
        # After the first paint: loading the pipeline (pydantic, plugins) and psutil in threads would
        # otherwise compete with it for the interpreter.
        self.call_after_refresh(self._start_background)

    def _start_background(self) -> None:
        self.action_validate(quiet=True)
        self.run_worker(self._poll, thread=True, group="project-poll", name="project status and hardware")

    def on_screen_resume(self) -> None:
        self._visible.set()

    def on_screen_suspend(self) -> None:
        self._visible.clear()

    def on_unmount(self) -> None:
        self._cancel.set()

    # -- loading -------------------------------------------------------------------------------------

    def action_validate(self, quiet: bool = False) -> None:
        cfg = self.state.config_path
        if cfg is None or not cfg.is_file():
            self._show_view(PipelineView([], [], f"no forge.toml here ({cfg or 'forge.toml'})"), quiet=True)
            return
        self.run_worker(
            lambda: self._validate_worker(quiet),
            thread=True,
            group="project-load",
            exclusive=True,
            name="validate forge.toml",
        )

    def _validate_worker(self, quiet: bool) -> None:
        view = load_view(self.state.config_path, self.state.registry())
        self.app.call_from_thread(self._show_view, view, quiet)

    def _show_view(self, view: PipelineView, quiet: bool = False) -> None:
        self.view = view
        table = self.query_one("#proj-stages", DataTable)
        table.clear()
        self._cells = {k: v for k, v in self._cells.items() if k[0] == ""}  # the rows are new
        by_index: dict[int, int] = {}
        for p in view.problems:
            idx = _stage_index(p.where)
            if idx is not None:
                by_index[idx] = by_index.get(idx, 0) + 1
        for row in view.stages:
            n = by_index.get(row.index, 0)
            table.add_row(row.name, row.uses, "-", "-", ", ".join(row.needs), f"[red]{n}[/]" if n else "", key=row.name)
        self._show_status(self.run_info)
        panel = self.query_one("#proj-problems", Static)
        if view.error or view.problems:
            lines = [view.error] if view.error else []
            lines += [str(p) for p in view.problems]
            panel.update("\n".join(lines))
            panel.border_title = f"problems ({len(view.problems) or 1})"
            panel.display = True
        else:
            panel.display = False
            if not quiet:
                name = self.state.config_path.name if self.state.config_path else "forge.toml"
                self.notify(f"{name}: valid, {len(view.stages)} stages")
        self._update_head()

    # -- status and hardware ---------------------------------------------------------------------------

    def _poll(self) -> None:
        """Worker thread: the latest run's manifest every second, the hardware every two, while shown."""
        from textual.worker import get_current_worker

        from llmforge.tui.hardware import HardwareMonitor, render

        worker = get_current_worker()
        hw = HardwareMonitor(self.state.runs_dir)
        next_hw = 0.0
        try:
            while not (self._cancel.is_set() or worker.is_cancelled):
                if not self._visible.is_set():
                    self._cancel.wait(0.5)  # hidden: cost nothing, but notice a cancel promptly
                    continue
                try:
                    info = self.state.latest_run(of_config=True)
                except Exception:  # noqa: BLE001 - a half-deleted run folder: try again next time
                    info = None
                hw_text = None
                if time.monotonic() >= next_hw:
                    next_hw = time.monotonic() + HARDWARE_EVERY_S
                    hw_text = render(hw.sample())
                try:
                    self.app.call_from_thread(self._show_polled, info, hw_text)
                except RuntimeError:  # the app is closing
                    break
                self._cancel.wait(STATUS_EVERY_S)
        finally:
            hw.close()

    def _show_polled(self, info, hw_text: str | None) -> None:
        self._show_status(info)
        if hw_text is not None:
            self.query_one("#proj-hw-text", Static).update(hw_text)

    def _show_status(self, info) -> None:
        self.run_info = info
        if self.view is None:
            return
        table = self.query_one("#proj-stages", DataTable)
        stages = info.manifest.get("stages", {}) if info is not None else {}
        now = time.time()
        for row in self.view.stages:
            if row.name not in table.rows:
                continue
            st = stages.get(row.name)
            status = info.stage_status(row.name) if st else "pending"
            if st and status == "running" and st.get("started"):
                took = fmt_duration(now - st["started"])
            else:
                took = fmt_duration(st.get("duration")) if st else "-"
            for col, value in (("status", styled(status)), ("time", took)):
                if self._cells.get((row.name, col)) != value:
                    self._cells[(row.name, col)] = value
                    table.update_cell(row.name, col, value, update_width=True)
        self._update_head()

    def _update_head(self) -> None:
        head = self._head_text()
        if self._cells.get(("", "head")) != head:
            self._cells[("", "head")] = head
            self.query_one("#proj-head", Static).update(head)

    def _head_text(self) -> str:
        cfg = self.state.config_path
        parts = [
            f"[b]{escape(str(cfg))}[/b]" if cfg else "[b]no forge.toml[/b]",
            f"runs: {escape(str(self.state.runs_dir))}",
        ]
        if self.run_info is not None:
            parts.append(f"latest run {self.run_info.id} {styled(self.run_info.status)}")
        else:
            parts.append("no run yet")
        if self.launching:
            parts.append("[yellow]starting a run...[/]")
        return "  ".join(parts)

    # -- launching -----------------------------------------------------------------------------------

    def action_run(self) -> None:
        self._launch()

    def action_resume(self) -> None:
        self._launch(resume=True)

    def action_run_from(self) -> None:
        table = self.query_one("#proj-stages", DataTable)
        if self.view is None or not self.view.stages or table.cursor_row is None:
            self.notify("no stage selected", severity="warning")
            return
        name = table.ordered_rows[table.cursor_row].key.value
        self._launch(from_stage=name)

    def _launch(self, resume: bool = False, from_stage: str | None = None) -> None:
        from llmforge.tui.launch import Launch

        cfg = self.state.config_path
        if cfg is None or not cfg.is_file():
            self.notify("no forge.toml to run", severity="error")
            return
        if self.launching:
            self.notify("a run is being started", severity="warning")
            return
        self.launching = True
        self._update_head()
        launch = Launch(cfg, from_stage=from_stage, resume=resume)
        self.run_worker(
            lambda: self._launch_worker(launch), thread=True, group="project-launch", name="start a detached run"
        )

    def _launch_worker(self, launch) -> None:
        from llmforge.errors import ConfigError
        from llmforge.tui.launch import start_detached

        try:
            started = start_detached(launch, registry=self.state.registry())
        except ConfigError as exc:
            # Show the problems in place; the app's handler still notifies the message.
            view = PipelineView(self.view.stages if self.view else [], exc.problems)
            self.app.call_from_thread(self._show_view, view, True)
            raise
        finally:
            self.app.call_from_thread(self._launch_done)
        # mypy cannot solve textual's `T | Awaitable[T]` for a coroutine function; textual awaits it
        self.app.call_from_thread(self._launched, started)  # type: ignore[arg-type]

    def _launch_done(self) -> None:
        self.launching = False
        self._update_head()

    async def _launched(self, started) -> None:
        self.state.selected_run = started.run_id
        self.notify(f"run {started.run_id} started (pid {started.pid}); it goes on if the TUI closes")
        await cast("LlmforgeApp", self.app).action_show("monitor")


def _stage_index(where: str) -> int | None:
    """`stages[2].lora.r` -> 2."""
    if where.startswith("stages["):
        end = where.find("]")
        if end > 7 and where[7:end].isdigit():
            return int(where[7:end])
    return None
