"""Entry point of `trackers`: TensorBoard and MLflow (defined in llmforge_plugins.trackers)."""

from __future__ import annotations

from llmforge import hookimpl


@hookimpl
def register_trackers(register):
    from llmforge_plugins.trackers import MlflowTracker, TensorBoardTracker

    register(TensorBoardTracker)
    register(MlflowTracker)


@hookimpl
def validate_pipeline(pipeline):
    from llmforge_plugins.trackers import missing_libraries

    return missing_libraries(pipeline)
