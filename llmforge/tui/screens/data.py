"""Data screen: training data the way a stage sees it, what `llmforge data inspect --masks` prints.

Pick a data file and, optionally, a model or tokenizer folder. Rows are read with the stage's own
loader (bad rows skipped and listed with their reasons); with a tokenizer, each row is rendered
through the chat template and tokenized with `encode_chat`, trained tokens shown in colour and
masked ones dimmed, with the length histogram and the truncation rate at `max_length`.
Reading and tokenizing (and importing transformers) happen in a worker thread.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from textual import on, work
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import (
    Button,
    DataTable,
    DirectoryTree,
    Footer,
    Input,
    Label,
    OptionList,
    Select,
    Static,
    TabbedContent,
    TabPane,
)
from textual.worker import get_current_worker

from llmforge.errors import ForgeError

TRAIN_ON = ("assistant", "all", "last_turn")
TABLE_ROWS = 2000  # rows listed in the table; statistics always cover every row
TRAINED_STYLE = "bold green"
MASKED_STYLE = "dim"


# ------------------------------------------------------------------------------------------------
# the work (no Textual): what `data inspect` computes, kept per row for browsing
# ------------------------------------------------------------------------------------------------


@dataclass
class Inspection:
    """A dataset read (and tokenized when a tokenizer was given)."""

    file: str
    kind: str
    format: str
    rows: list[dict]
    wheres: list[str]
    skipped: list[tuple[str, str]]
    tokenizer: Any = None
    template: Any = None
    max_length: int = 2048
    train_on: str = "assistant"
    lengths: list[int] = field(default_factory=list)  # tokens per row (characters without a tokenizer)
    trained: list[int] = field(default_factory=list)  # trained tokens per row
    truncated: list[bool] = field(default_factory=list)

    @property
    def unit(self) -> str:
        return "tokens" if self.tokenizer is not None else "characters"

    def summary(self) -> str:
        text = f"{self.file}: {len(self.rows)} rows, format {self.format} ({self.kind})" + (
            f", {len(self.skipped)} bad rows skipped" if self.skipped else ""
        )
        if self.tokenizer is None:
            return text + "; choose a model or tokenizer folder to see tokens and loss masks"
        n = max(len(self.lengths), 1)
        cut = sum(self.truncated)
        text += (
            f"\ntokens: mean {sum(self.lengths) / n:.1f}, max {max(self.lengths, default=0)}; truncated at "
            f"{self.max_length}: {cut} rows ({100 * cut / n:.1f}%); trained tokens "
            f"{100 * sum(self.trained) / max(sum(self.lengths), 1):.1f}%"
        )
        if self.template is not None:
            text += f"; template {self.template.name}"
        return text


def inspect_data(
    data: str,
    model: Path | None,
    template: str | None,
    max_length: int,
    train_on: str,
    base: Path,
    progress=None,
    cancelled=lambda: False,
    *,
    registry,
) -> Inspection | None:
    """Read the data like a stage (bad rows skipped; `data` relative to `base`, and shown as written)
    and, with a model folder, tokenize every row. `progress(done, total)` is called now and then;
    returns None when `cancelled()` turns true. `registry`: the app's plugins (readers, formats, templates)."""
    from llmforge.data import DataOptions, load_data

    ds = load_data(
        DataOptions(path=data, format="auto", on_bad_row="skip"), registry.readers, registry.row_formats, base=base
    )
    out = Inspection(data, ds.kind, ds.format, ds.rows, ds.wheres, ds.skipped, max_length=max_length, train_on=train_on)
    if model is None:
        out.lengths = [len(json.dumps(r, ensure_ascii=False)) for r in ds.rows]
        return out
    from llmforge.chat import encode_row, load_chat_tokenizer

    tok, out.template = load_chat_tokenizer(model, template, base, registry.chat_templates, ds.kind)
    out.tokenizer = tok
    for i, row in enumerate(ds.rows):
        if i % 200 == 0:
            if cancelled():
                return None
            if progress is not None:
                progress(i, len(ds.rows))
        ids, labels, cut = encode_row(tok, out.template, ds.kind, row, max_length, train_on)
        out.lengths.append(len(ids))
        out.trained.append(sum(1 for x in labels if x != -100))
        out.truncated.append(bool(cut))
    return out


def histogram(
    lengths: list[int], limit: int | None = None, bins: int = 10, width: int = 40, unit: str = "tokens"
) -> str:
    """A text histogram of lengths, one line per bin, with how many rows pass `limit`."""
    if not lengths:
        return "no rows"
    low, top = min(lengths), max(lengths)
    # Bins span the lengths present (not 0..max): rows of similar length still spread over the bins.
    bins = max(1, min(bins, top - low + 1))
    step = -(-(top - low + 1) // bins)  # ceil: every length lands in a bin
    counts = [0] * bins
    for n in lengths:
        counts[min((n - low) // step, bins - 1)] += 1
    most = max(counts)
    label_w = len(f"{low + step * bins - 1}")
    lines = [
        f"{unit} per row ({len(lengths)} rows): mean {statistics.fmean(lengths):.1f}, "
        f"median {statistics.median(lengths):g}, min {low}, max {top}"
    ]
    for b, count in enumerate(counts):
        lo, hi = low + b * step, low + (b + 1) * step - 1
        bar = "█" * (round(width * count / most) if most else 0)
        over = "  > max_length" if limit is not None and lo > limit else ""
        lines.append(f"{lo:>{label_w}}-{hi:<{label_w}} │{bar} {count}{over}")
    if limit is not None:
        longer = sum(1 for n in lengths if n > limit)
        lines.append(f"longer than {limit}: {longer} rows ({100 * longer / len(lengths):.1f}%)")
    return "\n".join(lines)


def masked_text(tok: Any, ids: list[int], labels: list[int]):
    """The row's tokens as rich Text: trained tokens in colour, masked (label -100) ones dimmed."""
    from rich.text import Text

    text = Text()
    for token, label in zip(ids, labels):
        text.append(tok.decode([token]), style=TRAINED_STYLE if label != -100 else MASKED_STYLE)
    return text


# ------------------------------------------------------------------------------------------------
# picking a path
# ------------------------------------------------------------------------------------------------


def _is_tokenizer_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def run_tokenizers(runs_dir: Path | None) -> list[tuple[str, Path]]:
    """The models of the runs that carry a tokenizer, newest run first, as the Models area lists them:
    (label, folder). A run's model folders are six levels down (runs/<id>/stages/<stage>/artifacts/model):
    the picker offers them directly."""
    if runs_dir is None or not Path(runs_dir).is_dir():
        return []
    from llmforge.tui.screens.models import collect_models

    out = []
    for entry in collect_models(Path(runs_dir)):
        if entry.kind in ("model", "adapter") and _is_tokenizer_dir(entry.path):
            out.append((f"{entry.name}  (run {entry.run})", entry.path))
    return out


class PathPicker(ModalScreen):
    """Choose a file (data) or a folder holding a tokenizer (model); escape cancels. For a tokenizer, the
    models of the runs are offered first, then the folder tree for any other folder."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]
    DEFAULT_CSS = """
    PathPicker { align: center middle; }
    PathPicker > Vertical { width: 80%; height: 80%; border: thick $primary; background: $surface; }
    PathPicker DirectoryTree { height: 1fr; }
    PathPicker #run-models { height: auto; max-height: 40%; display: none; }
    PathPicker #run-models.some { display: block; }
    """

    def __init__(self, root: Path, want_dir: bool, runs_dir: Path | None = None) -> None:
        super().__init__()
        self.root = root
        self.want_dir = want_dir
        self.runs_dir = runs_dir
        self.models: list[tuple[str, Path]] = []
        self.models_loaded = False

    def compose(self):
        what = "a model or tokenizer folder (enter on it)" if self.want_dir else "a data file"
        with Vertical():
            yield Label(f"Choose {what}; escape cancels")
            if self.want_dir:
                yield OptionList(id="run-models")
            yield DirectoryTree(self.root)

    def on_mount(self) -> None:
        if self.want_dir:
            self._find_models()

    @work(thread=True, exclusive=True, group="picker-models", exit_on_error=False)
    def _find_models(self) -> None:
        try:
            models = run_tokenizers(self.runs_dir)
        except Exception:  # noqa: BLE001 - the tree below still works
            models = []
        self.app.call_from_thread(self._show_models, models)

    def _show_models(self, models: list[tuple[str, Path]]) -> None:
        self.models, self.models_loaded = models, True
        if not models:
            return
        options = self.query_one("#run-models", OptionList)
        options.add_options([label for label, _path in models])
        options.add_class("some")
        options.border_title = "models of your runs (enter picks one)"
        options.highlighted = 0
        options.focus()

    @on(OptionList.OptionSelected, "#run-models")
    def _model(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.dismiss(self.models[event.option_index][1])

    @on(DirectoryTree.FileSelected)
    def _file(self, event: DirectoryTree.FileSelected) -> None:
        if not self.want_dir:
            self.dismiss(event.path)

    @on(DirectoryTree.DirectorySelected)
    def _folder(self, event: DirectoryTree.DirectorySelected) -> None:
        # Folders open as the user walks the tree; one holding a tokenizer is the choice.
        if self.want_dir and _is_tokenizer_dir(event.path):
            self.dismiss(event.path)

    def action_cancel(self) -> None:
        self.dismiss(None)


# ------------------------------------------------------------------------------------------------
# the screen
# ------------------------------------------------------------------------------------------------


class DataScreen(Screen):
    """Choose a data file and a tokenizer, load (enter), then browse the rows with the arrow keys:
    trained tokens in green, masked ones dimmed. Lengths and bad rows are in the other tabs."""

    HELP = """\
Training data as a stage sees it: choose a data file and a tokenizer (a model of your runs, or any
folder), then load. Trained tokens show in green, masked ones dimmed; lengths and bad rows in the tabs."""

    BINDINGS = [
        Binding("ctrl+l", "load", "Load", tooltip="read (and tokenize) the data"),
        Binding("ctrl+o", "pick_data", "Pick data", tooltip="choose the data file"),
        Binding(
            "ctrl+t",
            "pick_model",
            "Pick tokenizer",
            tooltip="choose a model of your runs, or a folder, for the tokenizer",
        ),
    ]

    DEFAULT_CSS = """
    DataScreen #data-form { height: auto; padding: 0 1; }
    DataScreen #data-form Horizontal { height: auto; }
    DataScreen #data-form Label { width: 10; }
    DataScreen #data-form Input { width: 1fr; }
    DataScreen #data-form Button { min-width: 5; width: auto; }
    DataScreen #max-length { width: 12; }
    DataScreen #train-on { width: 20; }
    DataScreen #summary { height: auto; padding: 0 1; color: $text-muted; }
    DataScreen #rows { height: 8; }
    DataScreen #row-view { height: 1fr; }
    DataScreen TabbedContent { height: 1fr; }
    """

    def __init__(self, app_state: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state = app_state
        self.result: Inspection | None = None

    @property
    def base(self) -> Path:
        """Relative paths mean what they mean in forge.toml: relative to its folder."""
        path = getattr(self.state, "config_path", None)
        return Path(path).resolve().parent if path else Path.cwd()

    def compose(self):
        with Vertical(id="data-form"):
            with Horizontal():
                yield Label("data")
                yield Input(placeholder="a data file or folder, relative to forge.toml", id="data-path", compact=True)
                yield Button("…", id="pick-data", compact=True)
            with Horizontal():
                yield Label("tokenizer")
                yield Input(placeholder="a model or tokenizer folder (optional)", id="model-path", compact=True)
                yield Button("…", id="pick-model", compact=True)
            with Horizontal():
                yield Label("template")
                yield Input(placeholder="the model's own", id="template", compact=True)
                yield Input("2048", placeholder="max_length", id="max-length", type="integer", compact=True)
                yield Select(
                    [(t, t) for t in TRAIN_ON], value="assistant", allow_blank=False, id="train-on", compact=True
                )
                yield Button("Load", id="load", variant="primary", compact=True)
        yield Static(
            "choose a data file (ctrl+o) and a tokenizer (ctrl+t), then load (enter or ctrl+l)",
            id="summary",
            markup=False,
        )
        with TabbedContent(id="data-tabs"):
            with TabPane("Rows", id="tab-rows"):
                yield DataTable(id="rows", cursor_type="row", zebra_stripes=True)
                with VerticalScroll(id="row-view"):
                    yield Static("", id="row-text", markup=False)
            with TabPane("Lengths", id="tab-lengths"):
                yield VerticalScroll(Static("", id="histogram", markup=False))
            with TabPane("Bad rows", id="tab-bad"):
                yield DataTable(id="bad", cursor_type="row", zebra_stripes=True)
        yield Footer()

    # ---- choosing ---------------------------------------------------------------------------
    def _shown(self, path: Path) -> str:
        try:
            return str(path.resolve().relative_to(self.base))
        except ValueError:
            return str(path)

    def _resolve(self, text: str) -> Path:
        path = Path(text).expanduser()
        return path if path.is_absolute() else self.base / path

    def action_pick_data(self) -> None:
        def chosen(path: Path | None) -> None:
            if path is not None:
                self.query_one("#data-path", Input).value = self._shown(path)

        self.app.push_screen(PathPicker(self.base, want_dir=False), chosen)

    def action_pick_model(self) -> None:
        def chosen(path: Path | None) -> None:
            if path is not None:
                self.query_one("#model-path", Input).value = self._shown(path)

        self.app.push_screen(
            PathPicker(self.base, want_dir=True, runs_dir=getattr(self.state, "runs_dir", None)), chosen
        )

    @on(Button.Pressed, "#pick-data")
    def _pick_data(self) -> None:
        self.action_pick_data()

    @on(Button.Pressed, "#pick-model")
    def _pick_model(self) -> None:
        self.action_pick_model()

    @on(Button.Pressed, "#load")
    @on(Input.Submitted)
    def _submit(self) -> None:
        self.action_load()

    # ---- loading ----------------------------------------------------------------------------
    def action_load(self) -> None:
        data = self.query_one("#data-path", Input).value.strip()
        if not data:
            self.app.notify("choose a data file first (ctrl+o)", title="Data", severity="warning")
            return
        model = self.query_one("#model-path", Input).value.strip()
        try:
            max_length = int(self.query_one("#max-length", Input).value or 2048)
            if max_length < 1:
                raise ValueError
        except ValueError:
            self.app.notify("max_length must be a whole number > 0", title="Data", severity="error")
            return
        self.query_one("#summary", Static).update(f"reading {data}…")
        self.load(
            data,
            model or None,
            self.query_one("#template", Input).value.strip() or None,
            max_length,
            str(self.query_one("#train-on", Select).value),
        )

    @work(thread=True, exclusive=True, group="data-load", exit_on_error=False)
    def load(self, data: str, model: str | None, template: str | None, max_length: int, train_on: str) -> None:
        worker = get_current_worker()

        def progress(done: int, total: int) -> None:
            self.app.call_from_thread(self._status, f"tokenizing {done}/{total} rows…")

        try:
            result = inspect_data(
                data,
                self._resolve(model) if model else None,
                template,
                max_length,
                train_on,
                self.base,
                progress,
                lambda: worker.is_cancelled,
                registry=self.state.registry(),
            )
        except ForgeError as exc:
            self.app.call_from_thread(self._failed, exc.message, exc.hint)
            return
        except Exception as exc:  # noqa: BLE001 - a tokenizer that will not load must not end the app
            self.app.call_from_thread(self._failed, f"{type(exc).__name__}: {exc}", None)
            return
        if result is not None and not worker.is_cancelled:
            self.app.call_from_thread(self._show, result)

    def _status(self, text: str) -> None:
        self.query_one("#summary", Static).update(text)

    def _failed(self, message: str, hint: str | None) -> None:
        self.query_one("#summary", Static).update(message + (f"\nhint: {hint}" if hint else ""))
        self.app.notify(message + (f"\nhint: {hint}" if hint else ""), title="Data", severity="error")

    # ---- showing ----------------------------------------------------------------------------
    def _show(self, result: Inspection) -> None:
        self.result = result
        self.query_one("#summary", Static).update(result.summary())
        table = self.query_one("#rows", DataTable)
        table.clear(columns=True)
        tokenized = result.tokenizer is not None
        table.add_columns("#", "where", result.unit, *(("trained", "truncated") if tokenized else ()))
        for i in range(min(len(result.rows), TABLE_ROWS)):
            cells = [str(i), result.wheres[i], str(result.lengths[i])]
            if tokenized:
                cells += [str(result.trained[i]), "yes" if result.truncated[i] else ""]
            table.add_row(*cells, key=str(i))
        limit = result.max_length if tokenized else None
        self.query_one("#histogram", Static).update(histogram(result.lengths, limit, unit=result.unit))
        bad = self.query_one("#bad", DataTable)
        bad.clear(columns=True)
        bad.add_columns("where", "reason")
        for where, reason in result.skipped[:TABLE_ROWS]:
            bad.add_row(where, reason)
        self.show_row(0)

    @on(DataTable.RowHighlighted, "#rows")
    def _row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.show_row(event.cursor_row)

    def show_row(self, index: int) -> None:
        """Render one row: through the template with its loss mask, or as read without a tokenizer."""
        from rich.text import Text

        from llmforge.chat import encode_row

        result = self.result
        if result is None or not 0 <= index < len(result.rows):
            return
        row = result.rows[index]
        head = Text(f"{result.wheres[index]}  ({result.lengths[index]} {result.unit})\n", style="bold")
        if result.tokenizer is None:
            body = Text(json.dumps(row, indent=2, ensure_ascii=False))
        else:
            ids, labels, cut = encode_row(
                result.tokenizer, result.template, result.kind, row, result.max_length, result.train_on
            )
            body = masked_text(result.tokenizer, ids, labels)
            body.append("\n\n")
            if cut:
                body.append(f"(truncated at {result.max_length} tokens)\n", style="yellow")
            body.append("trained", style=TRAINED_STYLE)
            body.append(" / ")
            body.append("ignored (label -100)", style=MASKED_STYLE)
        self.query_one("#row-text", Static).update(head + body)
