"""Training data: readers (file types) and row formats (schemas) are plugins; this module ties them
together: find the files, read them, detect or apply the row format, normalise every row, and report
a bad row by file, line and field (`data/chat.jsonl:17: messages[2].role: expected one of ...`).

Normalised rows have one of three shapes, named by the format's ``kind``:

* ``text``:       ``{"text": str}``
* ``chat``:       ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}``
  (at least one assistant message with content: a chat row is only kept if there is something to train on)
* ``preference``: ``{"prompt": [messages...], "chosen": [messages...], "rejected": [messages...]}``
  (the prompt's messages end with a user turn, or a tool result; chosen/rejected hold the assistant
  answer(s) and nothing else)

Where a row comes from is written `file:line` for line-based files (1-based, as an editor shows it)
and `file:row N` for columnar ones (parquet, saved HF datasets; 0-based, as `dataset[N]` finds it).
Paths are shown as the user wrote them (relative to forge.toml), not as absolute paths.

`iter_rows` streams ``(where, normalised row)``; `iter_records` streams the same rows as `SourceRow`s,
each with the raw row it was read as, so that curation can write a row back as it came in (every
column kept) with only the texts a rewrite changed replaced (`restore_row`, over each format's
`RowFormat.restore`).

No torch here: this module is imported by validation and by `llmforge data` commands.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from llmforge.errors import DataError
from llmforge.extension import ExtensionPoint, subclass_of
from llmforge.stage import Input, StageOptions

KINDS = ("text", "chat", "preference")
ROLES = ("system", "user", "assistant", "tool")

_SKIP_HINT = 'fix the row, or set on_bad_row = "skip" to skip bad rows and get a report'


class RowError(Exception):
    """Raised by RowFormat.normalize: what is wrong and in which field (`messages[2].role`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Record:
    """One raw row as read from a file. `where` is `path:line` (text formats) or `path:row N`.
    A reader that cannot parse a row yields it with `error` set instead of failing the file, so that
    on_bad_row = "skip" can go on. A reader that cannot go on at all (a broken JSON document, an
    unreadable parquet file) raises DataError naming the file instead."""

    data: dict
    where: str
    error: str | None = None


class Reader:
    """Reads one kind of file (or folder) into Records. Registered with `register_readers`.

    `read` should be a generator that yields records as it reads them: training files can be far
    larger than memory is comfortable with, and `limit` stops reading early."""

    name: ClassVar[str] = ""
    suffixes: ClassVar[tuple[str, ...]] = ()

    def matches(self, path: Path) -> bool:
        return path.is_file() and path.name.lower().endswith(self.suffixes)

    def read(self, path: Path, options: DataOptions) -> Iterator[Record]:  # pragma: no cover - abstract
        raise NotImplementedError


class RowFormat:
    """A row schema: recognises its columns and normalises a row. Registered with `register_row_formats`."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "chat"  # one of KINDS
    columns: ClassVar[tuple[str, ...]] = ()  # the columns that identify the format
    #: every column ``normalize`` reads (default: ``columns``); the others are the row's own extras
    fields: ClassVar[tuple[str, ...]] = ()
    priority: ClassVar[int] = 0  # when several formats match a row's columns, the highest wins

    def detect(self, columns: set[str]) -> bool:
        return bool(self.columns) and set(self.columns) <= columns

    def normalize(self, row: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def restore(self, raw: dict, old: dict, new: dict) -> dict:
        """``raw`` (a row of this format, its columns under our names) with the texts that a rewrite
        changed from ``old`` (``normalize(raw)``) to ``new`` written back into the columns they came
        from; every other column and key stays as it is. Used to write curated rows back as they came
        in (`llmforge data filter`, the curate stage).

        This default finds each changed text as a string value somewhere in the row and replaces it:
        right for formats whose texts are copied from the row unchanged. A format that joins or
        reshapes texts (alpaca's instruction and input in one turn) overrides it; a text it cannot
        place is a RowError, never a silently dropped change."""
        out = copy_row(raw)
        leaves = _string_leaves(out)
        used: set[int] = set()
        cursor = 0  # texts are found in the row's order, so that equal texts each find their own value
        for before, after in zip(texts_of(old), texts_of(new)):
            at = next((i for i in range(cursor, len(leaves)) if i not in used and leaves[i][2] == before), None)
            if at is None:
                at = next((i for i in range(len(leaves)) if i not in used and leaves[i][2] == before), None)
            if at is None:
                if before == after:
                    continue
                raise RowError(
                    "",
                    f"cannot write a rewritten text back into the {self.name} columns "
                    f"(it is not one of the row's values); the row format needs a restore method",
                )
            used.add(at)
            cursor = at + 1
            if before != after:
                container, key, _ = leaves[at]
                container[key] = after
        return out


def _row_format_rules(cls: type[RowFormat]) -> None:
    if cls.kind not in KINDS:
        raise TypeError(f"{cls.__qualname__}.kind must be one of {KINDS}, not {cls.kind!r}")


# The extension points of this module's two base classes (declared by the core in llmforge.execution).
READERS = ExtensionPoint(
    hook="register_readers",
    table="readers",
    label="reader",
    doc="""Register data readers: :class:`llmforge.data.Reader` subclasses, one per file type.

    A reader turns a file (``.jsonl``, ``.parquet``, ...) or a folder it recognises (a saved
    Hugging Face dataset) into raw records, each located by ``file:line`` or ``file:row N``.
    """,
    validate=subclass_of(Reader, instantiate=True),
)

ROW_FORMATS = ExtensionPoint(
    hook="register_row_formats",
    table="row_formats",
    label="row format",
    doc="""Register row formats: :class:`llmforge.data.RowFormat` subclasses.

    A row format recognises its columns (for ``format = "auto"``) and normalises a raw row into one
    of the shapes training stages consume (text, chat messages, preference pairs), raising
    :class:`llmforge.data.RowError` with the field that is wrong.
    """,
    validate=subclass_of(RowFormat, instantiate=True, check=_row_format_rules),
)


def copy_row(value: Any) -> Any:
    """A copy of a row's lists and dicts (not of the values in them), so that a restore can edit it."""
    if isinstance(value, dict):
        return {k: copy_row(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [copy_row(v) for v in value]
    return value


def texts_of(row: dict) -> list[str]:
    """Every text of a normalised row, in order: the text, or each turn's content (prompt, chosen, rejected)."""
    if "messages" in row:
        return [m["content"] for m in row["messages"]]
    if "chosen" in row:
        return [m["content"] for key in ("prompt", "chosen", "rejected") for m in row[key]]
    return [row["text"]]


def _shape(row: dict) -> list:
    if "messages" in row:
        return ["messages", [m["role"] for m in row["messages"]]]
    if "chosen" in row:
        return [[m["role"] for m in row[k]] for k in ("prompt", "chosen", "rejected")]
    return sorted(row)


def _string_leaves(container: Any, out: list | None = None) -> list[tuple[Any, Any, str]]:
    """(container, key, value) of every string in a row, depth first, in order."""
    out = [] if out is None else out
    items = (
        container.items()
        if isinstance(container, dict)
        else enumerate(container)
        if isinstance(container, list)
        else ()
    )
    for key, value in items:
        if isinstance(value, str):
            out.append((container, key, value))
        elif isinstance(value, (dict, list)):
            _string_leaves(value, out)
    return out


class DataOptions(StageOptions):
    """Where training data comes from and how to read it; embedded as `data` in training stages."""

    path: Annotated[str | list[str], Input("dataset", "files")] = Field(
        description="A file, a folder, or a list of them (relative to forge.toml), or an @stage reference."
    )
    format: str = Field(
        "auto",
        description="Row format (text, alpaca, sharegpt, messages, preference, ...) "
        "or auto to detect it from the columns.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="Column mapping for odd names: {format_column = your_column}."
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="Stop at the first bad row, or skip and report bad rows."
    )
    text_split: Literal["file", "blank_line", "line"] = Field(
        "blank_line", description=".txt files: one document per file, per blank-line block, or per line."
    )
    limit: int | None = Field(None, ge=1, description="Read at most this many rows (quick experiments).")


@dataclass
class Dataset:
    kind: str
    format: str
    rows: list[dict]
    wheres: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where, reason)
    files: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def report(self) -> dict:
        return {
            "kind": self.kind,
            "format": self.format,
            "rows": len(self.rows),
            "files": self.files,
            "skipped": len(self.skipped),
            "first_skipped": [f"{w}: {r}" for w, r in self.skipped[:20]],
        }

    def summary(self) -> str:
        """One line for a stage's log: what was read, and what was skipped (with the first reason)."""
        n_files = len(self.files)
        text = (
            f"{len(self.rows)} {self.kind} rows ({self.format} format) from {n_files} file{'s' if n_files != 1 else ''}"
        )
        if self.skipped:
            w, r = self.skipped[0]
            text += f"; {len(self.skipped)} bad row{'s' if len(self.skipped) != 1 else ''} skipped, first: {w}: {r}"
        return text


# ------------------------------------------------------------------------------------------------
# finding files
# ------------------------------------------------------------------------------------------------


def _paths(options: DataOptions, base: Path | None) -> list[tuple[Path, str]]:
    """(real path, the path as the user wrote it) for each entry of options.path."""
    raw = options.path if isinstance(options.path, list) else [options.path]
    out = []
    for p in raw:
        path = Path(p).expanduser()
        shown = str(Path(p))
        if not path.is_absolute() and base is not None:
            path = base / path
        out.append((path, shown))
    return out


def _reader_for(path: Path, readers: dict[str, Reader]) -> Reader | None:
    for reader in readers.values():
        if reader.matches(path):
            return reader
    return None


def _natural_key(name: str) -> tuple:
    # "part2" before "part10": shards and numbered files are read in the order a person expects.
    parts = re.split(r"(\d+)", name.lower())
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name


def _walk(folder: Path, readers: dict[str, Reader], seen: set[Path]) -> Iterator[tuple[Path, Reader]]:
    real = folder.resolve()
    if real in seen:  # a symlink loop must not make us read forever
        return
    seen.add(real)
    children = [c for c in folder.iterdir() if not c.name.startswith(".")]  # .git, .cache, editor files
    for child in sorted(children, key=lambda c: _natural_key(c.name)):
        reader = _reader_for(child, readers)
        if reader is not None:
            # A folder a reader claims (a saved HF dataset) is read as one; its own files
            # (state.json, *.arrow) are not data files of ours.
            yield child, reader
        elif child.is_dir():
            yield from _walk(child, readers, seen)


def _known(readers: dict[str, Reader]) -> str:
    return ", ".join(s for r in readers.values() for s in r.suffixes)


def iter_files(paths: list[Path], readers: dict[str, Reader]) -> Iterator[tuple[Path, Reader]]:
    """Every readable file under the given paths, in a stable order: each path in the order given,
    a folder's entries in natural name order (subfolders in place, hidden entries skipped). A folder
    that a reader claims as a whole (a saved HF dataset) is read as one; other folders are walked."""
    for path in paths:
        if not path.exists():
            raise DataError(f"{path}: file not found")
        reader = _reader_for(path, readers)
        if reader is not None:
            yield path, reader
            continue
        if path.is_dir():
            found = False
            for item in _walk(path, readers, set()):
                found = True
                yield item
            if not found:
                raise DataError(
                    f"{path}: no readable data files (known: {_known(readers)}, or a saved Hugging Face dataset folder)"
                )
            continue
        raise DataError(f"{path}: no reader for this file type (known: {_known(readers)})")


# ------------------------------------------------------------------------------------------------
# formats
# ------------------------------------------------------------------------------------------------


def _detect(columns: set[str], formats: dict[str, RowFormat], expect: tuple[str, ...]) -> RowFormat | None:
    matches = [f for f in formats.values() if f.detect(columns)]
    if not matches:
        return None
    # A format the stage can use beats one it cannot (a row with both `text` and `messages` is chat
    # data for SFT); then the format's own priority decides.
    return max(matches, key=lambda f: (f.kind in expect, f.priority))


def _detect_hint(formats: dict[str, RowFormat]) -> str:
    known = "; ".join(f"{f.name}: {', '.join(f.columns)}" for f in formats.values() if f.columns)
    return (
        f"set `format =` to one of {', '.join(sorted(formats))} and, for odd column names, "
        f'`columns = {{format_column = "your_column"}}` (columns each format looks for: {known})'
    )


def _check_kind(fmt: RowFormat, expect: tuple[str, ...], where: str) -> None:
    if fmt.kind not in expect:
        raise DataError(
            f"{where}: rows are in the {fmt.name} format ({fmt.kind} data), this stage needs "
            f"{' or '.join(expect)} data",
            hint="point `path` at data of the right kind, or set `format =` if the detection is wrong",
        )


def _renamer(columns: dict[str, str]) -> Callable[[dict], dict]:
    """Apply `columns = {ours = theirs}` to a raw row. A column that already carries one of our names
    but was mapped away is dropped, so the user's mapping always wins over a coincidental name."""
    if not columns:
        return lambda row: row
    inverse = {theirs: ours for ours, theirs in columns.items()}

    def rename(row: dict) -> dict:
        out = {}
        for k, v in row.items():
            if k in inverse:
                out[inverse[k]] = v
            elif k not in columns:
                out[k] = v
        return out

    return rename


def _user_field(field_path: str, columns: dict[str, str]) -> str:
    """`messages[2].role` -> `dialog[2].role` when the user mapped messages = "dialog": an error
    must name the column as it is in the user's file."""
    m = re.match(r"[^.\[]+", field_path)
    if m and m.group(0) in columns:
        return columns[m.group(0)] + field_path[m.end() :]
    return field_path


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------


FIRST_SKIPPED = 20  # bad rows whose reasons a ReadState keeps (all are counted)


@dataclass
class ReadState:
    """What reading found: the data's kind and format, the files, and the bad rows (counted; the first
    ones kept with their reasons, all of them passed to ``on_skip``)."""

    kind: str | None = None
    format: str | None = None
    files: list[str] = field(default_factory=list)
    rows: int = 0
    skipped: int = 0
    first_skipped: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "format": self.format,
            "files": self.files,
            "rows": self.rows,
            "skipped": self.skipped,
            "first_skipped": self.first_skipped,
        }


@dataclass(slots=True)  # one per row read: slots, not frozen (frozen dataclasses are slower to build)
class SourceRow:
    """One row of the stream with what it came from: ``raw`` is the row as the reader read it (every
    column, in the file's order, under the file's column names), ``row`` its normalised shape,
    ``fmt`` and ``columns`` the row format and column mapping that turned one into the other.
    :func:`restore_row` writes a rewritten ``row`` back into ``raw``."""

    where: str
    row: dict
    raw: dict
    fmt: RowFormat
    columns: dict[str, str] = field(default_factory=dict)


#: A hidden file in a dataset folder llmforge wrote (the curate stage's dataset artifact) that says how
#: its rows are read: ``{"format": ..., "columns": {...}}``, the source's settings. The rows are kept as
#: they came in, so a stage reading ``@curate`` needs them; hidden, so no reader takes it for data.
DATASET_META = ".llmforge-data.json"


def write_dataset_meta(folder: Path, fmt: str, columns: dict[str, str]) -> None:
    from llmforge.runs import atomic_write_text

    atomic_write_text(folder / DATASET_META, json.dumps({"format": fmt, "columns": columns}, indent=2) + "\n")


def _dataset_meta(options: DataOptions, base: Path | None) -> DataOptions:
    """``options`` with the format and column mapping of a dataset folder llmforge wrote, where the
    user left them at their defaults (``format = "auto"``, no ``columns``) and every path is one."""
    if options.format != "auto" or options.columns:
        return options
    metas = []
    for path, _ in _paths(options, base):
        try:
            meta = json.loads((path / DATASET_META).read_text(encoding="utf-8")) if path.is_dir() else None
        except (OSError, ValueError):
            meta = None
        if not isinstance(meta, dict):
            return options
        metas.append(meta)
    fmts = {m.get("format") for m in metas}
    cols = [m.get("columns") or {} for m in metas]
    if len(fmts) != 1 or any(c != cols[0] for c in cols) or not isinstance(cols[0], dict):
        return options
    return options.model_copy(update={"format": fmts.pop() or "auto", "columns": dict(cols[0])})


def restore_row(src: SourceRow, new: dict) -> dict:
    """The row to write for ``src`` once curation steps made ``new`` of its normalised row: ``src.raw``
    itself when nothing changed, else ``src.raw`` with only the rewritten texts replaced (in the
    columns they came from, under the user's column names). Every other column, key and value is
    kept, in its order. A rewrite that changed more than texts (added or removed a turn) is a
    DataError naming the row: such a row cannot be written back as it came in."""
    if new == src.row:
        return src.raw
    if _shape(new) != _shape(src.row):
        raise DataError(
            f"{src.where}: a rewrite step changed the row's turns or keys, not only its texts; "
            f"the row cannot be written back in its own columns",
            hint="rewrite steps may change texts (a text, the turns' contents), not the structure",
        )
    inverse = {theirs: ours for ours, theirs in src.columns.items()}
    # The row under our column names, in the file's order; a column that carries one of our names but
    # was mapped away is not the format's (the reader of the file did not use it), so it stays aside.
    ours = {inverse.get(k, k): v for k, v in src.raw.items() if k in inverse or k not in src.columns}
    try:
        restored = src.fmt.restore(ours, src.row, new)
    except RowError as exc:
        raise DataError(f"{src.where}: {exc}") from None
    out = {}
    for key, value in src.raw.items():
        if key in inverse:
            out[key] = restored.get(inverse[key], value)
        elif key in src.columns:
            out[key] = value
        else:
            out[key] = restored.get(key, value)
    for key, value in restored.items():  # a column the format filled in that the row did not have
        if src.columns.get(key, key) not in out:
            out[src.columns.get(key, key)] = value
    return out


def normalised_with_extras(src: SourceRow) -> dict:
    """The row in its normalised shape, followed by the columns its format does not read (ids,
    metadata): what a file that mixes row formats holds, since one file is read with one format."""
    used = {src.columns.get(c, c) for c in (src.fmt.fields or src.fmt.columns)} if src.fmt is not None else set()
    return {**src.row, **{k: v for k, v in src.raw.items() if k not in used and k not in src.row}}


def iter_rows(
    options: DataOptions,
    readers: dict[str, Reader],
    formats: dict[str, RowFormat],
    base: Path | None = None,
    expect: tuple[str, ...] = KINDS,
    state: ReadState | None = None,
    on_skip: Callable[[str, str], None] | None = None,
    on_row_error: Callable[[str, str], None] | None = None,
) -> Iterator[tuple[str, dict]]:
    """Yield ``(where, normalised row)`` for every row of the data, in file order.

    ``readers`` and ``formats`` are the registry's tables (``registry.readers``, ``registry.row_formats``);
    ``base`` is the folder relative paths are read from (forge.toml's).

    Bad rows stop the stream with a DataError naming file, line and field (``on_bad_row = "error"``),
    or are counted in ``state`` and passed to ``on_skip(where, reason)`` (``"skip"``). With
    ``on_row_error``, rows the row format rejects (a missing assistant turn, identical chosen and
    rejected) go there instead, whatever the policy: that is how `data lint` reports them. Finding
    no usable row at all is an error, as for a training stage.
    """
    for src in iter_records(options, readers, formats, base, expect, state, on_skip, on_row_error):
        yield src.where, src.row


def iter_records(
    options: DataOptions,
    readers: dict[str, Reader],
    formats: dict[str, RowFormat],
    base: Path | None = None,
    expect: tuple[str, ...] = KINDS,
    state: ReadState | None = None,
    on_skip: Callable[[str, str], None] | None = None,
    on_row_error: Callable[[str, str], None] | None = None,
) -> Iterator[SourceRow]:
    """:func:`iter_rows`, each row as a :class:`SourceRow`: with the raw row it was read as, so that
    curation can write rows back with all their columns."""
    options = _dataset_meta(options, base)
    state = state if state is not None else ReadState()
    fmt: RowFormat | None = None
    detected_at = ""
    if options.format != "auto":
        fmt = formats.get(options.format)
        if fmt is None:
            from llmforge.schema import did_you_mean

            raise DataError(
                f"unknown data format '{options.format}'{did_you_mean(options.format, formats)}",
                hint=f"installed: {', '.join(sorted(formats))}",
            )
        _check_kind(fmt, expect, f'format = "{fmt.name}"')
        state.kind, state.format = fmt.kind, fmt.name
    rename = _renamer(options.columns)
    first_reason: list[tuple[str, str]] = []

    def bad(where: str, reason: str, hint: str = _SKIP_HINT) -> None:
        if options.on_bad_row == "error":
            raise DataError(f"{where}: {reason}", hint=hint)
        state.skipped += 1
        if len(state.first_skipped) < FIRST_SKIPPED:
            state.first_skipped.append(f"{where}: {reason}")
        if not first_reason:
            first_reason.append((where, reason))
        if on_skip is not None:
            on_skip(where, reason)

    def located(root: Path, shown_root: str) -> Iterator[tuple[Path, Reader]]:
        try:
            yield from iter_files([root], readers)
        except DataError as exc:
            raise DataError(exc.message.replace(str(root), shown_root, 1), exc.hint) from None

    for root, shown_root in _paths(options, base):
        for path, reader in located(root, shown_root):
            real = str(path)
            shown = shown_root if path == root else str(Path(shown_root) / path.relative_to(root))

            # Used only while this file is read, inside this loop turn: the loop variables are the right ones.
            def here(where: str) -> str:
                return shown + where[len(real) :] if where.startswith(real) else where  # noqa: B023

            state.files.append(shown)
            seen_in_file = 0
            records = reader.read(path, options)
            try:
                for rec in records:
                    seen_in_file += 1
                    where = here(rec.where)
                    if rec.error is not None:
                        bad(where, rec.error)
                        continue
                    data = rename(rec.data)
                    if fmt is None:
                        fmt = _detect(set(data), formats, expect)
                        if fmt is None:
                            bad(
                                where,
                                f"cannot tell the row format from the columns {sorted(data)}",
                                _detect_hint(formats),
                            )
                            continue
                        detected_at = where
                        _check_kind(fmt, expect, where)
                        state.kind, state.format = fmt.kind, fmt.name
                    try:
                        norm = fmt.normalize(data)
                    except RowError as exc:
                        reason = str(RowError(_user_field(exc.field, options.columns), exc.message))
                        if options.format == "auto" and not fmt.detect(set(data)):
                            other = _detect(set(data), formats, expect)
                            if other is not None and other is not fmt:
                                reason += (
                                    f" (this row looks like the {other.name} format, but the data's format "
                                    f"is {fmt.name}, detected at {detected_at}; one dataset has one format)"
                                )
                        if on_row_error is not None:
                            on_row_error(where, reason)
                        else:
                            bad(where, reason)
                        continue
                    state.rows += 1
                    yield SourceRow(where, norm, rec.data, fmt, options.columns)
                    if options.limit and state.rows >= options.limit:
                        return
            except DataError as exc:
                raise DataError(here(exc.message), exc.hint) from None
            except (OSError, EOFError) as exc:
                raise DataError(f"{shown}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
            finally:
                close = getattr(records, "close", None)
                if close is not None:
                    close()
            if seen_in_file == 0:
                bad(shown, "empty file (no rows)", "remove the file or fill it")
    if state.rows == 0 and on_row_error is None:
        where = ", ".join(state.files) or str(options.path)
        if first_reason:
            w, r = first_reason[0]
            raise DataError(
                f"{where}: no usable rows ({state.skipped} bad row{'s' if state.skipped != 1 else ''} "
                f"skipped; first: {w}: {r})",
                hint='see the reasons above; `on_bad_row = "error"` stops at the first bad row',
            )
        raise DataError(f"{where}: no usable rows")


def load_data(
    options: DataOptions,
    readers: dict[str, Reader],
    formats: dict[str, RowFormat],
    base: Path | None = None,
    expect: tuple[str, ...] = KINDS,
) -> Dataset:
    """Read and normalise every row into memory; raise DataError (exit 2) naming file, line and field.

    `expect` lists the kinds the caller can train on (SFT: chat; DPO: preference; pretraining: text);
    it also breaks ties in format detection. With on_bad_row = "skip", bad rows (and empty files) are
    counted and kept in `Dataset.skipped` instead; finding no usable row at all is still an error.
    The rules are `iter_rows`'s: this is that stream, kept in a list.
    """
    state = ReadState()
    rows: list[dict] = []
    wheres: list[str] = []
    skipped: list[tuple[str, str]] = []
    for where, row in iter_rows(
        options, readers, formats, base, expect, state, on_skip=lambda w, r: skipped.append((w, r))
    ):
        rows.append(row)
        wheres.append(where)
    # iter_rows ends with a DataError when no row comes, and sets both as it reads the first one.
    assert state.kind is not None and state.format is not None
    return Dataset(kind=state.kind, format=state.format, rows=rows, wheres=wheres, skipped=skipped, files=state.files)


def write_report(dataset: Dataset, directory: Path) -> Path:
    """The data report of a stage: counts and the skipped rows with their reasons."""
    from llmforge.runs import atomic_write_text

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "data-report.json"
    report = dataset.report()
    report["skipped_rows"] = [{"where": w, "reason": r} for w, r in dataset.skipped]
    atomic_write_text(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return path


# ------------------------------------------------------------------------------------------------
# helpers for row formats
# ------------------------------------------------------------------------------------------------


def describe(value: Any) -> str:
    """A value as an error message shows it: short scalars as JSON (`"usr"`, `42`, `null`), containers
    by their JSON type. The user wrote JSON (or CSV), so Python type names would not help them."""
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value)
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 42 else text[:40] + '…"'
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def content_text(value: Any, field: str) -> str:
    """A message's content as a string. OpenAI-style content parts (`[{"type": "text", "text": ...}]`)
    are joined; anything else that is not a string (numbers, null, images) is a RowError."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                got = describe(part.get("type")) + " part" if isinstance(part, dict) else describe(part)
                raise RowError(f"{field}[{i}]", f'expected a text part ({{"type": "text", "text": ...}}), got {got}')
            texts.append(part["text"])
        return "".join(texts)
    raise RowError(field, f"expected a string, got {describe(value)}")


def check_messages(messages: Any, field: str = "messages", *, assistant: bool = False) -> list[dict]:
    """Validate a list of chat messages; raise RowError naming the first bad field.

    Roles are matched without regard to case or surrounding spaces. With `assistant=True` the list
    must hold an assistant message with some content: a chat row with nothing to train on is bad.
    Returns fresh `{"role", "content"}` dicts (other keys are dropped).
    """
    if not isinstance(messages, list):
        raise RowError(field, f"expected a list of messages, got {describe(messages)}")
    if not messages:
        raise RowError(field, "empty list of messages")
    out = []
    for i, m in enumerate(messages):
        here = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise RowError(here, f"expected an object with role and content, got {describe(m)}")
        if "role" not in m:
            raise RowError(f"{here}.role", "missing")
        role = m["role"]
        key = role.strip().lower() if isinstance(role, str) else None
        if key not in ROLES:
            raise RowError(f"{here}.role", f"expected one of {'/'.join(ROLES)}, got {describe(role)}")
        if "content" not in m:
            raise RowError(f"{here}.content", "missing")
        out.append({"role": key, "content": content_text(m["content"], f"{here}.content")})
    if assistant:
        require_assistant(out, field)
    return out


def require_assistant(messages: list[dict], field: str = "messages") -> None:
    """RowError unless a (normalised) message list has an assistant turn with some content."""
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise RowError(field, "no assistant turn to train on")
