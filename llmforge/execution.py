"""The core's own hook implementation: run a stage through the run's backend.

Registered before any plugin, so plugin implementations of `execute_stage` (firstresult) can take a
stage over, and `wrapper=True` implementations wrap this one (and with it a whole launch).
"""

from __future__ import annotations

from typing import Any

from llmforge.hookspecs import hookimpl


@hookimpl(trylast=True)
def execute_stage(stage: Any, options: Any, ctx: Any) -> bool:
    backend = getattr(ctx, "backend", None)
    if backend is not None and backend.handles(stage, options):
        backend.launch(stage, options, ctx)  # e.g. accelerate: the stage runs in each launched process
    else:
        stage.run(options, ctx)
    return True
