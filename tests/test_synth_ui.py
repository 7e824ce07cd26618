"""A synth stage in the TUI: its progress (units, rows kept, rejected) and metric curves in the Monitor while it
runs, and its report (report.md as Markdown, with a compact summary of report.json) from the Monitor and the
Runs area (`o`).

The run is made by the real runner, in a child process as `llmforge run` makes one, from a forge.toml whose
`synth` stage is played by `mini-synth` (defined here): it reports what the synth stage reports after each
batch (`ctx.progress(units, total, unit="unit", rows=.., rejected=..)` and `ctx.metric(rows=.., acceptance=..,
tokens_per_s=..)`), waits for the test to have looked at it running, then writes its report with the synth
plugin's own writer (plugins/synth/report.py). A second stage, `notes`, writes a report.md of another kind.
The TUI runs under Textual's `run_test()`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import Field
from rich.text import Text

from conftest import until
from llmforge import hookimpl
from llmforge.stage import Stage, StageOptions

HERE = Path(__file__).parent
SIZE = (120, 40)
UNITS = 4


def counts(u: int) -> tuple[int, int]:
    """Rows kept and rejected after unit `u`: two rows per unit, one rejection every other unit."""
    return 2 * u, (u + 1) // 2


class MiniSynthOptions(StageOptions):
    units: int = Field(UNITS)
    hold: str = Field("", description="a file: the stage waits for it before writing its report")


class MiniSynthStage(Stage):
    """Reports as the synth stage does after each batch, then writes a synth report.json + report.md."""

    kind = "mini-synth"
    summary = "the synth stage's progress, metrics and report, at once (the synth UI tests)"
    Options = MiniSynthOptions
    produces = ("report",)

    def run(self, o: MiniSynthOptions, ctx) -> None:
        from llmforge_plugins.synth.report import write_report

        for u in range(1, o.units + 1):
            kept, rejected = counts(u)
            ctx.progress(u, o.units, unit="unit", rows=kept, rejected=rejected)
            ctx.metric(
                step=u,
                rows=float(kept),
                rejected=float(rejected),
                acceptance=kept / (kept + rejected),
                tokens_per_s=100.0 * u,
            )
        deadline = time.monotonic() + 60
        while o.hold and not Path(o.hold).exists() and time.monotonic() < deadline and not ctx.should_stop():
            time.sleep(0.05)
        kept, rejected = counts(o.units)
        report = {
            "version": 1,
            "generator": "answer",
            "teacher": "smollm2-135m",
            "units": {"total": o.units, "done": o.units},
            "rows": kept,
            "candidates": kept + rejected,
            "rejected": {"verify": rejected - 1, "duplicate": 1},
            "scores": {"judge": {"mean": 7.5, "min": 6.0, "max": 9.0, "histogram": [[6.0, 7.5, 3], [7.5, 9.0, 5]]}},
            "usage": {"requests": 12, "tokens": 3456, "seconds": 4.5},
            "budget": {"rows": None, "tokens": None, "requests": None, "minutes": None, "stopped_by": None},
            "examples": {
                "kept": [{"messages": [{"role": "user", "content": "What is 2+2?"}]}],
                "rejected": [{"reason": "verify: wrong value 5", "row": {"messages": []}}],
            },
        }
        with ctx.artifact("report") as out:
            write_report(out, report)


class NotesStage(Stage):
    """A report of another kind: report.md only."""

    kind = "notes"
    summary = "a report.md without a synth report.json (the synth UI tests)"
    Options = StageOptions
    produces = ("report",)

    def run(self, o: StageOptions, ctx) -> None:
        ctx.progress(10, 10, unit="row", kept=7)
        with ctx.artifact("report") as out:
            (out / "report.md").write_text("# Curated notes\n\nkept 7 of 10 rows\n")


class SynthUiPlugin:
    @hookimpl
    def register_stages(self, register):
        register(MiniSynthStage)
        register(NotesStage)


def registry():
    from llmforge.plugins import load_registry

    return load_registry(env="", extra=[("synth-ui-test", SynthUiPlugin())])


FORGE = """
[[stages]]
name = "synth"
uses = "mini-synth"
hold = "{hold}"

[[stages]]
name = "notes"
uses = "notes"
"""

# The child process: the real runner over forge.toml with this module's stages, as `llmforge run` runs it.
CHILD = f"""
import sys
sys.path.insert(0, {str(HERE)!r})
from pathlib import Path
from llmforge.pipeline import load_pipeline
from llmforge.runner import RunRequest, run_pipeline
from test_synth_ui import registry
reg = registry()
result = run_pipeline(load_pipeline(Path("forge.toml"), registry=reg), RunRequest(), registry=reg)
sys.exit(result.exit_code)
"""


def plain(widget) -> str:
    content = widget.content if hasattr(widget, "content") else widget.renderable
    return content.plain if isinstance(content, Text) else Text.from_markup(str(content)).plain


def markdown_text(screen) -> str:
    from textual.widgets import Markdown

    md = screen.query_one("#report-text", Markdown)
    return md.source


# ------------------------------------------------------------------------------------------------
# the model behind the Monitor


def test_progress_extras_and_a_stages_own_metrics_become_the_line_and_the_charts():
    from llmforge.tui.follow import CHARTS, RunModel, progress_extras

    m = RunModel("r", Path("."))
    m.apply([{"type": "stage_start", "stage": "synth", "uses": "synth", "time": 1.0}])
    assert m.chart_slots() == list(CHARTS.items())  # nothing reported yet: the training charts, empty
    for u in (1, 2):
        kept, rejected = counts(u)
        m.apply(
            [
                {"type": "progress", "stage": "synth", "time": 1.0 + u, "done": u, "total": None, "unit": "unit",
                 "rows": kept, "rejected": rejected, "detail": {"nested": 1}},
                {"type": "metric", "stage": "synth", "time": 1.0 + u, "step": u,
                 "values": {"rows": float(kept), "acceptance": kept / (kept + rejected), "tokens_per_s": 50.0}},
            ]
        )  # fmt: skip
    assert m.progress.extra == {"rows": 4, "rejected": 1}  # a nested value has no place on one line
    assert progress_extras(m.progress.extra) == "rows 4  rejected 1"
    assert progress_extras({"acceptance": 0.8, "model": "sft"}) == "acceptance 0.8  model sft"
    # synth reports none of the training metrics: its own fill the chart slots, in the order they came
    assert m.chart_slots() == [("rows", "rows"), ("acceptance", "acceptance"), ("tokens_per_s", "tokens/s"),
                               (None, ""), (None, "")]  # fmt: skip
    assert m.chart("acceptance").points() == ([1.0, 2.0], [2 / 3, 4 / 5])
    # a training stage after it: the training charts again (its loss and whatever else it reports)
    m.apply([{"type": "metric", "stage": "sft", "time": 9.0, "step": 1, "values": {"loss": 2.0, "mfu": 0.3}}])
    assert m.chart_slots() == list(CHARTS.items())


def test_synth_summary_reads_the_shared_report_layout_and_passes_over_other_reports():
    from llmforge.tui.screens.report import synth_summary

    data = {
        "generator": "self_instruct",
        "teacher": "t",
        "units": {"total": None, "done": 7},
        "rows": 12,
        "candidates": 20,
        "rejected": {"judge": 3, "duplicate": 5},
        "usage": {"requests": 40, "tokens": 9000, "seconds": 12.25},
        "budget": {"rows": 12, "stopped_by": "rows"},
    }
    assert synth_summary(data).splitlines() == [
        "generator self_instruct, teacher t",
        "units 7, rows kept 12, candidates 20, rejected 8",
        "rejected by reason: duplicate 5, judge 3",
        "usage: 40 requests, 9000 tokens, 12.2 s",
        "stopped by the rows budget",
    ]
    assert synth_summary({"models": [], "results": []}) is None  # an eval report: no synth summary
    assert synth_summary({"generator": "x", "units": "bad", "rejected": None})  # a damaged one still reads


# ------------------------------------------------------------------------------------------------
# the app, following a real run


@pytest.fixture
def synth_project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hold = tmp_path / "release"
    (tmp_path / "forge.toml").write_text(FORGE.format(hold=hold))
    child = subprocess.Popen([sys.executable, "-c", CHILD], cwd=tmp_path)
    yield tmp_path, hold, child
    hold.touch()
    try:
        child.wait(60)
    finally:
        if child.poll() is None:
            child.kill()


@pytest.mark.slow
def test_monitor_shows_a_running_synth_stage_and_its_report_opens(synth_project):
    from textual.widgets import DataTable

    from llmforge.tui.app import LlmforgeApp
    from llmforge.tui.screens.monitor import MonitorScreen
    from llmforge.tui.screens.report import ReportScreen
    from llmforge.tui.screens.runs import RunsScreen
    from llmforge.tui.state import AppState
    from llmforge.tui.widgets.charts import MetricChart

    root, hold, child = synth_project
    app = LlmforgeApp(AppState(config_path=root / "forge.toml", runs_dir=root / "runs"), area="monitor")

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: isinstance(app.screen, MonitorScreen), 20, "the Monitor")
            mon = app.screen
            eta = mon.query_one("#mon-eta")
            kept, rejected = counts(UNITS)
            # the stage is running, held before its report: the line has the units and what it kept
            await until(pilot, lambda: f"{UNITS}/{UNITS} unit" in plain(eta), 40, "the synth progress line")
            assert f"rows {kept}  rejected {rejected}" in plain(eta)
            assert mon.model.status == "running" and mon.model.current_stage == "synth"
            # its own metrics in the charts, each titled with its latest value
            charts = list(mon.query(MetricChart))
            await until(pilot, lambda: charts[0].title == "rows" and charts[0].data[1], 10, "the synth charts")
            titles = [c.title for c in charts]
            assert titles[:4] == ["rows", "rejected", "acceptance", "tokens/s"]
            assert charts[0].data == ([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0])
            assert charts[3].data[1][-1] == 400.0 and charts[3].border_title == "tokens/s 400"
            # no report yet: o says so and opens nothing
            await pilot.press("o")
            await pilot.pause(0.3)
            assert not isinstance(app.screen, ReportScreen)

            hold.touch()  # let the stage write its report and the run end
            await until(pilot, lambda: mon.model.ended, 40, "the run's end")
            assert mon.model.status == "done", mon.model.logs
            await until(pilot, lambda: "10/10 row  kept 7" in plain(eta), 10, "the notes stage's extras")

            # o: the reports, the synth stage's first (the stage whose metrics are charted)
            await pilot.press("o")
            await until(pilot, lambda: isinstance(app.screen, ReportScreen), 10, "the report panel")
            panel = app.screen
            await pilot.pause(0.2)
            assert panel.report.stage == "synth"
            assert "report of synth" in str(panel.query_one("#report-box").border_title) and "1/2" in str(
                panel.query_one("#report-box").border_title
            )
            summary = plain(panel.query_one("#report-summary"))
            assert "generator answer, teacher smollm2-135m" in summary
            assert f"units {UNITS}/{UNITS}, rows kept {kept}, candidates {kept + rejected}, rejected {rejected}" in (
                summary
            )
            assert "rejected by reason: verify 1, duplicate 1" in summary
            assert "usage: 12 requests, 3456 tokens, 4.5 s" in summary and "not stopped by a budget" in summary
            md = markdown_text(panel)
            assert md.startswith("# Synthetic data: answer") and "| rows kept | 8 |" in md
            assert any((root / "runs").glob("*/stages/synth/artifacts/report/report.md"))
            # the Markdown is drawn as Markdown: a table widget, the heading without its '#'
            from textual.widgets._markdown import MarkdownTable

            assert panel.query(MarkdownTable)
            # n: the next report, one without a synth report.json (no summary)
            await pilot.press("n")
            await pilot.pause(0.2)
            assert panel.report.stage == "notes" and "kept 7 of 10 rows" in markdown_text(panel)
            assert not panel.query_one("#report-summary").display
            await pilot.press("escape")
            await until(pilot, lambda: isinstance(app.screen, MonitorScreen), 5, "back to the Monitor")

            # the Runs area: o on the highlighted run opens the same reports (the last stage's first)
            await pilot.press("3")
            await until(pilot, lambda: isinstance(app.screen, RunsScreen), 10, "the Runs area")
            runs = app.screen
            await until(pilot, lambda: runs.query_one(DataTable).row_count == 1, 10, "the run in the table")
            await pilot.press("o")
            await until(pilot, lambda: isinstance(app.screen, ReportScreen), 10, "the report from Runs")
            assert app.screen.report.stage == "notes"
            await pilot.press("escape")
            assert app.is_running and not app.unexpected_errors

    asyncio.run(scenario())
    assert child.wait(30) == 0
    run = next((root / "runs").iterdir())
    assert json.loads((run / "stages" / "synth" / "artifacts" / "report" / "report.json").read_text())["rows"] == 8
