"""Entry point of `continued_pretrain`: more pretraining of an existing model (defined in
llmforge_plugins.continued_pretrain)."""

from __future__ import annotations

from llmforge import hookimpl


@hookimpl
def register_stages(register):
    from llmforge_plugins.continued_pretrain import ContinuedPretrainStage

    register(ContinuedPretrainStage)
