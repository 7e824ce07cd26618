"""The `preferences` generator (stub: the RLAIF helper fills this)."""

from __future__ import annotations

from llmforge_plugins.synth.api import Generator


class PreferencesGenerator(Generator):
    kind = "preferences"
    summary = "preference pairs from a policy's own samples, judged (stub)"
    output = "preference"
