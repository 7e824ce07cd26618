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
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmforge.data import DataOptions, Reader, RowFormat, SourceRow
    from llmforge.plugins import Registry


class Parking:
    """Curated rows parked in a work file between the curate stage's two passes (curate each source,
    then mix): each row with its normalised shape, its row as it came in (any Python value a reader
    gives, parquet dates and decimals included: pickled, not JSON) and its format's name. A file of
    this process's own, read back only by ``read_parked``; written under a temporary name."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
        self._fh = open(self.tmp, "wb")  # noqa: SIM115 - held across writes; closed by commit() or __exit__
        self._done = False

    def write(self, src: SourceRow) -> None:
        import pickle

        pickle.dump(
            (src.where, src.row, src.raw, src.fmt.name, src.columns), self._fh, protocol=pickle.HIGHEST_PROTOCOL
        )

    def commit(self) -> None:
        self._fh.close()
        os.replace(self.tmp, self.path)
        self._done = True

    def __enter__(self) -> Parking:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self._fh.close()
            self.tmp.unlink(missing_ok=True)


def read_parked(path: Path, formats: dict[str, RowFormat]) -> Iterator[SourceRow]:
    """The SourceRows of a file ``Parking`` wrote; ``formats`` is the registry's row formats (the rows
    were parked with their format's name)."""
    import pickle

    from llmforge.data import SourceRow

    with open(path, "rb") as fh:
        while True:
            try:
                where, row, raw, fmt, columns = pickle.load(fh)
            except EOFError:
                return
            # the rows were parked by this process, read with this registry's formats: the name is there
            yield SourceRow(where, row, raw, formats[fmt], columns)


def records(options: DataOptions, base: Path | None, registry: Registry, **kw: Any) -> Iterator[SourceRow]:
    """``llmforge.data.iter_records`` over the registry's readers and row formats: every read in this
    plugin goes through here, so the rows come as a training stage reads them."""
    from llmforge.data import iter_records

    return iter_records(options, registry.readers, registry.row_formats, base, **kw)


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
        self._fh = open(self.tmp, "w", encoding="utf-8")  # noqa: SIM115 - closed by commit() or discard()
        self.rows = 0

    def write(self, row: dict) -> None:
        self._fh.write(json.dumps(row, ensure_ascii=False, default=json_value))
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

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._fh.closed:
            self.discard()


def json_value(value: Any) -> Any:
    """A value JSON has no type for, as JSON Lines can hold it: rows are kept with every column, and
    parquet and saved datasets have dates, decimals and bytes. (A .parquet output keeps the types.)"""
    import base64
    import datetime
    import decimal

    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    return str(value)


class ParquetRowWriter:
    """Rows to a parquet file, by batches, under a temporary name renamed into place by ``commit()``.
    With ``schema`` (the input's, when it was parquet) every column keeps its arrow type; without, the
    types are inferred from the first batch. A row that does not fit the schema is a DataError naming
    the output file."""

    batch_size = 1024

    def __init__(self, path: Path, schema: Any = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
        self.schema = schema
        self._writer = None
        self._pending: list[dict] = []
        self._closed = False
        self.rows = 0

    def write(self, row: dict) -> None:
        self._pending.append(row)
        self.rows += 1
        if len(self._pending) >= self.batch_size:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from llmforge.errors import DataError

        if not self._pending:
            return
        try:
            table = pa.Table.from_pylist(self._pending, schema=self.schema)
            writer = self._writer
            if writer is None:
                self.schema = table.schema
                writer = self._writer = pq.ParquetWriter(self.tmp, table.schema)
            writer.write_table(table)
        except (pa.ArrowException, ValueError, TypeError) as exc:
            raise DataError(
                f"{self.path}: cannot write these rows as parquet: {exc}",
                hint="rows whose columns differ in type cannot share one parquet file; write "
                "JSON Lines instead (an output name ending in .jsonl)",
            ) from None
        self._pending = []

    def commit(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._flush()
        writer = self._writer
        if writer is None:  # no row at all: an empty file with the schema, when there is one
            writer = self._writer = pq.ParquetWriter(self.tmp, self.schema or pa.schema([]))
        writer.close()
        self._closed = True
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        if self._writer is not None and not self._closed:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - the file is removed anyway
                pass
        self._closed = True
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> ParquetRowWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._closed:
            self.discard()


def is_parquet(path: Path) -> bool:
    return Path(path).name.lower().endswith(".parquet")


def open_writer(path: Path, schema: Any = None) -> ParquetRowWriter | JsonlWriter:
    """The writer for an output file, by its name: parquet for ``.parquet``, else JSON Lines."""
    return ParquetRowWriter(path, schema) if is_parquet(path) else JsonlWriter(path)


def parquet_schema(options: DataOptions, readers: dict[str, Reader], base: Path | None = None) -> Any:
    """The arrow schema the rows of ``options`` (a DataOptions) share when every file they name is a
    parquet file with the same schema (so the output can keep the column types); else None.
    ``readers`` is the registry's readers table."""
    import pyarrow.parquet as pq

    from llmforge.data import _paths, iter_files
    from llmforge.errors import DataError

    schemas = []
    try:
        for root, _ in _paths(options, base):
            for path, _reader in iter_files([root], readers):
                if not is_parquet(path):
                    return None
                schemas.append(pq.read_schema(path))
    except (DataError, OSError, ValueError, ImportError):
        return None  # reading the rows reports it
    if not schemas or any(not s.equals(schemas[0]) for s in schemas[1:]):
        return None
    return schemas[0].remove_metadata()


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
