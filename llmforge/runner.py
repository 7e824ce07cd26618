"""Executes a pipeline into the run store: cache checks, one stage after another, events, resume.

The runner is UI-free: the CLI passes listeners that render events, the TUI reads events.jsonl.

One call of `run_pipeline` is one *attempt* of a run: a new run, or `--resume` continuing an interrupted
one in the same folder. The attempt opens the run (taking its lock), writes the manifest, then walks the
stages in pipeline order; for each it decides, in this order (see the loop for why):

1. not selected (--stage): keep its earlier result if there is one, else mark it skipped;
2. an input stage has no result: blocked;
3. finished in this very run before the interruption, with the same key: reused;
4. finished in an earlier run with the same cache key, artifacts still on disk: reused (cached), unless
   forced (--force, --from);
5. else run it, from its checkpoints when this run was interrupted in it with the same key.

A stop (Ctrl-C, SIGTERM, `llmforge stop`, a stop.request) never kills a stage: it sets a flag the stage
polls (`ctx.should_stop()`); the stage saves and returns, is recorded `stopped`, and the run ends with
exit code 130 before the next stage. The manifest is rewritten atomically after each change, so a
killed writer leaves a manifest that says where it was (`running`, read as `killed`).
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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from llmforge import __version__
from llmforge.backend import build_backend
from llmforge.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, ForgeError, LockedError, UsageError
from llmforge.events import EventWriter, Listener
from llmforge.hardware import snapshot
from llmforge.pipeline import Pipeline, compute_keys, resolve_options
from llmforge.planning import fit_check
from llmforge.runs import (
    CHECKPOINT_REQUEST,
    EVENTS,
    STOP_REQUEST,
    Manifest,
    RunInfo,
    RunLock,
    RunStore,
    StageRecord,
    lock_is_live,
    read_lock,
    watch_requests,
)
from llmforge.schema import did_you_mean
from llmforge.stage import Artifact, StageContext
from llmforge.status import FINISHED, INTERRUPTED, LIVE, Status

if TYPE_CHECKING:
    from llmforge.backend import Backend
    from llmforge.config import ForgeConfig
    from llmforge.pipeline import StageSpec
    from llmforge.plugins import Registry

LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "deepspeed",
    "llama_cpp_python",
    "gguf",
    "pluggy",
    "pydantic",
)


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
    listeners: list[Listener] = field(default_factory=list)  # each gets every event dict as it is written

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
    status: Status
    exit_code: int
    stages: dict[str, dict[str, Any]]  # the manifest's stages, as manifest.json holds them


@dataclass
class RunSession:
    """One attempt of a run, as each of its stages is run in it: what `_run_stage` needs besides the
    stage itself. `artifacts` grows as stages finish (stage name -> kind -> Artifact): a stage's inputs
    are looked up there, so only results of this attempt (run, reused or cached) feed later stages."""

    pipe: Pipeline
    registry: Registry
    store: RunStore
    run_dir: Path
    manifest: Manifest
    events: EventWriter
    stop: _StopFlag
    backend: Backend | None = None
    artifacts: dict[str, dict[str, Artifact]] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return self.run_dir.name

    @property
    def config(self) -> ForgeConfig:
        return self.pipe.config

    def save(self) -> None:
        """Write the manifest now: after every status change, so a killed writer leaves it accurate."""
        self.manifest.save(self.run_dir)


def versions() -> dict[str, str]:
    """The versions the manifest records: Python, llmforge and the libraries a result may depend on
    (read from package metadata, never imported: torch costs seconds)."""
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

    def on_signal(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        # A signal only sets the flag: raising here would land anywhere in the stage (half-way through a
        # checkpoint save, say). The stage sees it at its next should_stop() and saves before returning.
        self.signals += 1
        self.signalled = True
        if self.signals >= 3:  # third time: the user really wants out now
            raise KeyboardInterrupt


def _checkpoint_check(run_dir: Path) -> Callable[[], bool]:
    """ctx.checkpoint_requested(): True once per `llmforge checkpoint` (the request file is consumed)."""

    def check() -> bool:
        req = run_dir / CHECKPOINT_REQUEST
        if req.exists():
            req.unlink(missing_ok=True)
            return True
        return False

    return check


def _select(pipe: Pipeline, req: RunRequest) -> tuple[set[str], set[str]]:
    """(stages to consider, stages forced to re-run).

    --stage X selects X and what it needs (upstream): those run only if their result is not cached.
    --from X forces X and everything downstream of it, since their inputs change with it."""
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


def _find_cached(store: RunStore, name: str, key: str, skip: str) -> tuple[RunInfo, StageRecord] | None:
    """The most recent finished stage with this key whose artifacts still exist.

    The key covers the stage's kind and version, its options, its inputs' keys and the libraries it
    names, so an equal key means the same result; any run of any config in the runs folder may supply
    it. Artifacts deleted since (a user cleaning up) make that run no source."""
    for run in reversed(store.list()):
        if run.id == skip:
            continue
        st = run.record.stages.get(name)
        if st and st.key == key and st.status in FINISHED and _artifacts_exist(st):
            return run, st
    return None


def _artifacts_exist(st: StageRecord) -> bool:
    return all(Path(a["path"]).exists() for a in st.artifacts.values())


def find_resumable(store: RunStore, cfg: ForgeConfig, ref: str | None) -> RunInfo:
    """The run `--resume` continues: the named one, else the last interrupted run of this config."""
    if ref:
        run = store.get(ref)
    else:
        candidates = [r for r in store.list() if r.config_path == str(cfg.path) and r.status in INTERRUPTED]
        if not candidates:
            raise UsageError(
                "nothing to resume: no interrupted run of this forge.toml", hint="start a new one with `llmforge run`"
            )
        run = candidates[-1]
    if run.status == Status.DONE:
        raise UsageError(f"run {run.id} has finished; nothing to resume")
    return run


def _open_run(
    pipe: Pipeline, store: RunStore, req: RunRequest, emit_note: list[str]
) -> tuple[Path, RunLock, Manifest | None]:
    """The run folder this attempt writes, its lock (held), and the manifest of the attempt it
    continues (None for a new run)."""
    cfg_path = str(pipe.config.path)
    same_config = [r for r in store.list() if r.config_path == cfg_path]
    if req.resume:
        run = find_resumable(store, pipe.config, req.run_ref)
        lock = RunLock(run.dir)
        if lock.acquire():
            emit_note.append(f"took over the stale lock of run {run.id}")
        return run.dir, lock, run.record

    for run in same_config:
        info = read_lock(run.dir)
        if info and lock_is_live(info):
            raise LockedError(
                f"run {run.id} of this forge.toml is still running (pid {info.get('pid')})",
                hint=f"follow it with `llmforge logs {run.id} -f` or stop it with `llmforge stop {run.id}`",
            )
        if run.record.status in LIVE:
            # Its writer died (SIGKILL, power loss): take its stale lock and record that, so the manifest
            # no longer claims a live run and `--resume` finds it as an interrupted one.
            lock = RunLock(run.dir)
            try:
                lock.acquire()
            except LockedError:
                continue
            try:
                run.record.status = Status.KILLED
                run.record.save(run.dir)
                emit_note.append(
                    f"run {run.id} was killed; took over its stale lock and marked it killed "
                    f"(`llmforge run --resume` continues it)"
                )
            finally:
                lock.release()
    run_dir = store.create(req.run_ref)
    lock = RunLock(run_dir)
    lock.acquire()
    return run_dir, lock, None


def run_pipeline(pipe: Pipeline, req: RunRequest | None = None, *, registry: Registry) -> RunResult:
    """Run one attempt of `pipe` into its runs folder (a new run, or `req.resume` continuing one) and say
    how it ended. A stage's failure or a stop is recorded and returned, not raised; a bad request (an
    unknown --stage, nothing to resume, a live run of this config, a stage that cannot fit this machine)
    raises a ForgeError before any stage runs."""
    req = req or RunRequest()
    cfg = pipe.config
    store = RunStore(cfg.runs_dir)
    selected, forced = _select(pipe, req)  # a bad --stage/--from is refused before any run folder exists
    if req.fit == "check":
        fit_check(pipe, req.only, req.from_stage)  # so is a stage that cannot fit this machine
    notes: list[str] = []  # warnings for the run's first events
    info_notes: list[str] = []
    run_dir, lock, previous = _open_run(pipe, store, req, notes)
    run_id = run_dir.name
    if req.resume and not req.has_selection() and previous is not None and previous.selection:
        # `--resume` alone continues the interrupted attempt as it was asked for: without its recorded
        # --stage/--from/--force, a forced stage would be taken from the cache (the result it was forced
        # to replace) and its checkpoint never used. A selection given with --resume replaces it.
        rec = previous.selection
        req = replace(req, only=list(rec.get("stages") or []), from_stage=rec.get("from"), force=bool(rec.get("force")))
        try:
            selected, forced = _select(pipe, req)
        except UsageError as exc:
            lock.release()
            raise UsageError(
                f"run {run_id} was started with {_selection_args(req)}: {exc.message}",
                hint="resume it naming the stages to run (--stage/--from), or start a new run",
            ) from None
        info_notes.append(f"resuming with the selection of run {run_id}: {_selection_args(req)}")
    keys = compute_keys(pipe, registry)
    # Requests left by an earlier attempt (a stop that came after it ended) must not stop this one.
    for name in (STOP_REQUEST, CHECKPOINT_REQUEST):
        (run_dir / name).unlink(missing_ok=True)

    old_stages = previous.stages if previous is not None else {}
    manifest = Manifest(
        id=run_id,
        created=previous.created if previous is not None and previous.created else time.time(),
        config_path=str(cfg.path),
        project=cfg.name,
        config=cfg.raw,
        status=Status.RUNNING,
        pid=os.getpid(),
        versions=versions(),
        hardware=snapshot(cfg.runs_dir),
        resumed=(previous.resumed if previous is not None else []) + ([time.time()] if req.resume else []),
        selection=req.selection,
        # A resumed run keeps what its stages recorded (status, artifacts, info): the loop below decides,
        # stage by stage, whether that still holds.
        stages={
            spec.name: replace(old_stages.get(spec.name) or StageRecord(), uses=spec.uses, key=keys[spec.name])
            for spec in pipe.stages
        },
    )
    # What this run's stages were computed from before (on --resume): a changed key invalidates them.
    prev_keys = {name: st.key for name, st in old_stages.items()}
    manifest.save(run_dir)
    backend = build_backend(cfg, registry)
    tracker_notes: list[str] = []
    trackers = _start_trackers(cfg, run_dir, registry, tracker_notes)
    events = EventWriter(
        run_dir / EVENTS,
        run_id,
        listeners=[*req.listeners, *_observers(registry, run_dir), *(t.on_event for t in trackers)],
    )
    stop = _StopFlag(run_dir)
    session = RunSession(
        pipe=pipe,
        registry=registry,
        store=store,
        run_dir=run_dir,
        manifest=manifest,
        events=events,
        stop=stop,
        backend=backend,
    )
    restore = _install_signals(stop)
    unwatch = watch_requests(run_dir, stop.on_request)
    registry.hook.configure.call_historic(kwargs={"config": cfg})

    events.emit(
        "run_start",
        config=str(cfg.path),
        stages=pipe.names,
        resume=req.resume,
        selected=[n for n in pipe.names if n in selected],
        selection=req.selection,
    )
    for note in notes + tracker_notes:
        events.emit("log", level="warning", message=note)
    for note in info_notes:
        events.emit("log", level="info", message=note)
    if not req.resume:
        _hint_interrupted(store, cfg, run_id, events)

    artifacts = session.artifacts
    status, exit_code = Status.DONE, EXIT_OK
    try:
        for spec in pipe.stages:
            st = manifest.stages[spec.name]
            key = keys[spec.name]
            same_key = prev_keys.get(spec.name) == key
            if spec.name not in selected:
                # Not asked for (--stage): a result it has from before in this run still feeds the selected
                # stages downstream; without one it is skipped, and what needs it is blocked.
                if st.status in FINISHED and same_key:
                    artifacts[spec.name] = _artifacts_of(st, spec.name)
                else:
                    st.status = Status.SKIPPED
                continue
            # A stop is honoured between stages too: the next stage does not start.
            if stop():
                status, exit_code = Status.STOPPED, EXIT_INTERRUPTED
                break
            blocked = [d for d in pipe.deps[spec.name] if d not in artifacts]
            if blocked:
                st.status = Status.BLOCKED
                events.emit("stage_end", stage=spec.name, status=Status.BLOCKED, reason=f"needs {', '.join(blocked)}")
                continue

            # 1. Finished in this very run before it was interrupted (only a resume has earlier statuses):
            # reuse it. A forced stage too when it ran here ("done"): the attempt being continued already
            # re-ran it; "cached" means it did not, so a forced one still runs.
            reusable = {Status.DONE} if spec.name in forced else FINISHED
            if st.status in reusable and same_key and _artifacts_exist(st):
                artifacts[spec.name] = _artifacts_of(st, spec.name)
                events.emit("stage_cached", stage=spec.name, from_run=st.cached_from or run_id)
                continue
            # 2. Finished in an earlier run with the same key: reuse, unless forced.
            if spec.name not in forced:
                hit = _find_cached(store, spec.name, key, skip=run_id)
                if hit is not None:
                    src_run, src = hit
                    # `cached_from` names the run that computed it, never a run that itself took it from
                    # the cache, so following it leads to the stage's logs and checkpoints.
                    st.status, st.cached_from = Status.CACHED, src.cached_from or src_run.id
                    st.artifacts, st.duration, st.error, st.info = dict(src.artifacts), 0.0, None, dict(src.info)
                    artifacts[spec.name] = _artifacts_of(st, spec.name)
                    session.save()
                    events.emit("stage_cached", stage=spec.name, from_run=st.cached_from)
                    continue

            # 3. Run it: from its checkpoints when this run was interrupted in it with the same key.
            # "running" counts as interrupted: a writer that died mid-stage could not record anything else.
            resume = req.resume and st.status in INTERRUPTED and same_key
            if req.resume and st.status in INTERRUPTED and not same_key:
                events.emit(
                    "log",
                    stage=spec.name,
                    level="warning",
                    message=f"stage {spec.name} changed since it was interrupted (options or inputs): "
                    f"its checkpoints do not apply, it starts afresh",
                )
            stage_dir = run_dir / "stages" / spec.name
            if not resume and stage_dir.exists():
                shutil.rmtree(stage_dir)  # a different key or a forced re-run: old checkpoints don't apply
            stage_dir.mkdir(parents=True, exist_ok=True)
            store.clean_tmp(stage_dir)
            outcome, code = _run_stage(session, spec, stage_dir, resume)
            if outcome == Status.DONE:
                continue
            # A stopped or failed stage ends the run: what follows would need its result, and a stop
            # means "stop now, resume later", not "skip this one".
            status, exit_code = outcome, code
            break
    except KeyboardInterrupt:
        status, exit_code = Status.STOPPED, EXIT_INTERRUPTED
    finally:
        # Whatever happened, the manifest and the events end consistent: no stage left "running", a
        # run_end event, the lock and any pending request removed.
        for st in manifest.stages.values():
            if st.status == Status.RUNNING:
                st.status = Status.STOPPED
        manifest.status = status
        manifest.exit_code = exit_code
        manifest.finished = time.time()
        session.save()
        events.emit(
            "run_end", status=status, exit_code=exit_code, stages={n: s.status for n, s in manifest.stages.items()}
        )
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
    return RunResult(run_id, run_dir, status, exit_code, manifest.to_dict()["stages"])


def _start_trackers(cfg: ForgeConfig, run_dir: Path, registry: Registry, notes: list[str]) -> list[Any]:
    """The trackers enabled in [trackers]; one that cannot start is skipped, with a warning event."""
    out = []
    for name, options in cfg.trackers.items():
        try:
            out.append(registry.trackers[name](options, run_dir, cfg))
        except Exception as exc:  # noqa: BLE001
            notes.append(f"tracker {name} could not start and is disabled: {type(exc).__name__}: {exc}")
    return out


def _observers(registry: Registry, run_dir: Path) -> list[Listener]:
    """One listener per on_event implementation: a failing observer is disabled alone. Each gets the
    arguments it names, so implementations written before `run_dir` existed keep working."""
    return [_observer(impl, run_dir) for impl in reversed(registry.hook.on_event.get_hookimpls())]


def _observer(impl: Any, run_dir: Path) -> Listener:
    function, names = impl.function, tuple(impl.argnames)

    def listener(event: dict) -> None:
        offered = {"event": event, "run_dir": run_dir}
        function(**{k: v for k, v in offered.items() if k in names})

    listener.__name__ = f"on_event of plugin {impl.plugin_name}"
    return listener


def _artifacts_of(st: StageRecord, stage: str) -> dict[str, Artifact]:
    return {k: Artifact(kind=k, path=Path(a["path"]), stage=stage, key=st.key) for k, a in st.artifacts.items()}


def _run_stage(session: RunSession, spec: StageSpec, stage_dir: Path, resume: bool) -> tuple[Status, int]:
    """Run one stage to its end and record it: (its status, the run's exit code if it ends the run).

    The stage's inputs come from `session.artifacts`; what it publishes through ``ctx.artifact`` is
    recorded in the manifest and added there when it ends `done`."""
    pipe, events, stop, st = session.pipe, session.events, session.stop, session.manifest.stages[spec.name]
    inputs: dict[str, Artifact] = {}
    for u in pipe.inputs[spec.name]:
        if u.ref_stage and u.ref_kind:  # the pipeline resolved "@stage" to the kind it reads
            inputs[u.key] = session.artifacts[u.ref_stage][u.ref_kind]
        elif u.path is not None:
            inputs[u.key] = Artifact(kind="path", path=u.path)
    options = resolve_options(spec, pipe.inputs[spec.name], inputs)
    cfg = session.config
    ctx = StageContext(
        stage_name=spec.name,
        run_id=session.run_id,
        run_dir=session.run_dir,
        stage_dir=stage_dir,
        inputs=inputs,
        emit=functools.partial(_emit_in_stage, events, spec.name),
        stop_check=stop,
        checkpoint_check=_checkpoint_check(session.run_dir),
        resume=resume,
        seed=cfg.project.seed,
        project_dir=cfg.project_dir,
        backend=session.backend,
        registry=session.registry,
        judges=cfg.judges,
    )
    started = time.time()
    st.status, st.started, st.error, st.artifacts, st.cached_from = Status.RUNNING, started, None, {}, None
    session.save()  # "running" on disk first: a writer killed from here on is seen as killed in this stage
    events.emit("stage_start", stage=spec.name, uses=spec.uses, key=st.key, resume=resume)
    outcome, code, error = Status.DONE, EXIT_OK, None
    try:
        with _warnings_to_events(ctx):
            handled = session.registry.hook.execute_stage(stage=spec.cls(), options=options, ctx=ctx)
        if handled is None:
            raise ForgeError(f"no plugin executed stage kind '{spec.uses}'")
        # What the stage says it produced (Stage.run's return, passed on by execute_stage) must be what
        # it published: an artifact written anywhere but through ctx.artifact() is not atomic, and
        # nothing would clean it up after a crash.
        if isinstance(handled, Mapping):
            stray = [k for k in handled if k not in ctx.published]
            if stray:
                raise ForgeError(
                    f"stage kind '{spec.uses}' returned {', '.join(map(str, stray))} "
                    f"without publishing it through ctx.artifact()"
                )
        missing = [k for k in spec.cls().outputs(options) if k not in ctx.published]
        # A stage is stopped when it saw the stop (ctx.should_stop() said so and it returned early). A stop
        # it never looked at, because it came while the outputs were being written, is deferred: the stage
        # finished and published everything, so it is done, and the run stops before the next stage.
        # A stage that returned without its outputs while a stop was pending was stopped, not broken.
        if ctx.stop_seen or (missing and stop()):
            outcome, code = Status.STOPPED, EXIT_INTERRUPTED
        elif missing:
            raise ForgeError(f"stage kind '{spec.uses}' declares it produces {', '.join(missing)} but did not write it")
    except KeyboardInterrupt:
        outcome, code, error = Status.STOPPED, EXIT_INTERRUPTED, "interrupted"
    except ForgeError as exc:
        outcome, code, error = Status.FAILED, exc.exit_code, exc.render()
    except Exception as exc:  # noqa: BLE001 - the run records the failure; the CLI shows it
        outcome, code, error = Status.FAILED, EXIT_FAILED, f"{type(exc).__name__}: {exc}"
        (stage_dir / "error.log").write_text(traceback.format_exc())
    if outcome != Status.DONE:
        # Never a stopped or failed stage with a published artifact: what it did publish (the first of
        # two, say) is removed, so nothing downstream, no cache lookup and no resume takes it for a result.
        for art in ctx.published.values():
            shutil.rmtree(art.path, ignore_errors=True)
        ctx.published.clear()
    st.status, st.ended, st.duration, st.error = outcome, time.time(), round(time.time() - started, 3), error
    st.artifacts = {k: {"kind": a.kind, "path": str(a.path)} for k, a in ctx.published.items()}
    if ctx.info:
        st.info = ctx.info
    if outcome == Status.DONE:
        session.artifacts[spec.name] = {k: Artifact(k, a.path, spec.name, st.key) for k, a in ctx.published.items()}
    session.save()
    extra = {"error": error} if error else {}
    if outcome == Status.FAILED and code == EXIT_FAILED and (stage_dir / "error.log").exists():
        extra["traceback_file"] = str(stage_dir / "error.log")
    events.emit("stage_end", stage=spec.name, status=outcome, duration=st.duration, **extra)
    # A failure is exit code 1, or 2 when the stage found its input bad; any other code a ForgeError
    # carries (a stop's 130, say) would misreport a failed run.
    if outcome == Status.FAILED and code not in (EXIT_FAILED, EXIT_BAD_INPUT):
        code = EXIT_FAILED
    return outcome, code


@contextlib.contextmanager
def _warnings_to_events(ctx: StageContext) -> Iterator[None]:
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


def _hint_interrupted(store: RunStore, cfg: ForgeConfig, run_id: str, events: EventWriter) -> None:
    """Never restart silently: say when an earlier run of this config could be resumed instead."""
    for run in reversed(store.list()):
        if run.id == run_id or run.config_path != str(cfg.path):
            continue
        if run.status in (Status.STOPPED, Status.KILLED, Status.FAILED):
            stuck = [n for n, s in run.record.stages.items() if s.status in INTERRUPTED]
            if stuck:
                events.emit(
                    "log",
                    level="warning",
                    message=f"run {run.id} was {run.status} in stage {stuck[0]}; this new run starts "
                    f"that stage afresh (`llmforge run --resume` would continue the old one)",
                )
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
