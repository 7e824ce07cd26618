"""The core's own hook implementations: run a stage through the run's backend; declare the core's
extension points.

Registered before any plugin, so plugin implementations of `execute_stage` (firstresult) can take a
stage over, and `wrapper=True` implementations wrap this one (and with it a whole launch); and so the
core's points (stages, readers, ...) are declared before any plugin's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmforge.hookspecs import hookimpl

if TYPE_CHECKING:
    from llmforge.stage import Produced, Stage, StageContext


@hookimpl(trylast=True)
def execute_stage(stage: Stage[Any], options: Any, ctx: StageContext) -> Produced | bool:
    """Run the stage here, or through the backend that launches it; what it produced, else True
    (a launched stage runs in other processes: its artifacts reach ``ctx.published`` by relay)."""
    backend = ctx.backend
    if backend is not None and backend.handles(stage, options):
        backend.launch(stage, options, ctx)  # e.g. accelerate: the stage runs in each launched process
        return True
    produced = stage.run(options, ctx)
    return True if produced is None else produced  # None from a stage written before run() returned


@hookimpl
def extension_points() -> list:
    """The core's own extension points, each declared next to its base class. Imported here, when the
    registry first needs them, not at start-up: the base classes are pydantic models, and the help
    screen (which only adds commands) must not pay for them."""
    from llmforge.backend import BACKENDS
    from llmforge.chat import CHAT_TEMPLATES
    from llmforge.chat_engine import CHAT_ENGINES
    from llmforge.data import READERS, ROW_FORMATS
    from llmforge.judging import JUDGE_BACKENDS
    from llmforge.stage import STAGES
    from llmforge.trackers import TRACKERS

    return [STAGES, READERS, ROW_FORMATS, CHAT_TEMPLATES, TRACKERS, BACKENDS, CHAT_ENGINES, JUDGE_BACKENDS]
