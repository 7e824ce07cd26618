"""Entry point of `shell`: a command as a stage (defined in llmforge_plugins.shell)."""

from __future__ import annotations

from llmforge import hookimpl


@hookimpl
def register_stages(register):
    from llmforge_plugins.shell import ShellStage

    register(ShellStage)
