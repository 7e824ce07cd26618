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
  objects. They run once per process, when the plugin registry is built. They must be cheap: no
  torch or transformers import, no I/O. The work happens later, in the registered object's methods.
* **Lifecycle hooks** run while a pipeline is validated and executed.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("llmforge")
hookimpl = pluggy.HookimplMarker("llmforge")


# --------------------------------------------------------------------------------------------
# Registration hooks
# --------------------------------------------------------------------------------------------


@hookspec
def extension_points() -> list:
    """Declare extension points: return a list of :class:`llmforge.extension.ExtensionPoint`.

    Called once, right after every plugin is loaded and before any registration hook runs. Each point
    adds a registration hook (``point.hook``, taking ``register``) that any plugin may then implement,
    and a registry table (``registry.table(point.table)``) its entries land in. The core declares its
    own points this way (stages, readers, row formats, chat templates, trackers, backends); the merge
    plugin declares merge methods, the curate plugin curation steps. Must be cheap: declarations only.
    """



@hookspec
def register_stages(register: Callable[[type], None]) -> None:
    """Register stage classes.

    Call ``register(StageClass)`` for each :class:`llmforge.stage.Stage` subclass the plugin
    provides. The class's ``name`` is the kind used in ``uses = "<name>"`` in forge.toml. When two
    plugins register the same name, the first in load order wins (built-in plugins first, then
    third-party distributions sorted by name) and the clash is reported by ``llmforge plugins list``.
    """


@hookspec
def register_readers(register: Callable[[type], None]) -> None:
    """Register data readers: :class:`llmforge.data.Reader` subclasses, one per file type.

    A reader turns a file (``.jsonl``, ``.parquet``, ...) or a folder it recognises (a saved
    Hugging Face dataset) into raw records, each located by ``file:line`` or ``file:row N``.
    """


@hookspec
def register_row_formats(register: Callable[[type], None]) -> None:
    """Register row formats: :class:`llmforge.data.RowFormat` subclasses.

    A row format recognises its columns (for ``format = "auto"``) and normalises a raw row into one
    of the shapes training stages consume (text, chat messages, preference pairs), raising
    :class:`llmforge.data.RowError` with the field that is wrong.
    """


@hookspec
def register_chat_templates(register: Callable[[Any], None]) -> None:
    """Register named chat templates: :class:`llmforge.chat.ChatTemplate` instances.

    The name is what ``template = "<name>"`` selects in a training stage.
    """


@hookspec
def register_trackers(register: Callable[[type], None]) -> None:
    """Register experiment trackers: :class:`llmforge.trackers.Tracker` subclasses.

    A tracker enabled in ``[trackers]`` receives every event of a run (metrics, logs, stage
    boundaries) and forwards them to its backend (TensorBoard files, an MLflow store, ...).
    """


@hookspec
def register_merge_methods(register: Callable[[type], None]) -> None:
    """Register model-merging methods: :class:`llmforge.merging.MergeMethod` subclasses.

    The name is what ``method = "<name>"`` (the ``merge`` stage, a merge recipe) and
    ``llmforge merge --method <name>`` select. A method only computes one merged tensor from the
    same tensor of each model (and of the base); reading, parameters per layer or per tensor-name
    filter, and writing are the merge engine's. The built-in methods (``linear``, ``slerp``,
    ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, ``model_stock``, ``passthrough``)
    are registered through this hook too.
    """


@hookspec
def register_backends(register: Callable[[type], None]) -> None:
    """Register backends: :class:`llmforge.backend.Backend` subclasses, how stages' processes are launched.

    ``[backend] type = "<name>"`` in forge.toml selects one; its ``Options`` (a subclass of
    :class:`llmforge.config.BackendSection`, the shared keys plus the backend's own tables) validate the
    whole ``[backend]`` table with key paths, and its ``check(cfg)`` runs with ``llmforge validate``.
    During a run the core's ``execute_stage`` hands each stage the backend ``handles()`` to its
    ``launch()``; the others run in the ``llmforge run`` process. The built-in backends (``local``,
    ``accelerate``, ``deepspeed``) are registered through this hook too.
    """


@hookspec
def register_curation_steps(register: Callable[[type], None]) -> None:
    """Register data-curation steps: ``llmforge.curation.CurationStep`` subclasses.

    The name is what a ``curate`` stage's ``steps = [...]`` and ``llmforge data filter --step <name>``
    select (``llmforge data steps`` lists them). A step has a ``kind`` (``filter``, ``dedup`` or
    ``rewrite``), an ``Options`` model, and answers each row (streamed to it in small batches, in
    order) with the row, a rewritten row, or ``Drop(reason, code=...)``; the reasons end up in the
    per-row reasons file and the curation report. The built-in steps (``normalize``, ``pii``,
    ``exact_dedup``, ``near_dedup``, ``quality``, ``language``, ``decontaminate``, ``lint``) are
    registered through this hook too.
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
def configure(config: Any) -> None:
    """Receive the validated project configuration before any stage runs.

    ``config`` is a :class:`llmforge.config.ForgeConfig`. The hook is *historic*: a plugin
    registered after the configuration was announced still receives it. Use it to read the
    plugin's own settings or to prepare shared state; do not start work here.
    """


@hookspec
def validate_pipeline(pipeline: Any) -> list | None:
    """Check a whole pipeline and return problems, or None.

    ``pipeline`` is a :class:`llmforge.pipeline.Pipeline` whose stages are already individually
    valid. Return a list of :class:`llmforge.errors.Problem` (or plain strings) describing what is
    wrong across stages. Every plugin's answers are collected and shown together by
    ``llmforge validate``; any problem makes the configuration invalid (exit code 2).
    """


@hookspec(firstresult=True)
def execute_stage(stage: Any, options: Any, ctx: Any) -> Any:
    """Execute one stage.

    ``stage`` is the stage instance, ``options`` its validated options with ``@references``
    resolved to artifact paths, ``ctx`` its :class:`llmforge.stage.StageContext`. The first
    implementation that returns a value other than None handles the stage; the built-in
    implementation calls ``stage.run(options, ctx)`` and returns True. Implement it as a
    ``wrapper=True`` hook to wrap every stage (seeding, timing, profiling, tracking).
    """


@hookspec
def on_event(event: dict, run_dir: Any) -> None:
    """Observe every event of a run as it is written to ``events.jsonl``.

    ``event`` is a JSON-serialisable dict with at least ``type``, ``time`` and ``run`` (the run id).
    ``run_dir`` is the run's folder (a :class:`pathlib.Path`: ``manifest.json``, ``events.jsonl``,
    ``stages/<name>/``); an implementation that does not name it does not get it. Observers
    (trackers, notifiers) must be fast and must not raise: an exception is reported once and the
    observer is then skipped for the rest of the run; training never stops because of it.

    An observer may steer the run it watches: ``llmforge.runs.request(run_dir, STOP_REQUEST)`` asks it
    to stop and is honoured at the stage's next ``ctx.should_stop()`` (a training stage: the next
    step's end, which saves a checkpoint), however soon it comes; ``CHECKPOINT_REQUEST`` asks for a
    checkpoint.
    """
