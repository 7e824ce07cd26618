"""The llmforge plugin API: every hook a plugin may implement.

A plugin is a module (or object) exposed through the ``llmforge`` entry-point group. It implements
any of the hooks below with the ``hookimpl`` marker::

    from llmforge import hookimpl

    @hookimpl
    def register_stages(register):
        register(MyStage)

An implementation may accept fewer arguments than the spec names; that is how hooks grow new
arguments without breaking existing plugins.

Two families of hooks exist:

* **Registration hooks** take a ``register`` callback (or, for commands, the CLI app) and hand over
  objects. They run once per registry, on the first read of their table. They must be cheap: no
  torch or transformers import, no I/O. The work happens later, in the registered object's methods.
  Except ``register_commands``, they are not listed here: each is declared by an extension point
  next to the base class it registers (``register_stages``: ``llmforge.stage.STAGES``;
  ``register_readers`` / ``register_row_formats``: ``llmforge.data``; ``register_chat_templates``:
  ``llmforge.chat``; ``register_trackers``: ``llmforge.trackers``; ``register_backends``:
  ``llmforge.backend``), and plugins declare more (``register_merge_methods``, by the merge plugin).
* **Lifecycle hooks** run while a pipeline is validated and executed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # the lifecycle hooks' real types, for type checkers; nothing imported at run time
    from pathlib import Path

    from llmforge.config import ForgeConfig
    from llmforge.errors import Problem
    from llmforge.pipeline import Pipeline
    from llmforge.stage import Produced, Stage, StageContext

hookspec = pluggy.HookspecMarker("llmforge")
hookimpl = pluggy.HookimplMarker("llmforge")


# --------------------------------------------------------------------------------------------
# Registration hooks
# --------------------------------------------------------------------------------------------


@hookspec
def extension_points() -> list:
    """Declare extension points: return a list of :class:`llmforge.extension.ExtensionPoint`.

    Called once per registry, one plugin at a time (the core first, then load order), on first use of
    anything but the commands, before hook names are checked and before any registration hook runs. Each point
    adds a registration hook (``point.hook``, taking ``register``) that any plugin may then implement,
    and a registry table (``registry.table(point.table)``) its entries land in. The core declares its
    own points this way (stages, readers, row formats, chat templates, trackers, backends); the merge
    plugin declares merge methods, the curate plugin curation steps. Must be cheap: declarations only.
    """


@hookspec
def register_commands(cli: Any) -> None:
    """Add commands to the ``llmforge`` command line.

    ``cli`` is the root Typer application; use ``cli.command()`` or ``cli.add_typer()``. Keep the
    module import light: anything heavy belongs inside the command function.
    """


# --------------------------------------------------------------------------------------------
# Lifecycle hooks
# --------------------------------------------------------------------------------------------


@hookspec(historic=True)
def configure(config: ForgeConfig) -> None:
    """Receive the validated project configuration before any stage runs.

    ``config`` is a :class:`llmforge.config.ForgeConfig`. The hook is *historic*: a plugin
    registered after the configuration was announced still receives it. Use it to read the
    plugin's own settings or to prepare shared state; do not start work here.
    """


@hookspec
def validate_pipeline(pipeline: Pipeline) -> list[Problem | str] | None:
    """Check a whole pipeline and return problems, or None.

    ``pipeline`` is a :class:`llmforge.pipeline.Pipeline` whose stages are already individually
    valid. Return a list of :class:`llmforge.errors.Problem` (or plain strings) describing what is
    wrong across stages. Every plugin's answers are collected and shown together by
    ``llmforge validate``; any problem makes the configuration invalid (exit code 2).
    """


@hookspec(firstresult=True)
def execute_stage(stage: Stage[Any], options: Any, ctx: StageContext) -> Produced | bool | None:
    """Execute one stage.

    ``stage`` is the stage instance, ``options`` its validated options (an instance of
    ``stage.Options``) with ``@references`` resolved to artifact paths, ``ctx`` its
    :class:`llmforge.stage.StageContext`. The first implementation that returns a value other than
    None handles the stage: what the stage produced (``Stage.run``'s mapping of kind to artifact,
    which the runner checks against ``ctx.published``), or True when it cannot say (a launch in other
    processes). The built-in implementation calls ``stage.run(options, ctx)`` (or the backend's
    launch) and returns that. Implement it as a ``wrapper=True`` hook to wrap every stage (seeding,
    timing, profiling, tracking).
    """


@hookspec
def on_event(event: dict[str, Any], run_dir: Path) -> None:
    """Observe every event of a run as it is written to ``events.jsonl``.

    ``event`` is a JSON-serialisable dict with at least ``type``, ``time`` and ``run`` (the run id):
    the line as written. ``llmforge.events.from_dict(event)`` gives the typed event
    (:class:`llmforge.events.Metric`, ``Log``, ...; a generic ``Event`` for other types).
    ``run_dir`` is the run's folder (a :class:`pathlib.Path`: ``manifest.json``, ``events.jsonl``,
    ``stages/<name>/``); an implementation that does not name it does not get it. Observers
    (trackers, notifiers) must be fast and must not raise: an exception is reported once and the
    observer is then skipped for the rest of the run; training never stops because of it.

    An observer may steer the run it watches: ``llmforge.runs.request(run_dir, STOP_REQUEST)`` asks it
    to stop and is honoured at the stage's next ``ctx.should_stop()`` (a training stage: the next
    step's end, which saves a checkpoint), however soon it comes; ``CHECKPOINT_REQUEST`` asks for a
    checkpoint.
    """
