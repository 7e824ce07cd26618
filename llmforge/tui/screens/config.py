"""Config screen: edit one stage of forge.toml through a form generated from its Options schema.

Every change is checked twice, with the code `llmforge validate` uses: at once against the stage's
schema (`validate_model`, the same function and key paths: `stages[1].learning_rate: must be > 0`),
then, a moment later in a worker, the whole file as it would be written (`load_pipeline`:
references, input files, the stages' own checks). Saving writes through `tomledit`, which keeps the
user's comments, blank lines and key order, and only when the edited stage has no problem left.

A key the stage does not know (a typo: `flaten`) has no field; it is listed under the form with a
Remove button, so that it can be taken out here (it would block every save of the stage otherwise).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from textual import on, work
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Footer, Select, Static
from textual.widgets.select import NoSelection
from textual.worker import get_current_worker

from llmforge.errors import ConfigError, ForgeError, Problem
from llmforge.tui import tomledit
from llmforge.tui.widgets.form import OptionsForm, fields_for

if TYPE_CHECKING:
    from llmforge.plugins import Registry
    from llmforge.stage import Stage
    from llmforge.tui.app import LlmforgeApp

# How long typing must pause before the whole file is validated again (the schema check is instant).
FULL_CHECK_DELAY = 0.3


def check_file(path: Path, registry: Registry) -> list[Problem]:
    """Every problem `llmforge validate` reports for this file (none: it is valid)."""
    from llmforge.pipeline import load_pipeline

    try:
        load_pipeline(path, registry=registry)
    except ConfigError as exc:
        return exc.problems
    except ForgeError as exc:
        return [Problem("", exc.message)]
    return []


def check_text(path: Path, text: str, registry: Registry) -> list[Problem]:
    """Validate `text` as if it were `path`: written next to it (relative paths and the project
    folder resolve alike), checked, and removed."""
    tmp = tomledit.write_temp(path, text, "check")
    try:
        return check_file(tmp, registry)
    finally:
        tmp.unlink(missing_ok=True)


def _under(where: str, prefix: str) -> bool:
    return where == prefix or where.startswith((prefix + ".", prefix + "["))


def unknown_keys(entry: Any, field_names: list[str]) -> list[str]:
    """The keys of a stage table that no field edits (dotted, in file order): typos such as `flaten`,
    or options of another stage kind. Tables of nested options are looked into (`lora.rr`)."""
    names = set(field_names)
    parents = {".".join(n.split(".")[:i]) for n in field_names for i in range(1, n.count(".") + 1)}
    out: list[str] = []

    def walk(table: Any, prefix: str) -> None:
        for key in list(table.keys()):
            dotted = f"{prefix}{key}"
            if not prefix and key in ("name", "uses"):
                continue
            if dotted in names:
                continue
            if dotted in parents and isinstance(table[key], dict):
                walk(table[key], dotted + ".")
                continue
            out.append(dotted)

    walk(entry, "")
    return out


class ConfigScreen(Screen):
    """Pick a stage, edit its options, save (ctrl+s). Reload (ctrl+r) rereads forge.toml."""

    HELP = """\
Edit one stage of forge.toml through a form made from its options. An empty field means "not set"
(the default applies). Problems show on the right and under their fields; a stage with a problem is
not saved. Keys the stage does not know are listed under the form, each with a Remove button.
Saving keeps your comments and layout."""

    BINDINGS = [
        Binding("ctrl+s", "save", "Save", tooltip="save the changes to forge.toml (comments and layout kept)"),
        Binding("ctrl+r", "reload", "Reload", tooltip="read forge.toml again, dropping unsaved edits"),
        Binding("ctrl+g", "pick_stage", "Stage", tooltip="go to the stage picker and open it"),
    ]

    DEFAULT_CSS = """
    ConfigScreen #config-head { height: auto; padding: 0 1; }
    ConfigScreen #stage-select { width: 1fr; max-width: 60; }
    ConfigScreen #config-body { height: 1fr; }
    ConfigScreen #form-area { width: 3fr; padding: 0 1; }
    ConfigScreen #side { width: 2fr; min-width: 24; border-left: solid $primary; padding: 0 1; }
    ConfigScreen #problems { height: auto; }
    ConfigScreen #message { padding: 1 2; }
    ConfigScreen .title { text-style: bold; }
    ConfigScreen #unknown { height: auto; margin: 0 0 1 0; }
    ConfigScreen .unknown-row { height: auto; }
    ConfigScreen .unknown-row Static { width: 1fr; color: $text-warning; }
    ConfigScreen .unknown-row Button { min-width: 10; width: auto; }
    """

    def __init__(self, app_state: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state = app_state
        self.path: Path | None = None
        self.text = ""  # the file as read: edits apply to it, and saving checks it is still on disk
        self.entries: list = []  # the [[stages]] tables of the parsed file
        self.classes_by_uses: dict[str, type[Stage] | None] = {}
        self.current: int | None = None  # index of the stage shown
        self.revision = 0  # bumped on every change: a late full check of an older text is dropped
        self.problems: list[Problem] = []
        self._form: OptionsForm | None = None
        self.unknown: list[str] = []  # keys of the shown stage that no field edits
        self.removed: list[str] = []  # of those, the ones the user removed (saved with the form's edits)
        self._refocus: str | None = None  # the field that had the focus when a save rebuilt the form
        self._quit_after_save = False

    def compose(self):
        with Horizontal(id="config-head"):
            yield Static("", id="config-path", markup=False)
        yield Select([], prompt="stage", allow_blank=True, id="stage-select", compact=True)
        with Horizontal(id="config-body"):
            yield VerticalScroll(Static("loading forge.toml…", id="message", markup=False), id="form-area")
            with Vertical(id="side"):
                yield Static("Problems", classes="title")
                yield Static("", id="problems")
        yield Footer()

    def on_mount(self) -> None:
        self.load()

    def on_screen_resume(self) -> None:
        # Back on this screen: forge.toml may have been changed meanwhile (an editor, `llmforge init
        # --force`). Reread it, unless the form holds edits: those are saved or dropped explicitly.
        if self.path is None or self.form is None or self.edits():
            return
        try:
            changed = tomledit.read_text(self.path) != self.text
        except ForgeError:
            changed = True
        if changed:
            self.action_reload()

    # ---- loading ---------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="config-load", exit_on_error=False)
    def load(self, keep_stage: int | None = None) -> None:
        """Read forge.toml and the stage classes (loading plugins takes a moment: not on the UI thread)."""
        path = self.state.config_path
        # The type: ignores below: mypy cannot solve textual's `T | Awaitable[T]` for a coroutine function
        # that returns None (it infers Never); textual awaits the coroutine on the UI thread.
        try:
            if path is None:
                raise ForgeError(
                    "no forge.toml here", hint="create one with `llmforge init`, or open the TUI with -c PATH"
                )
            path = Path(path)
            text = tomledit.read_text(path)
            doc = tomledit.parse(text, str(path))
            entries = tomledit.stages(doc)
            registry = self.state.registry()
            classes: dict[str, type[Stage] | None] = {}
            for entry in entries:
                uses = entry.get("uses")
                if isinstance(uses, str) and uses not in classes:
                    classes[uses] = registry.stage_class(uses)
            problems = check_file(path, registry)
        except ForgeError as exc:
            self.app.call_from_thread(self._failed, exc)  # type: ignore[arg-type]
            return
        except Exception as exc:  # noqa: BLE001 - a bug here must show, not take the app down
            self.app.call_from_thread(self._failed, ForgeError(f"{type(exc).__name__}: {exc}"))  # type: ignore[arg-type]
            return
        self.app.call_from_thread(self._loaded, path, text, entries, classes, problems, keep_stage)  # type: ignore[arg-type]

    async def _failed(self, exc: ForgeError) -> None:
        await self._message(exc.render())
        self.app.notify(exc.render(), title="Config", severity="error")

    async def _message(self, text: str) -> None:
        self._form = None
        area = self.query_one("#form-area", VerticalScroll)
        await area.remove_children()
        await area.mount(Static(text, id="message", markup=False))

    async def _loaded(
        self,
        path: Path,
        text: str,
        entries: list,
        classes: dict[str, type[Stage] | None],
        problems: list[Problem],
        keep_stage: int | None,
    ) -> None:
        self.path, self.text, self.entries, self.classes_by_uses = path, text, entries, classes
        self.query_one("#config-path", Static).update(f"{path}  ({len(entries)} stages)")
        select = self.query_one("#stage-select", Select)
        options = []
        for i, entry in enumerate(entries):
            name, uses = entry.get("name", f"stages[{i}]"), entry.get("uses", "?")
            options.append((f"{name} ({uses})", i))
        with select.prevent(Select.Changed):
            select.set_options(options)
        self.current = None
        self.problems = list(problems)
        self._show_problems(problems)
        if not entries:
            await self._message("forge.toml has no [[stages]] to edit")
            return
        index = keep_stage if keep_stage is not None and keep_stage < len(entries) else 0
        with select.prevent(Select.Changed):
            select.value = index
        await self.show_stage(index)

    # ---- the form --------------------------------------------------------------------------
    @property
    def form(self) -> OptionsForm | None:
        """The form of the stage shown, once mounted (None while loading or switching)."""
        return self._form

    async def show_stage(self, index: int) -> None:
        entry = self.entries[index]
        self.current = index
        uses = entry.get("uses")
        cls = self.classes_by_uses.get(uses) if isinstance(uses, str) else None
        if cls is None:
            await self._message(
                f"stages[{index}]: unknown stage kind {uses!r}; see the problems (and the Plugins screen)"
            )
            return
        fields = fields_for(cls.Options)
        values = {f.name: tomledit.get(entry, f.name) for f in fields}
        sources = {f.name: tomledit.source(entry, f.name) for f in fields}
        area = self.query_one("#form-area", VerticalScroll)
        self._form = None
        self.unknown = unknown_keys(entry, [f.name for f in fields])
        self.removed = []
        await area.remove_children()
        await area.mount(
            Static(f"{entry.get('name', '?')}: {uses} — {getattr(cls, 'summary', '')}", classes="title", markup=False)
        )
        if self.unknown:
            await area.mount(self._unknown_box(entry))
        form = OptionsForm(fields, values, sources, id="options-form")
        await area.mount(form)
        self._form = form
        self._show_problems(self.problems)
        refocus, self._refocus = self._refocus, None
        if refocus is not None and refocus in {f.name for f in fields}:
            # A save rebuilt the form: the user goes on typing where they were, not into the app's keys.
            form.editor(refocus).focus()

    def _unknown_box(self, entry: Any) -> Vertical:
        rows = []
        for i, key in enumerate(self.unknown):
            shown = tomledit.source(entry, key) or "?"
            rows.append(
                Horizontal(
                    Static(f"{key} = {shown}   (not an option of this stage)", markup=False),
                    Button("Remove", id=f"remove-{i}", variant="warning", compact=True),
                    classes="unknown-row",
                    id=f"unknown-{i}",
                )
            )
        return Vertical(Static("Unknown keys", classes="title"), *rows, id="unknown")

    @on(Button.Pressed, ".unknown-row Button")
    def _remove_unknown(self, event: Button.Pressed) -> None:
        event.stop()
        try:
            index = int(str(event.button.id).removeprefix("remove-"))
            key = self.unknown[index]
            if key not in self.removed:
                self.removed.append(key)
            row = self.query_one(f"#unknown-{index}")
            row.query_one(Static).update(f"{key}: removed (ctrl+s saves)")
            event.button.disabled = True
            self._edited()
        except Exception as exc:  # noqa: BLE001 - a handler must not raise (see app.py)
            cast("LlmforgeApp", self.app).show_error(exc)

    @on(Select.Changed, "#stage-select")
    async def _stage_chosen(self, event: Select.Changed) -> None:
        # textual's Select.Changed is not generic; this select's values are stage indexes (see _loaded)
        select = cast("Select[int]", event.select)
        value = cast("int | NoSelection", event.value)
        if isinstance(value, NoSelection) or value == self.current:
            return
        if self.current is not None and self.edits():
            # Keep the user's edits: they are saved or dropped (reload) explicitly, never silently.
            with select.prevent(Select.Changed):
                select.value = self.current
            self.app.notify(
                "this stage has unsaved changes: save (ctrl+s) or reload (ctrl+r) first",
                title="Config",
                severity="warning",
            )
            return
        await self.show_stage(value)

    def edits(self) -> list[tomledit.Edit]:
        form = self.form
        if form is None or self.current is None:
            return []
        out = [tomledit.Edit(self.current, name, value, typed) for name, (value, typed) in form.changes().items()]
        return out + [tomledit.Edit(self.current, key, tomledit.UNSET) for key in self.removed]

    def unsaved_text(self) -> str | None:
        """What quitting now would lose (the app asks before it quits), or None when nothing."""
        edits = self.edits()
        if not edits or self.current is None:
            return None
        name = self.entries[self.current].get("name", f"stages[{self.current}]")
        keys = ", ".join(dict.fromkeys(e.key for e in edits))
        return f"forge.toml has unsaved edits in stage {name}: {keys}."

    def candidate(self) -> str:
        """The file's text with the form's changes made (what saving would write)."""
        return tomledit.apply_edits(self.text, self.edits(), str(self.path))

    @on(OptionsForm.Changed)
    def _form_changed(self, event: OptionsForm.Changed) -> None:
        self._edited()

    def _edited(self) -> None:
        if self.current is None:
            return
        self.revision += 1
        try:
            text = self.candidate()
        except ForgeError as exc:
            self._show_problems([Problem(f"stages[{self.current}]", exc.message)])
            return
        self._show_problems(self._schema_problems(text) + self._other_problems())
        self.full_check(self.revision, text)

    def _schema_problems(self, text: str) -> list[Problem]:
        """The edited stage against its schema, now (the same function `validate` uses per stage)."""
        from llmforge.schema import validate_model
        from llmforge.tui.tomledit import tomllib

        index = self.current
        raw = tomllib.loads(text).get("stages", [])[index]
        opts = {k: v for k, v in raw.items() if k not in ("name", "uses")}
        cls = self.classes_by_uses.get(raw.get("uses"))
        if cls is None:
            return []
        return validate_model(cls.Options, opts, f"stages[{index}]")[1]

    def _other_problems(self) -> list[Problem]:
        """The last full check's problems outside the edited stage (still true: only it changed)."""
        return [p for p in self.problems if not _under(p.where, f"stages[{self.current}]")]

    @work(thread=True, exclusive=True, group="config-check", exit_on_error=False)
    def full_check(self, revision: int, text: str) -> None:
        time.sleep(FULL_CHECK_DELAY)  # typing goes on: a newer check replaces this one (exclusive)
        if get_current_worker().is_cancelled or revision != self.revision or self.path is None:
            return
        try:
            problems = check_text(self.path, text, self.state.registry())
        except Exception as exc:  # noqa: BLE001
            problems = [Problem("", f"validation failed: {type(exc).__name__}: {exc}")]
        if not get_current_worker().is_cancelled:
            self.app.call_from_thread(self._checked, revision, problems)

    def _checked(self, revision: int, problems: list[Problem]) -> None:
        if revision == self.revision:
            self.problems = list(problems)
            self._show_problems(problems)

    def _show_problems(self, problems: list[Problem]) -> None:
        """List the problems, and put each one about an option of the shown stage under its field."""
        from rich.text import Text

        out = Text()
        if not problems:
            out.append("valid", style="bold green")
        for p in problems:
            out.append(f"{p.where}: " if p.where else "", style="bold")
            out.append(p.message + "\n", style="red")
        self.query_one("#problems", Static).update(out)
        form = self.form
        if form is None or self.current is None:
            return
        by_field: dict[str, list[str]] = {}
        prefix = f"stages[{self.current}]"
        for p in problems:
            if _under(p.where, prefix) and p.where != prefix:
                rest = p.where[len(prefix) :].lstrip(".")
                name = form.field_for(rest)
                if name is not None:
                    by_field.setdefault(name, []).append(f"{p.where}: {p.message}")
        form.show_problems(by_field)

    # ---- actions ---------------------------------------------------------------------------
    def action_reload(self) -> None:
        self.revision += 1
        self.load(self.current)

    def action_pick_stage(self) -> None:
        select = self.query_one("#stage-select", Select)
        select.focus()
        select.action_show_overlay()

    def action_save(self, quit_after: bool = False) -> None:
        if self.path is None or self.current is None:
            if quit_after:
                self.app.exit()
            return
        edits = self.edits()
        if not edits:
            if quit_after:
                self.app.exit()
                return
            self.app.notify("nothing to save", title="Config")
            return
        self._quit_after_save = quit_after
        form, focused = self.form, self.app.focused
        if form is not None and focused is not None:
            self._refocus = next((f.name for f in form.fields if form.editor(f.name) is focused), None)
        self.revision += 1
        self.save(self.path, self.text, edits, self.current)

    @work(thread=True, exclusive=True, group="config-save", exit_on_error=False)
    def save(self, path: Path, original: str, edits: list[tomledit.Edit], index: int) -> None:
        """Write the edited text to a temporary file beside forge.toml, validate exactly those bytes,
        and rename them into place only if the edited stage is clean (problems elsewhere in the file
        do not stop a save: they were there before)."""
        try:
            text = tomledit.apply_edits(original, edits, str(path))
            tmp = tomledit.write_temp(path, text, "save")
            try:
                problems = check_file(tmp, self.state.registry())
                blocking = [p for p in problems if _under(p.where, f"stages[{index}]")]
                if blocking:
                    self.app.call_from_thread(self._not_saved, problems, blocking)
                    return
                tomledit.replace(path, tmp, expected=original)
            finally:
                tmp.unlink(missing_ok=True)
        except ForgeError as exc:
            self.app.call_from_thread(self._save_failed, exc.render())
            return
        except Exception as exc:  # noqa: BLE001
            self.app.call_from_thread(self._save_failed, f"{type(exc).__name__}: {exc}")
            return
        self.app.call_from_thread(self._saved, path, problems, index)

    def _save_failed(self, text: str) -> None:
        self._quit_after_save, self._refocus = False, None
        self.app.notify(text, title="Config: not saved", severity="error")

    def _not_saved(self, problems: list[Problem], blocking: list[Problem]) -> None:
        self._quit_after_save, self._refocus = False, None
        self.problems = list(problems)
        self._show_problems(problems)
        first = blocking[0]
        more = f" (and {len(blocking) - 1} more)" if len(blocking) > 1 else ""
        self.app.notify(f"{first}{more}", title="Config: not saved", severity="error")

    def _saved(self, path: Path, problems: list[Problem], index: int) -> None:
        self.app.notify(
            f"saved {path.name}" + (f"; {len(problems)} problems elsewhere in the file" if problems else ""),
            title="Config",
            severity="warning" if problems else "information",
        )
        if self._quit_after_save:  # `q`, then "save" in the question: saved, so quit now
            self.app.exit()
            return
        self.load(index)
