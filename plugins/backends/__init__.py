"""The built-in backends: `local` (stages run in the `llmforge run` process), `accelerate` (N processes
per node on M nodes, DDP or FSDP) and `deepspeed` (ZeRO 1/2/3, offload, ZeRO++), registered through the
same `register_backends` hook as a plugin's. This entry module stays light: the classes (pydantic) are
imported inside the hook, on first use of the registry."""

from __future__ import annotations

from llmforge import hookimpl


@hookimpl
def register_backends(register):
    from llmforge_plugins.backends.accelerate import AccelerateBackend
    from llmforge_plugins.backends.deepspeed import DeepSpeedBackend
    from llmforge_plugins.backends.local import LocalBackend

    for backend in (LocalBackend, AccelerateBackend, DeepSpeedBackend):
        register(backend)
