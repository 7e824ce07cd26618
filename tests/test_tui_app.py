"""The TUI's app, Project screen and Run monitor, driven with Pilot against real detached runs.

Runs are started from the Project screen exactly as a user would (key `r`), as separate processes,
and followed through the run store. Tiny `shell` pipelines where a run only needs to exist; a tiny
`pretrain` where the charts need real metrics and where a stop must leave a checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.text import Text

from conftest import run_cli, until
from llmforge.runs import STOP_REQUEST, RunStore, lock_is_live, read_lock, request
from llmforge.tui.app import SCREENS, LlmforgeApp, PlaceholderScreen
from llmforge.tui.follow import EventTail, RunModel, Series
from llmforge.tui.state import AppState
from training_data import PRETRAIN, write_data

SIZE = (110, 34)

# Counts to N, printing each number: a run that lasts a few seconds and logs as it goes.
COUNTER = """
[[stages]]
name = "count"
uses = "shell"
command = 'n=0; while [ "$n" -lt {n} ]; do n=$((n+1)); echo "tick $n"; sleep 0.05; done; echo done > "$LLMFORGE_OUT/x"'

[[stages]]
name = "bundle"
uses = "copy"
sources = ["@count"]
"""


@pytest.fixture
def tui_project(project, monkeypatch):
    """A project whose detached runs are stopped at the end of the test, whatever happened."""
    monkeypatch.chdir(project.root)
    monkeypatch.delenv("LLMFORGE_LOAD_PLUGINS", raising=False)
    yield project
    for run in RunStore(project.runs).list():
        if lock_is_live(read_lock(run.dir)):
            request(run.dir, STOP_REQUEST)
            deadline = time.time() + 60
            while time.time() < deadline and lock_is_live(read_lock(run.dir)):
                time.sleep(0.2)


def state_of(project) -> AppState:
    return AppState.discover(project.config, project.runs)


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def chart_points(app, metric: str) -> tuple[list, list]:
    from llmforge.tui.widgets.charts import MetricChart

    return app.screen.query_one(f"#chart-{metric}", MetricChart).data


def stages_text(monitor) -> str:
    """The Monitor's stages line as it reads on the screen."""
    return Text.from_markup(str(monitor.query_one("#mon-stages").content)).plain


def log_text(app) -> str:
    from textual.widgets import Log

    return "\n".join(app.screen.query_one("#mon-log", Log).lines)


# -- real runs -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_from_project_screen_is_followed_to_completion_with_charts(tui_project):
    write_data(tui_project.root)
    tui_project.write(PRETRAIN.format(steps=6).replace("log_every = 2", "log_every = 1"))

    async def scenario():
        app = LlmforgeApp(state_of(tui_project))
        async with app.run_test(size=SIZE) as pilot:
            from textual.widgets import DataTable

            table = await until(
                pilot,
                lambda: (
                    app.screen.query("#proj-stages") and app.screen.query_one("#proj-stages", DataTable).row_count == 1
                ),
                30,
                "stages",
            )
            assert table
            await pilot.press("r")
            await until(pilot, lambda: app.area == "monitor", 60, "the monitor after launch")
            mon = app.screen
            await until(pilot, lambda: mon.model, 10, "the monitor to attach")
            run_id = app.state.selected_run
            assert run_id and mon.model.run_id == run_id
            await until(pilot, lambda: mon.model.ended, 240, "the run to finish")
            await until(pilot, lambda: len(chart_points(app, "loss")[1]) == 6, 10, "the loss chart")
            assert mon.model.status == "done" and mon.model.exit_code == 0
            for metric in ("learning_rate", "grad_norm", "tokens_per_s"):
                assert chart_points(app, metric)[1], metric
            xs, ys = chart_points(app, "loss")
            assert xs == [1, 2, 3, 4, 5, 6] and all(y > 0 for y in ys)
            await until(pilot, lambda: "run done (exit code 0)" in log_text(app), 5, "the log tail")
            assert mon.model.stages["pretrain"].status == "done"
            # the Project screen shows the run's result for the stage
            await pilot.press("1")
            await until(
                pilot,
                lambda: "done" in str(app.screen.query_one("#proj-stages", DataTable).get_cell("pretrain", "status")),
                10,
                "stage status",
            )
            assert app.unexpected_errors == []
        return run_id

    run_id = asyncio.run(scenario())
    m = manifest(tui_project.runs / run_id)
    assert m["status"] == "done" and m["exit_code"] == 0
    assert m["pid"] != os.getpid()  # the run was its own process, not the TUI's


@pytest.mark.slow
def test_stop_from_the_monitor_ends_the_run_stopped_with_a_checkpoint(tui_project):
    write_data(tui_project.root)
    tui_project.write(PRETRAIN.format(steps=5000).replace("log_every = 2", "log_every = 1"))

    async def scenario():
        app = LlmforgeApp(state_of(tui_project))
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.screen.query("#proj-stages"), 30, "the project screen")
            await pilot.press("r")
            await until(pilot, lambda: app.area == "monitor", 60, "the monitor")
            mon = app.screen
            await until(pilot, lambda: len(chart_points(app, "loss")[1]) >= 2, 240, "loss points")
            await pilot.press("s")
            await until(pilot, lambda: mon.model.ended, 120, "the run to stop")
            assert mon.model.status == "stopped" and mon.model.exit_code == 130
            await until(pilot, lambda: mon.model.checkpoints, 10, "the checkpoint event")
            assert app.unexpected_errors == []
            # a second stop on an ended run is a user error, shown, not a crash
            await pilot.press("s")
            await until(pilot, lambda: app.shown_errors, 5, "the error")
            assert "is not running" in app.shown_errors[-1]
            assert app.is_running and app.unexpected_errors == []
            return mon.model.run_id, mon.model.checkpoints[-1]

    run_id, ckpt = asyncio.run(scenario())
    run_dir = tui_project.runs / run_id
    m = manifest(run_dir)
    assert m["status"] == "stopped" and m["exit_code"] == 130
    assert m["stages"]["pretrain"]["status"] == "stopped"
    assert (Path(ckpt["path"]) / "llmforge-complete").exists()


def test_quitting_leaves_the_run_going_and_a_new_session_reattaches(tui_project):
    tui_project.write(COUNTER.format(n=150))

    async def first_session():
        app = LlmforgeApp(state_of(tui_project))
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.screen.query("#proj-stages"), 30, "the project screen")
            await pilot.press("r")
            await until(pilot, lambda: app.area == "monitor", 60, "the monitor")
            await until(pilot, lambda: "tick 3" in log_text(app), 30, "the first ticks")
            run_id = app.screen.model.run_id
            await pilot.press("q")
        return run_id

    run_id = asyncio.run(first_session())
    run_dir = tui_project.runs / run_id
    assert lock_is_live(read_lock(run_dir)), "the run died with the TUI"
    assert manifest(run_dir)["status"] == "running"

    async def second_session():
        app = LlmforgeApp(state_of(tui_project), area="monitor")
        async with app.run_test(size=SIZE) as pilot:
            mon = await until(pilot, lambda: app.area == "monitor" and app.screen, 10, "the monitor")
            assert mon.model is not None and mon.model.run_id == run_id  # the latest run, reattached
            await until(pilot, lambda: mon.model.ended, 60, "the run to finish")
            assert mon.model.status == "done"
            # the whole history, from before this session too
            await until(pilot, lambda: "tick 150" in log_text(app), 5, "the log's end")
            assert any(line.endswith("[count] tick 1") for line in mon.model.logs)
            assert [s.status for s in mon.model.stages.values()] == ["done", "done"]
            assert app.unexpected_errors == []

    asyncio.run(second_session())
    assert manifest(run_dir)["status"] == "done"


def test_stop_then_resume_then_run_from_a_selected_stage(tui_project):
    from textual.widgets import DataTable

    tui_project.write(COUNTER.format(n=100))

    def cell(app, stage):
        return str(app.screen.query_one("#proj-stages", DataTable).get_cell(stage, "status"))

    async def scenario():
        app = LlmforgeApp(state_of(tui_project))
        async with app.run_test(size=SIZE) as pilot:
            await until(
                pilot,
                lambda: (
                    app.screen.query("#proj-stages") and app.screen.query_one("#proj-stages", DataTable).row_count == 2
                ),
                30,
                "the stages",
            )
            await pilot.press("r")
            await until(pilot, lambda: app.area == "monitor" and app.screen.model, 60, "the monitor")
            mon = app.screen
            first = mon.model.run_id
            await until(pilot, lambda: "tick 5" in log_text(app), 30, "ticks")
            await pilot.press("s")
            # what a stop does, said truly: a shell stage saves no checkpoint (it runs again on resume)
            notice = await until(
                pilot,
                lambda: next((n.message for n in app._notifications if n.message.startswith("stop requested")), None),
                5,
                "notice",
            )
            assert notice == (
                f"stop requested for run {first}: stage count stops at its next safe point "
                "(training stages save a checkpoint first)"
            )
            await until(pilot, lambda: mon.model.ended, 60, "the stop")
            assert (mon.model.status, mon.model.exit_code) == ("stopped", 130)
            # a stop is marked as the CLI marks it (■), apart from a failure (✗)
            await until(pilot, lambda: "count ■ stopped" in stages_text(mon), 5, "the stages line")
            assert "■ stopped  exit 130" in Text.from_markup(mon._texts["mon-title"]).plain
            assert any(x.endswith("[count] ■ stopped") for x in mon.model.logs)
            await pilot.press("1")
            await until(pilot, lambda: "■ stopped" in cell(app, "count"), 10, "the stopped stage")
            # resume: the same run goes on, and the monitor follows it on
            await pilot.press("e")
            await until(pilot, lambda: app.area == "monitor" and app.state.selected_run == first, 60, "resume")
            await until(pilot, lambda: mon.model.status == "done", 60, "the resumed run to finish")
            assert mon.model.run_id == first and any(x.endswith("run started (resumed)") for x in mon.model.logs)
            # run from the second stage: a new run that reuses `count` and re-runs `bundle`
            await pilot.press("1")
            await pilot.press("down")
            await pilot.press("f")
            await until(
                pilot, lambda: app.area == "monitor" and app.state.selected_run not in (None, first), 60, "the new run"
            )
            await until(
                pilot,
                lambda: mon.model.run_id == app.state.selected_run and mon.model.status == "done",
                60,
                "the new run to finish",
            )
            assert {n: s.status for n, s in mon.model.stages.items()} == {"count": "cached", "bundle": "done"}
            assert app.unexpected_errors == [] and app.shown_errors == []

    asyncio.run(scenario())


# -- the app without runs --------------------------------------------------------------------------------


def test_validation_problems_are_shown_in_place_with_key_paths(tui_project):
    tui_project.write("""
        [[stages]]
        name = "a"
        uses = "shell"
        command = "true"
        timeout = -1

        [[stages]]
        name = "b"
        uses = "copy"
        sources = ["@nowhere"]
    """)

    async def scenario():
        from textual.widgets import DataTable, Static

        app = LlmforgeApp(state_of(tui_project))
        async with app.run_test(size=SIZE) as pilot:
            panel = await until(
                pilot,
                lambda: (
                    app.screen.query_one("#proj-problems", Static).display
                    and app.screen.query_one("#proj-problems", Static)
                ),
                30,
                "the problems panel",
            )
            text = str(panel.content)
            assert "stages[0].timeout" in text and "stages[1].sources" in text
            table = app.screen.query_one("#proj-stages", DataTable)
            assert table.row_count == 2  # the stages as written, though invalid
            assert "1" in str(table.get_cell("a", "problems"))
            # running is refused with the problems, in a notification; no process is started
            await pilot.press("r")
            await until(pilot, lambda: not app.screen.launching and app.shown_errors, 30, "the refusal")
            assert "2 problems found" in app.shown_errors[-1] and "stages[0].timeout" in app.shown_errors[-1]
            assert not tui_project.runs.exists() or not list(tui_project.runs.iterdir())
            assert app.is_running and app.unexpected_errors == []

    asyncio.run(scenario())


def footer_keys(app) -> set[str]:
    from textual.widgets import Footer

    return {key.description for key in app.screen.query_one(Footer).children}


def test_area_keys_help_and_placeholders(tui_project, monkeypatch):
    tui_project.write(COUNTER.format(n=1))
    monkeypatch.setitem(SCREENS, "data", "llmforge.tui.screens.not_written_yet:Nothing")

    async def scenario():
        app = LlmforgeApp(state_of(tui_project))
        async with app.run_test(size=(80, 24)) as pilot:  # the smallest supported terminal
            await pilot.pause()
            assert app.area == "project"
            assert {"Validate", "Run", "Help", "Quit"} <= footer_keys(app)  # the first screen's footer too
            await pilot.press("2")
            assert app.area == "monitor" and type(app.screen).__name__ == "MonitorScreen"
            await pilot.pause()
            assert {"Stop run", "Checkpoint now", "Help"} <= footer_keys(app)
            assert app.screen.model is None  # no run yet: nothing to follow, nothing broken
            await pilot.press("s")  # stop with no run: a message, not a crash
            await pilot.pause()
            await pilot.press("4")
            assert isinstance(app.screen, PlaceholderScreen) and "not available yet" in app.screen.text
            await pilot.press("question_mark")
            help_text = str(app.screen.query_one("#help-text").content)
            assert "1 ... 7    switch area: Project," in help_text and "q          quit" in help_text
            await pilot.press("escape")
            await pilot.press("1")
            assert app.area == "project" and app.screen.query("AreaTabs")
            assert app.unexpected_errors == []
            await pilot.press("q")
        assert app.return_code in (0, None)

    asyncio.run(scenario())


# -- pieces ------------------------------------------------------------------------------------------------


def test_series_downsamples_long_histories_in_bounded_memory():
    s = Series(cap=500)
    for i in range(100_000):
        s.add(i, float(i % 10))
    xs, ys = s.points()
    assert len(s) == 100_000 and len(xs) <= 1002
    assert xs[-1] == 99_999  # the latest point is always drawn
    assert xs == sorted(xs) and abs(sum(ys[:-1]) / len(ys[:-1]) - 4.5) < 0.1  # averages, not samples


def test_event_tail_reads_incrementally_and_holds_back_a_partial_line(tmp_path):
    path = tmp_path / "events.jsonl"
    tail = EventTail(path)
    assert tail.read() == []  # no file yet
    with open(path, "w") as fh:
        fh.write('{"type": "log", "message": "a"}\n{"type": "log", "mess')
        fh.flush()
        assert [e.message for e in tail.read()] == ["a"]
        fh.write('age": "b"}\nnot json\n')
        fh.flush()
        assert [e.message for e in tail.read()] == ["b"]
    # decoded as read_events decodes (events.decode_event): a line that is not UTF-8 is named by file:line
    with open(path, "ab") as fh:
        fh.write(b'{"type": "log", "message": "\xff"}\n5\n{"type": "log", "message": "c"}\n')
    got = tail.read()
    assert [e.message for e in got][1:] == ["c"]
    assert f"{path}:4: skipped a line that is not UTF-8" in got[0].message
    model = RunModel("r", tmp_path)
    model.apply(
        [
            {"type": "metric", "stage": "s", "step": 1, "values": {"loss": 2.0, "lr": float("nan")}},
            {"type": "metric", "stage": "s", "step": 2, "values": {"loss": 1.5}},
        ]
    )
    assert model.chart("loss").points() == ([1.0, 2.0], [2.0, 1.5]) and model.chart("lr") is None


def test_tui_help_and_light_import():
    res = run_cli("tui", "--help")
    assert res.returncode == 0, res.stderr
    assert "--runs-dir" in res.stdout and "--config" in res.stdout
    code = (
        "import sys, json, llmforge.tui.app, llmforge.tui.screens.project, llmforge.tui.screens.monitor\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert "textual" in loaded
    assert not loaded & {"torch", "transformers", "llama_cpp", "peft", "trl"}, loaded
    # not an interactive terminal: `llmforge` alone still prints help, it does not open the TUI
    res = run_cli()
    assert "Usage" in res.stdout + res.stderr and "tui" in res.stdout + res.stderr
