"""Style-preserving edits of forge.toml: change a stage's options without touching anything else.

The TUI's Config screen edits one `[[stages]]` entry at a time. A plain TOML writer would lose the
user's comments, blank lines, key order and number spelling (`2e-5`), so edits go through tomlkit,
which keeps every byte it is not asked to change. Only keys whose value really changed are written;
a key set back to its default is removed (the schema's default applies again).

No Textual here: the module is plain functions over text, so that it can be tested and reused alone.
"""

from __future__ import annotations

import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import AoT, Item, SingleKey, Table

from llmforge.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class _Unset:
    """Marks a key to remove (the option goes back to its default)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


@dataclass(frozen=True)
class Edit:
    """Set `key` (dotted, `lora.r`) of `stages[stage]` to `value`, or remove it when value is UNSET.

    `source` is the value as the user typed it in TOML (`2e-5`, `["a", "b"]`); when given, it is written
    as typed rather than as tomlkit would spell the Python value."""

    stage: int
    key: str
    value: Any
    source: str | None = None


def read_text(path: Path) -> str:
    """The file's text exactly: bytes decoded as UTF-8, line endings untouched (no universal newlines)."""
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: file not found", hint="create one with `llmforge init`") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not valid UTF-8 (byte {exc.start})") from None


def parse(text: str, where: str = "forge.toml") -> tomlkit.TOMLDocument:
    """Parse for editing; refuse a file tomlkit cannot give back byte for byte (editing it would
    reformat the user's file)."""
    try:
        doc = tomlkit.parse(text)
    except TOMLKitError as exc:
        raise UsageError(f"{where}: invalid TOML: {exc}", hint="fix the file in an editor first") from None
    if doc.as_string() != text:
        raise UsageError(f"{where}: cannot be edited without reformatting it", hint="edit this file in a text editor")
    return doc


def stages(doc: tomlkit.TOMLDocument) -> list:
    """The `[[stages]]` entries (tomlkit tables or inline tables), in file order."""
    value = doc.get("stages")
    return list(value) if isinstance(value, list) else []


def _walk(table: Any, key: str, create: bool) -> tuple[Any, str] | None:
    """The table holding the last part of a dotted key, and that part; None when a part is missing.
    With `create`, missing intermediate tables are added as inline tables (`lora = {r = 8}`): they
    sit on one line where the key is added, instead of a `[stages.lora]` header placed by tomlkit."""
    *parents, last = key.split(".")
    for part in parents:
        nxt = table.get(part) if hasattr(table, "get") else None
        if nxt is None:
            if not create:
                return None
            nxt = tomlkit.inline_table()
            table[part] = nxt
            nxt = table[part]
        elif not isinstance(nxt, dict):
            raise UsageError(
                f"'{part}' is not a table in forge.toml (it is {type(nxt).__name__})",
                hint=f"fix '{key}' in a text editor",
            )
        table = nxt
    return table, last


def get(table: Any, key: str) -> Any:
    """The plain Python value of a dotted key in a stage table, or UNSET."""
    found = _walk(table, key, create=False)
    if found is None:
        return UNSET
    parent, last = found
    if last not in parent:
        return UNSET
    value = parent[last]
    return value.unwrap() if hasattr(value, "unwrap") else value


def source(table: Any, key: str) -> str | None:
    """The value of a dotted key as written in the file (`2e-5`, `'''...'''`), or None if absent."""
    found = _walk(table, key, create=False)
    if found is None or found[1] not in found[0]:
        return None
    value = found[0][found[1]]
    if isinstance(value, (Table, AoT)) or not isinstance(value, Item):
        # A `[table]` or `[[array of tables]]` spans lines: a one-line field shows it inline.
        return inline_text(value.unwrap() if isinstance(value, Item) else value)
    return value.as_string()


def inline_text(value: Any) -> str:
    """A value as one line of TOML: tables inline (`{ a = 1 }`), arrays of tables as arrays."""
    if isinstance(value, dict):
        body = ", ".join(f"{SingleKey(str(k)).as_string()} = {inline_text(v)}" for k, v in value.items())
        return f"{{ {body} }}" if body else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(inline_text(v) for v in value) + "]"
    return tomlkit.item(value).as_string()


def _item(value: Any, typed: str | None) -> Item:
    """The tomlkit item to write: the user's own spelling when it parses to the same value."""
    if typed is not None:
        try:
            parsed = tomlkit.parse(f"v = {typed}\n")["v"]
        except TOMLKitError:
            parsed = None
        if parsed is not None and parsed.unwrap() == value and type(parsed.unwrap()) is type(value):
            return parsed
    if isinstance(value, str) and "\n" in value:
        # A multi-line command stays readable in the file: a ''' block starting on its own line (the
        # newline after the opening quotes is not part of the value), as people write them by hand.
        try:
            block = tomlkit.parse(f"v = '''\n{value}'''\n")["v"]
            if block.unwrap() == value:
                return block
        except TOMLKitError:
            pass
        return tomlkit.string(value, multiline=True)  # the text holds ''': an escaped """ block
    return tomlkit.item(value)


def _set(table: Any, key: str, value: Any, typed: str | None) -> None:
    if value is UNSET:
        found = _walk(table, key, create=False)
        if found is not None and found[1] in found[0]:
            del found[0][found[1]]
        return
    found = _walk(table, key, create=True)
    assert found is not None  # with create, missing tables are added: there is always a place
    parent, last = found
    # Assigning to an existing key keeps its line, indentation and trailing comment (tomlkit copies
    # the old item's trivia); a new key is added after the table's last key.
    parent[last] = _item(value, typed)


def apply_edits(text: str, edits: list[Edit], where: str = "forge.toml") -> str:
    """The text with the edits made; every byte outside the changed values stays as it was.

    An edit whose value equals what the file already holds changes nothing (not even the spelling).
    """
    doc = parse(text, where)
    entries = stages(doc)
    for edit in edits:
        if not 0 <= edit.stage < len(entries):
            raise UsageError(f"{where}: there is no stages[{edit.stage}]", hint="reload the file")
        table = entries[edit.stage]
        old = get(table, edit.key)
        if old is not UNSET and edit.value is not UNSET and old == edit.value and type(old) is type(edit.value):
            continue
        if old is UNSET and edit.value is UNSET:
            continue
        _set(table, edit.key, edit.value, edit.source)
    out = doc.as_string()
    try:
        tomllib.loads(out)
    except tomllib.TOMLDecodeError as exc:  # a tomlkit bug must never reach the user's file
        raise UsageError(f"editing {where} would produce invalid TOML ({exc}); nothing was written") from None
    return out


def temp_path(path: Path, purpose: str = "tmp") -> Path:
    """A hidden file next to `path` (same folder: relative paths resolve alike, and the rename is
    atomic), unique to this call: two workers checking two versions must not share one."""
    return path.with_name(f".{path.name}.{purpose}-{os.getpid()}-{secrets.token_hex(4)}")


def write_temp(path: Path, text: str, purpose: str = "tmp") -> Path:
    """Write `text` to a temporary file next to `path`, flushed to disk, with `path`'s permissions."""
    tmp = temp_path(path, purpose)
    with open(tmp, "wb") as fh:
        fh.write(text.encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.chmod(tmp, path.stat().st_mode & 0o7777)
    except OSError:  # a new file, or a file system without modes: the default is fine
        pass
    return tmp


def replace(path: Path, tmp: Path, expected: str | None) -> None:
    """Move `tmp` over `path` atomically. `expected` is the text the edit started from: if the file
    changed on disk meanwhile (someone saved it in an editor), refuse rather than overwrite it."""
    if expected is not None:
        try:
            now = read_text(path)
        except UsageError:
            now = None
        if now != expected:
            tmp.unlink(missing_ok=True)
            raise UsageError(
                f"{path} changed on disk since it was opened; nothing was written",
                hint="reload it (ctrl+r) and make the change again",
            )
    os.replace(tmp, path)


def save(path: Path, text: str, expected: str | None = None) -> None:
    """Write `text` to `path` atomically (temporary file in the same folder, then rename)."""
    replace(path, write_temp(path, text), expected)
