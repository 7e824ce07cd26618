"""The training watchdog: when no step completes for `[backend] watchdog_minutes`, this process writes
the Python stacks of all its threads to `stacks-rank-R.txt` in the stage folder and a `watchdog` event
goes to the run's events. Hangs inside collective operations (one rank waiting for another that died or
took another code path) are the most common multi-GPU failure; the stacks of every rank show where each
one waits. Every rank runs its own watchdog; only rank 0's event reaches events.jsonl.

A plain Python thread does the watching: blocking collectives (gloo, NCCL) and sleeps release the GIL,
so it keeps running while the training thread is stuck.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

DEFAULT_MINUTES = 10.0


def minutes_for(ctx) -> float:
    """`[backend] watchdog_minutes` of the run (0 turns the watchdog off)."""
    settings = getattr(getattr(ctx, "backend", None), "settings", None)
    return float(getattr(settings, "watchdog_minutes", DEFAULT_MINUTES))


def format_stacks() -> str:
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    parts = []
    for ident, frame in sys._current_frames().items():
        if ident == me:
            continue  # the watchdog's own stack says nothing
        parts.append(f"--- thread {names.get(ident, '?')} ({ident}) ---\n" + "".join(traceback.format_stack(frame)))
    return "\n".join(parts)


class Watchdog:
    def __init__(
        self,
        minutes: float,
        stage_dir: Path,
        rank: int,
        emit: Callable[..., None],
        step: Callable[[], int | None] = lambda: None,
    ):
        self.seconds = minutes * 60
        self.path = Path(stage_dir) / f"stacks-rank-{rank}.txt"
        self.rank = rank
        self.emit = emit
        self.step = step
        self.last = time.monotonic()
        self.fired = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Watchdog:
        if self.seconds > 0 and self._thread is None:
            self.last = time.monotonic()
            self._thread = threading.Thread(target=self._watch, name="llmforge-watchdog", daemon=True)
            self._thread.start()
        return self

    def beat(self) -> None:
        """Progress: a step, an evaluation step or a save completed."""
        self.last = time.monotonic()
        self.fired = False

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None

    def _watch(self) -> None:
        poll = min(5.0, max(0.05, self.seconds / 10))
        while not self._stop.wait(poll):
            idle = time.monotonic() - self.last
            if idle >= self.seconds and not self.fired:
                self.fired = True  # once per stall; the next completed step re-arms it
                self.dump(idle)

    def dump(self, idle: float) -> None:
        header = (
            f"llmforge watchdog: rank {self.rank}, no training step for {idle:.1f} s "
            f"(watchdog_minutes = {self.seconds / 60:g}) at {time.strftime('%Y-%m-%d %H:%M:%S')}\n\n"
        )
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(header + format_stacks() + "\n")
        except OSError:
            pass
        message = (
            f"watchdog: no training step for {idle:.0f} s (after step {self.step()}); the Python stacks "
            f"of each process are in {self.path.parent}/stacks-rank-*.txt"
        )
        try:
            self.emit(
                "watchdog",
                rank=self.rank,
                idle_s=round(idle, 1),
                minutes=self.seconds / 60,
                step=self.step(),
                stacks=str(self.path),
                message=message,
            )
            self.emit("log", level="warning", message=message)  # what a terminal following the run shows
        except Exception:  # noqa: BLE001 - the watchdog must never take the run down
            pass
