"""`data_formats`: the built-in data readers and row formats.

Readers (one per file type; a folder is read file by file, see llmforge.data.iter_files):

* ``.txt``: plain text; one document per file, per blank-line block or per line (``text_split``).
* ``.jsonl`` / ``.ndjson``: one JSON object per line, read line by line.
* ``.json``: a list of objects, or an object holding one list (``{"data": [...]}``; with several
  lists, the one named ``train``). A ``.json`` file that is really JSON Lines is read as such.
* ``.csv`` / ``.tsv``: a header row, then one row per record (quoted fields may span lines).
* ``.parquet``: read by record batches with pyarrow.
* a folder written by ``datasets``' ``save_to_disk`` (it holds ``state.json``), or a DatasetDict
  folder (``dataset_dict.json``): its ``train`` split, or its only split.

Text-based files may be gzip-compressed (``.jsonl.gz`` ...). Line numbers are 1-based (as an editor
shows them); parquet and saved datasets name rows by their 0-based index (``dataset[17]``).

Row formats (detected from the columns of the first row, or chosen with ``format =``):

* ``text``: ``text``.
* ``alpaca``: ``instruction``, ``output``; optional ``input``, ``system`` and ``history``
  (``[[user, assistant], ...]`` earlier turns).
* ``sharegpt``: ``conversations`` = ``[{from, value}, ...]`` (``from``: human/gpt/system/tool and
  aliases); optional ``system`` column.
* ``messages``: ``messages`` = ``[{role, content}, ...]`` (OpenAI style).
* ``preference``: ``chosen``, ``rejected`` and usually ``prompt``; each a string or a message list.

Module imports stay light: this module is imported at every `llmforge` start-up, so pyarrow and
datasets are imported inside the readers that need them.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, cast

from llmforge.data import (
    DataOptions,
    Reader,
    Record,
    RowError,
    RowFormat,
    check_messages,
    content_text,
    describe,
    require_assistant,
)
from llmforge.errors import DataError

# ------------------------------------------------------------------------------------------------
# reading helpers
# ------------------------------------------------------------------------------------------------


def _open_bytes(path: Path) -> IO[bytes]:
    if path.name.lower().endswith(".gz"):
        import gzip

        return cast("IO[bytes]", gzip.open(path, "rb"))  # a GzipFile reads like a binary file
    return open(path, "rb")


def _bad_utf8(exc: UnicodeDecodeError, line: bytes) -> str:
    # Name the byte and where it is: a file saved as Latin-1 or cp1252 shows up here.
    col = exc.start + 1
    return (
        f"not valid UTF-8: byte 0x{line[exc.start]:02x} at column {col} "
        f"(the file must be UTF-8; re-save or convert it, e.g. iconv -f latin1 -t utf-8)"
    )


def _decode_line(raw: bytes, lineno: int) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason). Drops the line ending and, on the first line, a UTF-8 BOM."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, _bad_utf8(exc, raw)
    if lineno == 1:
        text = text.removeprefix("\ufeff")
    return text.rstrip("\n").rstrip("\r"), None


# ------------------------------------------------------------------------------------------------
# readers
# ------------------------------------------------------------------------------------------------


class TextReader(Reader):
    name = "txt"
    suffixes = (".txt", ".txt.gz")

    def read(self, path: Path, options: DataOptions) -> Iterator[Record]:
        split = options.text_split
        if split == "file":
            yield from self._whole(path)
            return
        block: list[str] = []
        start = 0
        error: tuple[int, str] | None = None  # first undecodable line of the current block

        def flush() -> Iterator[Record]:
            if error is not None:
                yield Record({}, f"{path}:{error[0]}", error[1])
            elif block:
                yield Record({"text": "\n".join(block)}, f"{path}:{start}")

        with _open_bytes(path) as fh:
            for lineno, raw in enumerate(fh, 1):
                text, reason = _decode_line(raw, lineno)
                if text is not None and not text.strip():
                    if split == "blank_line":
                        yield from flush()
                        block, error = [], None
                    continue
                if split == "line":
                    yield Record({"text": text} if reason is None else {}, f"{path}:{lineno}", reason)
                    continue
                if not block and error is None:
                    start = lineno
                if reason is not None:
                    error = error or (lineno, reason)
                else:
                    assert text is not None  # _decode_line gives the text or the reason it has none
                    block.append(text)
            yield from flush()

    @staticmethod
    def _whole(path: Path) -> Iterator[Record]:
        with _open_bytes(path) as fh:
            data = fh.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line_start = data.rfind(b"\n", 0, exc.start) + 1
            line_end = data.find(b"\n", exc.start)
            line = data[line_start : line_end if line_end >= 0 else len(data)]
            lineno = data.count(b"\n", 0, exc.start) + 1
            exc.start -= line_start
            yield Record({}, f"{path}:{lineno}", _bad_utf8(exc, line))
            return
        lines = text.removeprefix("\ufeff").replace("\r\n", "\n").split("\n")
        # Drop blank lines around the document, keep everything inside it (indentation included).
        first = next((i for i, s in enumerate(lines) if s.strip()), None)
        if first is None:
            return
        last = max(i for i, s in enumerate(lines) if s.strip())
        yield Record({"text": "\n".join(lines[first : last + 1])}, f"{path}:{first + 1}")


def _jsonl_records(lines: Iterator[tuple[int, str | None, str | None]], path: Path) -> Iterator[Record]:
    for lineno, text, reason in lines:
        where = f"{path}:{lineno}"
        if reason is not None:
            yield Record({}, where, reason)
            continue
        assert text is not None  # no reason: the line decoded
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield Record({}, where, f"invalid JSON: {exc.msg} (column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            yield Record({}, where, f"expected a JSON object ({{...}}), got {describe(obj)}")
            continue
        yield Record(obj, where)


class JsonlReader(Reader):
    name = "jsonl"
    suffixes = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")

    def read(self, path: Path, options: DataOptions) -> Iterator[Record]:
        # Line by line from the raw bytes: memory stays flat, and a bad line (bad JSON, bad bytes)
        # is one bad row with its own line number, not a failed file.
        with _open_bytes(path) as fh:
            yield from _jsonl_records(((n, *_decode_line(raw, n)) for n, raw in enumerate(fh, 1)), path)


class _Lines:
    """Maps character offsets of a text to 1-based line numbers, cheaply for increasing offsets."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def at(self, pos: int) -> int:
        if pos < self.pos:
            self.pos, self.line = 0, 1
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


_WS = re.compile(r"[ \t\r\n]*")


def _skip_ws(text: str, pos: int) -> int:
    """The first position at or after `pos` that is not JSON whitespace (the pattern matches the empty
    string, so there is always a match)."""
    match = _WS.match(text, pos)
    assert match is not None
    return match.end()


class JsonReader(Reader):
    name = "json"
    suffixes = (".json", ".json.gz")

    def read(self, path: Path, options: DataOptions) -> Iterator[Record]:
        # A JSON document has to be parsed whole; the list is then walked element by element so that
        # each row still gets the line it starts on.
        with _open_bytes(path) as fh:
            data = fh.read()
        try:
            text = data.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError as exc:
            lineno = data.count(b"\n", 0, exc.start) + 1
            line = data[data.rfind(b"\n", 0, exc.start) + 1 :]
            exc.start -= len(data) - len(line)
            raise DataError(f"{path}:{lineno}: {_bad_utf8(exc, line)}") from None
        lines = _Lines(text)
        dec = json.JSONDecoder()

        def value_at(pos: int) -> tuple[Any, int]:
            try:
                return dec.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})",
                    hint="a .json file must be one JSON document; use .jsonl for one object per line",
                ) from None

        i = _skip_ws(text, 0)
        if i == len(text):
            return  # empty file
        if text[i] == "[":
            yield from self._array(text, i, path, lines, value_at)
            return
        if text[i] != "{":
            raise DataError(
                f"{path}:{lines.at(i)}: expected a list of objects, or an object holding one list; "
                f"got {describe(value_at(i)[0])}"
            )
        obj, end = value_at(i)
        if _skip_ws(text, end) < len(text):
            # More after the first object: this is JSON Lines under a .json name (a common export).
            split = text.split("\n")
            yield from _jsonl_records(((n, s.rstrip("\r"), None) for n, s in enumerate(split, 1)), path)
            return
        lists = [k for k, v in obj.items() if isinstance(v, list)]
        if len(lists) > 1 and "train" in lists:
            lists = ["train"]
        if len(lists) != 1:
            what = f"lists under {', '.join(repr(k) for k in lists)}" if lists else "no list"
            raise DataError(
                f"{path}: expected a list of objects, or an object holding one list; this object holds {what}",
                hint="keep one list of rows per file (or one named train)",
            )
        # Find where that list starts, then walk it like a top-level list.
        pos = _skip_ws(text, i + 1)
        while True:
            key, pos = value_at(pos)
            pos = _skip_ws(text, pos) + 1  # the colon
            pos = _skip_ws(text, pos)
            if key == lists[0]:
                break
            _, pos = value_at(pos)
            pos = _skip_ws(text, pos) + 1  # the comma
            pos = _skip_ws(text, pos)
        yield from self._array(text, pos, path, lines, value_at)

    @staticmethod
    def _array(text, i, path, lines, value_at) -> Iterator[Record]:
        i = _skip_ws(text, i + 1)
        if i < len(text) and text[i] == "]":
            return
        while True:
            obj, end = value_at(i)
            where = f"{path}:{lines.at(i)}"
            if isinstance(obj, dict):
                yield Record(obj, where)
            else:
                yield Record({}, where, f"expected a JSON object ({{...}}), got {describe(obj)}")
            i = _skip_ws(text, end)
            if i < len(text) and text[i] == ",":
                i = _skip_ws(text, i + 1)
                continue
            if i < len(text) and text[i] == "]":
                return
            raise DataError(
                f"{path}:{lines.at(min(i, len(text)))}: invalid JSON: expected ',' or ']' after a list element"
            )


class CsvReader(Reader):
    name = "csv"
    suffixes = (".csv", ".tsv", ".csv.gz", ".tsv.gz")

    def read(self, path: Path, options: DataOptions) -> Iterator[Record]:
        # Long documents in one cell are normal in training data; the csv module's default cap is 128 KiB.
        csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
        delimiter = "\t" if ".tsv" in path.name.lower() else ","
        bad_lines: dict[int, str] = {}

        def lines() -> Iterator[str]:
            # Decode line by line ourselves, so that a bad byte is pinned to its line (and only the
            # record holding it is bad) instead of a UnicodeDecodeError somewhere in the file.
            with _open_bytes(path) as fh:
                for n, raw in enumerate(fh, 1):
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        bad_lines[n] = _bad_utf8(exc, raw)
                        text = raw.decode("utf-8", "replace")
                    yield text.removeprefix("\ufeff") if n == 1 else text

        # strict: a stray quote would otherwise swallow the rest of the file into one cell, silently.
        reader = csv.reader(lines(), delimiter=delimiter, strict=True)
        end = 0
        try:
            header = next((row for row in reader if row), None)
            if header is None:
                return
            if bad_lines:
                n, reason = next(iter(bad_lines.items()))
                raise DataError(f"{path}:{n}: header: {reason}")
            header = [h.strip() for h in header]
            dupes = sorted({h for h in header if header.count(h) > 1})
            if dupes:
                raise DataError(f"{path}:{reader.line_num}: header: column {dupes[0]!r} appears more than once")
            end = reader.line_num
            for row in reader:
                start, end = end + 1, reader.line_num
                if not row:
                    continue  # a blank line
                enc = [n for n in range(start, end + 1) if n in bad_lines]
                if enc:
                    yield Record({}, f"{path}:{enc[0]}", bad_lines[enc[0]])
                    for n in enc:
                        del bad_lines[n]
                    continue
                where = f"{path}:{start}"
                if len(row) != len(header):
                    yield Record({}, where, f"expected {len(header)} fields (as in the header), got {len(row)}")
                    continue
                yield Record(dict(zip(header, row)), where)
        except csv.Error as exc:
            # Name the line where the broken record starts: for an unclosed quote, line_num is the file's end.
            raise DataError(
                f"{path}:{end + 1}: cannot parse CSV: {exc}",
                hint="check the quoting of this record: a field with a quote, comma or line break "
                'must be quoted, and quotes inside it doubled ("")',
            ) from None


class ParquetReader(Reader):
    name = "parquet"
    suffixes = (".parquet",)
    batch_size = 1024

    def read(self, path: Path, options: DataOptions) -> Iterator[Record]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        # Record batches, not the whole table: a large file never has to fit in memory at once.
        index = 0
        try:
            with pq.ParquetFile(path) as pf:
                for batch in pf.iter_batches(batch_size=self.batch_size):
                    for row in batch.to_pylist():
                        yield Record(row, f"{path}:row {index}")
                        index += 1
        except (pa.ArrowException, ValueError) as exc:
            raise DataError(f"{path}: cannot read as parquet: {exc}") from None


class HfDatasetReader(Reader):
    """A folder written by `datasets.Dataset.save_to_disk` (or `DatasetDict.save_to_disk`)."""

    name = "hf_dataset"
    suffixes = ()
    batch_size = 256

    def matches(self, path: Path) -> bool:
        return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())

    def read(self, path: Path, options: DataOptions) -> Iterator[Record]:
        folder = path
        if (path / "dataset_dict.json").is_file():
            try:
                splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"{path / 'dataset_dict.json'}: not a dataset_dict.json ({exc})") from None
            if "train" in splits:
                folder = path / "train"
            elif len(splits) == 1:
                folder = path / splits[0]
            else:
                raise DataError(
                    f"{path}: a dataset with the splits {', '.join(splits)} and no train split",
                    hint=f"point `path` at the split to train on, e.g. {path / splits[0]}",
                )
        try:
            state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = {}
        if isinstance(state, dict) and state.get("_data_files") == []:
            return  # saved with no rows: datasets itself cannot load that (no shard to read the schema from)
        from datasets import load_from_disk

        try:
            ds = load_from_disk(str(folder))
        except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; all mean "cannot load"
            raise DataError(f"{folder}: cannot load the saved dataset: {exc}") from None
        # Plain Python values even if the dataset was saved with a torch/numpy format set.
        ds = ds.with_format(None)
        index = 0
        for batch in ds.iter(batch_size=self.batch_size):
            names = list(batch)
            for i in range(len(batch[names[0]]) if names else 0):
                yield Record({k: batch[k][i] for k in names}, f"{folder}:row {index}")
                index += 1


# ------------------------------------------------------------------------------------------------
# row formats
# ------------------------------------------------------------------------------------------------


def _get(row: dict, key: str) -> Any:
    if key not in row:
        raise RowError(key, "missing")
    return row[key]


def _string(value: Any, field: str, *, required: bool = True) -> str:
    if not isinstance(value, str):
        raise RowError(field, f"expected a string, got {describe(value)}")
    if required and not value.strip():
        raise RowError(field, "empty")
    return value


def _optional_string(row: dict, key: str) -> str:
    """A column that may be absent, null or empty (CSV and parquet write null/"" for "no value")."""
    value = row.get(key)
    return "" if value is None else _string(value, key, required=False)


def _as_list(value: Any) -> Any:
    # CSV cannot hold a list: accept a JSON-encoded one (what json.dumps of a message list writes).
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            decoded = json.loads(value)
        except ValueError:
            return value
        if isinstance(decoded, list):
            return decoded
    return value


# Writing rewritten texts back (RowFormat.restore): a rewrite step (normalize, pii) changes the texts of
# a normalised row; curation writes the row as it came in, with only those texts replaced in the place
# they were read from. A JSON-encoded list (CSV) stays a JSON-encoded list.


def _put_content(value: Any, text: str) -> Any:
    """A message content with its text replaced: a string, or OpenAI-style text parts (joined when
    read, so the new text goes in the first part and the other parts go)."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return [{**value[0], "text": text}]
    return text


def _set_turns(value: Any, texts: dict[int, str], key: Callable[[dict], str] = lambda turn: "content") -> Any:
    """A list of turns (or a JSON-encoded one) with turn i's text set to texts[i]."""
    if not texts:
        return value
    encoded = isinstance(value, str)
    turns = [dict(t) if isinstance(t, dict) else t for t in (_as_list(value) if encoded else value)]
    for i, text in texts.items():
        k = key(turns[i])
        turns[i][k] = _put_content(turns[i][k], text)
    return json.dumps(turns, ensure_ascii=False) if encoded else turns


def _changed(old: list[dict], new: list[dict], offset: int = 0) -> dict[int, str]:
    """{position: new text} for the turns whose content a rewrite changed."""
    return {i + offset: n["content"] for i, (o, n) in enumerate(zip(old, new)) if o["content"] != n["content"]}


class TextFormat(RowFormat):
    name = "text"
    kind = "text"
    columns = ("text",)
    priority = 10

    def normalize(self, row: dict) -> dict:
        return {"text": _string(_get(row, "text"), "text")}

    def restore(self, raw: dict, old: dict, new: dict) -> dict:
        return {**raw, "text": new["text"]}


class AlpacaFormat(RowFormat):
    name = "alpaca"
    kind = "chat"
    columns = ("instruction", "output")
    priority = 20
    fields = ("instruction", "input", "output", "system", "history")

    def normalize(self, row: dict) -> dict:
        instruction = _string(_get(row, "instruction"), "instruction", required=False)
        extra = _optional_string(row, "input")
        # The input is the material the instruction works on; it follows the instruction in the one user turn.
        user = "\n\n".join(s for s in (instruction, extra) if s.strip())
        if not user:
            raise RowError("instruction", "empty")
        output = _string(_get(row, "output"), "output")
        messages = []
        system = _optional_string(row, "system")
        if system.strip():
            messages.append({"role": "system", "content": system})
        history = _as_list(row.get("history"))
        if history is not None:
            if not isinstance(history, list):
                raise RowError("history", f"expected a list of [instruction, answer] pairs, got {describe(history)}")
            for i, pair in enumerate(history):
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    raise RowError(f"history[{i}]", f"expected an [instruction, answer] pair, got {describe(pair)}")
                messages.append({"role": "user", "content": _string(pair[0], f"history[{i}][0]", required=False)})
                messages.append({"role": "assistant", "content": _string(pair[1], f"history[{i}][1]", required=False)})
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return {"messages": messages}

    def restore(self, raw: dict, old: dict, new: dict) -> dict:
        out = dict(raw)
        olds, news = old["messages"], new["messages"]
        i = 0
        if olds[0]["role"] == "system":
            if olds[0] != news[0]:
                out["system"] = news[0]["content"]
            i = 1
        pairs = len(olds) - i - 2
        if pairs:
            history = _as_list(raw["history"])
            changed = [
                [olds[i + 2 * n + j]["content"] != news[i + 2 * n + j]["content"] for j in (0, 1)]
                for n in range(pairs // 2)
            ]
            if any(a or b for a, b in changed):
                new_history = [
                    [news[i + 2 * n + j]["content"] if changed[n][j] else pair[j] for j in (0, 1)]
                    for n, pair in enumerate(history)
                ]
                out["history"] = (
                    json.dumps(new_history, ensure_ascii=False) if isinstance(raw["history"], str) else new_history
                )
        user_old, user_new = olds[-2]["content"], news[-2]["content"]
        if user_old != user_new:
            out.update(self._split_user(raw, user_new))
        if olds[-1]["content"] != news[-1]["content"]:
            out["output"] = news[-1]["content"]
        return out

    @staticmethod
    def _split_user(raw: dict, text: str) -> dict:
        """instruction and input again from the rewritten user turn they were joined into."""
        instruction, extra = raw["instruction"], _optional_string(raw, "input")
        if not extra.strip():
            return {"instruction": text}
        if not instruction.strip():
            return {"input": text}
        # Split where the join put its blank line: at the same count of blank lines as the
        # instruction holds (a rewrite of whitespace inside a text keeps that count).
        n = len(instruction.split("\n\n"))
        parts = text.split("\n\n")
        old_parts = (instruction + "\n\n" + extra).split("\n\n")
        if len(parts) == len(old_parts) and "\n\n".join(old_parts[:n]) == instruction:
            return {"instruction": "\n\n".join(parts[:n]), "input": "\n\n".join(parts[n:])}
        return {"instruction": text, "input": ""}  # the same user turn, read back: nothing is lost


# ShareGPT speaker names as found in the wild, lower-cased. function_call is the assistant asking for
# a tool (its value is the call); observation/function_response are what the tool returned.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "function_call": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
    "function_response": "tool",
    "ipython": "tool",
}


class ShareGptFormat(RowFormat):
    name = "sharegpt"
    kind = "chat"
    columns = ("conversations",)
    priority = 30
    fields = ("conversations", "system")

    def normalize(self, row: dict) -> dict:
        conv = _as_list(_get(row, "conversations"))
        if not isinstance(conv, list):
            raise RowError("conversations", f"expected a list of {{from, value}} turns, got {describe(conv)}")
        if not conv:
            raise RowError("conversations", "empty list of turns")
        messages = []
        for i, turn in enumerate(conv):
            here = f"conversations[{i}]"
            if not isinstance(turn, dict):
                raise RowError(here, f"expected an object with from and value, got {describe(turn)}")
            # Some exports keep the conversations column but write OpenAI-style role/content turns.
            role_key, text_key = ("role", "content") if "from" not in turn and "role" in turn else ("from", "value")
            if role_key not in turn:
                raise RowError(f"{here}.from", "missing")
            speaker = turn[role_key]
            role = SHAREGPT_ROLES.get(speaker.strip().lower()) if isinstance(speaker, str) else None
            if role is None:
                raise RowError(
                    f"{here}.{role_key}",
                    "expected one of human/gpt/system/tool (or user/assistant/"
                    f"function_call/observation/...), got {describe(speaker)}",
                )
            if text_key not in turn:
                raise RowError(f"{here}.{text_key}", "missing")
            messages.append({"role": role, "content": content_text(turn[text_key], f"{here}.{text_key}")})
        system = _optional_string(row, "system")
        if system.strip() and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        require_assistant(messages, "conversations")
        return {"messages": messages}

    def restore(self, raw: dict, old: dict, new: dict) -> dict:
        out = dict(raw)
        olds, news = old["messages"], new["messages"]
        conv = _as_list(raw["conversations"])
        if len(olds) == len(conv) + 1:  # the first turn came from the system column
            if olds[0] != news[0]:
                out["system"] = news[0]["content"]
            olds, news = olds[1:], news[1:]
        out["conversations"] = _set_turns(
            raw["conversations"],
            _changed(olds, news),
            key=lambda turn: "content" if "from" not in turn and "role" in turn else "value",
        )
        return out


class MessagesFormat(RowFormat):
    name = "messages"
    kind = "chat"
    columns = ("messages",)
    priority = 30

    def normalize(self, row: dict) -> dict:
        messages = _as_list(_get(row, "messages"))
        if isinstance(messages, list):
            # OpenAI's newer name for the system role.
            messages = [
                {**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m for m in messages
            ]
        return {"messages": check_messages(messages, "messages", assistant=True)}

    def restore(self, raw: dict, old: dict, new: dict) -> dict:
        return {**raw, "messages": _set_turns(raw["messages"], _changed(old["messages"], new["messages"]))}


class PreferenceFormat(RowFormat):
    """prompt/chosen/rejected; or, without a prompt, chosen/rejected as whole conversations that share
    their opening turns (the "implicit prompt" layout): the shared turns become the prompt."""

    name = "preference"
    kind = "preference"
    columns = ("chosen", "rejected")
    priority = 40
    fields = ("prompt", "chosen", "rejected")

    def normalize(self, row: dict) -> dict:
        chosen_raw, rejected_raw = _as_list(_get(row, "chosen")), _as_list(_get(row, "rejected"))
        prompt_raw = _as_list(row.get("prompt"))
        if prompt_raw is None:
            if isinstance(chosen_raw, str) or isinstance(rejected_raw, str):
                raise RowError("prompt", "missing (needed when chosen and rejected are plain strings)")
            chosen_all = check_messages(chosen_raw, "chosen")
            rejected_all = check_messages(rejected_raw, "rejected")
            k = max((i + 1 for i, m in enumerate(chosen_all) if m["role"] != "assistant"), default=0)
            if k == 0:
                raise RowError("prompt", "missing (chosen has no turns before the answer to use as the prompt)")
            prompt = self._prompt(chosen_all[:k])
            if rejected_all[:k] != prompt:
                raise RowError(
                    "rejected",
                    "does not start with the same turns as chosen (with no prompt column, "
                    "the shared opening turns are the prompt)",
                )
            chosen, rejected = self._answer(chosen_all, k, "chosen"), self._answer(rejected_all, k, "rejected")
        else:
            if isinstance(prompt_raw, str):
                prompt = [{"role": "user", "content": _string(prompt_raw, "prompt")}]
            else:
                prompt = self._prompt(check_messages(prompt_raw, "prompt"))
            chosen = self._side(chosen_raw, "chosen", prompt)
            rejected = self._side(rejected_raw, "rejected", prompt)
        if chosen == rejected:
            raise RowError("rejected", "same as chosen: the pair teaches nothing")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    def restore(self, raw: dict, old: dict, new: dict) -> dict:
        out = dict(raw)
        prompt = _changed(old["prompt"], new["prompt"])
        if raw.get("prompt") is None:
            # chosen and rejected are whole conversations; their shared opening turns are the prompt
            k = len(old["prompt"])
            for side in ("chosen", "rejected"):
                out[side] = _set_turns(raw[side], {**prompt, **_changed(old[side], new[side], k)})
            return out
        if isinstance(_as_list(raw["prompt"]), str):
            if prompt:
                out["prompt"] = new["prompt"][0]["content"]
        else:
            out["prompt"] = _set_turns(raw["prompt"], prompt)
        for side in ("chosen", "rejected"):
            value = _as_list(raw[side])
            if isinstance(value, str):
                if old[side] != new[side]:
                    out[side] = new[side][0]["content"]
                continue
            # an answer list may repeat the prompt first (dropped when read): it follows the prompt's rewrite
            skip = len(value) - len(old[side])
            out[side] = _set_turns(raw[side], {**(prompt if skip else {}), **_changed(old[side], new[side], skip)})
        return out

    @staticmethod
    def _prompt(prompt: list[dict]) -> list[dict]:
        # The answers continue the prompt, so it must end where the assistant speaks next:
        # after a user turn (or a tool result the assistant is to act on).
        if prompt[-1]["role"] not in ("user", "tool"):
            raise RowError(
                f"prompt[{len(prompt) - 1}].role",
                f"the prompt must end with a user turn, got {describe(prompt[-1]['role'])}",
            )
        return prompt

    def _side(self, raw: Any, field: str, prompt: list[dict]) -> list[dict]:
        if isinstance(raw, str):
            return [{"role": "assistant", "content": _string(raw, field)}]
        messages = check_messages(raw, field)
        # Some exports repeat the prompt at the start of each answer; drop it rather than fail.
        skip = len(prompt) if len(messages) > len(prompt) and messages[: len(prompt)] == prompt else 0
        return self._answer(messages, skip, field)

    @staticmethod
    def _answer(messages: list[dict], start: int, field: str) -> list[dict]:
        answer = messages[start:]
        if not answer:
            raise RowError(field, "no answer after the prompt")
        for i, m in enumerate(answer, start):
            if m["role"] != "assistant":
                raise RowError(
                    f"{field}[{i}].role", f"expected assistant (the answer to the prompt), got {describe(m['role'])}"
                )
        require_assistant(answer, field)
        return answer


# Registered by llmforge_plugins.hooks.data_formats. A saved-dataset folder must be claimed before the
# folder walk would read its state.json, so HfDatasetReader comes first.
READERS = (HfDatasetReader, JsonlReader, JsonReader, CsvReader, ParquetReader, TextReader)
ROW_FORMATS = (PreferenceFormat, MessagesFormat, ShareGptFormat, AlpacaFormat, TextFormat)
