"""Renders run events on the terminal; used by `run` (live) and `logs` (replay or follow)."""

from __future__ import annotations

import os
import time

from rich.markup import escape

from llmforge.cli.common import console, fmt_duration, status_mark, styled


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
        self._progress = None
        self._task = None
        self._info: dict[str, str] = {}
        self._eta: float | None = None

    def _bar(self, ev: dict) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        if self._progress is None:
            # markup=False: a stage name is text
            self._progress = Progress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(),
                                      MofNCompleteColumn(), TextColumn("{task.fields[info]}", markup=False),
                                      console=self.out)
            self._progress.start()
            self._task = self._progress.add_task(ev.get("stage", ""), total=ev.get("total"), info="")
        self._eta = ev.get("eta_s")
        self._progress.update(self._task, completed=ev.get("done", 0), total=ev.get("total"), info=self._bar_info())

    def _bar_info(self) -> str:
        eta = self._eta
        return "  ".join(v for v in [self._info.get("loss"), self._info.get("tok"),
                                     f"ETA {fmt_duration(eta)}" if eta else None] if v)

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

    def __call__(self, ev: dict) -> None:
        t = ev.get("type")
        stage = escape(str(ev.get("stage", "")))
        p = self.out.print
        if t == "run_start":
            p(f"[bold]run {escape(str(ev['run']))}[/]  stages: {escape(', '.join(ev.get('stages', [])))}")
        elif t == "stage_start":
            extra = " (resuming)" if ev.get("resume") else ""
            p(f"[bold]▶ {stage}[/] [dim]({escape(str(ev.get('uses')))})[/]{extra}")
        elif t == "stage_cached":
            p(f"[cyan]↺ {stage}[/] cached [dim](from run {escape(str(ev.get('from_run')))})[/]")
        elif t == "stage_end":
            self._end_bar()
            status = str(ev.get("status"))
            line = f"{status_mark(status)} {stage} {styled(escape(status))}"
            if ev.get("duration") is not None:
                line += f" in {fmt_duration(ev['duration'])}"
            p(line)
            if ev.get("error"):
                p(f"  [red]{escape(str(ev['error']))}[/]")  # relayed rank logs hold [brackets]
            if ev.get("reason"):
                p(f"  [dim]{escape(str(ev['reason']))}[/]")
        elif t == "log":
            level = ev.get("level", "info")
            if level == "debug" and not self.debug:
                return  # library chatter: in events.jsonl, shown with --debug
            style = {"warning": "yellow", "error": "red", "debug": "dim"}.get(level, "")
            prefix = f"[dim]{stage} |[/] " if stage else ""
            msg = escape(str(ev.get("message", "")))
            p(f"{prefix}[{style}]{msg}[/]" if style else f"{prefix}{msg}")
        elif t == "metric":
            vals = ev.get("values") or {}
            if "loss" in vals:
                self._info["loss"] = f"loss {_num(vals['loss'])}"
            if "tokens_per_s" in vals:
                self._info["tok"] = f"{vals['tokens_per_s']:,.0f} tok/s"
            if self._progress is not None:
                # the metric of a step arrives after its progress event: show its loss now, not at the next one
                self._progress.update(self._task, info=self._bar_info())
            text = "  ".join(f"{k}={_num(v)}" for k, v in vals.items())
            step = f"step {ev['step']}  " if ev.get("step") is not None else ""
            p(f"[dim]{stage} |[/] {escape(step + text)}")
        elif t == "progress":
            total = ev.get("total")
            done = ev.get("done")
            if self.live and total:
                self._bar(ev)
            elif self._due(f"progress:{stage}", final=total is not None and done >= total):
                frac = f" ({100 * done / total:.0f}%)" if total else ""
                unit = escape(str(ev.get("unit", "")))
                p(f"[dim]{stage} |[/] {_num(done)}/{_num(total) if total else '?'} {unit}{frac}")
        elif t == "artifact":
            p(f"[dim]{stage} | artifact {escape(str(ev.get('kind')))}: {escape(str(ev.get('path')))}[/]")
        elif t == "run_end":
            self._end_bar()
            p(f"[bold]run {escape(str(ev['run']))}[/] {styled(escape(str(ev.get('status', '?'))))}")


def _num(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
