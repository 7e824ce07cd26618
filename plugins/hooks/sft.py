"""Entry point of `sft`: supervised fine-tuning, full or LoRA/QLoRA (defined in llmforge_plugins.sft)."""

from __future__ import annotations

from llmforge import hookimpl


@hookimpl
def register_stages(register):
    from llmforge_plugins.sft import SftStage

    register(SftStage)
