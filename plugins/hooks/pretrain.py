"""Entry point of `pretrain`: a tokenizer and a Llama trained from scratch (defined in llmforge_plugins.pretrain)."""

from __future__ import annotations

from llmforge import hookimpl


@hookimpl
def register_stages(register):
    from llmforge_plugins.pretrain import PretrainStage

    register(PretrainStage)
