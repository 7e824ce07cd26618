"""The `synth` stage (stub: the SYNTH-STAGE helper fills this)."""

from __future__ import annotations

from llmforge.stage import Stage


class SynthStage(Stage):
    kind = "synth"
    summary = "Synthetic data: a teacher model generates, verifiers and judges filter (stub)."
    produces = ("dataset", "report")
