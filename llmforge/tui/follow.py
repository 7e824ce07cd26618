"""Following a run through its files: events.jsonl tailed incrementally, the manifest re-read now and then.

* `EventTail` reads whatever was appended since the last call (never the whole file again), holding
  back a last line that is still being written and decoding each line as `events.read_events` does
  (`events.decode_event`), but without blocking, so one worker can poll it between other work.
* `Series` keeps a metric's history for a chart in bounded memory: past `2 * cap` points it averages
  neighbouring pairs and doubles its stride, so 100k points cost as much to draw as 2k.
* `RunModel` is what the Monitor shows: stages and their status, the current stage, progress and
  ETA, the log tail (each line flagged when it is `debug`: library chatter, hidden unless asked for)
  and the metric series. `apply(events)` updates it; `version` changes whenever
  something did, so the UI redraws only then.
* `follow(run_dir, model, lock, cancelled)` is the worker's loop that feeds a model.

Events arrive typed (`llmforge.events`): the one decoder `llmforge logs` uses too, so the TUI and the CLI
cannot read a line differently. A type the Monitor does not show (a plugin's own) only counts as seen.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmforge.events import (
    ArtifactEvent,
    Checkpoint,
    Event,
    Log,
    Metric,
    RunEnd,
    RunStart,
    StageCached,
    StageEnd,
    StageStart,
    decode_event,
    from_dict,
)
from llmforge.events import Progress as ProgressEvent
from llmforge.runs import EVENTS, MANIFEST, Manifest
from llmforge.status import ENDED, Status
from llmforge.tui.widgets.text import fmt_number, marked

# The charts the Monitor draws for a training stage: metric name -> title. Other metrics are kept too
# (`RunModel.series`); a stage that reports none of these (synth, curate, eval) gets its own metrics charted
# instead, in the order they first arrived (`RunModel.chart_slots`).
CHARTS = {
    "loss": "loss",
    "eval_loss": "eval loss",
    "learning_rate": "learning rate",
    "grad_norm": "grad norm",
    "tokens_per_s": "tokens/s",
}


def metric_title(name: str) -> str:
    """A chart's title for a metric that has none in CHARTS: `tokens_per_s` -> "tokens/s", `kl_div` -> "kl div"."""
    return name.replace("_per_", "/").replace("_", " ")


def progress_extras(extra: dict[str, Any]) -> str:
    """The progress event's extra fields as the Monitor's line shows them: "rows 30  rejected 5"."""
    parts = []
    for key, value in extra.items():
        shown = fmt_number(value) if isinstance(value, float) else str(value)
        parts.append(f"{key.replace('_', ' ')} {shown}")
    return "  ".join(parts)


class EventTail:
    """Incremental reader of one events.jsonl."""

    def __init__(self, path: Path, chunk: int = 1 << 20):
        self.path = Path(path)
        self.offset = 0
        self.chunk = chunk
        self._partial = b""
        self.lineno = 0  # complete lines read so far, for the file:line a damaged one is named by

    def read(self, max_bytes: int | None = None) -> list[Event]:
        """The complete events appended since the last call (up to about `max_bytes` of them)."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read(max_bytes or self.chunk)
        except FileNotFoundError:
            return []
        if not data:
            return []
        self.offset += len(data)
        data = self._partial + data
        cut = data.rfind(b"\n") + 1
        data, self._partial = data[:cut], data[cut:]
        out = []
        for raw in data.split(b"\n")[:-1]:  # each line as read_events decodes it
            self.lineno += 1
            event = decode_event(raw, f"{self.path}:{self.lineno}")
            if event is not None:
                out.append(event)
        return out


class Series:
    """One metric's (step, value) history, downsampled to at most `2 * cap` stored points."""

    def __init__(self, cap: int = 1000):
        self.cap = cap
        self.xs: list[float] = []
        self.ys: list[float] = []
        self.stride = 1  # raw points per stored point
        self.count = 0  # raw points seen
        self.last: tuple[float, float] | None = None
        self._acc = [0.0, 0.0, 0]  # the bucket being filled: sum x, sum y, n

    def add(self, x: float, y: float) -> None:
        self.count += 1
        self.last = (x, y)
        acc = self._acc
        acc[0] += x
        acc[1] += y
        acc[2] += 1
        if acc[2] < self.stride:
            return
        self.xs.append(acc[0] / acc[2])
        self.ys.append(acc[1] / acc[2])
        self._acc = [0.0, 0.0, 0]
        if len(self.xs) >= 2 * self.cap:
            # Halve the resolution: each pair becomes its mean. Amortised O(1) per point.
            self.xs = [(a + b) / 2 for a, b in zip(self.xs[::2], self.xs[1::2])]
            self.ys = [(a + b) / 2 for a, b in zip(self.ys[::2], self.ys[1::2])]
            self.stride *= 2

    def points(self) -> tuple[list[float], list[float]]:
        """What to draw: the stored points, the partial bucket, and always the latest raw point."""
        xs, ys = list(self.xs), list(self.ys)
        n = self._acc[2]
        if n:
            xs.append(self._acc[0] / n)
            ys.append(self._acc[1] / n)
        if self.last is not None and (not xs or xs[-1] != self.last[0]):
            xs.append(self.last[0])
            ys.append(self.last[1])
        return xs, ys

    def __len__(self) -> int:
        return self.count


@dataclass
class StageState:
    name: str
    status: Status | str = Status.PENDING
    uses: str = ""
    started: float | None = None
    duration: float | None = None
    error: str | None = None


@dataclass
class Progress:
    stage: str | None = None
    done: float = 0
    total: float | None = None
    unit: str = ""
    eta_s: float | None = None  # from the event when the stage gives one, else estimated
    time: float = 0.0
    started: float = 0.0  # when this stage's progress began (first progress event)
    first_done: float = 0.0
    # What else the stage said with its progress (`ctx.progress(done, total, rows=.., rejected=..)`): the
    # Monitor shows each beside the count, whatever the stage, so a plugin's stage needs no UI code.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunModel:
    run_id: str
    run_dir: Path
    status: Status | str = Status.UNKNOWN
    exit_code: int | None = None
    stages: dict[str, StageState] = field(default_factory=dict)
    current_stage: str | None = None
    step: int | None = None
    progress: Progress = field(default_factory=Progress)
    logs: deque = field(default_factory=lambda: deque(maxlen=500))
    log_count: int = 0  # lines ever appended to `logs` (it keeps only the last 500)
    # One flag per line of `logs`: a `debug` log event (library chatter, see llmforge/chatter.py). The
    # Monitor hides those lines unless asked, as `llmforge logs` does without --debug.
    log_debug: deque = field(default_factory=lambda: deque(maxlen=500))
    debug_count: int = 0  # debug lines ever appended
    series: dict[tuple[str, str], Series] = field(default_factory=dict)  # (stage, metric) -> history
    metric_stage: str | None = None  # the stage whose metrics the charts show (the latest to report)
    checkpoints: list[dict] = field(default_factory=list)
    events_seen: int = 0
    started: float | None = None
    finished: float | None = None
    version: int = 0
    series_version: int = 0  # changes only when a metric arrived: charts redraw on this one

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    def chart(self, metric: str) -> Series | None:
        """The series a chart shows: that metric of the stage that reported metrics last."""
        if self.metric_stage is not None and (self.metric_stage, metric) in self.series:
            return self.series[(self.metric_stage, metric)]
        for (_stage, name), s in reversed(list(self.series.items())):
            if name == metric:
                return s
        return None

    def chart_slots(self, n: int = len(CHARTS)) -> list[tuple[str | None, str]]:
        """(metric, title) for each of the Monitor's `n` chart slots: the training charts (`CHARTS`) when the
        stage that reported last has any of them but tokens/s, else that stage's own metrics in the order they first
        arrived (rows, acceptance, tokens/s of a synth stage), the slots left over empty (None)."""
        stage = self.metric_stage
        names = [name for (st, name) in self.series if st == stage] if stage is not None else []
        slots: list[tuple[str | None, str]] = []
        # tokens/s alone does not make a training stage: a synth or eval stage measures its speed too.
        if not names or any(name in CHARTS and name != "tokens_per_s" for name in names):
            slots += list(CHARTS.items())[:n]
            return slots
        slots += [(name, metric_title(name)) for name in names[:n]]
        return slots + [(None, "")] * (n - len(slots))

    def eta(self, now: float | None = None) -> float | None:
        p = self.progress
        if p.total is None or self.ended:
            return None
        if p.eta_s is not None:
            return max(0.0, p.eta_s - ((now or time.time()) - p.time))
        done = p.done - p.first_done
        if done <= 0 or p.time <= p.started:
            return None
        rate = done / (p.time - p.started)
        return max(0.0, (p.total - p.done) / rate)

    # -- updates -----------------------------------------------------------------------------------

    def apply(self, events: Iterable[Event | dict[str, Any]]) -> None:
        """Update from events: typed ones (`EventTail.read`), or dicts as events.jsonl holds them."""
        n = 0
        for e in events:
            self._apply(e if isinstance(e, Event) else from_dict(e))
            n += 1
        if n:
            self.events_seen += n
            self.version += 1

    def _apply(self, e: Event) -> None:
        stage = e.stage
        if isinstance(e, Metric):
            step = e.step
            for name, v in (e.values or {}).items():
                if isinstance(v, (int, float)) and v == v:  # skip NaN: it breaks the plot's scale
                    key = (stage or "", name)
                    if key not in self.series:
                        self.series[key] = Series()
                    s = self.series[key]
                    # A metric without a step (ctx.metric(loss=...)) is drawn against its index.
                    s.add(float(step) if isinstance(step, (int, float)) else float(s.count), float(v))
            if isinstance(step, int):
                self.step = step
            self.metric_stage = stage or ""
            self.series_version += 1
        elif isinstance(e, ProgressEvent):
            p = self.progress
            if p.stage != stage:
                self.progress = p = Progress(stage=stage, started=e.time or 0.0, first_done=e.done or 0)
            p.done = e.done or 0
            p.total = e.total
            p.unit = e.unit or ""
            p.eta_s = e.eta_s
            p.time = e.time or 0.0
            # Only scalars: a stage may attach anything JSON holds, and the line has room for a few words.
            p.extra = {k: v for k, v in (e.data or {}).items() if isinstance(v, (int, float, str)) and v == v}
            if p.unit == "step" and isinstance(p.done, int):
                self.step = p.done
        elif isinstance(e, Log):
            level = e.level or "info"
            prefix = f"[{stage}] " if stage else ""
            tag = "" if level == "info" else f"{level}: "
            self._log(e, f"{prefix}{tag}{e.message}", debug=level == "debug")
        elif isinstance(e, StageStart):
            st = self._stage(stage)
            st.status, st.uses, st.started = Status.RUNNING, e.uses or st.uses, e.time
            self.current_stage = stage
            self.step = None
            self._log(e, f"[{stage}] started ({st.uses})")
        elif isinstance(e, StageCached):
            self._stage(stage).status = Status.CACHED
            self._log(e, f"[{stage}] cached (from run {e.from_run})")
        elif isinstance(e, StageEnd):
            st = self._stage(stage)
            st.status, st.duration, st.error = Status.of(e.status), e.duration, e.error
            msg = f"[{stage}] {marked(st.status)}"  # "[sft] ■ stopped": a stop is not a failure
            if st.error:
                msg += f": {st.error}"
            self._log(e, msg)
        elif isinstance(e, Checkpoint):
            self.checkpoints.append({"stage": stage, "step": e.step, "path": e.path})
            self._log(e, f"[{stage}] checkpoint at step {e.step}")
        elif isinstance(e, ArtifactEvent):
            self._log(e, f"[{stage}] artifact {e.kind}: {e.path}")
        elif isinstance(e, RunStart):
            self.status = Status.RUNNING
            self.exit_code = None
            self.finished = None
            self.started = self.started or e.time
            for name in e.stages or []:
                self._stage(name)
            # `selected` is absent from runs written before selections existed: every stage was.
            selected = set(e.selected or e.stages or [])
            for name, st in self.stages.items():
                if name not in selected and st.status == Status.PENDING:
                    st.status = Status.SKIPPED
            self._log(e, "run started" + (" (resumed)" if e.resume else ""))
        elif isinstance(e, RunEnd):
            self.status = Status.of(e.status)
            self.exit_code = e.exit_code
            self.finished = e.time
            for name, status in (e.stages or {}).items():
                self._stage(name).status = Status.of(status)
            self.current_stage = None
            self._log(e, f"run {self.status} (exit code {self.exit_code})")

    def _stage(self, name: str | None) -> StageState:
        name = name or ""
        if name not in self.stages:
            self.stages[name] = StageState(name)
        return self.stages[name]

    def _log(self, e: Event, text: str, debug: bool = False) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(e.time or 0))
        self.logs.append(f"{stamp} {text}")
        self.log_debug.append(debug)
        self.log_count += 1
        self.debug_count += debug

    def apply_manifest(self, manifest: Manifest, status: Status | str) -> None:
        """Facts only the manifest has: a run whose writer died (`killed`), stage timings, stage kinds."""
        changed = False
        if status != self.status and (status in ENDED or self.status == Status.UNKNOWN):
            self.status, changed = status, True
            if manifest.exit_code is not None:
                self.exit_code = manifest.exit_code
        for name, st in manifest.stages.items():
            mine = self._stage(name)
            if not mine.uses and st.uses:
                mine.uses, changed = st.uses, True
            if mine.duration is None and st.duration is not None:
                mine.duration, changed = st.duration, True
            if status == Status.KILLED and mine.status == Status.RUNNING:
                mine.status, changed = Status.KILLED, True
        if changed:
            self.version += 1


def follow(
    run_dir: Path,
    model: RunModel,
    lock: threading.Lock,
    cancelled: Callable[[], bool],
    poll: float = 0.1,
    manifest_every: float = 1.0,
    batch_bytes: int = 1 << 20,
) -> None:
    """Feed `model` from the run's files until `cancelled()`: new events as they are appended, the
    manifest once a second. Runs in a worker thread; holds `lock` only while applying a batch."""
    from llmforge.runs import RunInfo

    tail = EventTail(Path(run_dir) / EVENTS)
    next_manifest = 0.0
    while not cancelled():
        events = tail.read(batch_bytes)
        if events:
            with lock:
                model.apply(events)
        now = time.monotonic()
        if now >= next_manifest:
            next_manifest = now + manifest_every
            try:
                manifest = json.loads((Path(run_dir) / MANIFEST).read_text())
                if not isinstance(manifest, dict):
                    raise ValueError("not a JSON object")
                info = RunInfo(model.run_id, Path(run_dir), manifest)
                status = info.status
                with lock:
                    model.apply_manifest(info.record, status)
            except (OSError, ValueError):
                pass  # being replaced right now, or damaged: the events still tell the story
        if not events:
            # Idle: poll less often once the run has ended (a resume appends to the same file).
            time.sleep(poll if not model.ended else max(poll, 0.5))
