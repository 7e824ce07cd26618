"""Keys and forms in the real app (under `run_test()`): what a new user pressing keys runs into.

Each test drives the app with Pilot the way a user types: quitting with unsaved edits asks first; escape
leaves a text field; digits typed into the form stay in the form; an unknown key of a stage can be
removed from the form and then the stage saves; a key opens the stage picker; the help is words, not code.
"""

from __future__ import annotations

import asyncio

from conftest import until

FORGE = """\
# keep this comment
[project]
name = "keys"  # the name

[[stages]]
name = "count"
uses = "shell"
command = "echo counted > $LLMFORGE_OUT/n.txt"
timeout = 60  # seconds
flaten = true   # a typo: the shell stage has no such option

[[stages]]
name = "bundle"
uses = "copy"
sources = ["@count"]  # the first stage's files
"""


MULTILINE = 'command = """\necho counted\necho > $LLMFORGE_OUT/n.txt\n"""'


def _app(project, area: str = "config"):
    from llmforge.tui.app import LlmforgeApp
    from llmforge.tui.state import AppState

    return LlmforgeApp(AppState(project.config, project.root / "runs"), area=area)


async def _config(pilot):
    from llmforge.tui.screens.config import ConfigScreen

    screen = await until(
        pilot,
        lambda: pilot.app.screen if isinstance(pilot.app.screen, ConfigScreen) else None,
        what="the Config screen",
    )
    await until(pilot, lambda: screen.form, what="the form")
    return screen


async def _type_into(pilot, widget, *keys: str) -> None:
    widget.focus()
    await pilot.pause()
    await pilot.press(*keys)
    await pilot.pause()


def test_quit_with_unsaved_edits_asks_and_cancel_keeps_them(project):
    from llmforge.tui.app import ConfirmQuit

    project.write(FORGE)

    async def scenario():
        app = _app(project)
        async with app.run_test(size=(100, 32)) as pilot:
            screen = await _config(pilot)
            field = screen.form.editor("timeout")
            await _type_into(pilot, field, "ctrl+a", "ctrl+k", "3", "0")
            await pilot.press("escape", "q")  # leave the field, then quit
            await until(pilot, lambda: isinstance(app.screen, ConfirmQuit), what="the question")
            assert "timeout" in str(app.screen.query_one("#confirm-text").content)
            await pilot.press("escape")  # cancel: still running, the edit still there
            await until(pilot, lambda: not isinstance(app.screen, ConfirmQuit), what="the question to close")
            assert app.is_running and screen.form.editor("timeout").value == "30"
            await pilot.press("ctrl+q")  # ctrl+q asks too
            await until(pilot, lambda: isinstance(app.screen, ConfirmQuit), what="the question again")
            await pilot.press("d")  # discard: quits
            await until(pilot, lambda: not app.is_running, what="the app to end")

    asyncio.run(scenario())
    assert project.config.read_text() == FORGE  # nothing written


def test_quit_and_save_writes_then_quits(project):
    project.write(FORGE.replace("flaten = true   # a typo: the shell stage has no such option\n", ""))

    async def scenario():
        app = _app(project)
        async with app.run_test(size=(100, 32)) as pilot:
            screen = await _config(pilot)
            await _type_into(pilot, screen.form.editor("timeout"), "ctrl+a", "ctrl+k", "4", "5", "escape", "q")
            await pilot.press("s")
            await until(pilot, lambda: not app.is_running, what="save, then quit")

    asyncio.run(scenario())
    assert "timeout = 45  # seconds\n" in project.config.read_text()


def test_quit_without_edits_quits_at_once(project):
    project.write(FORGE)

    async def scenario():
        app = _app(project)
        async with app.run_test(size=(100, 32)) as pilot:
            await _config(pilot)
            await pilot.press("q")
            await until(pilot, lambda: not app.is_running, what="the app to end")

    asyncio.run(scenario())


def test_escape_leaves_a_text_field_and_digits_stay_in_the_form(project):
    project.write(FORGE.replace('command = "echo counted > $LLMFORGE_OUT/n.txt"', MULTILINE))

    async def scenario():
        app = _app(project)
        async with app.run_test(size=(100, 32)) as pilot:
            screen = await _config(pilot)
            field = screen.form.editor("timeout")
            await _type_into(pilot, field, "ctrl+a", "ctrl+k", "1", "2")
            assert field.value == "12" and app.area == "config"

            # a multi-line field (a TextArea) likewise
            await _type_into(pilot, screen.form.editor("command"), "4", "q")
            assert screen.form.editor("command").text.startswith("4q") and app.area == "config" and app.is_running

            # escape leaves the field: now the digits are the app's again
            await _type_into(pilot, field, "escape")
            assert app.focused is None
            await pilot.press("3")
            await until(pilot, lambda: app.area == "runs", what="the Runs area")

    asyncio.run(scenario())


def test_after_a_save_typing_goes_on_in_the_same_field(project):
    project.write(FORGE.replace("flaten = true   # a typo: the shell stage has no such option\n", ""))
    before = project.config.read_bytes()

    async def scenario():
        app = _app(project)
        async with app.run_test(size=(100, 32)) as pilot:
            screen = await _config(pilot)
            form = screen.form
            await _type_into(pilot, form.editor("timeout"), "ctrl+a", "ctrl+k", "9", "ctrl+s")
            await until(pilot, lambda: project.config.read_bytes() != before, what="the save")
            await until(pilot, lambda: screen.form is not None and screen.form is not form, what="the new form")
            field = screen.form.editor("timeout")
            await until(pilot, lambda: field.has_focus, what="the focus back in the field")
            await pilot.press("end", "1")  # the user goes on typing: into the field, not into the app's keys
            assert field.value == "91" and app.area == "config"

    asyncio.run(scenario())


def test_an_unknown_key_can_be_removed_and_then_the_stage_saves(project):
    from textual.widgets import Button

    project.write(FORGE)

    async def scenario():
        app = _app(project)
        async with app.run_test(size=(100, 40)) as pilot:
            screen = await _config(pilot)
            problems = screen.query_one("#problems")
            await until(pilot, lambda: "flaten" in str(problems.content), what="the unknown key listed")
            assert screen.unknown == ["flaten"]
            await _type_into(pilot, screen.form.editor("timeout"), "ctrl+a", "ctrl+k", "3", "0", "ctrl+s")
            await until(
                pilot,
                lambda: any("not saved" in (n.title or "") for n in app._notifications),
                what="the refusal (the unknown key blocks the save)",
            )
            assert project.config.read_text() == FORGE

            remove = screen.query_one("#unknown-0 Button", Button)
            remove.focus()
            await pilot.pause()
            await pilot.press("enter")
            await until(pilot, lambda: "flaten" not in str(problems.content), what="the problem gone")
            await pilot.press("ctrl+s")
            await until(pilot, lambda: project.config.read_text() != FORGE, what="the save")
            assert not app.unexpected_errors

    asyncio.run(scenario())
    # the typo's line is gone, the edit made, every comment kept
    assert project.config.read_text() == FORGE.replace(
        "flaten = true   # a typo: the shell stage has no such option\n", ""
    ).replace("timeout = 60", "timeout = 30")


def test_a_key_opens_the_stage_picker(project):
    from textual.widgets import Select

    project.write(FORGE)

    async def scenario():
        app = _app(project)
        async with app.run_test(size=(100, 32)) as pilot:
            screen = await _config(pilot)
            await _type_into(pilot, screen.form.editor("timeout"), "escape")
            footer_keys = {b.binding.key for b in app.screen.active_bindings.values() if b.binding.show}
            assert "ctrl+g" in footer_keys
            await pilot.press("ctrl+g")
            select = screen.query_one("#stage-select", Select)
            await until(pilot, lambda: select.expanded, what="the picker open")
            await pilot.press("down", "enter")
            await until(
                pilot,
                lambda: screen.current == 1 and screen.form is not None and screen.form.fields[0].name == "sources",
                what="the second stage",
            )

    asyncio.run(scenario())


def test_help_is_words_per_area(project):
    from llmforge.tui.app import LABELS, HelpScreen

    project.write(FORGE)

    async def scenario():
        app = _app(project, "project")
        texts = {}
        async with app.run_test(size=(100, 40)) as pilot:
            for area in ("project", "monitor", "runs", "data", "models", "plugins", "config"):
                await app.action_show(area)
                app.screen.set_focus(None)
                await pilot.pause()
                await pilot.press("question_mark")
                await until(pilot, lambda: isinstance(app.screen, HelpScreen), what=f"the help of {area}")
                texts[area] = str(app.screen.query_one("#help-text").content)
                await pilot.press("escape")
                await until(pilot, lambda: not isinstance(app.screen, HelpScreen), what="the help to close")
        return texts

    texts = asyncio.run(scenario())
    for area, text in texts.items():
        assert "Screen" not in text and "`" not in text, (area, text)  # no class names, no docstring markup
        assert f"{LABELS[area]} area" in text, (area, text)
        assert "escape" in text and "switch area" in text
    assert "ctrl+s" in texts["config"] and "save the changes" in texts["config"]
    assert "ctrl+g" in texts["config"]
    assert "stop" in texts["monitor"].lower()
