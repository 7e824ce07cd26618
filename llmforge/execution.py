"""The core's own hook implementation: run a stage in this process.

Registered before any plugin, so plugin implementations of `execute_stage` (firstresult) can take a
stage over (for example a launcher backend), and `wrapper=True` implementations wrap this one.
"""

from __future__ import annotations

from typing import Any

from llmforge.hookspecs import hookimpl


@hookimpl(trylast=True)
def execute_stage(stage: Any, options: Any, ctx: Any) -> bool:
    stage.run(options, ctx)
    return True
