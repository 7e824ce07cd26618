"""Formatting shared by the front ends (the CLI and the TUI) and the plugins.

Imports nothing but the status vocabulary: it is loaded at start-up."""

from __future__ import annotations

from llmforge.status import Status

# The colour of each run and stage status, as a style string that rich (the CLI) and textual (the TUI) both
# read. Keyed by Status, so a plain status string ("done", read from a file) finds its style too.
STATUS_STYLE: dict[str, str] = {
    Status.DONE: "green",
    Status.CACHED: "cyan",
    Status.RUNNING: "yellow",
    Status.STARTING: "yellow",
    Status.FAILED: "red",
    Status.STOPPED: "magenta",
    Status.KILLED: "red",
    Status.DAMAGED: "red",
    Status.BLOCKED: "dim",
    Status.SKIPPED: "dim",
    Status.PENDING: "dim",
}

# The mark before an ended stage's status, the same in the CLI's lines and the TUI's tables: a stop the user
# asked for is not a failure, and the mark says so where colour is not seen (NO_COLOR, a monochrome terminal).
STATUS_MARK: dict[str, str] = {
    Status.DONE: "✓",
    Status.CACHED: "↺",
    Status.STOPPED: "■",
    Status.SKIPPED: "-",
    Status.FAILED: "✗",
    Status.KILLED: "✗",
    Status.DAMAGED: "✗",
}


def fmt_duration(seconds: float | None) -> str:
    """A run's or a stage's duration as the front ends show it: 4.2s, 3m07s, 1h05m."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def fmt_bytes(n: float | None, digits: int = 1) -> str:
    """A size in binary units, as every front end and plugin shows one: 3.2 GiB, 12.0 MiB, 512 B; "?" for None."""
    if n is None:
        return "?"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{int(n)} B"
