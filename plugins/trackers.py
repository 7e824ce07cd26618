"""The built-in experiment trackers: `tensorboard` (event files) and `mlflow` (an MLflow store).

Enable them in forge.toml::

    [trackers]
    tensorboard = true          # event files in <run_dir>/tensorboard

    [trackers.mlflow]           # runs in <project>/mlflow.db (SQLite), one MLflow run per llmforge run
    experiment = "my-exp"

This module is imported every time `llmforge` starts, so it imports neither tensorboard nor mlflow
at module level: each tracker imports its library when a run creates it. A missing library is
reported by `llmforge validate` (and `run`) at `trackers.<name>`, before any work starts.

Both trackers receive the run's events on the training thread, so they only buffer or queue work
there (TensorBoard's writer has its own thread; MLflow metrics are sent in batches), and neither
ever raises out of close(): a tracker must not turn a finished run into a failed one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import Field

from llmforge.errors import Problem
from llmforge.stage import StageOptions
from llmforge.trackers import Tracker

# Log levels that `logs = "warnings"` keeps.
_WARNING_LEVELS = ("warning", "warn", "error", "critical")


# ----------------------------------------------------------------------------------------------
# shared helpers


def _numbers(values: Any) -> Iterator[tuple[str, float]]:
    """The numeric entries of a metric event's `values`.

    Listeners get the event before it is serialised, so values may still be numpy or torch
    scalars: float() takes those. Strings are skipped on purpose: "1.5" is a label, not a reading.
    """
    if not isinstance(values, dict):
        return
    for name, value in values.items():
        if value is None or isinstance(value, (str, bytes)):
            continue
        try:
            yield str(name), float(value)
        except (TypeError, ValueError):
            continue


class _Steps:
    """Step numbers for metric events. A stage that reports without a step (ctx.metric(loss=...))
    still gets a usable x axis: its n-th such event is step n, counted per stage."""

    def __init__(self) -> None:
        self._auto: dict[str | None, int] = {}

    def __call__(self, stage: str | None, step: Any) -> int:
        if step is not None and not isinstance(step, bool):
            try:
                return int(step)
            except (TypeError, ValueError):
                pass
        n = self._auto.get(stage, 0)
        self._auto[stage] = n + 1
        return n


def _wall_time(event: dict) -> float:
    # The event's own time, not the moment the tracker sees it: curves against wall time then
    # match events.jsonl exactly, even when a tracker lags behind.
    t = event.get("time")
    return float(t) if isinstance(t, (int, float)) else time.time()


def _resolve(path: str, project_dir: Path) -> Path:
    p = Path(os.path.expanduser(path))
    return (p if p.is_absolute() else project_dir / p).resolve()


def _warn(name: str, what: str, exc: BaseException) -> None:
    # close() runs after the run's event log is closed, so stderr is the only place left to say it.
    print(f"warning: tracker {name}: {what}: {type(exc).__name__}: {exc}", file=sys.stderr)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Hold back a library's INFO chatter (MLflow announces creating its database tables) that would
    land in the middle of the CLI's progress display; its warnings still come through."""
    logger = logging.getLogger(logger_name)
    old = logger.level
    logger.setLevel(max(old, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(old)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------
# TensorBoard


class TensorBoardOptions(StageOptions):
    log_dir: str | None = Field(
        None,
        description="Folder for the event files, relative to forge.toml; each run writes to "
        "<log_dir>/<run id>. Default: inside the run, <run_dir>/tensorboard.",
    )
    logs: Literal["none", "warnings", "all"] = Field(
        "warnings",
        description="Which log events are also written as text (TensorBoard's Text tab); "
        "failed or stopped stages count as warnings.",
    )
    flush_secs: float = Field(
        10.0,
        gt=0,
        description="Longest time, in seconds, that written points wait before they reach "
        "the file (the writer also flushes at the end of every stage).",
    )


class TensorBoardTracker(Tracker):
    """Scalars `<stage>/<metric>` at each metric event's step, `<stage>/duration_s` per finished
    stage, and (as text) the run's configuration, warnings and outcome."""

    name = "tensorboard"
    summary = "Write metrics, stage durations and warnings as TensorBoard event files."
    Options = TensorBoardOptions
    requires = ("tensorboard",)

    def __init__(self, options: TensorBoardOptions, run_dir: Path, config: Any):
        super().__init__(options, run_dir, config)
        # tensorboard's own event-file writer: the one torch.utils.tensorboard wraps, used here
        # directly so that a run with only this tracker never has to import torch for it.
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.plugins.text.summary_v2 import text_pb
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event_pb2, self._summary_pb2, self._text_pb = event_pb2, summary_pb2, text_pb
        if options.log_dir:
            self.log_dir = _resolve(options.log_dir, Path(config.project_dir)) / Path(run_dir).name
        else:
            self.log_dir = Path(run_dir) / "tensorboard"
        self._steps = _Steps()
        self._text_steps: dict[str, int] = {}
        # Events may come from a stage's helper threads; reentrant because an event handled here can
        # cause another (a library warning the runner turns into a log event) on the same thread.
        self._lock = threading.RLock()
        self._writer = EventFileWriter(str(self.log_dir), max_queue_size=100, flush_secs=options.flush_secs)

    # -- events --------------------------------------------------------------------------------
    def on_event(self, event: dict) -> None:
        with self._lock:
            if self._writer is None:
                return
            kind = event.get("type")
            stage = event.get("stage")
            wall = _wall_time(event)
            if kind == "metric":
                step = self._steps(stage, event.get("step"))
                self._scalars(
                    wall, step, [(self._tag(stage, name), value) for name, value in _numbers(event.get("values"))]
                )
            elif kind == "log":
                level = str(event.get("level") or "info").lower()
                if self.options.logs == "all" or (self.options.logs == "warnings" and level in _WARNING_LEVELS):
                    prefix = "" if level == "info" else f"**{level}**: "
                    self._text(wall, self._tag(stage, "logs"), prefix + str(event.get("message", "")))
            elif kind == "stage_end":
                duration = event.get("duration")
                if isinstance(duration, (int, float)):
                    self._scalars(wall, 0, [(self._tag(stage, "duration_s"), float(duration))])
                status = event.get("status")
                if status != "done" and self.options.logs != "none":
                    why = event.get("error") or event.get("reason") or ""
                    self._text(
                        wall, self._tag(stage, "logs"), f"**stage {stage} {status}**" + (f": {why}" if why else "")
                    )
                # A stage boundary is where someone looks at the curves: make them visible now.
                self._writer.flush()
            elif kind == "run_start":
                raw = getattr(self.config, "raw", None)
                if raw is not None:
                    text = json.dumps(raw, indent=2, default=str)
                    # Markdown code block: TensorBoard renders text summaries as Markdown.
                    self._text(wall, "config", "```\n" + text + "\n```")
            elif kind == "run_end":
                if self.options.logs != "none":
                    self._text(
                        wall,
                        "logs",
                        f"run {event.get('run')} {event.get('status')} (exit code {event.get('exit_code')})",
                    )
                self._writer.flush()

    def close(self) -> None:
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is None:
            return  # closed already: close() may be called more than once
        try:
            writer.close()
        except Exception as exc:  # noqa: BLE001 - never fail a finished run
            _warn(self.name, f"could not close the event file in {self.log_dir}", exc)

    # -- writing -------------------------------------------------------------------------------
    @staticmethod
    def _tag(stage: str | None, name: str) -> str:
        return f"{stage}/{name}" if stage else name

    def _scalars(self, wall: float, step: int, values: list[tuple[str, float]]) -> None:
        if not values:
            return
        # simple_value is the classic scalar encoding (what torch's SummaryWriter writes): every
        # TensorBoard version and EventAccumulator.Scalars() read it. It is a float32.
        summary = self._summary_pb2.Summary(
            value=[self._summary_pb2.Summary.Value(tag=tag, simple_value=v) for tag, v in values]
        )
        self._writer.add_event(self._event_pb2.Event(wall_time=wall, step=step, summary=summary))

    def _text(self, wall: float, tag: str, text: str) -> None:
        # Text entries of one tag get steps 0, 1, 2...: the Text tab shows them in order.
        step = self._text_steps.get(tag, 0)
        self._text_steps[tag] = step + 1
        summary = self._text_pb(tag, text)
        self._writer.add_event(self._event_pb2.Event(wall_time=wall, step=step, summary=summary))


# ----------------------------------------------------------------------------------------------
# MLflow

# MLflow's limits (log_batch accepts at most 1000 metrics and 100 params or tags per call; keys are
# limited to 250 characters). Param values are cut much shorter than MLflow's own limit: a param
# is for comparing runs at a glance, and the full config is in the run's manifest.json.
_MAX_METRICS, _MAX_PARAMS_OR_TAGS = 1000, 100
_MAX_KEY, _MAX_PARAM_VALUE, _MAX_TAG_VALUE = 250, 500, 5000
_FLUSH_SECS = 5.0
_KEY_BAD_CHARS = re.compile(r"[^\w\-. /:]")  # what MLflow accepts in metric, param and tag names
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")  # 2+ letters: "C:\x" is a path, not a URI
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_STATUS = {"done": "FINISHED", "failed": "FAILED", "stopped": "KILLED", "killed": "KILLED"}


class MlflowOptions(StageOptions):
    tracking_uri: str | None = Field(
        None,
        description="Where runs are stored: an MLflow tracking URI (sqlite:///mlflow.db, "
        "http://host:5000, databricks, ...); relative sqlite or file paths are relative to "
        "forge.toml. Default: $MLFLOW_TRACKING_URI if set, else sqlite:///<project>/mlflow.db.",
    )
    experiment: str | None = Field(
        None, min_length=1, description="MLflow experiment that receives the runs (default: the project name)."
    )
    tags: dict[str, str] = Field(
        default_factory=dict, description="Extra tags set on every MLflow run of this project."
    )


def tracking_uri(option: str | None, project_dir: Path) -> str:
    """The MLflow URI to use: relative local stores are anchored at the project folder, like every
    other path in forge.toml, so a run behaves the same whatever the current directory is."""
    if not option:
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if env:
            return env
        # SQLite, not MLflow's ./mlruns file store: MLflow 3 keeps the file store in maintenance
        # mode and refuses it unless MLFLOW_ALLOW_FILE_STORE is set.
        return "sqlite:///" + (Path(project_dir) / "mlflow.db").resolve().as_posix()
    m = _SCHEME.match(option)
    if m is None:  # a bare path: MLflow reads it as a file store folder
        return _resolve(option, project_dir).as_uri()
    scheme = m.group(1).lower()
    if scheme == "sqlite" and option.startswith("sqlite:///"):
        rest = option[len("sqlite:///") :]
        if rest and rest != ":memory:" and not rest.startswith("/") and not re.match(r"^[A-Za-z]:", rest):
            return "sqlite:///" + _resolve(rest, project_dir).as_posix()
    elif scheme == "file":
        parsed = urlparse(option)
        if not parsed.netloc and parsed.path and not Path(parsed.path).is_absolute():
            return _resolve(parsed.path, project_dir).as_uri()
    return option


def _check_sqlite(uri: str) -> None:
    """Open a local SQLite store once before MLflow does: MLflow retries a database it cannot open
    with back-off for about 100 seconds (meant for a server still starting), which for a local
    file only delays the run before the same error."""
    if not uri.startswith("sqlite:///"):
        return
    db = uri[len("sqlite:///") :].split("?", 1)[0]
    if not db or db == ":memory:":
        return
    import sqlite3

    path = Path(db)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path)
        try:
            conn.execute("pragma schema_version")  # reads the header: a file that is no database fails here
        finally:
            conn.close()
    except (OSError, sqlite3.Error) as exc:
        raise RuntimeError(f"cannot open the MLflow database {path}: {exc}") from None


def _modules_for(uri: str) -> tuple[str, ...]:
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    # MLflow's database stores are SQLAlchemy + alembic; mlflow-skinny does not bring them.
    return ("mlflow", "sqlalchemy", "alembic") if scheme in _DB_SCHEMES else ("mlflow",)


def _key(text: str) -> str:
    return _KEY_BAD_CHARS.sub("_", text)[:_MAX_KEY]


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    """Nested options become dotted params (`sft.lora.r`); lists stay one JSON value."""
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
        return
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    out[_key(prefix)] = _cut(text, _MAX_PARAM_VALUE)


def config_params(config: Any) -> dict[str, str]:
    """MLflow params from the validated config: project/model/backend settings and every stage's
    options, defaults included (a default that changes between versions is then visible)."""
    out: dict[str, str] = {}
    for section in ("project", "model", "backend"):
        model = getattr(config, section, None)
        if model is not None:
            _flatten(section, model.model_dump(mode="json"), out)
    for spec in getattr(config, "stages", []):
        out[_key(f"{spec.name}.uses")] = _cut(spec.uses, _MAX_PARAM_VALUE)
        try:
            options = spec.options.model_dump(mode="json")
        except Exception:  # noqa: BLE001 - an option type pydantic cannot dump: use what was written
            options = spec.raw
        _flatten(spec.name, options, out)
    return out


class MlflowTracker(Tracker):
    """One MLflow run per llmforge run (named after the run id), in the project's experiment:
    params from the config, metrics `<stage>.<metric>` at their steps, stage statuses as tags."""

    name = "mlflow"
    summary = "Log params, metrics and stage statuses to MLflow (default: a SQLite store in the project)."
    Options = MlflowOptions

    def __init__(self, options: MlflowOptions, run_dir: Path, config: Any):
        super().__init__(options, run_dir, config)
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient

        self._Metric, self._Param, self._RunTag = Metric, Param, RunTag
        self.uri = tracking_uri(options.tracking_uri, Path(config.project_dir))
        self.llmforge_run = Path(run_dir).name
        _check_sqlite(self.uri)
        # The client API, not mlflow.start_run(): the fluent API keeps one process-wide "active
        # run", which an embedding program (or a test running several pipelines) may be using.
        with _quiet("mlflow.store.db.utils"):
            client = MlflowClient(tracking_uri=self.uri)
            experiment_id = self._experiment(client, options.experiment or config.name)
        run = self._find_run(client, experiment_id)
        params = config_params(config)
        if run is None:
            tags = {
                "llmforge.run_id": self.llmforge_run,
                "llmforge.project": config.name,
                "llmforge.config": str(config.path),
                "mlflow.source.name": str(config.path),
                "mlflow.source.type": "LOCAL",
                **options.tags,
            }
            run = client.create_run(
                experiment_id,
                run_name=self.llmforge_run,
                tags={_key(k): _cut(str(v), _MAX_TAG_VALUE) for k, v in tags.items()},
            )
        else:
            # `llmforge run --resume`: continue the same MLflow run. Params cannot change in MLflow,
            # so only the ones it does not have yet are added.
            client.update_run(run.info.run_id, status="RUNNING")
            params = {k: v for k, v in params.items() if k not in run.data.params}
        self.run_id = run.info.run_id
        self._client: MlflowClient | None = client  # None once finished: later calls are no-ops
        self._steps = _Steps()
        self._metrics: list = []
        self._tags: dict[str, str] = {}
        self._last_flush = time.monotonic()
        self._final_status: str | None = None
        self._lock = threading.RLock()  # see TensorBoardTracker
        self._failed = False
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), _MAX_PARAMS_OR_TAGS):
            client.log_batch(self.run_id, params=items[i : i + _MAX_PARAMS_OR_TAGS])

    def _experiment(self, client: Any, name: str) -> str:
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)  # its name is taken until it is purged
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):
            # Without a location MLflow would put artifacts in ./mlruns of whatever the current
            # directory is; keep them next to the database instead.
            db = self.uri[len("sqlite:///") :]
            if db and db != ":memory:":
                location = (Path(db).parent / "mlartifacts").as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except Exception:
            # Another run may have created it in the meantime.
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def _find_run(self, client: Any, experiment_id: str) -> Any:
        if "'" in self.llmforge_run or "\\" in self.llmforge_run:
            return None  # not expressible in a filter string; a resumed run then gets a new MLflow run
        found = client.search_runs(
            [experiment_id], max_results=1, filter_string=f"tags.`llmforge.run_id` = '{self.llmforge_run}'"
        )
        return found[0] if found else None

    # -- events --------------------------------------------------------------------------------
    def on_event(self, event: dict) -> None:
        with self._lock:
            if self._client is None:
                return
            try:
                self._handle(event)
            except Exception:
                # The runner disables this tracker and records why; close() must then not retry
                # against a store that just failed (a remote one could block the end of the run).
                self._failed = True
                raise

    def _handle(self, event: dict) -> None:
        kind = event.get("type")
        stage = event.get("stage")
        millis = int(_wall_time(event) * 1000)
        if kind == "metric":
            step = self._steps(stage, event.get("step"))
            for name, value in _numbers(event.get("values")):
                self._metrics.append(self._Metric(_key(f"{stage}.{name}" if stage else name), value, millis, step))
            if len(self._metrics) >= _MAX_METRICS or time.monotonic() - self._last_flush >= _FLUSH_SECS:
                self._flush()
        elif kind == "stage_start":
            self._tags[_key(f"llmforge.stage.{stage}")] = "running"
        elif kind == "stage_end":
            duration = event.get("duration")
            if isinstance(duration, (int, float)):
                self._metrics.append(self._Metric(_key(f"{stage}.duration_s"), float(duration), millis, 0))
            self._tags[_key(f"llmforge.stage.{stage}")] = str(event.get("status"))
            self._flush()
        elif kind == "run_end":
            status = str(event.get("status"))
            self._tags.update({"llmforge.status": status, "llmforge.exit_code": str(event.get("exit_code"))})
            for name, st in (event.get("stages") or {}).items():
                self._tags[_key(f"llmforge.stage.{name}")] = str(st)
            self._flush()
            assert self._client is not None  # on_event checked it, under the lock
            self._client.set_terminated(self.run_id, status=_STATUS.get(status, "FAILED"), end_time=millis)
            self._final_status = status

    def _flush(self) -> None:
        assert self._client is not None  # its callers check it, under the lock
        metrics, self._metrics = self._metrics, []
        tags, self._tags = [self._RunTag(k, _cut(v, _MAX_TAG_VALUE)) for k, v in self._tags.items()], {}
        self._last_flush = time.monotonic()
        for i in range(0, len(metrics), _MAX_METRICS):
            self._client.log_batch(self.run_id, metrics=metrics[i : i + _MAX_METRICS])
        for i in range(0, len(tags), _MAX_PARAMS_OR_TAGS):
            self._client.log_batch(self.run_id, tags=tags[i : i + _MAX_PARAMS_OR_TAGS])

    def close(self) -> None:
        with self._lock:
            if self._client is None:
                return  # closed already: close() may be called more than once
            try:
                if not self._failed:  # after a failure, don't retry a store that just failed
                    self._flush()
                    if self._final_status is None:
                        # run_end never reached us: take the outcome from the manifest the runner saved.
                        status = _manifest_status(Path(self.run_dir))
                        self._client.set_terminated(self.run_id, status=_STATUS.get(status, "KILLED"))
            except Exception as exc:  # noqa: BLE001 - never fail a finished run
                _warn(self.name, f"could not finish MLflow run {self.run_id} at {self.uri}", exc)
            finally:
                self._client = None


def _manifest_status(run_dir: Path) -> str:
    try:
        return str(json.loads((run_dir / "manifest.json").read_text(encoding="utf-8")).get("status"))
    except (OSError, ValueError):
        return "killed"


# ----------------------------------------------------------------------------------------------
# preflight (the validate_pipeline hook in llmforge_plugins.hooks.trackers)


_PIP_NAMES = {"mlflow": "mlflow-skinny"}


def missing_libraries(pipeline):
    """(The trackers plugin's validate_pipeline.) A tracker whose library is missing would only be noticed as a
    warning once the run has started; say it at validation instead, at the tracker's key, with the command that
    fixes it."""
    cfg = pipeline.config
    problems = []
    for name, options in cfg.trackers.items():
        if isinstance(options, TensorBoardOptions):
            modules: tuple[str, ...] = TensorBoardTracker.requires
        elif isinstance(options, MlflowOptions):
            modules = _modules_for(tracking_uri(options.tracking_uri, cfg.project_dir))
        else:
            continue  # another plugin's tracker
        missing = [m for m in modules if not _installed(m)]
        if missing:
            pkgs = " ".join(_PIP_NAMES.get(m, m) for m in missing)
            problems.append(
                Problem(
                    f"trackers.{name}",
                    f"needs {', '.join(missing)}, which "
                    f"{'is' if len(missing) == 1 else 'are'} not installed: pip install {pkgs} "
                    f"(or pip install 'llmforge[trackers]')",
                )
            )
    return problems
