"""Renders run events on the terminal; used by `run` (live) and `logs` (replay or follow)."""

from __future__ import annotations

import time

from llmforge.cli.common import console, fmt_duration, styled


class EventPrinter:
    """Turns events into short lines. Progress and metrics are throttled so a fast stage does not
    flood the terminal; everything stays in events.jsonl regardless."""

    def __init__(self, every: float = 2.0):
        self.out = console()
        self.every = every
        self._last: dict[str, float] = {}

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
            status = ev.get("status")
            line = f"{'✓' if status == 'done' else '✗'} {stage} {styled(status)}"
            if ev.get("duration") is not None:
                line += f" in {fmt_duration(ev['duration'])}"
            p(line)
            if ev.get("error"):
                p(f"  [red]{ev['error']}[/]", markup=True)
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
            if self._due(f"metric:{stage}"):
                vals = "  ".join(f"{k}={_num(v)}" for k, v in (ev.get("values") or {}).items())
                step = f"step {ev['step']}  " if ev.get("step") is not None else ""
                p(f"[dim]{stage} |[/] {step}{vals}")
        elif t == "progress":
            total = ev.get("total")
            done = ev.get("done")
            if self._due(f"progress:{stage}", final=total is not None and done >= total):
                frac = f" ({100 * done / total:.0f}%)" if total else ""
                p(f"[dim]{stage} |[/] {_num(done)}/{_num(total) if total else '?'} {ev.get('unit', '')}{frac}")
        elif t == "artifact":
            p(f"[dim]{stage} | artifact {ev.get('kind')}: {ev.get('path')}[/]")
        elif t == "run_end":
            p(f"[bold]run {ev['run']}[/] {styled(ev.get('status', '?'))}")


def _num(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
