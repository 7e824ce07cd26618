"""Events: what stages report, as JSON lines in the run's `events.jsonl`, and the typed view readers get.

On disk every event is a JSON object with `type`, `time` (unix seconds), `run` and, inside a stage,
`stage`. The file is append-only and written one whole line per write, so readers (the CLI's `logs -f`,
the TUI) can tail it while the run writes, without any lock.

Writers (the runner, `ctx.emit`, `ctx.log`, ...) hand the writer keyword arguments; listeners and
`on_event` observers get the dict that was written. Readers decode each line once, here, into a typed
event (`decode_event`, `read_events`, `from_dict`): `RunStart`, `RunEnd`, `StageStart`, `StageEnd`,
`StageCached`, `Log`, `Metric`, `Progress`, `ArtifactEvent`, `Checkpoint`. A type this version does not
know (a plugin's own: `dataset`, `launch`, `watchdog`, ...; or a newer writer's) decodes to the generic
`Event`, its fields in `data`, so a newer run never breaks an older reader. A class's unnamed fields land
in `data` too. Decoding checks no value: a reader of a damaged or foreign file guards what it uses.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from llmforge.status import Status

Listener = Callable[[dict], None]


class EventWriter:
    def __init__(self, path: Path, run_id: str, listeners: list[Listener] | None = None):
        self.path = path
        self.run_id = run_id
        self.listeners = list(listeners or [])
        self._broken: set[int] = set()
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def emit(self, type: str, stage: str | None = None, **data) -> dict:
        event = {"type": type, "time": round(time.time(), 3), "run": self.run_id}
        if stage is not None:
            event["stage"] = stage
        event.update(data)
        # One write per line: appends of a single short write are not interleaved with other lines.
        self._fh.write(json.dumps(event, default=str) + "\n")
        self._fh.flush()
        for i, listener in enumerate(self.listeners):
            if i in self._broken:
                continue
            try:
                listener(event)
            except Exception as exc:  # noqa: BLE001 - an observer never stops training
                self._broken.add(i)
                self._fh.write(
                    json.dumps(
                        {
                            "type": "log",
                            "time": round(time.time(), 3),
                            "run": self.run_id,
                            "level": "warning",
                            "message": f"{getattr(listener, '__name__', 'event observer')} "
                            f"failed and is disabled for this run: {exc!r}",
                        }
                    )
                    + "\n"
                )
                self._fh.flush()
        return event

    def close(self) -> None:
        try:
            os.fsync(self._fh.fileno())
        except OSError:
            pass
        self._fh.close()


# ----------------------------------------------------------------------------------------------
# the typed events


@dataclass(kw_only=True)
class Event:
    """One event as readers see it. The generic class is what an unknown type decodes to.

    `type`, `time`, `run` and `stage` are common to every event; `data` holds the fields the class does
    not name (for the generic event, all of them), so nothing written is lost on the way through.
    """

    TYPE: ClassVar[str] = ""
    type: str = ""
    time: float | None = None
    run: str | None = None
    stage: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.TYPE:
            self.type = self.TYPE  # a typed event always says what it is

    def to_dict(self) -> dict[str, Any]:
        """The event as a JSON object of events.jsonl. Optional fields left at None are omitted (as the
        writer omits them: a stage_end without `error`), so `from_dict(e.to_dict()) == e`."""
        out: dict[str, Any] = {"type": self.type, "time": self.time, "run": self.run}
        if self.stage is not None:
            out["stage"] = self.stage
        for f in _own_fields(type(self)):
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            out[f.name] = value
        out.update(self.data)
        return out


_COMMON = frozenset({"type", "time", "run", "stage", "data"})
EVENT_TYPES: dict[str, type[Event]] = {}
E = TypeVar("E", bound=type[Event])


def event_type(cls: E) -> E:
    """Class decorator: `cls` decodes the events whose type is `cls.TYPE`. A plugin may declare its own
    event types this way; readers that never import it still read them, as generic events."""
    EVENT_TYPES[cls.TYPE] = cls
    return cls


_FIELDS: dict[type, tuple[Any, ...]] = {}


def _own_fields(cls: type[Event]) -> tuple[Any, ...]:
    """The fields a class adds to the common ones (cached: decoding runs once per line of a big file)."""
    got = _FIELDS.get(cls)
    if got is None:
        got = _FIELDS[cls] = tuple(f for f in fields(cls) if f.name not in _COMMON)
    return got


@event_type
@dataclass(kw_only=True)
class RunStart(Event):
    """A run (or a resumed attempt of it) begins: its stages in order and the ones this attempt runs."""

    TYPE: ClassVar[str] = "run_start"
    config: str | None = None  # the forge.toml
    stages: list[str] = field(default_factory=list)
    resume: bool = False
    selected: list[str] | None = None  # absent in runs written before selections existed: all stages
    selection: dict[str, Any] | None = None  # --stage/--from/--force as the manifest records it


@event_type
@dataclass(kw_only=True)
class RunEnd(Event):
    """A run ended (done, stopped, failed): its exit code and every stage's final status."""

    TYPE: ClassVar[str] = "run_end"
    status: Status | str = Status.UNKNOWN
    exit_code: int | None = None
    stages: dict[str, str] = field(default_factory=dict)


@event_type
@dataclass(kw_only=True)
class StageStart(Event):
    TYPE: ClassVar[str] = "stage_start"
    uses: str | None = None  # the stage kind
    key: str | None = None  # its cache key
    resume: bool = False  # continuing from its checkpoints


@event_type
@dataclass(kw_only=True)
class StageEnd(Event):
    """A stage ended: done, stopped, failed, or blocked (never started: `reason` says which input)."""

    TYPE: ClassVar[str] = "stage_end"
    status: Status | str = Status.UNKNOWN
    duration: float | None = None
    error: str | None = None
    reason: str | None = None
    traceback_file: str | None = None


@event_type
@dataclass(kw_only=True)
class StageCached(Event):
    TYPE: ClassVar[str] = "stage_cached"
    from_run: str | None = None  # the run whose result is reused


@event_type
@dataclass(kw_only=True)
class Log(Event):
    """A message. `debug` is library chatter: kept in the file, shown only when asked (--debug)."""

    TYPE: ClassVar[str] = "log"
    level: str = "info"  # debug, info, warning, error
    message: str = ""


@event_type
@dataclass(kw_only=True)
class Metric(Event):
    TYPE: ClassVar[str] = "metric"
    step: int | None = None
    values: dict[str, Any] = field(default_factory=dict)


@event_type
@dataclass(kw_only=True)
class Progress(Event):
    """How far the stage is; `eta_s` when the stage knows better than a rate would say."""

    TYPE: ClassVar[str] = "progress"
    done: float = 0
    total: float | None = None
    unit: str = "step"
    eta_s: float | None = None


@event_type
@dataclass(kw_only=True)
class ArtifactEvent(Event):
    """An artifact was published (see `StageContext.artifact`)."""

    TYPE: ClassVar[str] = "artifact"
    kind: str = ""
    path: str = ""


@event_type
@dataclass(kw_only=True)
class Checkpoint(Event):
    """A training stage saved a checkpoint (what `--resume` continues from)."""

    TYPE: ClassVar[str] = "checkpoint"
    step: int | None = None
    path: str | None = None


def from_dict(raw: Mapping[str, Any]) -> Event:
    """The typed event for one JSON object of events.jsonl (or a dict a listener got): the class of its
    type, else the generic `Event`. Never raises on content: a field the class does not name goes to
    `data`, a missing one keeps its default."""
    kind = raw.get("type")
    cls = EVENT_TYPES.get(kind, Event) if isinstance(kind, str) else Event
    own = {f.name for f in _own_fields(cls)}
    kwargs: dict[str, Any] = {}
    data: dict[str, Any] = {}
    for k, v in raw.items():
        if k in own:
            # A status read from a file becomes the enum (an unknown one, a newer writer's, stays a string).
            kwargs[k] = Status.of(v) if k == "status" else v
        elif k not in _COMMON or k == "data":
            data[k] = v
    ev = cls(
        type=kind if isinstance(kind, str) else "",
        time=raw.get("time"),
        run=raw.get("run"),
        stage=raw.get("stage"),
        data=data,
        **kwargs,
    )
    return ev


def _decode_json(raw: bytes, where: str) -> dict | None:
    try:
        line = raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        return {
            "type": "log",
            "level": "warning",
            "time": None,
            "message": f"{where}: skipped a line that is not UTF-8 text ({exc.reason} at byte {exc.start})",
        }
    if not line:
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None  # a line torn by a crash: skip it, never fail the reader
    return event if isinstance(event, dict) else None


def decode_event(raw: bytes, where: str) -> Event | None:
    """One line of an events.jsonl as every reader takes it (`read_events`, the TUI's tail): the typed
    event; None for a blank line or one torn by a crash (not JSON, or not an object); for a line that is
    not UTF-8 (a damaged file), a warning `Log` naming `where` (file:line), never an error."""
    obj = _decode_json(raw, where)
    return None if obj is None else from_dict(obj)


def read_records(
    path: Path, follow: bool = False, stop: Callable[[], bool] | None = None, poll: float = 0.2
) -> Iterator[dict]:
    """The JSON objects of an events.jsonl as written (`llmforge logs --raw`, tools, the test fixtures);
    lines are read as `read_events` reads them."""
    for _where, obj in _lines(path, follow, stop, poll):
        yield obj


def read_events(
    path: Path, follow: bool = False, stop: Callable[[], bool] | None = None, poll: float = 0.2
) -> Iterator[Event]:
    """Yield the typed events of a file; with `follow`, keep waiting for new lines until `stop()` is true.

    A last line without its newline is still being written: it is held back until complete. A line
    torn by a crash (not JSON) is skipped. A line that is not UTF-8 (a damaged file) is never fatal:
    it becomes a warning log event naming the file and line, so every reader (`llmforge logs`, the
    TUI) shows where the damage is and goes on with the next line.
    """
    for _where, obj in _lines(path, follow, stop, poll):
        yield from_dict(obj)


def _lines(path: Path, follow: bool, stop: Callable[[], bool] | None, poll: float) -> Iterator[tuple[str, dict]]:
    buf = b""
    lineno = 0
    with open(path, "rb") as fh:
        while True:
            chunk = fh.readline()
            if chunk:
                buf += chunk
                if not buf.endswith(b"\n"):
                    continue
                raw, buf = buf, b""
                lineno += 1
                where = f"{path}:{lineno}"
                obj = _decode_json(raw, where)
                if obj is not None:
                    yield where, obj
                continue
            if not follow or (stop is not None and stop()):
                return
            time.sleep(poll)
