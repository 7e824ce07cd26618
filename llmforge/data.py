"""Training data: readers (file types) and row formats (schemas) are plugins; this module ties them
together: find the files, read them, detect or apply the row format, normalise every row, and report
a bad row by file, line and field (`data/chat.jsonl:17: messages[2].role: expected one of ...`).

Normalised rows have one of three shapes, named by the format's ``kind``:

* ``text``:       ``{"text": str}``
* ``chat``:       ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}``
* ``preference``: ``{"prompt": [messages...], "chosen": [messages...], "rejected": [messages...]}``
  (the prompt's messages end with a user turn; chosen/rejected hold the assistant answer(s))

No torch here: this module is imported by validation and by `llmforge data` commands.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Iterator, Literal

from pydantic import Field

from llmforge.errors import DataError
from llmforge.stage import Input, StageOptions

KINDS = ("text", "chat", "preference")
ROLES = ("system", "user", "assistant", "tool")


class RowError(Exception):
    """Raised by RowFormat.normalize: what is wrong and in which field (`messages[2].role`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Record:
    """One raw row as read from a file. `where` is `path:line` (text formats) or `path:row N`.
    A reader that cannot parse a row yields it with `error` set instead of failing the file."""

    data: dict
    where: str
    error: str | None = None


class Reader:
    """Reads one kind of file (or folder) into Records. Registered with `register_readers`."""

    name: ClassVar[str] = ""
    suffixes: ClassVar[tuple[str, ...]] = ()

    def matches(self, path: Path) -> bool:
        return path.is_file() and path.name.lower().endswith(self.suffixes)

    def read(self, path: Path, options: "DataOptions") -> Iterator[Record]:  # pragma: no cover - abstract
        raise NotImplementedError


class RowFormat:
    """A row schema: recognises its columns and normalises a row. Registered with `register_row_formats`."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "chat"  # one of KINDS
    columns: ClassVar[tuple[str, ...]] = ()  # the columns that identify the format
    priority: ClassVar[int] = 0  # when several formats match a row's columns, the highest wins

    def detect(self, columns: set[str]) -> bool:
        return bool(self.columns) and set(self.columns) <= columns

    def normalize(self, row: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError


class DataOptions(StageOptions):
    """Where training data comes from and how to read it; embedded as `data` in training stages."""

    path: Annotated[str | list[str], Input("dataset", "files")] = Field(
        description="A file, a folder, or a list of them (relative to forge.toml), or an @stage reference.")
    format: str = Field("auto", description="Row format (text, alpaca, sharegpt, messages, preference, ...) "
                                            "or auto to detect it from the columns.")
    columns: dict[str, str] = Field(default_factory=dict,
                                    description="Column mapping for odd names: {format_column = your_column}.")
    on_bad_row: Literal["error", "skip"] = Field("error", description="Stop at the first bad row, or skip and "
                                                                      "report bad rows.")
    text_split: Literal["file", "blank_line", "line"] = Field(
        "blank_line", description=".txt files: one document per file, per blank-line block, or per line.")
    limit: int | None = Field(None, ge=1, description="Read at most this many rows (quick experiments).")


@dataclass
class Dataset:
    kind: str
    format: str
    rows: list[dict]
    wheres: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where, reason)
    files: list[str] = field(default_factory=list)

    def report(self) -> dict:
        return {"kind": self.kind, "format": self.format, "rows": len(self.rows), "files": self.files,
                "skipped": len(self.skipped), "first_skipped": [f"{w}: {r}" for w, r in self.skipped[:20]]}


def _paths(options: DataOptions, base: Path | None) -> list[Path]:
    raw = options.path if isinstance(options.path, list) else [options.path]
    out = []
    for p in raw:
        path = Path(p)
        if not path.is_absolute() and base is not None:
            path = base / path
        out.append(path)
    return out


def _reader_for(path: Path, readers: dict[str, Reader]) -> Reader | None:
    for reader in readers.values():
        if reader.matches(path):
            return reader
    return None


def iter_files(paths: list[Path], readers: dict[str, Reader]) -> Iterator[tuple[Path, Reader]]:
    """Every readable file under the given paths, in a stable order. A folder that a reader claims
    as a whole (a saved HF dataset) is read as one; other folders are walked."""
    for path in paths:
        if not path.exists():
            raise DataError(f"{path}: file not found")
        reader = _reader_for(path, readers)
        if reader is not None:
            yield path, reader
            continue
        if path.is_dir():
            found = False
            for child in sorted(p for p in path.rglob("*") if not any(x.startswith(".") for x in p.parts[-1:])):
                if child.is_file() and (r := _reader_for(child, readers)) is not None:
                    found = True
                    yield child, r
            if not found:
                raise DataError(f"{path}: no readable data files (known: "
                                f"{', '.join(s for r in readers.values() for s in r.suffixes)})")
            continue
        raise DataError(f"{path}: no reader for this file type (known: "
                        f"{', '.join(s for r in readers.values() for s in r.suffixes)})")


def pick_format(columns: set[str], formats: dict[str, RowFormat], where: str) -> RowFormat:
    matches = [f for f in formats.values() if f.detect(columns)]
    if not matches:
        raise DataError(f"{where}: cannot tell the row format from the columns {sorted(columns)}",
                        hint="set `format =` (" + ", ".join(sorted(formats)) + ") and, for odd column names, "
                             "`columns = {format_column = \"your_column\"}`")
    return max(matches, key=lambda f: f.priority)


def load_data(options: DataOptions, base: Path | None = None, registry=None,
              expect: tuple[str, ...] = KINDS) -> Dataset:
    """Read and normalise every row; raise DataError (exit 2) naming file, line and field.

    `expect` lists the kinds the caller can train on (SFT: chat; DPO: preference; pretraining: text).
    With on_bad_row = "skip", bad rows are counted and kept in `Dataset.skipped` instead.
    """
    from llmforge.plugins import get_registry

    registry = registry or get_registry()
    readers, formats = registry.readers, registry.row_formats
    fmt: RowFormat | None = None
    if options.format != "auto":
        fmt = formats.get(options.format)
        if fmt is None:
            from llmforge.schema import did_you_mean

            raise DataError(f"unknown data format '{options.format}'{did_you_mean(options.format, formats)}",
                            hint=f"installed: {', '.join(sorted(formats))}")
    inverse = {theirs: ours for ours, theirs in options.columns.items()}
    rows: list[dict] = []
    wheres: list[str] = []
    skipped: list[tuple[str, str]] = []
    files: list[str] = []

    def bad(where: str, reason: str) -> None:
        if options.on_bad_row == "error":
            raise DataError(f"{where}: {reason}",
                            hint="fix the row, or set on_bad_row = \"skip\" to skip bad rows and get a report")
        skipped.append((where, reason))

    for path, reader in iter_files(_paths(options, base), readers):
        files.append(str(path))
        seen_in_file = 0
        for rec in reader.read(path, options):
            seen_in_file += 1
            if rec.error is not None:
                bad(rec.where, rec.error)
                continue
            data = {inverse.get(k, k): v for k, v in rec.data.items()} if inverse else rec.data
            row_fmt = fmt or pick_format(set(data), formats, rec.where)
            if fmt is None:
                fmt = row_fmt  # one dataset, one format: detected on the first row
            try:
                norm = row_fmt.normalize(data)
            except RowError as exc:
                bad(rec.where, str(exc))
                continue
            rows.append(norm)
            wheres.append(rec.where)
            if options.limit and len(rows) >= options.limit:
                break
        if seen_in_file == 0:
            raise DataError(f"{path}: empty file (no rows)")
        if options.limit and len(rows) >= options.limit:
            break
    if fmt is None or not rows:
        where = ", ".join(files) or str(options.path)
        raise DataError(f"{where}: no usable rows" + (f" ({len(skipped)} bad rows skipped; first: "
                                                      f"{skipped[0][0]}: {skipped[0][1]})" if skipped else ""))
    if fmt.kind not in expect:
        raise DataError(f"{files[0]}: rows are in the {fmt.name} format ({fmt.kind}), this stage needs "
                        f"{' or '.join(expect)} data")
    return Dataset(kind=fmt.kind, format=fmt.name, rows=rows, wheres=wheres, skipped=skipped, files=files)


def write_report(dataset: Dataset, directory: Path) -> Path:
    """The data report of a stage: counts and the skipped rows with their reasons."""
    from llmforge.runs import atomic_write_text

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "data-report.json"
    report = dataset.report()
    report["skipped_rows"] = [{"where": w, "reason": r} for w, r in dataset.skipped]
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    return path


def check_messages(messages: Any, field: str = "messages") -> list[dict]:
    """Validate a list of chat messages; raise RowError naming the first bad field."""
    if not isinstance(messages, list) or not messages:
        raise RowError(field, f"expected a non-empty list of messages, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        here = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise RowError(here, f"expected a table with role and content, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise RowError(f"{here}.role", f"expected one of {'/'.join(ROLES)}, got {json.dumps(role)}")
        content = m.get("content")
        if not isinstance(content, str):
            raise RowError(f"{here}.content", f"expected a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out
