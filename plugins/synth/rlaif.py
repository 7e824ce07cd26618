"""The `rlaif` stage (stub: the RLAIF helper fills this)."""

from __future__ import annotations

from llmforge.stage import Stage


class RlaifStage(Stage):
    kind = "rlaif"
    summary = "Iterated alignment from AI feedback: sample, judge into pairs, DPO, for several rounds (stub)."
    produces = ("model", "dataset", "report")
