"""Renders run events on the terminal; used by `run` (live) and `logs` (replay or follow)."""

from __future__ import annotations

import time

from rich.markup import escape

from llmforge.cli.common import console, fmt_duration, styled


class EventPrinter:
    """Turns events into short lines. Progress and metrics are throttled so a fast stage does not
    flood the terminal; everything stays in events.jsonl regardless."""

    def __init__(self, every: float = 2.0, live: bool | None = None):
        self.out = console()
        self.every = every
        self._last: dict[str, float] = {}
        # On a terminal, progress is a live bar (with loss, tokens/s and ETA); in logs and pipes, lines.
        self.live = self.out.is_terminal if live is None else live
        self._progress = None
        self._task = None
        self._info: dict[str, str] = {}

    def _bar(self, ev: dict) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        if self._progress is None:
            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[info]}"), console=self.out)
            self._progress.start()
            self._task = self._progress.add_task(ev.get("stage", ""), total=ev.get("total"), info="")
        eta = ev.get("eta_s")
        info = "  ".join(v for v in [self._info.get("loss"), self._info.get("tok"),
                                     f"ETA {fmt_duration(eta)}" if eta else None] if v)
        self._progress.update(self._task, completed=ev.get("done", 0), total=ev.get("total"), info=info)

    def _end_bar(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._info = {}

    def _due(self, key: str, final: bool = False) -> bool:
        now = time.monotonic()
        if final or now - self._last.get(key, 0.0) >= self.every:
            self._last[key] = now
            return True
        return False

    def __call__(self, ev: dict) -> None:
        t = ev.get("type")
        stage = ev.get("stage", "")
        p = self.out.print
        if t == "run_start":
            p(f"[bold]run {ev['run']}[/]  stages: {' -> '.join(ev.get('stages', []))}")
        elif t == "stage_start":
            extra = " (resuming)" if ev.get("resume") else ""
            p(f"[bold]▶ {stage}[/] [dim]({ev.get('uses')})[/]{extra}")
        elif t == "stage_cached":
            p(f"[cyan]↺ {stage}[/] cached [dim](from run {ev.get('from_run')})[/]")
        elif t == "stage_end":
            self._end_bar()
            status = ev.get("status")
            line = f"{'✓' if status == 'done' else '✗'} {stage} {styled(status)}"
            if ev.get("duration") is not None:
                line += f" in {fmt_duration(ev['duration'])}"
            p(line)
            if ev.get("error"):
                p(f"  [red]{escape(str(ev['error']))}[/]", markup=True)  # relayed rank logs hold [brackets]
            if ev.get("reason"):
                p(f"  [dim]{ev['reason']}[/]")
        elif t == "log":
            level = ev.get("level", "info")
            style = {"warning": "yellow", "error": "red", "debug": "dim"}.get(level, "")
            prefix = f"[dim]{stage} |[/] " if stage else ""
            msg = ev.get("message", "")
            p(f"{prefix}[{style}]{msg}[/]" if style else f"{prefix}{msg}", markup=bool(style or prefix),
              highlight=False)
        elif t == "metric":
            vals = ev.get("values") or {}
            if "loss" in vals:
                self._info["loss"] = f"loss {_num(vals['loss'])}"
            if "tokens_per_s" in vals:
                self._info["tok"] = f"{vals['tokens_per_s']:,.0f} tok/s"
            if self._due(f"metric:{stage}"):
                vals = "  ".join(f"{k}={_num(v)}" for k, v in (ev.get("values") or {}).items())
                step = f"step {ev['step']}  " if ev.get("step") is not None else ""
                p(f"[dim]{stage} |[/] {step}{vals}")
        elif t == "progress":
            total = ev.get("total")
            done = ev.get("done")
            if self.live and total:
                self._bar(ev)
            elif self._due(f"progress:{stage}", final=total is not None and done >= total):
                frac = f" ({100 * done / total:.0f}%)" if total else ""
                p(f"[dim]{stage} |[/] {_num(done)}/{_num(total) if total else '?'} {ev.get('unit', '')}{frac}")
        elif t == "artifact":
            p(f"[dim]{stage} | artifact {ev.get('kind')}: {ev.get('path')}[/]")
        elif t == "run_end":
            self._end_bar()
            p(f"[bold]run {ev['run']}[/] {styled(ev.get('status', '?'))}")


def _num(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
