"""Renders run events on the terminal; used by `run` (live) and `logs` (replay or follow)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from llmforge.cli.common import console, fmt_duration, status_mark, styled
from llmforge.events import (
    ArtifactEvent,
    Event,
    Log,
    Metric,
    Progress,
    RunEnd,
    RunStart,
    StageCached,
    StageEnd,
    StageStart,
    from_dict,
)

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID


class EventPrinter:
    """Turns events into short lines. Every metric event is printed (the last step's included); only
    progress events are throttled, on a terminal into a live bar. Everything stays in events.jsonl.

    All text that comes from a stage, a plugin, a library or the user (messages, names, paths, errors)
    is escaped: `[cache hit]` in a message is text, not rich markup. Debug-level log events (library
    chatter, see llmforge/chatter.py) are shown only with `debug` (--debug or LLMFORGE_DEBUG=1).
    """

    def __init__(self, every: float = 2.0, live: bool | None = None, debug: bool | None = None):
        self.out = console()
        self.every = every
        self._last: dict[str, float] = {}
        # On a terminal, progress is a live bar (with loss, tokens/s and ETA); in logs and pipes, lines.
        self.live = self.out.is_terminal if live is None else live
        self.debug = os.environ.get("LLMFORGE_DEBUG") == "1" if debug is None else debug
        self._progress: RichProgress | None = None
        self._task: TaskID | None = None
        self._info: dict[str, str] = {}
        self._eta: float | None = None

    def _bar(self, ev: Progress) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
        from rich.progress import Progress as RichProgress

        if self._progress is None or self._task is None:
            # markup=False: a stage name is text
            self._progress = RichProgress(
                TextColumn("{task.description}", style="bold", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}", markup=False),
                console=self.out,
            )
            self._progress.start()
            self._task = self._progress.add_task(ev.stage or "", total=ev.total, info="")
        self._eta = ev.eta_s
        self._progress.update(self._task, completed=ev.done or 0, total=ev.total, info=self._bar_info())

    def _bar_info(self) -> str:
        eta = self._eta
        return "  ".join(
            v for v in [self._info.get("loss"), self._info.get("tok"), f"ETA {fmt_duration(eta)}" if eta else None] if v
        )

    def _end_bar(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._info = {}
            self._eta = None

    def _due(self, key: str, final: bool = False) -> bool:
        now = time.monotonic()
        if final or now - self._last.get(key, 0.0) >= self.every:
            self._last[key] = now
            return True
        return False

    def __call__(self, ev: Event | dict[str, Any]) -> None:
        """Print one event: a typed one (`llmforge logs`), or the dict a run's listener gets (`llmforge run`)."""
        self.show(ev if isinstance(ev, Event) else from_dict(ev))

    def show(self, ev: Event) -> None:
        stage = escape(str(ev.stage or ""))
        p = self.out.print
        if isinstance(ev, RunStart):
            p(f"[bold]run {escape(str(ev.run))}[/]  stages: {escape(', '.join(map(str, ev.stages or [])))}")
        elif isinstance(ev, StageStart):
            extra = " (resuming)" if ev.resume else ""
            p(f"[bold]▶ {stage}[/] [dim]({escape(str(ev.uses))})[/]{extra}")
        elif isinstance(ev, StageCached):
            p(f"[cyan]↺ {stage}[/] cached [dim](from run {escape(str(ev.from_run))})[/]")
        elif isinstance(ev, StageEnd):
            self._end_bar()
            status = str(ev.status)
            line = f"{status_mark(status)} {stage} {styled(escape(status))}"
            if ev.duration is not None:
                line += f" in {fmt_duration(ev.duration)}"
            p(line)
            if ev.error:
                p(f"  [red]{escape(str(ev.error))}[/]")  # relayed rank logs hold [brackets]
            if ev.reason:
                p(f"  [dim]{escape(str(ev.reason))}[/]")
        elif isinstance(ev, Log):
            level = ev.level or "info"
            if level == "debug" and not self.debug:
                return  # library chatter: in events.jsonl, shown with --debug
            style = {"warning": "yellow", "error": "red", "debug": "dim"}.get(level, "")
            prefix = f"[dim]{stage} |[/] " if stage else ""
            msg = escape(str(ev.message if ev.message is not None else ""))
            p(f"{prefix}[{style}]{msg}[/]" if style else f"{prefix}{msg}")
        elif isinstance(ev, Metric):
            vals = ev.values or {}
            if "loss" in vals:
                self._info["loss"] = f"loss {_num(vals['loss'])}"
            if "tokens_per_s" in vals:
                self._info["tok"] = f"{vals['tokens_per_s']:,.0f} tok/s"
            if self._progress is not None and self._task is not None:
                # the metric of a step arrives after its progress event: show its loss now, not at the next one
                self._progress.update(self._task, info=self._bar_info())
            text = "  ".join(f"{k}={_num(v)}" for k, v in vals.items())
            step = f"step {ev.step}  " if ev.step is not None else ""
            p(f"[dim]{stage} |[/] {escape(step + text)}")
        elif isinstance(ev, Progress):
            total, done = ev.total, ev.done
            if self.live and total:
                self._bar(ev)
            elif self._due(f"progress:{stage}", final=total is not None and done >= total):
                frac = f" ({100 * done / total:.0f}%)" if total else ""
                unit = escape(str(ev.unit or ""))
                p(f"[dim]{stage} |[/] {_num(done)}/{_num(total) if total else '?'} {unit}{frac}")
        elif isinstance(ev, ArtifactEvent):
            p(f"[dim]{stage} | artifact {escape(str(ev.kind))}: {escape(str(ev.path))}[/]")
        elif isinstance(ev, RunEnd):
            self._end_bar()
            p(f"[bold]run {escape(str(ev.run))}[/] {styled(escape(str(ev.status or '?')))}")
        # Any other type (a plugin's own: dataset, launch, checkpoint, ...; or a newer writer's) is in
        # events.jsonl and `logs --raw`; the stage reports what a person needs through log events.


def _num(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def stderr_logger(stage: str):
    """A ``log(message, level="info")`` that prints like `llmforge run` does, on stderr (stdout stays a
    command's result): what a plugin command running one stage's machinery outside a run logs with."""
    printer = EventPrinter(live=False)
    printer.out = console(stderr=True)

    def log(message, level="info"):
        printer({"type": "log", "stage": stage, "level": level, "message": str(message)})

    return log
