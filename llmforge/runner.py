"""Executes a pipeline into the run store: cache checks, one stage after another, events, resume.

The runner is UI-free: the CLI passes listeners that render events, the TUI reads events.jsonl.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Callable, Literal

from llmforge import __version__
from llmforge.backend import build_backend
from llmforge.errors import (EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, ForgeError, LockedError,
                             UsageError)
from llmforge.events import EventWriter
from llmforge.hardware import snapshot
from llmforge.pipeline import Pipeline, compute_keys, resolve_options
from llmforge.planning import fit_check
from llmforge.runs import (CHECKPOINT_REQUEST, EVENTS, MANIFEST, STOP_REQUEST, RunInfo, RunLock, RunStore,
                           atomic_write_json, lock_is_live, read_lock, watch_requests)
from llmforge.schema import did_you_mean
from llmforge.stage import Artifact, StageContext

FINISHED = ("done", "cached")
INTERRUPTED = ("stopped", "failed", "killed", "running")
LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "deepspeed", "llama_cpp_python", "gguf",
             "pluggy", "pydantic")


@dataclass
class RunRequest:
    only: list[str] = field(default_factory=list)  # --stage: these (and what they need)
    from_stage: str | None = None  # --from: this and everything downstream re-run
    resume: bool = False
    run_ref: str | None = None  # --run: the run to resume, or the id of the new run
    force: bool = False  # ignore caches (of the --stage stages when given)
    # The fit check (llmforge.planning.fit_check), made before any run folder exists: "check" refuses a
    # selected stage whose estimate clearly exceeds this machine (exit code 2); "skip" (--no-fit-check) starts.
    fit: Literal["check", "skip"] = "check"
    listeners: list[Callable[[dict], None]] = field(default_factory=list)

    @property
    def selection(self) -> dict:
        """What the manifest records as this run's selection; a resume without one continues with it."""
        return {"stages": list(self.only), "from": self.from_stage, "force": self.force}

    def has_selection(self) -> bool:
        return bool(self.only or self.from_stage or self.force)


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    status: str
    exit_code: int
    stages: dict


def versions() -> dict:
    out = {"python": sys.version.split()[0], "llmforge": __version__}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


class _StopFlag:
    """Set by SIGINT/SIGTERM, by a stop.request file, or at once by request() in this process (an on_event
    observer: see llmforge.runs.watch_requests); polled by stages through ctx.should_stop()."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.signalled = False
        self.signals = 0
        self.requested = False
        self._last = 0.0
        self._file = False

    def __call__(self) -> bool:
        now = time.monotonic()
        # The file comes from another process (`llmforge stop`, the TUI, another host): a stat at most 5
        # times a second, as some stages ask per row. Requests made in this process do not wait for it.
        if not self._file and now - self._last > 0.2:
            self._last = now
            self._file = (self.run_dir / STOP_REQUEST).exists()
        return self.signalled or self.requested or self._file

    def on_request(self, what: str) -> None:
        if what == STOP_REQUEST:
            self.requested = True

    def on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self.signals += 1
        self.signalled = True
        if self.signals >= 3:  # third time: the user really wants out now
            raise KeyboardInterrupt


def _checkpoint_check(run_dir: Path) -> Callable[[], bool]:
    def check() -> bool:
        req = run_dir / CHECKPOINT_REQUEST
        if req.exists():
            req.unlink(missing_ok=True)
            return True
        return False

    return check


def _select(pipe: Pipeline, req: RunRequest) -> tuple[set[str], set[str]]:
    """(stages to consider, stages forced to re-run)."""
    names = pipe.names
    for n in [*req.only, *([req.from_stage] if req.from_stage else [])]:
        if n not in names:
            raise UsageError(f"no stage named '{n}'{did_you_mean(n, names)}", hint=f"stages: {', '.join(names)}")
    selected = pipe.upstream(set(req.only)) if req.only else set(names)
    # --force re-runs what was asked for: the --stage stages when given (their inputs may still come
    # from the cache), else every stage.
    forced: set[str] = (set(req.only) or set(names)) if req.force else set()
    if req.from_stage:
        forced |= pipe.downstream({req.from_stage})
        if req.only:
            forced &= selected
    return selected, forced


def _find_cached(store: RunStore, name: str, key: str, skip: str) -> tuple[RunInfo, dict] | None:
    """The most recent finished stage with this key whose artifacts still exist."""
    for run in reversed(store.list()):
        if run.id == skip:
            continue
        st = run.manifest.get("stages", {}).get(name)
        if st and st.get("key") == key and st.get("status") in FINISHED:
            arts = st.get("artifacts", {})
            if all(Path(a["path"]).exists() for a in arts.values()):
                return run, st
    return None


def find_resumable(store: RunStore, cfg, ref: str | None) -> RunInfo:
    """The run `--resume` continues: the named one, else the last interrupted run of this config."""
    if ref:
        run = store.get(ref)
    else:
        candidates = [r for r in store.list() if r.config_path == str(cfg.path) and r.status in INTERRUPTED]
        if not candidates:
            raise UsageError("nothing to resume: no interrupted run of this forge.toml",
                             hint="start a new one with `llmforge run`")
        run = candidates[-1]
    if run.status == "done":
        raise UsageError(f"run {run.id} has finished; nothing to resume")
    return run


def _open_run(pipe: Pipeline, store: RunStore, req: RunRequest, emit_note: list[str]) -> tuple[Path, RunLock, dict]:
    cfg_path = str(pipe.config.path)
    same_config = [r for r in store.list() if r.config_path == cfg_path]
    if req.resume:
        run = find_resumable(store, pipe.config, req.run_ref)
        lock = RunLock(run.dir)
        if lock.acquire():
            emit_note.append(f"took over the stale lock of run {run.id}")
        return run.dir, lock, dict(run.manifest)

    for run in same_config:
        info = read_lock(run.dir)
        if info and lock_is_live(info):
            raise LockedError(f"run {run.id} of this forge.toml is still running (pid {info.get('pid')})",
                              hint=f"follow it with `llmforge logs {run.id} -f` or stop it with "
                                   f"`llmforge stop {run.id}`")
        if run.manifest.get("status") in ("running", "starting"):
            # Its writer died (SIGKILL, power loss): take its stale lock and record that.
            lock = RunLock(run.dir)
            try:
                lock.acquire()
            except LockedError:
                continue
            try:
                run.manifest["status"] = "killed"
                atomic_write_json(run.dir / MANIFEST, run.manifest)
                emit_note.append(f"run {run.id} was killed; took over its stale lock and marked it killed "
                                 f"(`llmforge run --resume` continues it)")
            finally:
                lock.release()
    run_dir = store.create(req.run_ref)
    lock = RunLock(run_dir)
    lock.acquire()
    return run_dir, lock, {}


def run_pipeline(pipe: Pipeline, req: RunRequest | None = None, registry=None) -> RunResult:
    from llmforge.plugins import get_registry

    req = req or RunRequest()
    registry = registry or get_registry()
    cfg = pipe.config
    store = RunStore(cfg.runs_dir)
    selected, forced = _select(pipe, req)  # a bad --stage/--from is refused before any run folder exists
    if req.fit == "check":
        fit_check(pipe, req.only, req.from_stage)  # so is a stage that cannot fit this machine
    notes: list[str] = []  # warnings for the run's first events
    info_notes: list[str] = []
    run_dir, lock, previous = _open_run(pipe, store, req, notes)
    run_id = run_dir.name
    if req.resume and not req.has_selection() and previous.get("selection"):
        # `--resume` alone continues the interrupted attempt as it was asked for: without its recorded
        # --stage/--from/--force, a forced stage would be taken from the cache (the result it was forced
        # to replace) and its checkpoint never used. A selection given with --resume replaces it.
        rec = previous["selection"]
        req = replace(req, only=list(rec.get("stages") or []), from_stage=rec.get("from"),
                      force=bool(rec.get("force")))
        try:
            selected, forced = _select(pipe, req)
        except UsageError as exc:
            lock.release()
            raise UsageError(f"run {run_id} was started with {_selection_args(req)}: {exc.message}",
                             hint="resume it naming the stages to run (--stage/--from), or start a new run") \
                from None
        info_notes.append(f"resuming with the selection of run {run_id}: {_selection_args(req)}")
    keys = compute_keys(pipe, registry)
    for name in (STOP_REQUEST, CHECKPOINT_REQUEST):
        (run_dir / name).unlink(missing_ok=True)

    manifest = {
        "id": run_id,
        "created": previous.get("created", time.time()),
        "config_path": str(cfg.path),
        "project": cfg.name,
        "config": cfg.raw,
        "status": "running",
        "pid": os.getpid(),
        "exit_code": None,
        "versions": versions(),
        "hardware": snapshot(cfg.runs_dir),
        "resumed": previous.get("resumed", []) + ([time.time()] if req.resume else []),
        "selection": req.selection,
        "stages": {},
    }
    old_stages = previous.get("stages", {})
    # What this run's stages were computed from before (on --resume): a changed key invalidates them.
    prev_keys = {name: st.get("key") for name, st in old_stages.items()}
    for spec in pipe.stages:
        old = old_stages.get(spec.name, {})
        manifest["stages"][spec.name] = {**old, "uses": spec.uses, "key": keys[spec.name],
                                         "status": old.get("status", "pending")}

    def save() -> None:
        atomic_write_json(run_dir / MANIFEST, manifest)

    save()
    backend = build_backend(cfg, registry)
    tracker_notes: list[str] = []
    trackers = _start_trackers(cfg, run_dir, registry, tracker_notes)
    events = EventWriter(run_dir / EVENTS, run_id,
                         listeners=[*req.listeners, *_observers(registry, run_dir), *(t.on_event for t in trackers)])
    stop = _StopFlag(run_dir)
    restore = _install_signals(stop)
    unwatch = watch_requests(run_dir, stop.on_request)
    registry.pm.hook.configure.call_historic(kwargs={"config": cfg})

    events.emit("run_start", config=str(cfg.path), stages=pipe.names, resume=req.resume,
                selected=[n for n in pipe.names if n in selected], selection=req.selection)
    for note in notes + tracker_notes:
        events.emit("log", level="warning", message=note)
    for note in info_notes:
        events.emit("log", level="info", message=note)
    if not req.resume:
        _hint_interrupted(store, cfg, run_id, events)

    artifacts: dict[str, dict[str, Artifact]] = {}
    status, exit_code = "done", EXIT_OK
    try:
        for spec in pipe.stages:
            st = manifest["stages"][spec.name]
            key = keys[spec.name]
            same_key = prev_keys.get(spec.name) == key
            if spec.name not in selected:
                if st["status"] in FINISHED and same_key:
                    artifacts[spec.name] = _artifacts_of(st, spec.name)
                else:
                    st["status"] = "skipped"
                continue
            if stop():
                status, exit_code = "stopped", EXIT_INTERRUPTED
                break
            blocked = [d for d in pipe.deps[spec.name] if d not in artifacts]
            if blocked:
                st["status"] = "blocked"
                events.emit("stage_end", stage=spec.name, status="blocked", reason=f"needs {', '.join(blocked)}")
                continue

            # 1. Finished in this very run before it was interrupted (only a resume has earlier statuses):
            # reuse it. A forced stage too when it ran here ("done"): the attempt being continued already
            # re-ran it; "cached" means it did not, so a forced one still runs.
            reusable = ("done",) if spec.name in forced else FINISHED
            if st["status"] in reusable and same_key and \
                    all(Path(a["path"]).exists() for a in st.get("artifacts", {}).values()):
                artifacts[spec.name] = _artifacts_of(st, spec.name)
                events.emit("stage_cached", stage=spec.name, from_run=st.get("cached_from", run_id))
                continue
            # 2. Finished in an earlier run with the same key: reuse, unless forced.
            if spec.name not in forced:
                hit = _find_cached(store, spec.name, key, skip=run_id)
                if hit is not None:
                    src_run, src = hit
                    st.update(status="cached", cached_from=src.get("cached_from", src_run.id),
                              artifacts=src.get("artifacts", {}), duration=0.0, error=None,
                              info=src.get("info", {}))
                    artifacts[spec.name] = _artifacts_of(st, spec.name)
                    save()
                    events.emit("stage_cached", stage=spec.name, from_run=st["cached_from"])
                    continue

            # 3. Run it: from its checkpoints when this run was interrupted in it with the same key.
            resume = req.resume and st.get("status") in INTERRUPTED and same_key
            if req.resume and st.get("status") in INTERRUPTED and not same_key:
                events.emit("log", stage=spec.name, level="warning",
                            message=f"stage {spec.name} changed since it was interrupted (options or inputs): "
                                    f"its checkpoints do not apply, it starts afresh")
            stage_dir = run_dir / "stages" / spec.name
            if not resume and stage_dir.exists():
                shutil.rmtree(stage_dir)  # a different key or a forced re-run: old checkpoints don't apply
            stage_dir.mkdir(parents=True, exist_ok=True)
            store.clean_tmp(stage_dir)
            outcome, code = _run_stage(spec, pipe, registry, artifacts, run_id, run_dir, stage_dir, resume,
                                       st, events, stop, cfg, save, backend)
            if outcome == "done":
                continue
            status, exit_code = outcome, code
            break
    except KeyboardInterrupt:
        status, exit_code = "stopped", EXIT_INTERRUPTED
    finally:
        for spec in pipe.stages:
            if manifest["stages"][spec.name]["status"] == "running":
                manifest["stages"][spec.name]["status"] = "stopped"
        manifest["status"] = status
        manifest["exit_code"] = exit_code
        manifest["finished"] = time.time()
        save()
        events.emit("run_end", status=status, exit_code=exit_code,
                    stages={n: s["status"] for n, s in manifest["stages"].items()})
        events.close()
        for tracker in trackers:
            try:
                tracker.close()
            except Exception:  # noqa: BLE001 - a tracker never fails a finished run
                pass
        restore()
        unwatch()
        for name in (STOP_REQUEST, CHECKPOINT_REQUEST):
            (run_dir / name).unlink(missing_ok=True)
        lock.release()
    return RunResult(run_id, run_dir, status, exit_code, manifest["stages"])


def _start_trackers(cfg, run_dir: Path, registry, notes: list[str]) -> list:
    """The trackers enabled in [trackers]; one that cannot start is skipped, with a warning event."""
    out = []
    for name, options in cfg.trackers.items():
        try:
            out.append(registry.trackers[name](options, run_dir, cfg))
        except Exception as exc:  # noqa: BLE001
            notes.append(f"tracker {name} could not start and is disabled: {type(exc).__name__}: {exc}")
    return out


def _observers(registry, run_dir: Path) -> list[Callable[[dict], None]]:
    """One listener per on_event implementation: a failing observer is disabled alone. Each gets the
    arguments it names, so implementations written before `run_dir` existed keep working."""
    out = []
    for impl in reversed(registry.pm.hook.on_event.get_hookimpls()):
        def listener(event: dict, _f=impl.function, _names=tuple(impl.argnames)) -> None:
            offered = {"event": event, "run_dir": run_dir}
            _f(**{k: v for k, v in offered.items() if k in _names})

        listener.__name__ = f"on_event of plugin {impl.plugin_name}"
        out.append(listener)
    return out


def _artifacts_of(st: dict, stage: str) -> dict[str, Artifact]:
    return {k: Artifact(kind=k, path=Path(a["path"]), stage=stage, key=st.get("key"))
            for k, a in st.get("artifacts", {}).items()}


def _run_stage(spec, pipe, registry, artifacts, run_id, run_dir, stage_dir, resume, st, events, stop, cfg, save,
               backend=None):
    inputs = {}
    for u in pipe.inputs[spec.name]:
        if u.ref_stage:
            inputs[u.key] = artifacts[u.ref_stage][u.ref_kind]
        else:
            inputs[u.key] = Artifact(kind="path", path=u.path)
    options = resolve_options(spec, pipe.inputs[spec.name], inputs)
    ctx = StageContext(
        stage_name=spec.name, run_id=run_id, run_dir=run_dir, stage_dir=stage_dir, inputs=inputs,
        emit=functools.partial(_emit_in_stage, events, spec.name), stop_check=stop,
        checkpoint_check=_checkpoint_check(run_dir), resume=resume, seed=cfg.project.seed,
        project_dir=cfg.project_dir, backend=backend,
    )
    started = time.time()
    st.update(status="running", started=started, error=None, artifacts={})
    st.pop("cached_from", None)
    save()
    events.emit("stage_start", stage=spec.name, uses=spec.uses, key=st["key"], resume=resume)
    outcome, code, error = "done", EXIT_OK, None
    try:
        with _warnings_to_events(ctx):
            handled = registry.pm.hook.execute_stage(stage=spec.cls(), options=options, ctx=ctx)
        if handled is None:
            raise ForgeError(f"no plugin executed stage kind '{spec.uses}'")
        missing = [k for k in spec.cls().outputs(options) if k not in ctx.published]
        # A stage is stopped when it saw the stop (ctx.should_stop() said so and it returned early). A stop
        # it never looked at, because it came while the outputs were being written, is deferred: the stage
        # finished and published everything, so it is done, and the run stops before the next stage.
        # A stage that returned without its outputs while a stop was pending was stopped, not broken.
        if ctx.stop_seen or (missing and stop()):
            outcome, code = "stopped", EXIT_INTERRUPTED
        elif missing:
            raise ForgeError(f"stage kind '{spec.uses}' declares it produces {', '.join(missing)} "
                             f"but did not write it")
    except KeyboardInterrupt:
        outcome, code, error = "stopped", EXIT_INTERRUPTED, "interrupted"
    except ForgeError as exc:
        outcome, code, error = "failed", exc.exit_code, exc.render()
    except Exception as exc:  # noqa: BLE001 - the run records the failure; the CLI shows it
        outcome, code, error = "failed", EXIT_FAILED, f"{type(exc).__name__}: {exc}"
        (stage_dir / "error.log").write_text(traceback.format_exc())
    if outcome != "done":
        # Never a stopped or failed stage with a published artifact: what it did publish (the first of
        # two, say) is removed, so nothing downstream, no cache lookup and no resume takes it for a result.
        for art in ctx.published.values():
            shutil.rmtree(art.path, ignore_errors=True)
        ctx.published.clear()
    st.update(status=outcome, ended=time.time(), duration=round(time.time() - started, 3), error=error,
              artifacts={k: {"kind": a.kind, "path": str(a.path)} for k, a in ctx.published.items()})
    if ctx.info:
        st["info"] = ctx.info
    if outcome == "done":
        artifacts[spec.name] = {k: Artifact(k, a.path, spec.name, st["key"]) for k, a in ctx.published.items()}
    save()
    extra = {"error": error} if error else {}
    if outcome == "failed" and code == EXIT_FAILED and (stage_dir / "error.log").exists():
        extra["traceback_file"] = str(stage_dir / "error.log")
    events.emit("stage_end", stage=spec.name, status=outcome, duration=st["duration"], **extra)
    if outcome == "failed" and code not in (EXIT_FAILED, EXIT_BAD_INPUT):
        code = EXIT_FAILED
    return outcome, code


@contextlib.contextmanager
def _warnings_to_events(ctx):
    """Python warnings raised inside a stage (libraries are chatty) become one log event each, once.
    Library chatter (their deprecation warnings and routine log lines) becomes a debug event: in the
    run's events, not in the user's face (see llmforge/chatter.py)."""
    from llmforge.chatter import is_library_chatter, library_logs_to

    seen: set = set()

    def show(message, category, filename, lineno, file=None, line=None):
        key = (category, str(message))
        if key not in seen:
            seen.add(key)
            level = "debug" if is_library_chatter(category, filename) else "warning"
            ctx.log(f"{category.__name__}: {message}", level=level)

    with warnings.catch_warnings(), library_logs_to(lambda level, text: ctx.log(text, level=level)):
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield


def _emit_in_stage(events: EventWriter, stage: str, type: str, **data) -> None:
    events.emit(type, stage=stage, **data)


def _selection_args(req: RunRequest) -> str:
    """The selection as the command line says it: `--stage sft --force`."""
    parts = [f"--stage {s}" for s in req.only] + ([f"--from {req.from_stage}"] if req.from_stage else [])
    return " ".join(parts + (["--force"] if req.force else [])) or "no selection"


def _hint_interrupted(store: RunStore, cfg, run_id: str, events: EventWriter) -> None:
    """Never restart silently: say when an earlier run of this config could be resumed instead."""
    for run in reversed(store.list()):
        if run.id == run_id or run.config_path != str(cfg.path):
            continue
        if run.status in ("stopped", "killed", "failed"):
            stuck = [n for n, s in run.manifest.get("stages", {}).items() if s.get("status") in INTERRUPTED]
            if stuck:
                events.emit("log", level="warning",
                            message=f"run {run.id} was {run.status} in stage {stuck[0]}; this new run starts "
                                    f"that stage afresh (`llmforge run --resume` would continue the old one)")
        break


def _install_signals(stop: _StopFlag) -> Callable[[], None]:
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, stop.on_signal)

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)

    return restore
