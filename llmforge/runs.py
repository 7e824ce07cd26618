"""The run store: `runs/<run-id>/` with manifest.json, events.jsonl, stages/<name>/, and a lock.

One writer per run: the lock file holds the writer's pid, host and process start time. A lock whose
process is gone (same host, pid dead or reused) is stale and is taken over; a live one is refused.
Readers (status, logs, the TUI) never lock: the manifest is replaced atomically and events are
appended line by line.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

from llmforge.errors import LockedError, UsageError
from llmforge.status import LIVE, Status

MANIFEST = "manifest.json"
EVENTS = "events.jsonl"
LOCK = "lock"
STOP_REQUEST = "stop.request"
CHECKPOINT_REQUEST = "checkpoint.request"


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary name in the same folder, fsync, then rename over the target."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json_object(path: Path, what: str = "file", error: type = UsageError) -> dict:
    """A JSON object from a file we did not write (a model's config, a tokenizer's settings): unreadable,
    undecodable or not an object -> `error` naming the file and what it was supposed to be."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise error(f"{path}: cannot read the {what} ({exc})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: the {what} is not a JSON object")
    return data


def resolve_runs_dir(explicit: Path | None, config: Path | None) -> Path:
    """Where runs live, for every front end: `explicit` (--runs-dir) as given, else [project].runs_dir of
    the forge.toml `config` (read, not validated; relative to its folder), else ./runs."""
    if explicit is not None:
        return Path(explicit)
    if config is not None and Path(config).is_file():
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        try:
            raw = tomllib.loads(Path(config).read_text(encoding="utf-8"))
            return (Path(config).parent / str(raw.get("project", {}).get("runs_dir", "runs"))).resolve()
        except Exception:  # noqa: BLE001 - a broken forge.toml still lets you look at runs
            pass
    return Path("runs").resolve()


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


# ----------------------------------------------------------------------------------------------
# lock


def _process_start(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def _pid_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def read_lock(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / LOCK).read_text())
    except (OSError, ValueError):
        return None


def lock_is_live(info: dict | None) -> bool:
    """True when the lock's writer still runs (a lock from another host is assumed live)."""
    if not info:
        return False
    if info.get("host") != platform.node():
        return True
    pid = int(info.get("pid", -1))
    if pid <= 0 or not _pid_alive(pid):
        return False
    started = _process_start(pid)
    return started is None or abs(started - float(info.get("started", started))) < 2.0


class RunLock:
    """The writer lock of one run directory."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.held = False

    def acquire(self) -> bool:
        """Take the lock; returns True when a stale lock was taken over. Raises LockedError when live."""
        took_over = False
        me = {"pid": os.getpid(), "host": platform.node(), "started": _process_start(os.getpid()), "argv": sys.argv}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = read_lock(self.path.parent)
                if info is None:
                    # Half-written by a writer that is starting right now, or garbage from a crash.
                    time.sleep(0.1)
                    info = read_lock(self.path.parent)
                if info is not None and lock_is_live(info):
                    raise LockedError(
                        f"run {self.path.parent.name} is being written by pid {info.get('pid')} on {info.get('host')}",
                        hint=f"wait for it, or stop it with `llmforge stop {self.path.parent.name}`",
                    ) from None
                # Stale: move it aside under a unique name; only one contender's rename succeeds.
                try:
                    os.replace(self.path, self.path.with_name(f".{LOCK}.stale-{os.getpid()}"))
                    os.unlink(self.path.with_name(f".{LOCK}.stale-{os.getpid()}"))
                    took_over = True
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return took_over
        raise LockedError(f"could not take the lock of run {self.path.parent.name}")

    def release(self) -> None:
        if self.held:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.held = False


# ----------------------------------------------------------------------------------------------
# the manifest

#: the manifest format this version writes. 1: the first with a `version` key (older manifests have
#: none and read the same way). Bump it when a key changes meaning; a reader keeps reading older ones.
MANIFEST_VERSION = 1


@dataclass
class StageRecord:
    """One stage in the manifest: what it is, its cache key, where it stands and what it produced.

    `artifacts` maps an artifact kind to ``{"kind", "path"}`` (JSON, as on disk); `cached_from` names the
    run whose result a cached stage reuses; `info` holds the facts the stage recorded (``ctx.info``).
    Keys this version does not know are kept in `extra` and written back unchanged.
    """

    uses: str | None = None
    key: str | None = None
    status: Status | str = Status.PENDING
    started: float | None = None
    ended: float | None = None
    duration: float | None = None
    error: str | None = None
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    cached_from: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> StageRecord:
        known = _names(cls)
        rec = cls(
            **{k: v for k, v in raw.items() if k in known}, extra={k: v for k, v in raw.items() if k not in known}
        )
        rec.status = Status.of(rec.status)
        return rec

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"uses": self.uses, "key": self.key, "status": self.status}
        # What a stage never got to (a pending stage has no start, a stage without facts no info) is left
        # out, as the runner always wrote it; `error` stays once the stage ran: None says "no error".
        for name in ("started", "ended", "duration", "cached_from"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.started is not None or self.status == Status.CACHED or self.error is not None:
            out["error"] = self.error
        if self.artifacts or self.started is not None or self.status == Status.CACHED:
            out["artifacts"] = self.artifacts
        if self.info:
            out["info"] = self.info
        return {**self.extra, **out}


@dataclass
class Manifest:
    """`manifest.json`: what a run is (its config, versions, hardware), where it stands, and its stages.

    The runner writes it atomically after every change; readers never lock. `version` is
    `MANIFEST_VERSION` when written by this version, None for a manifest written before versions existed.
    Unknown keys (a newer writer's) are kept in `extra` and written back.
    """

    id: str = ""
    created: float | None = None
    config_path: str | None = None
    project: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    status: Status | str = Status.UNKNOWN
    pid: int | None = None
    exit_code: int | None = None
    versions: dict[str, str] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)
    resumed: list[float] = field(default_factory=list)  # when each --resume began
    selection: dict[str, Any] | None = None  # --stage/--from/--force of the attempt (see RunRequest)
    stages: dict[str, StageRecord] = field(default_factory=dict)
    finished: float | None = None
    version: int | None = MANIFEST_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Manifest:
        """The model of a manifest as read from disk, of any version; a missing key keeps its default."""
        known = _names(cls)
        values = {k: v for k, v in raw.items() if k in known}
        values.setdefault("version", None)  # written before manifests had a version
        stages = values.pop("stages", None)
        stages = stages if isinstance(stages, dict) else {}
        m = cls(**values, extra={k: v for k, v in raw.items() if k not in known})
        m.status = Status.of(m.status)
        m.stages = {n: StageRecord.from_dict(s if isinstance(s, dict) else {}) for n, s in stages.items()}
        return m

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("stages", "extra")}
        if self.finished is None:
            del out["finished"]  # a run that has not finished has no such key (as before versions)
        if self.version is None:
            del out["version"]  # an old manifest written back (marked killed) stays as it was
        out["stages"] = {n: s.to_dict() for n, s in self.stages.items()}
        return {**self.extra, **out}

    def save(self, run_dir: Path) -> None:
        """Replace `run_dir/manifest.json` atomically with this manifest."""
        atomic_write_json(Path(run_dir) / MANIFEST, self.to_dict())


def _names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)} - {"extra"}


# ----------------------------------------------------------------------------------------------
# reading runs


@dataclass
class RunInfo:
    """A run folder as readers see it. `manifest` is the JSON as on disk (what `status --json` prints),
    `record` the same read through the typed `Manifest`."""

    id: str
    dir: Path
    manifest: dict
    #: why the run's manifest cannot be read ("<path>: <error>"), for a damaged run folder; else None
    damaged: str | None = None

    @cached_property
    def record(self) -> Manifest:
        return Manifest.from_dict(self.manifest)

    @property
    def status(self) -> Status | str:
        """The recorded status, or 'killed' when it says running but its writer is gone; 'damaged'
        when the manifest cannot be read; 'unknown' when it records none."""
        if self.damaged:
            return Status.DAMAGED
        status = self.record.status
        if status in LIVE and not lock_is_live(read_lock(self.dir)):
            return Status.KILLED
        return status

    @property
    def config_path(self) -> str | None:
        return self.record.config_path

    def stage_status(self, name: str) -> Status | str:
        st = self.record.stages.get(name)
        status = st.status if st is not None else Status.PENDING
        if status == Status.RUNNING and self.status == Status.KILLED:
            return Status.KILLED
        return status

    def to_json(self) -> dict:
        return {
            **self.manifest,
            "id": self.id,
            "dir": str(self.dir),
            "status": self.status,
            "stages": {n: {**s, "status": self.stage_status(n)} for n, s in self.manifest.get("stages", {}).items()},
        }


class RunStore:
    def __init__(self, runs_dir: Path):
        self.dir = Path(runs_dir)

    def list(self, include_damaged: bool = False) -> list[RunInfo]:
        """The runs, oldest first. A run folder whose manifest cannot be read is left out, unless
        `include_damaged` (listings: the user must see it, named, rather than have it vanish)."""
        runs: list[RunInfo] = []
        if not self.dir.is_dir():
            return runs
        for d in self.dir.iterdir():
            if not d.is_dir():
                continue
            run = _read_run(d)
            if run is not None and (include_damaged or not run.damaged):
                runs.append(run)
        runs.sort(key=lambda r: (r.manifest.get("created", 0) if not r.damaged else _mtime(r.dir), r.id))
        return runs

    def get(self, ref: str | None = None, allow_damaged: bool = False) -> RunInfo:
        """A run by id, unique id prefix or directory path; the latest run when `ref` is None.
        A damaged run named by `ref` is a UsageError that names its unreadable file, unless
        `allow_damaged` (`logs` reads the events, which do not need the manifest)."""
        _readable = (lambda r: r) if allow_damaged else _whole
        if ref and Path(ref).is_dir() and (Path(ref) / MANIFEST).exists():
            run = _read_run(Path(ref).resolve())
            if run is not None:
                return _readable(run)
        runs = self.list(include_damaged=True)
        if not runs:
            raise UsageError(f"no runs in {self.dir}", hint="start one with `llmforge run`")
        if ref is None:
            whole = [r for r in runs if not r.damaged]
            if not whole:
                return _readable(runs[-1])
            return whole[-1]
        matches = [r for r in runs if r.id == ref] or [r for r in runs if r.id.startswith(ref)]
        if not matches:
            raise UsageError(f"no run '{ref}' in {self.dir}", hint="`llmforge runs list` shows them")
        if len(matches) > 1:
            raise UsageError(f"'{ref}' matches {len(matches)} runs: {', '.join(r.id for r in matches[:5])}")
        return _readable(matches[0])

    def create(self, run_id: str | None = None) -> Path:
        run_id = run_id or new_run_id()
        d = self.dir / run_id
        d.mkdir(parents=True, exist_ok=True)
        if (d / MANIFEST).exists():
            raise UsageError(f"run {run_id} already exists", hint="use --resume to continue it")
        return d

    def clean_tmp(self, stage_dir: Path) -> None:
        """Remove what an interrupted attempt left half-written (.tmp-* and .old-* names)."""
        arts = stage_dir / "artifacts"
        if arts.is_dir():
            for p in arts.iterdir():
                if p.name.startswith((".tmp-", ".old-")):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _read_run(d: Path) -> RunInfo | None:
    """The run in folder `d`; a damaged RunInfo when its manifest is unreadable, or missing while the
    folder holds a run's other files; None for a folder that is no run at all."""
    m = d / MANIFEST
    if not m.exists():
        if (d / EVENTS).exists() or (d / "stages").is_dir():
            return RunInfo(d.name, d, {}, damaged=f"{m}: missing")
        return None
    try:
        data = json.loads(m.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        return RunInfo(d.name, d, {}, damaged=f"{m}: cannot be read ({exc})")
    if not isinstance(data, dict):
        return RunInfo(d.name, d, {}, damaged=f"{m}: not a JSON object")
    return RunInfo(d.name, d, data)


def _whole(run: RunInfo) -> RunInfo:
    if run.damaged:
        raise UsageError(
            f"run {run.id} is damaged: {run.damaged}",
            hint="its stage folders may still hold artifacts; start a new run with `llmforge run`",
        )
    return run


def _mtime(d: Path) -> float:
    try:
        return d.stat().st_mtime
    except OSError:
        return 0.0


# Runs written by this process, by resolved folder: request() also tells their writer directly. The file
# alone is polled (a stat at most a few times a second), so a request made in this very process (a plugin's
# on_event observer, a test) could land between two polls and be missed by a stage that ends soon after.
_IN_PROCESS: dict[Path, Callable[[str], None]] = {}


def watch_requests(run_dir: Path, notify: Callable[[str], None]) -> Callable[[], None]:
    """While a run is written by this process, `notify(what)` hears every request() made here for it at
    once. Returns the function that stops listening."""
    key = Path(run_dir).resolve()
    _IN_PROCESS[key] = notify

    def unwatch() -> None:
        _IN_PROCESS.pop(key, None)

    return unwatch


def request(run_dir: Path, what: str) -> None:
    """Leave a request file the running stage polls (stop or checkpoint). Works across hosts
    that share the run directory, and for detached runs with no terminal. Made in the process that
    writes the run (an on_event observer), it takes effect at once: the next ``ctx.should_stop()``
    sees it."""
    atomic_write_text(run_dir / what, json.dumps({"time": time.time(), "pid": os.getpid()}))
    notify = _IN_PROCESS.get(Path(run_dir).resolve())
    if notify is not None:
        notify(what)
