"""llama.cpp's OpenAI-compatible server (llama-cpp-python's ``server`` extra), loading models as llmforge
does: ``python -m llmforge_plugins.judges.serve --model judge.gguf --port 8080`` takes the same arguments as
``python -m llama_cpp.server``.

Why not that command directly: on CPUs that advertise AMX but fault on it, llama.cpp dies with SIGILL on the
first batch of a quantized model unless its extra buffer types are off (llmforge.native probes this once per
machine). The server builds its ``Llama`` itself, so the decision is applied to the one function every
model load reads its parameters from, for the life of this process (which only serves).
"""

from __future__ import annotations


def main() -> None:
    from llmforge import native

    if not native.extra_bufts():
        import llama_cpp.llama_cpp as lib

        default = lib.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = False
            return p

        lib.llama_model_default_params = params
    from llama_cpp.server.__main__ import main as serve

    serve()


if __name__ == "__main__":
    main()
