"""What the TUI draws, measured on the rendered screen of the real app (under `run_test()`): charts that
can be read at 80x24, a chat panel whose border holds whatever the model answers, and the tokenizer picker
offering the models the runs made.

The project and runs are the snapshot tests' (tests/test_tui_snapshots.py), built once per module.
"""

from __future__ import annotations

import asyncio
import time

import pytest

import test_tui_snapshots as fx
from conftest import until


@pytest.fixture(scope="module")
def runs_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("tui-render") / "demo"
    fx.build(root)
    return root


@pytest.fixture
def in_project(runs_project, monkeypatch):
    monkeypatch.chdir(runs_project)
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    fx.pin_live_values(monkeypatch.setattr)
    yield runs_project
    monkeypatch.undo()
    time.tzset()


def _plot_rows(chart) -> int:
    """Rows of the chart's plot as drawn (inside the border), 0 when it is not shown."""
    plot = chart._plot
    return plot.region.height if chart.display and plot is not None and plot.display else 0


def test_monitor_charts_are_readable_at_80x24(in_project):
    from llmforge.tui.widgets.charts import MetricChart

    async def scenario():
        app = fx.make_app("monitor")
        async with app.run_test(size=(80, 24)) as pilot:
            await fx.ready_monitor(pilot)
            screen = app.screen
            charts = {c.metric: c for c in screen.query(MetricChart)}
            shown = [m for m, c in charts.items() if _plot_rows(c)]
            assert shown == ["loss", "learning_rate"], shown  # a page of two charts
            assert all(_plot_rows(charts[m]) >= 8 for m in shown), {m: _plot_rows(charts[m]) for m in shown}
            # the plot holds the curve: braille dots on several of its rows, not a one-row line
            plot = charts["loss"]._plot
            lines = [strip.text for strip in plot.render_lines(plot.region.reset_offset)]
            assert sum(any("\u2800" < ch <= "\u28ff" for ch in line) for line in lines) >= 4, "\n".join(lines)
            await pilot.press("m")
            await until(
                pilot,
                lambda: [m for m, c in charts.items() if _plot_rows(c)] == ["grad_norm", "tokens_per_s"],
                what="the next page",
            )
            await pilot.press("m", "m")
            await until(pilot, lambda: _plot_rows(charts["loss"]) >= 8, what="back to the first page")

        # a tall terminal shows all five at once, each still tall enough
        app = fx.make_app("monitor")
        async with app.run_test(size=(120, 50)) as pilot:
            await fx.ready_monitor(pilot)
            charts = list(app.screen.query(MetricChart))
            assert all(c.display for c in charts)
            assert all(_plot_rows(c) >= 8 for c in charts if c.plotted)

    asyncio.run(scenario())


def test_tokenizer_picker_offers_the_models_of_the_runs(in_project):
    from textual.widgets import Input, OptionList

    from llmforge.tui.screens.data import DataScreen, PathPicker

    async def scenario():
        app = fx.make_app("data")
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: isinstance(app.screen, DataScreen), what="the Data area")
            data = app.screen
            await pilot.press("ctrl+t")
            picker = await until(
                pilot, lambda: app.screen if isinstance(app.screen, PathPicker) else None, what="the picker"
            )
            await until(pilot, lambda: picker.models_loaded, what="the models of the runs")
            options = picker.query_one("#run-models", OptionList)
            labels = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
            # the model that carries a tokenizer (the pretrain stage saves one), one key away
            assert labels == [f"pretrain/model  (run {fx.DONE})"]
            assert options.has_focus
            await pilot.press("enter")
            await until(pilot, lambda: app.screen is data, what="the picker to close")
            assert data.query_one("#model-path", Input).value == f"runs/{fx.DONE}/stages/pretrain/artifacts/model"
            assert not app.unexpected_errors

    asyncio.run(scenario())


# A reply as a small model writes one: bytes that are not UTF-8 (U+FFFD once decoded), CJK and emoji
# (two cells), an emoji with a skin tone and one with a variation selector, a zero-width joiner, a stray
# combining accent, ESC colour codes, a carriage return, a tab and a bell.
ODD_REPLY = ("ok \xff\xfe done. 中文字符 wide 👍🏽 ❤️ a\u200db \u0301x e\u0301 \x1b[31mred\r\n\tnext\x07 end").encode(
    "utf-8", "surrogateescape"
)
ODD_REPLY = ODD_REPLY.replace(b"\xc3\xbf\xc3\xbe", b"\xff\xfe")  # the two raw bytes, not the characters


class ByteEngine:
    """A model whose tokens are bytes, answering ODD_REPLY whatever it is asked: the chat's real `reply()`
    decodes and streams it (partial characters held back, broken bytes as U+FFFD) as for any model."""

    kind, template, context, stop_strings = "gguf", None, 4096, ()

    def __init__(self, path):
        self.path = path

    def encode(self, text, *, chat):
        return list(text.encode("utf-8"))

    def generate(self, ids, *, temperature, seed):
        yield from ODD_REPLY

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")

    def render_variables(self):
        return {}

    def is_stop(self, token):
        return False

    def close(self):
        pass


def _width(ch: str) -> int:
    """A character's cells in a terminal, where terminals agree (wide: 2; the rest: 1)."""
    import unicodedata

    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def test_chat_panel_border_holds_with_broken_and_wide_characters(in_project, monkeypatch):
    import unicodedata

    from textual.widgets import Input

    from llmforge import chat_engine
    from llmforge.tui.widgets.chat import ChatPanel

    monkeypatch.setattr(chat_engine, "open_engine", lambda path, engines, **kw: ByteEngine(path))

    async def scenario():
        app = fx.make_app("models")
        async with app.run_test(size=(80, 24)) as pilot:
            screen = app.screen
            await until(pilot, lambda: len(getattr(screen, "entries", ())) == 8, what="the models")
            await pilot.press("c")
            panel = screen.query_one(ChatPanel)
            field = screen.query_one("#chat-input", Input)
            await until(pilot, lambda: field.has_focus, what="the chat")
            await pilot.press(*"hi", "enter")
            await until(pilot, lambda: panel.last_reply is not None, what="the reply")
            assert "\ufffd" in panel.last_reply.text and "中文" in panel.last_reply.text  # what the model said
            await pilot.pause(0.2)
            region = panel.region
            lines = [strip.text[region.x :] for strip in app.screen._compositor.render_strips()]
            return [line for line in lines[region.y : region.bottom]], region.width

    lines, width = asyncio.run(scenario())
    text = "\n".join(lines)
    assert "中文字符" in text and "red" in text and "next" in text  # the reply is on screen
    for line in lines:
        cells = 0
        for ch in line:
            cat = unicodedata.category(ch)
            # nothing a terminal draws differently from how it was measured
            assert (
                ch != "\ufffd"
                and not cat.startswith(("C", "M"))
                and not 0xFE00 <= ord(ch) <= 0xFE0F
                and not 0x1F3FB <= ord(ch) <= 0x1F3FF
            ), (repr(ch), line)
            cells += _width(ch)
            if cells >= width:
                break
        # the right border is in the panel's last cell, counted as a terminal counts
        assert cells == width and line.rstrip() and ch in "│╮╯", (cells, width, line)


def test_runs_are_listed_newest_first_as_the_cli_lists_them(in_project):
    import json

    from conftest import run_cli
    from llmforge.tui.screens.runs import RunsScreen

    async def scenario():
        app = fx.make_app("runs")
        async with app.run_test(size=(100, 30)) as pilot:
            screen = await until(
                pilot, lambda: app.screen if isinstance(app.screen, RunsScreen) else None, what="the Runs area"
            )
            await until(pilot, lambda: screen.loaded and len(screen.rows) == 3, what="the runs")
            return [r.id for r in screen.rows]

    shown = asyncio.run(scenario())
    assert shown == [fx.DONE, fx.STOPPED, fx.FAILED]  # the latest run first
    out = run_cli("runs", "list", "--json", "--runs-dir", "runs", cwd=in_project)
    assert out.returncode == 0, out.stderr
    assert [r["id"] for r in json.loads(out.stdout)] == shown
