"""Chat templates: a named Jinja template plus the special tokens it needs.

Built-in templates (chatml, llama3, alpaca, mistral) are registered by a plugin through
`register_chat_templates`, like any third-party one. A training stage resolves its `template`
option to a ChatTemplate (a registered name, a .jinja file, or the tokenizer's own), and the same
template travels with every model artifact (tokenizer_config.json / chat_template.jinja) so that
export and chat later use exactly it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    source: str  # Jinja, with HF's variables: messages, add_generation_prompt, bos_token, eos_token
    eos: str  # the token that ends an assistant turn (trained on, and a stop token)
    bos: str | None = None
    pad: str | None = None
    special_tokens: tuple[str, ...] = ()  # role markers etc. that must be single tokens in the vocab
    stop: tuple[str, ...] = ()  # extra stop strings for generation
    summary: str = ""

    @property
    def hash(self) -> str:
        blob = "\0".join([self.source, self.eos, self.bos or "", self.pad or "", *self.special_tokens])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
