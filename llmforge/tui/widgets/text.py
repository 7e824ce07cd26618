"""Small text helpers the TUI's widgets share: durations, status colours, numbers."""

from __future__ import annotations

import math

from llmforge.formatting import fmt_duration  # noqa: F401 - the screens import it from here

# Statuses as the CLI colours them (cli/common.py), as textual markup styles.
STATUS_STYLE = {
    "done": "green", "cached": "cyan", "running": "yellow", "failed": "red", "stopped": "magenta",
    "killed": "red", "blocked": "dim", "skipped": "dim", "pending": "dim",
}


def styled(status: str) -> str:
    return f"[{STATUS_STYLE.get(status, 'default')}]{status}[/]"


def fmt_number(v: float | None) -> str:
    """Compact: 0.000123 -> 1.23e-04, 1234.5 -> 1234.5, 2.5 -> 2.5."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    a = abs(v)
    if a != 0 and (a < 1e-3 or a >= 1e6):
        return f"{v:.2e}"
    return f"{v:.4g}"
