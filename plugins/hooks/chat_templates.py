"""Entry point of `chat_templates`: chatml, llama3, alpaca, mistral, qwen, gemma, phi3 (defined in
llmforge_plugins.chat_templates)."""

from __future__ import annotations

from llmforge import hookimpl


@hookimpl
def register_chat_templates(register):
    from llmforge_plugins.chat_templates import BUILTIN_TEMPLATES

    for template in BUILTIN_TEMPLATES:
        register(template)
