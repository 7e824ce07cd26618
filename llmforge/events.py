"""Events: what stages report, as JSON lines in the run's `events.jsonl`.

Every event is a dict with `type`, `time` (unix seconds), `run` and, inside a stage, `stage`.
Types written by the core: run_start, run_end, stage_start, stage_end, stage_cached, log, metric,
progress, artifact. Stages add their own through ctx.emit (the training stages: checkpoint,
dataset, tokenized, template, profile). The file is append-only and written one whole line per write, so readers (the CLI's
`logs -f`, the TUI) can tail it while the run writes, without any lock.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Iterator

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
                self._fh.write(json.dumps({"type": "log", "time": round(time.time(), 3), "run": self.run_id,
                                           "level": "warning",
                                           "message": f"{getattr(listener, '__name__', 'event observer')} "
                                                      f"failed and is disabled for this run: {exc!r}"}) + "\n")
                self._fh.flush()
        return event

    def close(self) -> None:
        try:
            os.fsync(self._fh.fileno())
        except OSError:
            pass
        self._fh.close()


def decode_event(raw: bytes, where: str) -> dict | None:
    """One line of an events.jsonl as every reader takes it (`read_events`, the TUI's tail): the event;
    None for a blank line or one torn by a crash (not JSON, or not an object); for a line that is not
    UTF-8 (a damaged file), a warning log event naming `where` (file:line), never an error."""
    try:
        line = raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        return {"type": "log", "level": "warning", "time": None,
                "message": f"{where}: skipped a line that is not UTF-8 text ({exc.reason} at byte {exc.start})"}
    if not line:
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None  # a line torn by a crash: skip it, never fail the reader
    return event if isinstance(event, dict) else None


def read_events(path: Path, follow: bool = False, stop: Callable[[], bool] | None = None,
                poll: float = 0.2) -> Iterator[dict]:
    """Yield the events of a file; with `follow`, keep waiting for new lines until `stop()` is true.

    A last line without its newline is still being written: it is held back until complete. A line
    torn by a crash (not JSON) is skipped. A line that is not UTF-8 (a damaged file) is never fatal:
    it becomes a warning log event naming the file and line, so every reader (`llmforge logs`, the
    TUI) shows where the damage is and goes on with the next line.
    """
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
                event = decode_event(raw, f"{path}:{lineno}")
                if event is not None:
                    yield event
                continue
            if not follow or (stop is not None and stop()):
                return
            time.sleep(poll)
