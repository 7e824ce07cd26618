"""The small pieces every curation command shares: reading back the JSON Lines this plugin wrote,
batching a row stream, writing JSON Lines atomically, and a compact code for a row's location so that
deduplication can name the row a duplicate repeats without keeping every location string.

Rows come in through ``llmforge.data.iter_rows``: the same readers, format detection, column mapping,
`file:line: field: reason` errors and ``on_bad_row`` policy as a training stage, as a stream.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterator


def read_curated(path: Path) -> Iterator[tuple[str, dict]]:
    """Rows of a JSON Lines file this plugin wrote itself (normalised already): no format detection."""
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                yield f"{path}:{n}", json.loads(line)


def batched(rows: Iterator[tuple[str, dict]], size: int) -> Iterator[tuple[list[str], list[dict]]]:
    wheres: list[str] = []
    out: list[dict] = []
    for where, row in rows:
        wheres.append(where)
        out.append(row)
        if len(out) >= size:
            yield wheres, out
            wheres, out = [], []
    if out:
        yield wheres, out


# ------------------------------------------------------------------------------------------------
# writing


class JsonlWriter:
    """Rows to a JSON Lines file under a temporary name, renamed into place by ``commit()``; a writer
    closed without commit (an error, a stop) removes its temporary file, so a half-written output never
    carries the final name."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
        self._fh = open(self.tmp, "w", encoding="utf-8")
        self.rows = 0

    def write(self, row: dict) -> None:
        self._fh.write(json.dumps(row, ensure_ascii=False))
        self._fh.write("\n")
        self.rows += 1

    def commit(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._fh.closed:
            self.discard()


# ------------------------------------------------------------------------------------------------
# locations as numbers


class WhereCodec:
    """``file:17`` or ``file:row 3`` as one integer (file number, kind of position, number), so that an
    index can remember where each kept row came from in 8 bytes instead of a string."""

    _ROW = 1 << 40
    _FILE = 1 << 41

    def __init__(self) -> None:
        self._files: dict[str, int] = {}
        self._names: list[str] = []

    def encode(self, where: str) -> int:
        prefix, sep, pos = where.rpartition(":")
        flag = 0
        if pos.startswith("row "):
            pos, flag = pos[4:], self._ROW
        if not sep or not pos.isdigit() or int(pos) >= self._ROW >> 1:
            prefix, pos, flag = where, "0", self._ROW | (self._ROW >> 1)  # a location of another shape: kept whole
        file = self._files.get(prefix)
        if file is None:
            file = self._files[prefix] = len(self._names)
            self._names.append(prefix)
        return file * self._FILE + flag + int(pos)

    def decode(self, code: int) -> str:
        file, rest = divmod(int(code), self._FILE)
        prefix = self._names[file]
        if rest & (self._ROW >> 1) and rest & self._ROW:
            return prefix
        if rest & self._ROW:
            return f"{prefix}:row {rest - self._ROW}"
        return f"{prefix}:{rest}"
