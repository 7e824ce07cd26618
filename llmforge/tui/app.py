"""The TUI application: one screen per area, switched with keys 1..7, `?` for help, `q` to quit.

Keys and text fields: while a text field (an Input or a TextArea) has the focus, the
app's single-key bindings (1..7, `q`) do nothing, so typing `12` into a field never switches areas;
`escape` leaves the field, and the keys work again. `q` (and `ctrl+q`) with unsaved edits in the Config
area asks first: save, discard or cancel.

Each area's screen lives in its own module, found through `SCREENS` and imported the first time the
area is shown, so start-up imports only textual and this package (no torch, no pydantic: the
Project screen loads the pipeline later, in a worker). A module that does not exist yet, or fails to
import, shows a placeholder instead of breaking the app.

The contract for a screen module (see screens/__init__.py): a `textual.screen.Screen` subclass
constructed as `Screen(app_state)`, with `BINDINGS` for its own keys. The app adds the area tabs at
the top and a Footer (unless the screen composed one). Screens are created once and kept installed,
so a screen keeps its state (a followed run, a selection) while another area is shown.

Errors: an exception raised by an action (a key binding) or a worker becomes an error notification
(a `ForgeError` with its message and hint) and the app keeps running. Event handlers (`on_*`) should
catch their own errors and call `app.show_error(exc)`: textual ends the message loop of a widget whose
handler raised.
"""

from __future__ import annotations

import importlib
import traceback
from typing import TYPE_CHECKING, cast

from textual.actions import SkipAction
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Footer, Static

from llmforge.tui.state import AppState
from llmforge.tui.widgets.tabs import AreaTabs

if TYPE_CHECKING:  # the screens load on first visit (a broken one shows a placeholder)
    from llmforge.tui.screens.config import ConfigScreen

# Area -> "module:Class" of its screen. The order is the order of the keys 1..7.
SCREENS = {
    "project": "llmforge.tui.screens.project:ProjectScreen",
    "monitor": "llmforge.tui.screens.monitor:MonitorScreen",
    "runs": "llmforge.tui.screens.runs:RunsScreen",
    "data": "llmforge.tui.screens.data:DataScreen",
    "models": "llmforge.tui.screens.models:ModelsScreen",
    "plugins": "llmforge.tui.screens.plugins:PluginsScreen",
    "config": "llmforge.tui.screens.config:ConfigScreen",
}
AREAS = list(SCREENS)
LABELS = {
    "project": "Project",
    "monitor": "Monitor",
    "runs": "Runs",
    "data": "Data",
    "models": "Models",
    "plugins": "Plugins",
    "config": "Config",
}


class PlaceholderScreen(Screen):
    """Stands in for an area whose screen module is missing or broken."""

    def __init__(self, area: str, text: str) -> None:
        super().__init__()
        self.area = area
        self.text = text

    def compose(self) -> ComposeResult:
        yield Static(self.text, id="placeholder", markup=False)


class HelpScreen(ModalScreen):
    """`?`: the app's keys, then the keys of the screen it was opened from."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: 76; max-width: 100%; height: auto; max-height: 90%;
        border: round $accent; background: $surface; padding: 0 1;
    }
    """
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "Close")]

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(self.text, id="help-text", markup=False)


# What the app's own keys do, as the help lists them.
APP_KEYS = [
    ("1 ... 7", "switch area: " + ", ".join(LABELS[a] for a in AREAS)),
    ("?", "this help (escape closes it)"),
    ("escape", "leave a text field, so that these keys work again"),
    ("tab", "next part of the area (table, field, button); shift+tab goes back"),
    ("q", "quit (runs started here keep going); asks first if the Config form has unsaved edits"),
    ("ctrl+q", "quit from anywhere, even from a text field"),
    ("ctrl+p", "command palette: theme, keys, quit"),
]


def _key_name(key: str) -> str:
    names = {"question_mark": "?", "space": "space", "enter": "enter", "escape": "escape"}
    return ", ".join(names.get(k.strip(), k.strip()) for k in key.split(","))


def _help_text(screen: Screen, area: str | None = None) -> str:
    """Plain words: each key and what it does, the app's first, then the area's (its `HELP` text and the
    descriptions of its bindings). No class names, no docstrings: those are written for programmers."""
    lines: list[str] = []
    title = LABELS.get(str(area or getattr(screen, "area", "")), "")
    own = [b for b in getattr(screen, "BINDINGS", []) if isinstance(b, Binding)]
    own += [Binding(*b) for b in getattr(screen, "BINDINGS", []) if isinstance(b, tuple)]
    about = getattr(screen, "HELP", "")
    if title and (own or about) and not isinstance(screen, PlaceholderScreen):
        lines += [f"{title} area", ""]
        if about:
            lines += [" ".join(about.split()), ""]
        for b in own:
            what = getattr(b, "tooltip", "") or b.description or b.action
            lines.append(f"  {b.key_display or _key_name(b.key):<10} {what}")
        lines.append("")
    lines += ["Keys everywhere", ""]
    lines += [f"  {key:<10} {what}" for key, what in APP_KEYS]
    return "\n".join(lines)


class ConfirmQuit(ModalScreen[str]):
    """Asked by `q` while the Config form holds edits not saved: save, discard (quit anyway) or cancel."""

    DEFAULT_CSS = """
    ConfirmQuit { align: center middle; }
    ConfirmQuit > Vertical {
        width: 64; max-width: 100%; height: auto; border: round $warning; background: $surface; padding: 0 1;
    }
    ConfirmQuit #confirm-buttons { height: auto; align-horizontal: center; margin-top: 1; }
    ConfirmQuit Button { margin: 0 1; min-width: 10; }
    """
    BINDINGS = [
        Binding("s", "choose('save')", "Save and quit"),
        Binding("d", "choose('discard')", "Quit without saving"),
        Binding("escape,c", "choose('cancel')", "Cancel"),
    ]

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(f"{self.what}\n\nSave them before quitting?", id="confirm-text", markup=False)
            with Horizontal(id="confirm-buttons"):
                yield Button("Save (s)", id="save", variant="primary", compact=True)
                yield Button("Discard (d)", id="discard", variant="error", compact=True)
                yield Button("Cancel (esc)", id="cancel", compact=True)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id)

    def action_choose(self, choice: str) -> None:
        self.dismiss(choice)


def error_text(exc: BaseException) -> str:
    """A ForgeError's message and hint (`hint: ...`), as the CLI prints it; anything else as `Type: msg`."""
    from llmforge.errors import ForgeError

    if isinstance(exc, ForgeError):
        return exc.render()
    return f"{type(exc).__name__}: {exc}"


class LlmforgeApp(App):
    TITLE = "llmforge"
    BINDINGS = [
        # `area`, not `show`: refused while a form control has the focus (check_action); a click on the
        # area tabs runs `show` and always works.
        *(Binding(str(i), f"area('{a}')", LABELS[a], show=False) for i, a in enumerate(AREAS, start=1)),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("escape", "leave_field", "Leave field", show=False),
        Binding("q", "leave", "Quit"),
    ]

    def __init__(self, state: AppState | None = None, area: str = "project") -> None:
        super().__init__()
        self.state = state or AppState.discover()
        self.first_area = area if area in SCREENS else "project"
        self.area: str | None = None  # the area shown now
        self.unexpected_errors: list[BaseException] = []  # non-ForgeError exceptions kept for tests/debugging
        self.shown_errors: list[str] = []  # every error shown to the user, newest last

    async def on_mount(self) -> None:
        await self.action_show(self.first_area)

    # -- keys and text fields ----------------------------------------------------------------------

    def editing(self) -> bool:
        """Whether a text field has the focus: a key typed now is meant for it, not for the app. (A drop-down
        takes no text: with one focused, the digits and `q` keep working.)"""
        widget = self.focused
        if widget is None:
            return False
        from textual.widgets import Input, TextArea

        return isinstance(widget, (Input, TextArea))

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        # area and leave keys go nowhere while a field is edited (an Input has already taken printable keys)
        return not (action in ("area", "leave") and self.editing())

    async def action_area(self, area: str) -> None:
        await self.action_show(area)

    def action_leave_field(self) -> None:
        """escape: the focus leaves the text field, so the area's keys work again."""
        if not self.editing():
            raise SkipAction()
        self.screen.set_focus(None)

    async def action_leave(self) -> None:
        await self.action_quit()

    def unsaved(self) -> str | None:
        """What would be lost by quitting now (the Config form's edits), or None."""
        name = "area-config"
        if not self.is_screen_installed(name):
            return None
        screen = self.get_screen(name)
        describe = getattr(screen, "unsaved_text", None)
        return describe() if callable(describe) else None

    async def action_quit(self) -> None:
        if isinstance(self.screen, ConfirmQuit):
            return
        what = self.unsaved()
        if what is None:
            self.exit()
            return

        async def answered(choice: str | None) -> None:
            if choice == "discard":
                self.exit()
            elif choice == "save":
                # Saved: the Config screen quits (its `quit_after_save`); refused: it stays, and says why.
                config = cast("ConfigScreen", self.get_screen("area-config"))
                await self.action_show("config")
                config.action_save(quit_after=True)

        self.push_screen(ConfirmQuit(what), answered)

    # -- areas -------------------------------------------------------------------------------------

    def area_screen(self, area: str) -> Screen:
        """The screen of an area, created (and its module imported) on first use."""
        name = f"area-{area}"
        if self.is_screen_installed(name):
            return self.get_screen(name)
        screen = self._build_screen(area)
        self.install_screen(screen, name)
        return screen

    def _build_screen(self, area: str) -> Screen:
        module_name, _, class_name = SCREENS[area].partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
            return cls(self.state)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # not written yet: expected while the TUI grows
                return PlaceholderScreen(area, f"{LABELS[area]}: not available yet ({module_name}).")
            return self._broken(area, exc)
        except Exception as exc:  # noqa: BLE001 - one broken area must not take the others down
            return self._broken(area, exc)

    def _broken(self, area: str, exc: Exception) -> Screen:
        self.unexpected_errors.append(exc)
        self.log.error("".join(traceback.format_exception(exc)))
        return PlaceholderScreen(area, f"{LABELS[area]} could not be opened:\n{error_text(exc)}")

    async def action_show(self, area: str) -> None:
        if area not in SCREENS:
            return
        # A modal (help, a dialog) on top: close it first, so switching replaces an area screen.
        while len(self.screen_stack) > 1 and isinstance(self.screen, ModalScreen):
            await self.pop_screen()
        screen = self.area_screen(area)
        if self.area is None:  # the first area goes above textual's default screen, which cannot be switched
            await self.push_screen(screen)
        elif screen is not self.screen:
            await self.switch_screen(screen)
        self.area = area
        await self._decorate(area, screen)

    async def _decorate(self, area: str, screen: Screen) -> None:
        """Add the area tabs (and a Footer, if the screen has none) once, after the screen composed."""
        if screen.query(AreaTabs):
            return
        await screen.mount(AreaTabs([(a, LABELS[a]) for a in AREAS], area))
        if not screen.query(Footer):
            await screen.mount(Footer())
        # A Footer fills itself when the screen announces its bindings; a screen that took focus while
        # composing announced them before this Footer existed, so announce them again.
        screen.refresh_bindings()

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            self.pop_screen()
            return
        self.push_screen(HelpScreen(_help_text(self.screen, self.area)))

    # -- errors ------------------------------------------------------------------------------------

    def show_error(self, exc: BaseException, title: str = "error") -> None:
        """Show an exception as an error notification (message and hint); the app carries on."""
        text = error_text(exc)
        self.shown_errors.append(text)
        self.notify(text, title=title, severity="error", timeout=10, markup=False)

    def _report(self, exc: BaseException) -> None:
        """A ForgeError is a user-facing failure (bad config, a run that is not running): show it. Anything
        else is a bug, but losing the cockpit over it would be worse: show it, log it, keep it for tests."""
        from llmforge.errors import ForgeError

        if isinstance(exc, ForgeError):
            self.show_error(exc)
            return
        self.unexpected_errors.append(exc)
        self.log.error("".join(traceback.format_exception(exc)))
        self.show_error(exc, title="unexpected error")

    async def _dispatch_action(self, namespace, action_name: str, params) -> bool:
        # Every key binding and clickable link runs through here. Textual ends the message loop of
        # whatever dispatched an action that raised (and then the app): catch it here instead.
        try:
            return await super()._dispatch_action(namespace, action_name, params)
        except Exception as exc:  # noqa: BLE001 - see _report
            self._report(exc)
            return True

    def _handle_exception(self, error: Exception) -> None:
        # Reached by workers that raised (`exit_on_error`, the default) and by event handlers that
        # raised. A failed worker harms nothing else: report it and go on. A handler that raised has
        # had its widget's message loop ended by textual, so only a ForgeError is shown and survived
        # (the widget may be unresponsive); anything else exits as textual does, with the traceback.
        from textual.worker import WorkerFailed

        from llmforge.errors import ForgeError

        if isinstance(error, WorkerFailed) and isinstance(error.error, Exception):
            self._report(error.error)
            return
        if isinstance(error, ForgeError):
            self.show_error(error)
            return
        super()._handle_exception(error)


def run_app(state: AppState, area: str = "project") -> None:
    LlmforgeApp(state, area).run()
