"""Trackers: send a run's events to an experiment tracker (TensorBoard, MLflow, ...).

A tracker is a plugin (`register_trackers`). forge.toml enables it in `[trackers]`:
``tensorboard = true`` (default options) or a table of its options (``[trackers.mlflow]``). The
runner creates enabled trackers at run start, hands them every event, and closes them at the end;
a tracker that raises is disabled for the rest of the run, training never stops because of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from llmforge.extension import ExtensionPoint, pydantic_options, subclass_of
from llmforge.stage import StageOptions


class Tracker:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type[StageOptions]] = StageOptions

    def __init__(self, options: Any, run_dir: Path, config: Any):
        self.options = options
        self.run_dir = run_dir
        self.config = config

    def on_event(self, event: dict) -> None:
        """Called for every event of the run, in order."""

    def close(self) -> None:
        """Called once at the end of the run (also after a failure or a stop)."""


# The extension point trackers are registered through (declared by the core in llmforge.execution).
TRACKERS = ExtensionPoint(
    hook="register_trackers",
    table="trackers",
    label="tracker",
    doc="""Register experiment trackers: :class:`llmforge.trackers.Tracker` subclasses.

    A tracker enabled in ``[trackers]`` receives every event of a run (metrics, logs, stage
    boundaries) and forwards them to its backend (TensorBoard files, an MLflow store, ...).
    """,
    validate=subclass_of(Tracker, check=pydantic_options),
)
