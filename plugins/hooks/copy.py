"""Entry point of `copy`: files into an artifact (defined in llmforge_plugins.copy)."""

from __future__ import annotations

from llmforge import hookimpl


@hookimpl
def register_stages(register):
    from llmforge_plugins.copy import CopyStage

    register(CopyStage)
