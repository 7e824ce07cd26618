"""The TUI's Runs, Models and Plugins screens, driven with Pilot in the real app over real runs.

Runs come from real pipelines: a `curve` stage defined here (registered in-process, as tests/test_core.py
does) logs a loss curve through ctx.metric exactly as the training stages do, next to a shell stage; a
failing run goes through the real command line. The Models screen lists what a real merge + gguf pipeline
made from a tiny Llama (2 layers, hidden 64) and chats with it through transformers and llama.cpp. The
Plugins screen lists the broken fixture plugins, installed with pip as conftest's `plugin_site` does.

Each scenario runs the app under `App.run_test()` inside `asyncio.run`, so no async pytest plugin is needed.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import Field
from rich.console import Console

from conftest import _env, until
from llmforge import hookimpl
from llmforge.stage import Stage, StageOptions
from llmforge.tui.screens.runs import COLUMNS

# ------------------------------------------------------------------------------------------------
# helpers


def plain(renderable, width: int = 400) -> str:
    """What a widget's content reads as on a terminal (rich renderables, Text or str)."""
    console = Console(width=width, file=io.StringIO(), color_system=None, markup=False, highlight=False)
    console.print(renderable)
    return console.file.getvalue()


async def type_text(pilot, text: str) -> None:
    await pilot.press(*("space" if c == " " else c for c in text))


async def shown(pilot, app, cls):
    """Wait until the app shows a screen of class `cls`; return it."""
    await until(pilot, lambda: app.screen_stack and isinstance(app.screen_stack[-1], cls), what=cls.__name__)
    return app.screen


def make_app(runs_dir: Path, area: str):
    from llmforge.tui.app import LlmforgeApp
    from llmforge.tui.state import AppState

    return LlmforgeApp(AppState(config_path=None, runs_dir=runs_dir), area=area)


def test_the_screens_import_nothing_heavy():
    code = (
        "import sys, llmforge.tui.screens.runs, llmforge.tui.screens.models, llmforge.tui.screens.plugins, "
        "llmforge.tui.widgets.chat; print(sorted(m for m in ('torch', 'transformers', 'llama_cpp', 'pydantic') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------
# Runs


class CurveOptions(StageOptions):
    steps: int = Field(10, ge=1)
    start: float = Field(2.0)
    delay: float = Field(0.0, ge=0, description="Seconds per step: a run that is seen running.")
    chatter: str = Field(
        "",
        description="A line logged through transformers' logger first, as the library "
        "does while a training stage loads a model: the runner makes it a "
        "debug event (llmforge/chatter.py).",
    )


class CurveStage(Stage):
    """Logs loss = start / step (and eval_loss every 5 steps) as training stages do, and records the last."""

    kind = "curve"
    summary = "a loss curve, for the TUI tests"
    Options = CurveOptions
    produces = ("files",)

    def run(self, o: CurveOptions, ctx) -> None:
        if o.chatter:
            import logging

            # at WARNING whatever an earlier test in this process left (HFEngine sets transformers to ERROR)
            lib = logging.getLogger("transformers")
            old_level = lib.level
            lib.setLevel(logging.WARNING)
            try:
                lib.warning(o.chatter)
            finally:
                lib.setLevel(old_level)
        ctx.log("curve: starting")
        for step in range(1, o.steps + 1):
            ctx.metric(step, loss=o.start / step, learning_rate=1e-3)
            if step % 5 == 0:
                ctx.metric(step, eval_loss=o.start / step + 0.5)
            time.sleep(o.delay)
        ctx.info.update(final_loss=o.start / o.steps, eval_loss=o.start / (o.steps - o.steps % 5) + 0.5)
        with ctx.artifact("files") as out:
            (out / "done.txt").write_text("ok")


class CurvePlugin:
    @hookimpl
    def register_stages(self, register):
        register(CurveStage)


def curve_run(root: Path, steps: int, start: float, delay: float = 0.0, chatter: str = ""):
    from llmforge.pipeline import load_pipeline
    from llmforge.plugins import load_registry
    from llmforge.runner import RunRequest, run_pipeline

    (root / "forge.toml").write_text(f"""
[project]
name = "tui-runs"

[[stages]]
name = "prep"
uses = "shell"
command = "echo prepared"

[[stages]]
name = "train"
uses = "curve"
steps = {steps}
start = {start}
delay = {delay}
chatter = {chatter!r}
""")
    registry = load_registry(env="", extra=[("tui-test", CurvePlugin())])
    result = run_pipeline(load_pipeline(root / "forge.toml", registry=registry), RunRequest(), registry=registry)
    assert result.exit_code == 0, result.stages
    return result


def test_runs_screen_lists_runs_overlays_two_and_opens_one_in_the_monitor(project):
    long_run = curve_run(project.root, steps=1500, start=2.0)
    short_run = curve_run(project.root, steps=20, start=4.0)
    project.write(
        '[project]\nruns_dir = "../runs"\n\n[[stages]]\nname = "boom"\nuses = "shell"\ncommand = "exit 3"\n',
        name="fail/forge.toml",
    )
    failed = project.run("run", "-c", "fail/forge.toml")
    assert failed.returncode == 1, failed.stderr
    app = make_app(project.runs, "runs")

    async def scenario():
        from llmforge.tui.screens.runs import MAX_POINTS, LossChart, RunsScreen

        async with app.run_test(size=(120, 36)) as pilot:
            screen = await shown(pilot, app, RunsScreen)
            await until(pilot, lambda: len(screen.rows) == 3, what="three runs")
            newest, short, long = screen.rows
            assert (short.id, long.id) == (short_run.run_id, long_run.run_id)
            assert newest.status == "failed" and newest.stages == "1 failed" and newest.losses == "-"
            assert short.status == "done" and short.stages == "1 cached, 1 done"  # prep is reused from the first run
            assert short.losses == "train 0.2 (eval 0.7)"
            assert long.losses == f"train {2 / 1500:.4g} (eval {2 / 1500 + 0.5:.4g})"
            table = screen.query_one("#runs-table")
            # marked as the CLI marks it: a failure is ✗, a stop ■ (test_tui_app), a finished run ✓
            assert plain(table.get_row(newest.id)[3]).strip() == "✗ failed"
            assert plain(table.get_row(short.id)[3]).strip() == "✓ done"

            # The highlighted run is charted; a run without metrics says so.
            chart = screen.query_one(LossChart)
            await until(pilot, lambda: newest.id in chart.chart_title, what="the failed run's chart")
            assert chart.series == [] and "no loss metrics" in chart.chart_title
            await pilot.press("down")
            await until(pilot, lambda: chart.series and short.id in chart.chart_title, what="the short run's chart")
            curves = {s.label: s for s in chart.series}
            assert set(curves) == {"train loss", "train eval_loss"}
            assert curves["train loss"].x == list(range(1, 21))
            assert curves["train loss"].y == pytest.approx([4.0 / s for s in range(1, 21)])
            assert curves["train eval_loss"].x == [5, 10, 15, 20]

            # Mark two runs: both are overlaid, labelled by run; a long history is downsampled, ending on its last.
            await pilot.press("space", "down", "space")
            assert screen.marked == [short.id, long.id]
            await until(pilot, lambda: len(chart.series) == 4, what="two runs overlaid")
            curves = {s.label: s for s in chart.series}
            assert set(curves) == {f"{r} train {m}" for r in (short.id, long.id) for m in ("loss", "eval_loss")}
            long_loss = curves[f"{long.id} train loss"]
            assert len(long_loss.x) == MAX_POINTS and long_loss.x[0] == 1 and long_loss.x[-1] == 1500
            assert long_loss.y[-1] == pytest.approx(2.0 / 1500)
            assert plain(table.get_row(short.id)[0]).strip() == "●"

            # A third mark drops the oldest one.
            await pilot.press("up", "up", "space")
            assert screen.marked == [long.id, newest.id]
            assert plain(table.get_row(short.id)[0]).strip() == ""
            await until(pilot, lambda: {s.label.split()[0] for s in chart.series} == {long.id}, what="recharted")

            # Enter opens the highlighted run in the monitor.
            await pilot.press("down", "enter")
            await until(pilot, lambda: app.area == "monitor", what="the monitor")
            assert app.state.selected_run == short.id
            assert not app.unexpected_errors

    asyncio.run(scenario())


def test_runs_screen_follows_new_and_running_runs(project):
    app = make_app(project.runs, "runs")

    async def scenario():
        from llmforge.tui.screens.runs import RunsScreen

        async with app.run_test(size=(80, 24)) as pilot:
            screen = await shown(pilot, app, RunsScreen)
            hint = screen.query_one("#runs-hint")
            await until(pilot, lambda: "no runs" in plain(hint.content), what="the empty hint")
            # A run made while the screen is open shows up on the next refresh (every 2 s).
            await asyncio.to_thread(curve_run, project.root, 5, 1.0)
            await until(pilot, lambda: len(screen.rows) == 1, timeout=10, what="the new run")
            first = screen.rows[0]
            assert first.losses == "train 0.2 (eval 0.7)"

            # A run going on while you look: it shows as running, and its row updates in place when it ends,
            # leaving the cursor where it was (here on the older run).
            running = asyncio.create_task(asyncio.to_thread(curve_run, project.root, 20, 3.0, 0.15))
            await until(
                pilot,
                lambda: len(screen.rows) == 2 and screen.rows[0].status == "running",
                timeout=10,
                what="the running run",
            )
            table = screen.query_one("#runs-table")
            await pilot.press("down")
            assert screen.highlighted == first.id
            await running
            await until(pilot, lambda: screen.rows[0].status == "done", timeout=10, what="the run's end")
            assert screen.rows[0].losses == "train 0.15 (eval 0.65)"
            assert plain(table.get_row(screen.rows[0].id)[COLUMNS.index("losses")]).strip() == "train 0.15 (eval 0.65)"
            assert table.cursor_row == 1 and screen.highlighted == first.id
            assert not app.unexpected_errors

    asyncio.run(scenario())


def test_a_damaged_run_is_listed_named_and_cannot_be_opened_by_mistake(project):
    """A run folder whose manifest.json cannot be read is a row marked damaged, naming the file (as `llmforge
    runs list` does), not a run that silently vanished; enter on it says why it cannot be followed, and the
    app goes on."""
    import json

    whole = curve_run(project.root, steps=5, start=1.0)
    broken = curve_run(project.root, steps=5, start=2.0)
    manifest = project.runs / broken.run_id / "manifest.json"
    manifest.write_text(manifest.read_text()[:40], encoding="utf-8")  # torn: a disk that lost its end
    listed = project.run("runs", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    cli_rows = json.loads(listed.stdout)
    app = make_app(project.runs, "runs")

    async def scenario():
        from llmforge.tui.screens.runs import RunsScreen

        async with app.run_test(size=(120, 30)) as pilot:
            screen = await shown(pilot, app, RunsScreen)
            await until(pilot, lambda: len(screen.rows) == 2, what="both runs, the damaged one too")
            assert [r.id for r in screen.rows] == [r["id"] for r in cli_rows]  # the CLI's order
            row = next(r for r in screen.rows if r.id == broken.run_id)
            table = screen.query_one("#runs-table")
            cells = [plain(c).strip() for c in table.get_row(row.id)]
            assert cells[COLUMNS.index("status")] == "✗ damaged"
            assert row.damaged.startswith(f"{manifest}: cannot be read")
            assert cells[COLUMNS.index("losses")] == row.damaged  # the file named, as `llmforge runs list` names it
            assert [r.get("damaged") for r in cli_rows if r["id"] == row.id] == [row.damaged]
            # highlighted: the hint names the file; enter says why it is not opened, and stays here
            table.move_cursor(row=[r.id for r in screen.rows].index(row.id))
            hint = screen.query_one("#runs-hint")
            await until(pilot, lambda: "is damaged" in plain(hint.content), what="the damage in the hint")
            assert str(manifest) in plain(hint.content)
            chart = screen.query_one("#runs-chart")  # the curves come from events.jsonl, which is whole
            await until(pilot, lambda: chart.series and row.id in chart.chart_title, what="the damaged run's curves")
            await pilot.press("enter")
            await until(pilot, lambda: app.shown_errors, what="the refusal")
            assert f"run {row.id} is damaged: {manifest}: cannot be read" in app.shown_errors[-1]
            assert app.area == "runs" and app.state.selected_run is None
            # the whole run still opens
            table.move_cursor(row=[r.id for r in screen.rows].index(whole.run_id))
            await pilot.press("enter")
            await until(pilot, lambda: app.area == "monitor", what="the monitor")
            await until(pilot, lambda: app.screen.model and app.screen.model.ended, what="the whole run followed")
            assert app.screen.model.run_id == whole.run_id
            assert not app.unexpected_errors

    asyncio.run(scenario())


def test_monitor_hides_library_chatter_until_asked(project):
    """Library chatter (here transformers' logger, diverted by the runner into a `debug` log event) is in the
    run's events but not in the Monitor's log; `d` shows it and hides it again, and the log's title says
    how many lines are hidden."""
    import json

    from textual.widgets import Footer, Log

    chatter = "`torch_dtype` is deprecated! Use `dtype` instead!"
    run = curve_run(project.root, steps=5, start=1.0, chatter=chatter)
    events = [json.loads(x) for x in (project.runs / run.run_id / "events.jsonl").read_text().splitlines()]
    assert [e["level"] for e in events if e["type"] == "log" and chatter in e.get("message", "")] == ["debug"]
    app = make_app(project.runs, "monitor")

    async def scenario():
        async with app.run_test(size=(110, 34)) as pilot:
            mon = await until(
                pilot, lambda: app.area == "monitor" and app.screen.model and app.screen, what="the monitor"
            )
            log = mon.query_one("#mon-log", Log)
            await until(pilot, lambda: any("run done" in x for x in log.lines), what="the whole log")
            assert any("[train] curve: starting" in x for x in log.lines)  # info lines are shown
            assert not any(chatter in x for x in log.lines)
            assert log.border_title == "log (1 debug line hidden: d shows them)"
            assert "Debug" in {k.description for k in mon.query_one(Footer).children}

            await pilot.press("d")
            shown_lines = list(log.lines)
            assert [x.split(" ", 1)[1] for x in shown_lines if chatter in x] == [
                f"[train] debug: transformers: {chatter}"
            ]
            # in its place among the others, before the stage's own first line
            assert [i for i, x in enumerate(shown_lines) if chatter in x][0] < [
                i for i, x in enumerate(shown_lines) if "curve: starting" in x
            ][0]
            assert log.border_title == "log, with 1 debug line (d hides them)"

            await pilot.press("d")
            assert not any(chatter in x for x in log.lines) and any("run done" in x for x in log.lines)
            await pilot.press("question_mark")  # the help says it in words
            help_text = str(app.screen.query_one("#help-text").content)
            assert "hides debug lines (library chatter) until d shows them" in help_text
            assert "  d          show or hide the log's debug lines" in help_text
            await pilot.press("escape")
            assert not app.unexpected_errors

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------------------
# Models


@pytest.fixture(scope="module")
def model_runs(tmp_path_factory):
    """A run that merges a tiny Llama (passthrough of its two layers: the same weights) and exports the
    merge to an F32 GGUF with the parity check: one HF model and one GGUF with its scorecard."""
    import torch
    from transformers import LlamaForCausalLM

    from llmforge.pipeline import load_pipeline
    from llmforge.plugins import load_registry
    from llmforge.runner import RunRequest, run_pipeline
    from llmforge_plugins.chat_templates import BUILTIN_TEMPLATES
    from llmforge_plugins.training.models import model_config, train_tokenizer

    root = tmp_path_factory.mktemp("models")
    chatml = next(t for t in BUILTIN_TEMPLATES if t.name == "chatml")
    corpus = [f"the quick brown fox jumps over the lazy dog {i} times." for i in range(100)]
    corpus += ["hello world, how are you? I am fine, thank you."] * 20
    tok = train_tokenizer(corpus, 300, chatml)
    cfg = model_config("tiny", len(tok), 128, {}, tok)
    cfg.initializer_range = 0.2  # wide weights: greedy decoding says varied tokens
    torch.manual_seed(0)
    tiny = root / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(str(tiny))
    tok.save_pretrained(str(tiny))

    (root / "forge.toml").write_text(f"""
[project]
name = "tui-models"

[[stages]]
name = "merged"
uses = "merge"
method = "passthrough"
slices = [{{ sources = [{{ model = "{tiny}", layer_range = [0, 2] }}] }}]

[[stages]]
name = "export"
uses = "gguf"
model = "@merged"
outtype = "f32"
""")
    registry = load_registry(env="")
    result = run_pipeline(load_pipeline(root / "forge.toml", registry=registry), RunRequest(), registry=registry)
    assert result.exit_code == 0, result.stages
    return root, result, tiny


def test_models_screen_shows_lineage_the_scorecard_and_chats_with_hf_and_gguf(model_runs):
    from llmforge.tui.widgets.text import terminal_safe
    from llmforge_plugins.gguf.chat import open_engine, reply

    root, run, tiny = model_runs
    gguf_dir = Path(run.stages["export"]["artifacts"]["gguf"]["path"])
    model_dir = Path(run.stages["merged"]["artifacts"]["model"]["path"])
    gguf = gguf_dir / "model-f32.gguf"
    engine = open_engine(gguf)
    try:
        expected = reply(engine, [{"role": "user", "content": "hello world"}], max_new_tokens=16, temperature=0)
    finally:
        engine.close()
    assert expected.token_ids
    app = make_app(root / "runs", "models")

    async def scenario():
        from llmforge.tui.screens.models import ModelsScreen
        from llmforge.tui.widgets.chat import ChatPanel, Message

        async with app.run_test(size=(150, 45)) as pilot:
            screen = await shown(pilot, app, ModelsScreen)
            await until(pilot, lambda: len(screen.entries) == 2, what="the two models")
            hf, gg = screen.entries
            assert (hf.kind, hf.path, hf.run, hf.stage, hf.uses) == ("model", model_dir, run.run_id, "merged", "merge")
            assert hf.sources == (str(tiny),)
            assert (gg.kind, gg.path, gg.stage, gg.uses, gg.sources) == ("gguf", gguf, "export", "gguf", ("@merged",))
            assert gg.size == gguf.stat().st_size
            assert hf.size == sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
            table = screen.query_one("#models-table")
            assert [plain(c).strip() for c in table.get_row(str(gguf))][:2] == ["gguf", "model-f32.gguf"]

            # The details: the HF folder's config, then the GGUF's scorecard.
            detail = screen.query_one("#models-detail-text")
            text = plain(detail.content)
            assert (
                "LlamaForCausalLM: 2 layers, hidden 64" in text
                and f"made by stage merged (merge) of run {run.run_id}" in text
            )
            await pilot.press("down")
            await until(pilot, lambda: "parity against the HF model" in plain(detail.content), what="the scorecard")
            text = plain(detail.content)
            assert "from @merged" in text
            assert "model-f32.gguf" in text and "F32" in text and "top-1" in text

            # Chat with the GGUF: the streamed answer is llama.cpp's greedy answer.
            chat = screen.query_one(ChatPanel)
            chat.temperature, chat.max_new_tokens = 0.0, 16
            await pilot.press("enter")
            assert chat.model == gguf and app.focused.id == "chat-input"
            await type_text(pilot, "hello world")
            await pilot.press("enter")
            await until(
                pilot, lambda: chat.last_reply is not None and not chat.answering, timeout=60, what="the GGUF's answer"
            )
            assert chat.last_reply.token_ids == expected.token_ids
            messages = list(chat.query(Message))
            # shown as drawn safely: this tiny model writes broken UTF-8 and control characters (see terminal_safe)
            assert plain(messages[-1].content).strip() == terminal_safe(expected.text).plain.strip()
            assert chat.history == [
                {"role": "user", "content": "hello world"},
                {"role": "assistant", "content": expected.text},
            ]

            # The HF model it came from answers with the same tokens (F32 parity), through transformers.
            table.focus()
            await pilot.press("up", "c")
            assert chat.model == model_dir and chat.history == []
            chat.last_reply = None
            await type_text(pilot, "hello world")
            await pilot.press("enter")
            await until(
                pilot,
                lambda: chat.last_reply is not None and not chat.answering,
                timeout=90,
                what="the HF model's answer",
            )
            assert chat.last_reply.token_ids == expected.token_ids

            # A damaged GGUF dropped next to it: listed, and chatting says what is wrong, in place.
            data = gguf.read_bytes()
            broken = gguf_dir / "broken.gguf"
            broken.write_bytes(data[: len(data) // 2])
            try:
                table.focus()
                await pilot.press("r")
                await until(pilot, lambda: len(screen.entries) == 3, what="the damaged file listed")
                index = [e.path for e in screen.entries].index(broken)
                table.move_cursor(row=index)
                await pilot.press("enter")
                assert chat.model == broken
                await type_text(pilot, "hi")
                await pilot.press("enter")
                await until(
                    pilot, lambda: not chat.answering and chat.query(".error"), timeout=30, what="the error message"
                )
                error = plain(chat.query(".error").last().content)
                assert "broken.gguf" in error and "Traceback" not in error
                assert chat.history == []
                assert app.is_running and not app.unexpected_errors
            finally:
                broken.unlink()

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------------------
# Plugins


@pytest.fixture
def broken_plugins(plugin_site, monkeypatch):
    """The broken fixture plugins installed and visible to the registry an app loads (each app loads its own)."""
    for name in ("broken-plugin", "bad-register-plugin"):
        monkeypatch.syspath_prepend(str(plugin_site(name)))
    monkeypatch.delenv("LLMFORGE_LOAD_PLUGINS", raising=False)


def test_plugins_screen_lists_plugins_and_the_broken_ones_with_their_errors(broken_plugins, tmp_path):
    app = make_app(tmp_path / "runs", "plugins")

    async def scenario():
        from llmforge.tui.screens.plugins import PluginsScreen

        async with app.run_test(size=(140, 40)) as pilot:
            screen = await shown(pilot, app, PluginsScreen)
            await until(pilot, lambda: screen.loaded, timeout=60, what="the registry")
            plugins = screen.query_one("#plugins-table")
            shell = [plain(c).strip() for c in plugins.get_row("shell")]
            assert shell[0] == "shell" and shell[1] == "llmforge (built-in)" and shell[3] == "shell"
            assert "register_stages" in shell[4]

            errors = screen.query_one("#plugins-errors")
            rows = {
                plain(errors.get_row(str(i))[0]).strip(): [plain(c).strip() for c in errors.get_row(str(i))]
                for i in range(errors.row_count)
            }
            assert rows["broken"][1] == "broken-plugin"
            assert rows["broken"][2] == (
                "failed to load: ModuleNotFoundError: No module named 'lf_dependency_that_is_not_installed'"
            )
            assert "register_stages failed" in rows["bad_register"][2]
            assert rows["bad_register"][2].endswith("what that hook adds is unavailable")
            title = plain(screen.query_one("#plugins-errors-title").content)
            assert f"load errors ({errors.row_count})" in title

            # The error's traceback shows when its row is highlighted.
            await pilot.press("e")
            index = list(rows).index("broken")
            for _ in range(index):
                await pilot.press("down")
            details = screen.query_one("#plugins-detail-text")
            await until(pilot, lambda: "Traceback" in plain(details.content), what="the traceback")
            assert "lf_broken_plugin" in plain(details.content)

            # Back on the plugins: a plugin's details list what it provides.
            await pilot.press("p")
            plugins.move_cursor(row=plugins.get_row_index("shell"))
            await until(
                pilot,
                lambda: "module llmforge_plugins.hooks.shell" in plain(details.content),
                what="the shell plugin's details",
            )
            assert app.is_running and not app.unexpected_errors

    asyncio.run(scenario())
