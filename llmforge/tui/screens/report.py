"""A stage's report in the TUI: `o` on the Monitor or the Runs area opens the reports of a run.

Any stage that publishes a `report` artifact (synth, curate, eval, rlaif, a plugin's own) writes a folder
with ``report.md`` (for people) and usually ``report.json`` (for programs). The panel shows the Markdown as
Markdown (Textual's widget: tables, headings, code), found generically through the manifest as
`llmforge.leaderboard.report_folders` finds an eval report, so no stage needs UI code. A report.json with a
``generator`` (the synth layout, docs/synthetic.md) also gets a compact summary above it: rows kept, the
rejections by reason, the teacher's usage and what stopped the stage.

The files are read in a worker thread (`load_reports`); the panel itself only draws.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown, Static

MAX_MARKDOWN = 200_000  # characters: a report is a summary; a runaway one is cut, not drawn for seconds


@dataclass
class StageReport:
    """One stage's report folder: its Markdown and, when readable, its report.json."""

    run: str
    stage: str
    folder: Path
    markdown: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"report of {self.stage} (run {self.run})"


def _read_folder(run_id: str, stage: str, folder: Path) -> StageReport | None:
    md, js = folder / "report.md", folder / "report.json"
    data: dict[str, Any] = {}
    try:
        raw = json.loads(js.read_text(encoding="utf-8"))
        data = raw if isinstance(raw, dict) else {}
    except (OSError, ValueError):
        pass  # no report.json, or a damaged one: the Markdown still says it all
    try:
        text = md.read_text(encoding="utf-8", errors="replace")
    except OSError:
        if not data:
            return None
        # A report without its Markdown: the JSON, readable, is better than nothing.
        text = "```json\n" + json.dumps(data, indent=2)[:MAX_MARKDOWN] + "\n```\n"
    if len(text) > MAX_MARKDOWN:
        text = text[:MAX_MARKDOWN] + f"\n\n*(cut at {MAX_MARKDOWN} characters: the whole report is {md})*\n"
    return StageReport(run_id, stage, folder, text, data)


def load_reports(runs_dir: Path, run_id: str) -> list[StageReport]:
    """The reports of run `run_id`, in the order of its stages (a cached stage's from the run that made it)."""
    from llmforge.leaderboard import report_folders
    from llmforge.runs import RunStore

    run = RunStore(runs_dir).get(run_id, allow_damaged=True)
    out = []
    for stage in run.manifest.get("stages") or {}:
        for folder in report_folders(run, stage):
            found = _read_folder(run_id, stage, folder)
            if found is not None:
                out.append(found)
                break
    return out


def _count(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)  # 12.0 -> "12": a count summed as floats


def _dict(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def synth_summary(data: dict[str, Any]) -> str | None:
    """The compact lines of a synth report.json (one with a "generator"), or None for any other report."""
    if not isinstance(data.get("generator"), str):
        return None
    lines = [f"generator {data['generator']}" + (f", teacher {data['teacher']}" if data.get("teacher") else "")]
    units = _dict(data.get("units"))
    total = units.get("total")
    done = f"units {_count(units.get('done', '?'))}" + (f"/{_count(total)}" if total is not None else "")
    rejected = _dict(data.get("rejected"))
    n_rejected = sum(float(v) for v in rejected.values() if isinstance(v, (int, float)))
    lines.append(
        f"{done}, rows kept {_count(data.get('rows', '?'))}, candidates {_count(data.get('candidates', '?'))}, "
        f"rejected {_count(n_rejected)}"
    )
    if rejected:
        reasons = sorted(rejected.items(), key=lambda kv: -kv[1] if isinstance(kv[1], (int, float)) else 0)
        lines.append("rejected by reason: " + ", ".join(f"{k} {_count(v)}" for k, v in reasons))
    usage = _dict(data.get("usage"))
    if usage:
        seconds = usage.get("seconds")
        took = f", {seconds:.1f} s" if isinstance(seconds, (int, float)) else ""
        lines.append(
            f"usage: {_count(usage.get('requests', '?'))} requests, {_count(usage.get('tokens', '?'))} tokens{took}"
        )
    budget = _dict(data.get("budget"))
    stopped = budget.get("stopped_by")
    lines.append(f"stopped by the {stopped} budget" if stopped else "not stopped by a budget")
    return "\n".join(lines)


class ReportScreen(ModalScreen):
    """A run's stage reports, one at a time: `n` the next one, `escape` closes."""

    DEFAULT_CSS = """
    ReportScreen { align: center middle; }
    ReportScreen > Vertical {
        width: 90%; height: 90%;
        border: round $accent; background: $surface; padding: 0 1;
    }
    ReportScreen #report-summary { height: auto; color: $text; border-bottom: hkey $primary-darken-2; }
    ReportScreen #report-scroll { height: 1fr; }
    """
    BINDINGS = [
        Binding("escape,q,o", "dismiss", "Close"),
        Binding("n", "next_report", "Next report", tooltip="the next stage's report of this run"),
    ]

    def __init__(self, reports: list[StageReport], start: int = 0) -> None:
        super().__init__()
        self.reports = reports
        self.index = start % len(reports)

    @property
    def report(self) -> StageReport:
        return self.reports[self.index]

    def compose(self) -> ComposeResult:
        with Vertical(id="report-box"):
            yield Static("", id="report-summary", markup=False)
            with VerticalScroll(id="report-scroll"):
                yield Markdown("", id="report-text")

    def on_mount(self) -> None:
        self._show()

    def _show(self) -> None:
        r = self.report
        box = self.query_one("#report-box", Vertical)
        more = f"  {self.index + 1}/{len(self.reports)} (n: next)" if len(self.reports) > 1 else ""
        box.border_title = r.title + more
        box.border_subtitle = str(r.folder)
        summary = synth_summary(r.data)
        static = self.query_one("#report-summary", Static)
        static.display = summary is not None
        static.update(summary or "")
        self.query_one("#report-text", Markdown).update(r.markdown)
        self.query_one("#report-scroll", VerticalScroll).scroll_home(animate=False)

    def action_next_report(self) -> None:
        if len(self.reports) < 2:
            self.notify("this run has no other report")
            return
        self.index = (self.index + 1) % len(self.reports)
        self._show()


async def open_reports(screen: Any, runs_dir: Path, run_id: str, stage: str | None = None) -> None:
    """Push the reports of `run_id` (starting at `stage`'s when it has one, else the last stage's), or say that
    there is none yet. For a screen's worker: the files are read in a thread."""
    from llmforge.tui.screens import read_runs_dir

    reports = await read_runs_dir(screen, lambda d: load_reports(d, run_id), runs_dir)
    if reports is None:
        return
    if not reports:
        screen.notify(
            f"run {run_id} has no stage report yet (synth, curate, eval and rlaif stages write one as they end)",
            markup=False,
        )
        return
    names = [r.stage for r in reports]
    start = names.index(stage) if stage in names else len(reports) - 1
    screen.app.push_screen(ReportScreen(reports, start))
