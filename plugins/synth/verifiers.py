"""Built-in verifiers (stub: the VERIFIERS helper fills this)."""

from __future__ import annotations

from llmforge_plugins.synth.api import Verifier

BUILTIN_VERIFIERS: list[type[Verifier]] = []
