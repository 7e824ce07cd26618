"""`gguf`: getting a trained model into llama.cpp, Ollama and LM Studio, and checking that it survived.

* the stage kind `gguf` (stage.py): export, quantize, parity check, Modelfiles, as one pipeline step;
* the commands `llmforge gguf export|quantize|check`, `llmforge import` and `llmforge chat` (command.py);
* the engine: export.py and vocab.py (HF -> GGUF, streamed), quantize.py (llama.cpp's quantizer) and
  imatrix.py (importance matrices from calibration text), check.py (tokenization, logits parity, perplexity:
  the scorecard), importer.py (GGUF -> HF), modelfile.py (Ollama), metadata.py (header keys without the
  vocabulary);
* the chat engines `hf` (transformers) and `gguf` (llama.cpp) in chat.py, registered through the core's
  `register_chat_engines`: `llmforge chat`, the TUI's chat panel and the demo's evaluation open models
  with them.

Imported at every `llmforge` start-up: nothing heavy here. torch, transformers, gguf and llama_cpp are
imported inside the functions that need them.
"""

from __future__ import annotations

from llmforge import hookimpl


@hookimpl
def register_stages(register):
    from llmforge_plugins.gguf.stage import GgufStage

    register(GgufStage)


@hookimpl
def register_chat_engines(register):
    # chat.py imports nothing heavy at import (torch and llama.cpp load when an engine opens a model).
    from llmforge_plugins.gguf.chat import ENGINES

    for engine in ENGINES.values():
        register(engine)


@hookimpl
def register_commands(cli):
    from llmforge_plugins.gguf.command import register

    register(cli)
