"""`local`: every stage runs in the `llmforge run` process, on one device (CUDA, MPS or the CPU, chosen
by the stage's own precision and device logic). What llmforge did before backends existed."""

from __future__ import annotations

from typing import Any

from llmforge.backend import Backend
from llmforge.errors import Problem


class LocalBackend(Backend):
    name = "local"
    summary = "Stages run in the llmforge run process, on one device."

    def check(self, cfg: Any) -> list[Problem]:
        s = self.settings
        return [
            Problem(
                f"backend.{key}",
                f'the local backend runs one process; {key} = {value} needs type = "accelerate" (or "deepspeed")',
            )
            for key, value in (("num_processes", s.num_processes), ("num_nodes", s.num_nodes), ("tp_size", s.tp_size))
            if value != 1
        ]
