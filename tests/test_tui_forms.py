"""The TUI's Config and Data screens, and the style-preserving TOML writer behind the Config form.

The screens run inside the real app under `App.run_test()` (in `asyncio.run`, no async plugin);
the Data screen tokenizes with a small tokenizer trained here, as tests/test_data_inspect.py does.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from conftest import until
from llmforge.tui import tomledit
from llmforge.tui.tomledit import UNSET, Edit

FORGE = """\
# A project file with comments everywhere: the Config screen must keep every one of them.
[project]
name = "forms"  # the name

# ---- first stage ----
[[stages]]
name = "count"
uses = "shell"
# the command runs in the work folder
command = "echo counted > $LLMFORGE_OUT/n.txt"
timeout = 60  # seconds before the command is killed
env = { A = "1" }   # extra variables

[[stages]]
name = "bundle"
uses = "copy"
sources = ["@count"]  # the first stage's files
"""


def _lines_except(text: str, changed: str) -> list[str]:
    return [line for line in text.splitlines(keepends=True) if not line.startswith(changed)]


# ------------------------------------------------------------------------------------------------
# tomledit, alone
# ------------------------------------------------------------------------------------------------


def test_edits_keep_every_other_byte():
    out = tomledit.apply_edits(FORGE, [Edit(0, "timeout", 2.5e-5, "2.5e-5")])
    assert "timeout = 2.5e-5  # seconds before the command is killed\n" in out  # typed spelling, comment kept
    assert _lines_except(out, "timeout") == _lines_except(FORGE, "timeout")

    # a value equal to the file's (spelt differently) changes nothing at all
    assert tomledit.apply_edits(FORGE, [Edit(0, "timeout", 60, "6e1")]) == FORGE

    # inside an inline table, and a new key: added after the stage's last key, before the blank line
    out = tomledit.apply_edits(FORGE, [Edit(0, "env", {"A": "2"}, '{ A = "2" }'), Edit(1, "flatten", True)])
    assert 'env = { A = "2" }   # extra variables\n' in out
    assert 'sources = ["@count"]  # the first stage\'s files\nflatten = true\n' in out
    assert _lines_except(out, ("env", "flatten")) == _lines_except(FORGE, "env")

    # back to the default: the key goes, nothing else does
    out = tomledit.apply_edits(FORGE, [Edit(0, "timeout", UNSET)])
    assert out == FORGE.replace("timeout = 60  # seconds before the command is killed\n", "")

    # a multi-line string becomes a ''' block; a nested key under a missing table, an inline table
    out = tomledit.apply_edits(FORGE, [Edit(0, "command", "a\nb\n"), Edit(1, "extra.deep", 1)])
    assert "command = '''\na\nb\n'''\n" in out and "extra = {deep = 1}" in out
    tricky = "it's '''quoted'''\n"
    assert (
        tomledit.tomllib.loads(tomledit.apply_edits(FORGE, [Edit(0, "command", tricky)]))["stages"][0]["command"]
        == tricky
    )
    assert tomledit.tomllib.loads(out)["stages"][1]["extra"] == {"deep": 1}


def test_save_is_atomic_and_refuses_a_file_changed_on_disk(tmp_path):
    path = tmp_path / "forge.toml"
    path.write_bytes(FORGE.replace("\n", "\r\n").encode())  # CRLF survives: bytes in, bytes out
    text = tomledit.read_text(path)
    new = tomledit.apply_edits(text, [Edit(0, "timeout", 30, "30")])
    tomledit.save(path, new, expected=text)
    assert path.read_bytes() == FORGE.replace("timeout = 60", "timeout = 30").replace("\n", "\r\n").encode()
    with pytest.raises(tomledit.UsageError, match="changed on disk"):
        tomledit.save(path, text, expected=text)
    assert [p.name for p in tmp_path.iterdir()] == ["forge.toml"]  # no temporary file left behind


# ------------------------------------------------------------------------------------------------
# the screens, in the real app
# ------------------------------------------------------------------------------------------------


def _app(project, area: str):
    from llmforge.tui.app import LlmforgeApp
    from llmforge.tui.state import AppState

    return LlmforgeApp(AppState(project.config, project.root / "runs"), area=area)


async def _screen(pilot, cls):
    """The area screen once the app shows it (the app switches to it after start-up)."""

    def shown():
        stack = pilot.app.screen_stack
        return stack[-1] if stack and isinstance(stack[-1], cls) else None

    return await until(pilot, shown, what=cls.__name__)


def _text(static) -> str:
    content = static.content
    return content.plain if hasattr(content, "plain") else str(content)


def test_config_form_rejects_a_bad_value_and_saves_a_good_one(project):
    from textual.widgets import Select

    from llmforge.tui.screens.config import ConfigScreen

    project.write(FORGE)
    before = project.config.read_bytes()

    async def scenario():
        app = _app(project, "config")
        async with app.run_test(size=(110, 40)) as pilot:
            screen = await _screen(pilot, ConfigScreen)
            form = await until(pilot, lambda: screen.form, what="the form")
            problems = screen.query_one("#problems")
            await until(pilot, lambda: _text(problems).startswith("valid"), what="the initial check")
            assert [f.name for f in form.fields] == ["command", "inputs", "env", "timeout"]

            timeout = form.editor("timeout")
            assert timeout.value == "60"
            timeout.focus()
            await pilot.pause()
            await pilot.press("ctrl+a", "ctrl+k", "0")  # clear the field, type 0
            bad = "stages[0].timeout: must be > 0 (got 0)"
            await until(pilot, lambda: bad in _text(problems), what="the problem listed")
            error = form.error("timeout")
            assert bad in _text(error)  # and under its field

            await pilot.press("ctrl+s")
            await until(
                pilot, lambda: any("not saved" in (n.title or "") for n in app._notifications), what="the refusal"
            )
            assert project.config.read_bytes() == before

            stages = screen.query_one("#stage-select", Select)
            stages.value = 1  # another stage while edits are pending: refused, the edits stay
            await until(
                pilot, lambda: any("unsaved changes" in n.message for n in app._notifications), what="the warning"
            )
            assert screen.current == 0 and stages.value == 0 and timeout.value == "0"

            await pilot.press("backspace", "3", "0")
            await until(pilot, lambda: _text(problems).startswith("valid"), what="the problem gone")
            await pilot.press("ctrl+s")
            await until(pilot, lambda: project.config.read_bytes() != before, what="the save")
            await until(pilot, lambda: screen.form is not None and screen.form is not form, what="the reload")
            assert screen.form.editor("timeout").value == "30"

            # a choice (a bool) on the second stage: a key the file did not have is added to that stage
            stages.value = 1
            form = await until(
                pilot,
                lambda: screen.form if screen.form and screen.form.fields[0].name == "sources" else None,
                what="the second stage",
            )
            flatten = form.editor("flatten")
            assert flatten.value is Select.NULL  # not set: the default applies
            flatten.value = 0  # true
            saved = project.config.read_bytes()
            await pilot.press("ctrl+s")
            await until(pilot, lambda: project.config.read_bytes() != saved, what="the second save")
            await app.workers.wait_for_complete()
            assert not app.unexpected_errors

    asyncio.run(scenario())
    # every byte as it was but the two edits (the comment on the edited line included)
    assert project.config.read_text() == FORGE.replace("timeout = 60  #", "timeout = 30  #").replace(
        "first stage's files\n", "first stage's files\nflatten = true\n"
    )
    # the checks and the save wrote their temporary files beside forge.toml, and removed them
    assert sorted(p.name for p in project.root.iterdir()) == ["forge.toml"]


def test_config_screen_without_a_forge_toml(tmp_path):
    from llmforge.tui.app import LlmforgeApp
    from llmforge.tui.screens.config import ConfigScreen
    from llmforge.tui.state import AppState

    async def scenario():
        app = LlmforgeApp(AppState(None, tmp_path / "runs"), area="config")
        async with app.run_test(size=(80, 24)) as pilot:
            screen = await _screen(pilot, ConfigScreen)
            await until(pilot, lambda: "no forge.toml" in _text(screen.query_one("#message")), what="message")
            await pilot.press("ctrl+s")  # nothing to save, nothing breaks
            assert not app.unexpected_errors

    asyncio.run(scenario())


def test_data_screen_shows_masks_lengths_and_bad_rows(project, tokenizer_dir):
    from textual.widgets import DataTable, Input

    from llmforge.tui.screens.data import MASKED_STYLE, TRAINED_STYLE, DataScreen

    project.write(FORGE)
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"What is the capital of Land{i}?"},
                {"role": "assistant", "content": f"The capital of Land{i} is Town{i}."},
            ]
        }
        for i in range(4)
    ]
    rows.append({"messages": [{"role": "usr", "content": "bad role"}, {"role": "assistant", "content": "x"}]})
    project.write("\n".join(json.dumps(r) for r in rows) + "\n", name="data/chat.jsonl")

    async def scenario():
        app = _app(project, "data")
        async with app.run_test(size=(100, 36)) as pilot:
            screen = await _screen(pilot, DataScreen)
            screen.query_one("#data-path", Input).value = "data/chat.jsonl"
            screen.query_one("#model-path", Input).value = str(tokenizer_dir)
            screen.query_one("#template", Input).focus()
            await pilot.press(*"chatml", "enter")
            await until(pilot, lambda: screen.result is not None, timeout=90, what="the data to load")
            summary = _text(screen.query_one("#summary"))
            assert "data/chat.jsonl: 4 rows, format messages (chat), 1 bad rows skipped" in summary
            assert "truncated at 2048: 0 rows (0.0%)" in summary and "template chatml" in summary

            # the first row, trained tokens apart from masked ones: exactly the answer and its end marker
            view = screen.query_one("#row-text").content
            trained = "".join(view.plain[s.start : s.end] for s in view.spans if s.style == TRAINED_STYLE)
            masked = "".join(view.plain[s.start : s.end] for s in view.spans if s.style == MASKED_STYLE)
            assert trained.startswith("The capital of Land0 is Town0.<|im_end|>")
            assert "What is the capital of Land0?" in masked and "Land0 is" not in masked

            table = screen.query_one("#rows", DataTable)
            assert table.row_count == 4
            table.focus()
            await pilot.press("down")
            await until(
                pilot, lambda: "chat.jsonl:2" in screen.query_one("#row-text").content.plain, what="the second row"
            )

            hist = _text(screen.query_one("#histogram"))
            assert "tokens per row (4 rows)" in hist and "longer than 2048: 0 rows (0.0%)" in hist
            bad = screen.query_one("#bad", DataTable)
            assert bad.row_count == 1
            assert "messages[0].role" in str(bad.get_row_at(0)[1])

            # a folder that holds no tokenizer: an error notification, the app goes on
            screen.query_one("#model-path", Input).value = str(project.root / "data")
            await pilot.press("ctrl+l")
            await until(
                pilot, lambda: any(n.severity == "error" for n in app._notifications), timeout=60, what="the error"
            )
            assert not app.unexpected_errors

    asyncio.run(scenario())


def test_histogram_marks_rows_longer_than_max_length():
    from llmforge.tui.screens.data import histogram

    text = histogram([1, 5, 9, 30, 31], limit=10, bins=4, width=8)
    lines = text.splitlines()
    assert lines[0] == "tokens per row (5 rows): mean 15.2, median 9, min 1, max 31"
    assert lines[1:5] == [
        " 1-8  │████████ 2",
        " 9-16 │████ 1",
        "17-24 │ 0  > max_length",
        "25-32 │████████ 2  > max_length",
    ]
    assert lines[-1] == "longer than 10: 2 rows (40.0%)"
    assert histogram([7, 7], bins=10).splitlines()[1:] == ["7-7 │████████████████████████████████████████ 2"]
