"""Entry point of `dpo`: preference training with TRL's DPOTrainer (defined in llmforge_plugins.dpo)."""

from __future__ import annotations

from llmforge import hookimpl


@hookimpl
def register_stages(register):
    from llmforge_plugins.dpo import DpoStage

    register(DpoStage)
