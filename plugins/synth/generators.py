"""Built-in generators (stub: the GENERATORS helper fills this)."""

from __future__ import annotations

from llmforge_plugins.synth.api import Generator

BUILTIN_GENERATORS: list[type[Generator]] = []
