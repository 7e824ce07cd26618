"""`llmforge synth` (stub: the SYNTH-STAGE helper fills this)."""

from __future__ import annotations


def register(cli) -> None:
    return None
