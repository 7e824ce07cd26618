"""The Models screen: every model the runs made, where it came from, and a chat with it.

The list is built from the manifests: each finished stage's `model`, `adapter` and `gguf` artifacts (a gguf
folder gives one row per .gguf file in it, the unit you chat with or ship), with its size on disk and its
lineage: the run and stage that made it and the `@stage` references (or model paths) the stage read. A stage
reused from the cache points at another run's artifact; the row belongs to the run that made it, so each
artifact is listed once.

The details pane shows what the folder says about itself (config.json, adapter_config.json), for a GGUF the
parity scorecard the gguf stage wrote (report.json), and the leaderboard of the eval report that scored the
model (an `eval` stage's report artifact, read by llmforge/leaderboard.py): models x tasks with each task's
primary metric, the gates, the selected model starred and this model marked. Enter (or `c`) loads the
highlighted model into the chat panel (llmforge/tui/widgets/chat.py), which runs the model in a worker thread.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Group
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from llmforge.formatting import fmt_bytes
from llmforge.leaderboard import EvalReport, fmt_value, run_reports
from llmforge.tui.screens import read_runs_dir
from llmforge.tui.widgets.chat import ChatPanel

MODEL_KINDS = ("model", "adapter", "gguf")


@dataclass(frozen=True)
class ModelEntry:
    kind: str  # "model", "adapter" or "gguf"
    path: Path  # the folder (model, adapter) or the .gguf file
    folder: Path  # the artifact folder (the .gguf file's folder for gguf)
    run: str
    stage: str
    uses: str  # the stage kind
    created: float | None
    sources: tuple[str, ...]  # what the stage read: "@sft", "/models/base"
    size: int
    info: dict = field(default_factory=dict, compare=False, hash=False)  # the stage's manifest info

    @property
    def key(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name if self.kind == "gguf" else f"{self.stage}/{self.kind}"


def folder_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                continue  # removed while we walk
    return total


def stage_sources(stage_config: dict) -> tuple[str, ...]:
    """The models a stage read, from its table in forge.toml (as recorded in the manifest): every `@reference`
    anywhere in its options, and `model`/`base` paths given directly."""
    refs: list[str] = []

    def walk(value, key: str | None = None) -> None:
        if isinstance(value, str):
            if value.startswith("@") or key in ("model", "base", "lora_base"):
                refs.append(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, k)
        elif isinstance(value, list):
            for v in value:
                walk(v, key)

    for k, v in stage_config.items():
        if k not in ("name", "uses"):
            walk(v, k)
    return tuple(dict.fromkeys(refs))  # in order, once each


def collect_models(runs_dir: Path) -> list[ModelEntry]:
    """The model artifacts of every run of a runs folder, newest run first."""
    from llmforge.runs import RunStore

    out: list[ModelEntry] = []
    from llmforge.tui.screens.runs import newest_first

    for run in newest_first(RunStore(runs_dir).list()):
        m = run.manifest
        configs = {s.get("name"): s for s in (m.get("config") or {}).get("stages", []) if isinstance(s, dict)}
        for name, st in m.get("stages", {}).items():
            if st.get("cached_from"):
                continue  # listed under the run that made it
            for kind, art in (st.get("artifacts") or {}).items():
                if kind not in MODEL_KINDS:
                    continue
                folder = Path(art.get("path", ""))
                if not folder.is_dir():
                    continue  # deleted since
                common = dict(
                    folder=folder,
                    run=run.id,
                    stage=name,
                    uses=st.get("uses", ""),
                    created=st.get("ended") or m.get("created"),
                    sources=stage_sources(configs.get(name, {})),
                    info=st.get("info") or {},
                )
                if kind == "gguf":
                    for f in sorted(folder.glob("*.gguf")):
                        out.append(ModelEntry(kind, f, size=f.stat().st_size, **common))
                else:
                    out.append(ModelEntry(kind, folder, size=folder_size(folder), **common))
    return out


@dataclass(frozen=True)
class Board:
    """One eval report of a run, for the leaderboard: the run, and the report (stage, folder, JSON)."""

    run: str
    report: EvalReport

    @property
    def paths(self) -> set[Path]:
        return {_resolved(m.get("path")) for m in self.report.models if m.get("path")}


def _resolved(path) -> Path:
    try:
        return Path(str(path)).resolve()
    except (OSError, RuntimeError):
        return Path(str(path))


def collect_boards(runs_dir: Path) -> list[Board]:
    """The eval reports of every run of a runs folder, newest run first (a cached eval stage's report is
    listed under the run that made it, as its models are)."""
    from llmforge.runs import RunStore
    from llmforge.tui.screens.runs import newest_first

    out: list[Board] = []
    for run in newest_first(RunStore(runs_dir).list()):
        cached = {n for n, st in (run.manifest.get("stages") or {}).items() if st.get("cached_from")}
        out += [Board(run.id, rep) for rep in run_reports(run) if rep.stage not in cached]
    return out


def collect(runs_dir: Path) -> tuple[list[ModelEntry], list[Board]]:
    """What the screen shows: the models and the leaderboards, read together in the screen's worker."""
    return collect_models(runs_dir), collect_boards(runs_dir)


def board_for(entry: ModelEntry | None, boards: list[Board]) -> Board | None:
    """The leaderboard to show next to a model: the newest report that scored it (by path), else the newest
    of its own run, else (no model highlighted) the newest of all."""
    if entry is None:
        return boards[0] if boards else None
    path = _resolved(entry.path)
    return next((b for b in boards if path in b.paths), None) or next((b for b in boards if b.run == entry.run), None)


# ----------------------------------------------------------------------------------------------
# the details pane


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def scorecard(folder: Path) -> dict | None:
    """The gguf stage's report.json (`{"card", "thresholds", "failures"}`), or None when there is none."""
    return _read_json(folder / "report.json")


def _score_line(row: dict) -> str:
    tok = (
        "ok"
        if row.get("tokenization_ok", True)
        else f"differs at token {(row.get('tokenization_diff') or {}).get('at', '?')}"
    )
    kld = row.get("mean_kld", 0.0)
    kld_text = f"{kld:.4f}" if kld == 0 or abs(kld) >= 1e-3 else f"{kld:.1e}"
    return (
        f"{row.get('type', '?')}, {row.get('bpw', 0):.2f} bits/weight, PPL {row.get('ppl', 0):.3f} "
        f"({row.get('delta_ppl', 0):+.3f}), mean KLD {kld_text}, top-1 {row.get('top1', 0):.1%}, tokenizer {tok}"
    )


def scorecard_text(report: dict, highlight: Path | None = None) -> Text:
    """The parity scorecard, one line per file (lines wrap in half of an 80-column terminal; a table would
    not), the highlighted file first and in bold. The full card is report.md next to report.json."""
    card = report.get("card") or {}
    text = Text()
    text.append("parity against the HF model", style="underline")
    if isinstance(card.get("hf_ppl"), (int, float)):
        text.append(f" (HF PPL {card['hf_ppl']:.3f}, {card.get('tokens', '?')} tokens)")
    text.append("\n")
    rows = card.get("rows", [])
    rows = sorted(rows, key=lambda r: highlight is None or Path(r.get("file", "")).name != highlight.name)
    for row in rows:
        name = Path(row.get("file", "?")).name
        mine = highlight is not None and name == highlight.name
        text.append(f"{name}: ", style="bold" if mine else "")
        text.append(_score_line(row) + "\n", style="bold" if mine else "")
    return text


def leaderboard(board: Board, highlight: Path | None = None) -> Group:
    """The leaderboard of one eval report: a row per model, a column per task (its primary metric, "value ±
    stderr"), the selected model starred and the model `highlight` marked; then each gate with its verdict."""
    from rich import box
    from rich.table import Table

    rep = board.report
    selected = (rep.selected or {}).get("model")
    mine = _resolved(highlight) if highlight is not None else None
    title = Text()
    title.append(f"leaderboard of {rep.stage}", style="underline")
    title.append(f" (run {board.run})")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("model")
    tasks = [t.get("name") for t in rep.tasks if t.get("name")]
    for task in tasks:
        primary = rep.primary(str(task)) or "?"
        first = next((r for r in rep.rows() if r["task"] == task and r["metric"] == primary), None)
        arrow = "" if first is None else (" ↑" if first["higher_is_better"] else " ↓")
        n = f" n={first['n']}" if first is not None and first.get("n") is not None else ""
        table.add_column(f"{task}.{primary}{arrow}{n}", justify="right")
    for model in rep.models:
        label = str(model.get("label", "?"))
        marks = ("★ " if label == selected else "") + (
            "▶ " if mine is not None and model.get("path") and _resolved(model["path"]) == mine else ""
        )
        cells = []
        for task in tasks:
            m = rep.metric(label, str(task), rep.primary(str(task)) or "")
            cells.append(fmt_value(m.get("value"), m.get("stderr")) if m else "-")
        style = "bold" if "▶" in marks else ""
        table.add_row(Text(marks + label, style=style), *(Text(c, style=style) for c in cells))
    parts: list = [title, table]
    for gate in rep.gates:
        ok = bool(gate.get("passed"))
        line = Text("✓ " if ok else "✗ ", style="green" if ok else "red")
        line.append(str(gate.get("message") or f"{gate.get('metric')} on {gate.get('model')}"))
        parts.append(line)
    if selected:
        sel = rep.selected or {}
        parts.append(Text(f"★ selected: {selected} ({sel.get('metric')} {fmt_value(sel.get('value'))})"))
    return Group(*parts)


def describe(entry: ModelEntry, board: Board | None = None) -> Group:
    """What the details pane shows for one model."""
    lines = Text()
    lines.append(f"{entry.name}\n", style="bold")
    made = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.created)) if entry.created else "?"
    lines.append(
        f"{entry.kind}, {fmt_bytes(entry.size)}, made by stage {entry.stage} ({entry.uses}) of run "
        f"{entry.run}, {made}\n"
    )
    if entry.sources:
        lines.append(f"from {', '.join(entry.sources)}\n")
    lines.append(f"{entry.path}\n", style="dim")
    parts: list = [lines]
    if entry.kind == "model":
        cfg = _read_json(entry.path / "config.json") or {}
        arch = ", ".join(cfg.get("architectures") or []) or cfg.get("model_type", "?")
        lines.append(
            f"{arch}: {cfg.get('num_hidden_layers', '?')} layers, hidden {cfg.get('hidden_size', '?')}, "
            f"vocabulary {cfg.get('vocab_size', '?')}\n"
        )
    elif entry.kind == "adapter":
        cfg = _read_json(entry.path / "adapter_config.json") or {}
        lines.append(
            f"LoRA r={cfg.get('r', '?')} alpha={cfg.get('lora_alpha', '?')} on "
            f"{cfg.get('base_model_name_or_path', '?')}\n"
        )
    template = entry.info.get("chat_template")
    if isinstance(template, dict) and template.get("name"):
        lines.append(f"chat template {template['name']}\n")
    if isinstance(entry.info.get("final_loss"), (int, float)):
        lines.append(f"final loss {entry.info['final_loss']:.4g}\n")
    if entry.kind == "gguf":
        report = scorecard(entry.folder)
        if report is None:
            lines.append("no scorecard (the gguf stage ran with check = false)\n", style="dim")
        else:
            parts.append(scorecard_text(report, entry.path))
            for failure in report.get("failures") or []:
                parts.append(Text(f"failed: {failure}", style="red"))
        modelfile = entry.path.with_suffix(".Modelfile")
        if modelfile.is_file():
            parts.append(Text(f"Ollama: ollama create NAME -f {modelfile}", style="dim"))
    if board is not None:
        parts.append(leaderboard(board, entry.path))
    return Group(*parts)


# ----------------------------------------------------------------------------------------------
# the screen


class ModelsScreen(Screen):
    """Models the runs made (HF folders, LoRA adapters, GGUF files) with sizes and lineage; enter or c chats
    with the highlighted one."""

    DEFAULT_CSS = """
    ModelsScreen #models-table { height: auto; max-height: 40%; min-height: 3; }
    ModelsScreen #models-lower { height: 1fr; }
    ModelsScreen #models-details { width: 1fr; border: round $panel; padding: 0 1; }
    ModelsScreen ChatPanel { width: 1fr; }
    """

    HELP = """\
The models your runs made (model folders, LoRA adapters, GGUF files) with their size and where they
came from, and the eval leaderboard that scored the highlighted one (l shows the next leaderboard).
Chat with one: it loads when you send the first message. In the message field, enter sends, escape
stops an answer (or leaves the field), ctrl+r starts a new conversation."""

    BINDINGS = [
        Binding("c", "chat", "Chat with it", tooltip="chat with the highlighted model (enter too)"),
        Binding("r", "reload", "Refresh", tooltip="read the runs again"),
        Binding("l", "next_board", "Leaderboards", tooltip="show the next eval leaderboard (newest run first)"),
    ]

    def __init__(self, app_state, **kw):
        super().__init__(**kw)
        self.state = app_state
        self.entries: list[ModelEntry] = []
        self.boards: list[Board] = []
        #: the leaderboard `l` chose, shown instead of the highlighted model's until the highlight moves
        self.board_pick: int | None = None

    def compose(self) -> ComposeResult:
        table: DataTable[str] = DataTable(id="models-table", cursor_type="row", zebra_stripes=True)
        for label, key in (
            ("kind", "kind"),
            ("name", "name"),
            ("size", "size"),
            ("run", "run"),
            ("stage", "stage"),
            ("from", "from"),
        ):
            table.add_column(label, key=key)
        yield table
        with Horizontal(id="models-lower"):
            with VerticalScroll(id="models-details"):
                yield Static("", id="models-detail-text")
            yield ChatPanel(id="models-chat")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).focus()

    def on_screen_resume(self) -> None:
        self.action_reload()

    # ---- the list ------------------------------------------------------------------------------
    def action_reload(self) -> None:
        self._load()

    @work(exclusive=True, group="models-list")
    async def _load(self) -> None:
        found = await read_runs_dir(self, collect, self.state.runs_dir)
        if found is not None:
            self.boards = found[1]
            self._show(found[0])

    def _show(self, entries: list[ModelEntry]) -> None:
        table = self.query_one(DataTable)
        current = self.highlighted
        if [e.key for e in entries] != [e.key for e in self.entries]:
            table.clear()
            for e in entries:
                table.add_row(
                    e.kind,
                    e.name,
                    fmt_bytes(e.size),
                    e.run,
                    f"{e.stage} ({e.uses})",
                    ", ".join(e.sources) or "-",
                    key=e.key,
                )
        self.entries = entries
        if current is not None and any(e.key == current.key for e in entries):
            table.move_cursor(row=table.get_row_index(current.key))
        self._details()

    @property
    def highlighted(self) -> ModelEntry | None:
        row = self.query_one(DataTable).cursor_row
        return self.entries[row] if 0 <= row < len(self.entries) else None

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.board_pick = None
        self._details()

    @property
    def board(self) -> Board | None:
        """The leaderboard shown: the one `l` picked, else the highlighted model's."""
        if self.board_pick is not None and self.board_pick < len(self.boards):
            return self.boards[self.board_pick]
        return board_for(self.highlighted, self.boards)

    def action_next_board(self) -> None:
        if not self.boards:
            self.notify("no eval reports in these runs: an `eval` stage writes one", markup=False)
            return
        current = self.board
        at = self.boards.index(current) if current in self.boards else -1
        self.board_pick = (at + 1) % len(self.boards)
        self._details()

    def _details(self) -> None:
        entry = self.highlighted
        detail = self.query_one("#models-detail-text", Static)
        board = self.board
        if entry is None:
            empty = Text(f"no models in {self.state.runs_dir} yet: training, merge and gguf stages make them")
            detail.update(Group(empty, leaderboard(board)) if board is not None else empty)
            return
        try:
            detail.update(describe(entry, board))
        except OSError as exc:  # the folder went away under us
            detail.update(Text(f"cannot read {entry.path}: {exc}"))

    # ---- chat ----------------------------------------------------------------------------------
    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_chat()

    def action_chat(self) -> None:
        entry = self.highlighted
        if entry is None:
            return
        chat = self.query_one(ChatPanel)
        chat.set_model(entry.path, f"{entry.name} ({entry.kind}, run {entry.run})")
        chat.focus_input()

    # ---- errors --------------------------------------------------------------------------------
