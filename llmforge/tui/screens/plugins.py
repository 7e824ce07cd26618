"""The Plugins screen: what is installed, what each plugin adds, and what failed to load.

The same registry `llmforge plugins list` shows (the app's, `AppState.registry()`): plugins with their
distribution, version, stage kinds and hooks; load errors (a plugin that failed to import, or whose
registration hook raised) with the one-line error and, on the highlighted row, the traceback; and name
conflicts. Building the registry runs every plugin's registration hooks (pydantic, the plugins' modules), so
it happens in a worker, once per process, as for the CLI.
"""

from __future__ import annotations

import asyncio

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

# The order of the tables a plugin provides entries to, besides stage kinds; any other table (an extension
# point a plugin declared) follows, by name. A table is shown by its name in words ("row formats").
PROVIDES = ("readers", "row_formats", "chat_templates", "trackers", "merge_methods", "backends", "curation_steps")


def provided(p) -> list[tuple[str, list[str]]]:
    """(table in words, names) for every table but the stages a plugin registered entries in."""
    tables = [t for t in PROVIDES if t in p.provides]
    tables += sorted(t for t in p.provides if t not in PROVIDES and t != "stages")
    return [(t.replace("_", " "), p.provides[t]) for t in tables if p.provides[t]]


def load_registry_view(state):
    """The app's registry with every table filled (the registration hooks run here)."""
    reg = state.registry().collect()
    return reg.plugins, reg.errors, reg.conflicts


class PluginsScreen(Screen):
    """Installed plugins (built-in and third-party) with their stages, hooks and versions, and load errors.
    Tab moves between the plugins and the errors; the highlighted row's details show below."""

    DEFAULT_CSS = """
    PluginsScreen #plugins-table { height: 2fr; min-height: 4; }
    PluginsScreen #plugins-errors-title { height: 1; padding: 0 1; text-style: bold; }
    PluginsScreen #plugins-errors { height: auto; max-height: 35%; }
    PluginsScreen #plugins-details { height: 1fr; min-height: 3; border: round $panel; padding: 0 1; }
    """

    HELP = """\
The plugins llmforge loaded (built-in and installed), what each provides, and the ones that failed to
load with their error. Highlight a row to see its details."""

    BINDINGS = [
        Binding("e", "focus_errors", "Load errors", tooltip="go to the plugins that failed to load"),
        Binding("p", "focus_plugins", "Plugins", tooltip="go back to the plugins"),
    ]

    def __init__(self, app_state, **kw):
        super().__init__(**kw)
        self.state = app_state
        self.plugins: list = []
        self.errors: list = []
        self.conflicts: list = []
        self.loaded = False

    def compose(self) -> ComposeResult:
        plugins: DataTable[str] = DataTable(id="plugins-table", cursor_type="row", zebra_stripes=True)
        for label, key in (
            ("plugin", "name"),
            ("distribution", "dist"),
            ("version", "version"),
            ("provides", "provides"),
            ("hooks", "hooks"),
        ):
            plugins.add_column(label, key=key)
        yield plugins
        yield Static("load errors", id="plugins-errors-title")
        errors: DataTable[str | Text] = DataTable(id="plugins-errors", cursor_type="row")
        for label, key in (("plugin", "plugin"), ("distribution", "dist"), ("error", "error")):
            errors.add_column(label, key=key)
        yield errors
        with VerticalScroll(id="plugins-details"):
            yield Static("loading plugins…", id="plugins-detail-text")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#plugins-table", DataTable).focus()
        self._load()

    @work(exclusive=True, group="plugins")
    async def _load(self) -> None:
        plugins, errors, conflicts = await asyncio.to_thread(load_registry_view, self.state)
        self.plugins, self.errors, self.conflicts = list(plugins), list(errors), list(conflicts)
        self._fill()
        self.loaded = True

    def _fill(self) -> None:
        table = self.query_one("#plugins-table", DataTable)
        table.clear()
        for p in self.plugins:
            dist = Text(p.dist)
            if p.builtin:
                dist.append(" (built-in)", style="dim")
            table.add_row(p.name, dist, p.version, self.provides(p), ", ".join(p.hooks), key=p.name)
        errors = self.query_one("#plugins-errors", DataTable)
        errors.clear()
        for i, e in enumerate(self.errors):
            errors.add_row(e.plugin, e.dist, Text(self.error_line(e), style="red"), key=str(i))
        errors.display = bool(self.errors)  # no empty table taking room from the details
        title = f"load errors ({len(self.errors)})" if self.errors else "load errors: none"
        if self.conflicts:
            title += f", conflicts ({len(self.conflicts)}): " + "; ".join(str(c) for c in self.conflicts)
        self.query_one("#plugins-errors-title", Static).update(Text(title))
        self._show_plugin()

    @staticmethod
    def provides(p) -> str:
        """Its stage kinds by name (what forge.toml's `uses` takes), then how many of anything else it adds."""
        parts = list(p.stages)
        parts += [f"{len(names)} {label}" for label, names in provided(p)]
        return ", ".join(parts) or "-"

    def error_line(self, e) -> str:
        """As `plugins list` says it: a plugin that imported but whose hook failed lost what that hook adds."""
        loaded = {p.name for p in self.plugins}
        if e.plugin in loaded:
            return f"{e.error}; what that hook adds is unavailable"
        return f"failed to load: {e.error}"

    # ---- details -------------------------------------------------------------------------------
    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "plugins-errors":
            self._show_error()
        else:
            self._show_plugin()

    def on_descendant_focus(self, event) -> None:
        # The details follow the table you are in.
        if getattr(event.widget, "id", None) == "plugins-errors":
            self._show_error()
        elif getattr(event.widget, "id", None) == "plugins-table":
            self._show_plugin()

    def _show_plugin(self) -> None:
        row = self.query_one("#plugins-table", DataTable).cursor_row
        if not (0 <= row < len(self.plugins)):
            self._detail(Text("no plugins loaded" if self.loaded else "loading plugins…"))
            return
        p = self.plugins[row]
        text = Text()
        text.append(f"{p.name}", style="bold")
        text.append(f"  {p.dist} {p.version}{'  built-in' if p.builtin else ''}\n")
        text.append(f"module {p.module}\n")
        text.append(f"stages: {', '.join(p.stages) or '-'}\n")
        for label, names in provided(p):
            text.append(f"{label}: {', '.join(names)}\n")
        text.append(f"hooks: {', '.join(p.hooks) or '-'}\n")
        for e in self.errors:
            if e.plugin == p.name:
                text.append(f"error: {self.error_line(e)}\n", style="red")
        self._detail(text)

    def _show_error(self) -> None:
        row = self.query_one("#plugins-errors", DataTable).cursor_row
        if not (0 <= row < len(self.errors)):
            return
        e = self.errors[row]
        text = Text()
        text.append(f"{e.plugin} ({e.dist}): {self.error_line(e)}\n", style="bold red")
        text.append(e.details or "(no traceback)")
        self._detail(text)

    def _detail(self, text: Text) -> None:
        self.query_one("#plugins-detail-text", Static).update(text)

    # ---- actions -------------------------------------------------------------------------------
    def action_focus_errors(self) -> None:
        self.query_one("#plugins-errors", DataTable).focus()

    def action_focus_plugins(self) -> None:
        self.query_one("#plugins-table", DataTable).focus()
