"""The Stage API: what a stage declares, and the context it runs in.

A stage is a class with a ``kind`` (what ``uses = ...`` names), a one-line ``summary``, an
``Options`` pydantic model (the one schema behind forge.toml validation, ``stages show``, ``--set``
and the TUI form), the artifact kinds it ``produces``, a cheap ``check()`` and ``run()``, which
publishes each artifact through ``ctx.artifact(kind)`` and returns them (``return ctx.published``)::

    class Greet(Stage[GreetOptions]):           # the type parameter types `options` for a checker
        def run(self, options: GreetOptions, ctx: StageContext) -> Produced | None:
            with ctx.artifact("files") as out:
                (out / "hello.txt").write_text(options.greeting)
            return ctx.published

Inputs are declared in the options schema itself, by marking a field with :func:`Input`::

    class Options(StageOptions):
        model: Annotated[str, Input("model")]          # "@pretrain" or a path

A marked field accepts either a path (which must exist) or a reference ``"@stage"`` /
``"@stage.kind"`` to another stage's artifact. References order the pipeline; at run time they are
replaced by the artifact's path.

Planning (``llmforge plan``, the fit check of ``llmforge run``): ``estimate(options, env)`` returns the
stage's memory and disk figures (an :class:`llmforge.planning.Estimate`, or None for "no estimate"),
and ``output_shape(options, env)`` the shape of the model it writes, so that a stage reading it by
``@reference`` can estimate too. Both are arithmetic on options and shapes, run on every plan.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from llmforge.extension import ExtensionPoint, pydantic_options, subclass_of

if TYPE_CHECKING:
    from llmforge.backend import Backend
    from llmforge.errors import Problem
    from llmforge.planning import Estimate, PlanEnv, Shape
    from llmforge.plugins import Registry


class StageOptions(BaseModel):
    """Base class for stage options: unknown keys are errors, and schema building waits for first use
    (so that loading plugins at start-up stays cheap)."""

    model_config = ConfigDict(extra="forbid", defer_build=True, validate_default=True)


@dataclass(frozen=True)
class Input:
    """Marks an options field as an input: a path, or a reference to another stage's artifact.

    ``kinds`` lists the artifact kinds accepted from a reference (empty: any). ``must_exist``
    says whether a plain path has to exist when the configuration is validated.
    """

    kinds: tuple[str, ...] = ()
    must_exist: bool = True

    def __init__(self, *kinds: str, must_exist: bool = True):
        object.__setattr__(self, "kinds", tuple(kinds))
        object.__setattr__(self, "must_exist", must_exist)


@dataclass(frozen=True)
class Artifact:
    """A finished output of a stage: a directory in the run store (or a user path given as input)."""

    kind: str
    path: Path
    stage: str | None = None  # None for plain user paths
    key: str | None = None  # cache key of the producing stage

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "stage": self.stage, "key": self.key}


OptionsT = TypeVar("OptionsT", bound=StageOptions)

#: What ``Stage.run`` returns: the artifacts it produced, by kind (normally ``ctx.published``).
Produced = Mapping[str, Artifact]


class _KindAlias:
    """``Stage.name`` read on a class or an instance: the kind. Plugins written before ``Stage.kind``
    (a backend's ``handles(stage, ...)``, an ``execute_stage`` hook) read the kind there."""

    def __get__(self, obj: object, owner: type) -> str:
        return stage_kind(owner)


def stage_kind(cls: type) -> str:
    """A stage class's kind: the nearest ``kind`` in its MRO, or, for a class written before ``kind``
    (or a subclass of a built-in stage that renames itself that way), a plain string ``name`` set
    nearer than any ``kind``."""
    for klass in cls.__mro__:
        for attr in ("kind", "name"):
            value = vars(klass).get(attr)
            if isinstance(value, str) and value:
                return value
    return ""


class Stage(Generic[OptionsT]):
    """Base class of every stage. Subclasses set the class attributes and implement ``run``.

    Name the options class as the type parameter, ``class Greet(Stage[GreetOptions])``, and a type
    checker knows what ``options`` holds in ``run``, ``check`` and ``outputs``; a plain ``Stage``
    subclass gets ``Any`` options, as before.
    """

    #: what ``uses = "<kind>"`` in forge.toml names; a stage's own name is its StageSpec's ``name``
    kind: ClassVar[str] = ""
    #: the older spelling of ``kind``: a class that sets only ``name`` still registers under it (see
    #: STAGES), and reading ``name`` gives the kind, for plugins written before ``kind``
    name: ClassVar[str] = _KindAlias()  # type: ignore[assignment]
    summary: ClassVar[str] = ""
    Options: ClassVar[type[StageOptions]] = StageOptions
    produces: ClassVar[tuple[str, ...]] = ()
    #: bump when the stage's behaviour changes so that cached results are not reused
    version: ClassVar[str] = "1"
    #: distributions whose versions enter the cache key (read from metadata, never imported)
    cache_libraries: ClassVar[tuple[str, ...]] = ()
    #: under a launching backend (accelerate, deepspeed): True runs ``run()`` in every process of the
    #: launch (a stage that trains with the HF Trainer or accelerate); False keeps it in the
    #: ``llmforge run`` process; None lets the backend decide (the built-in ones launch training stages)
    distributed: ClassVar[bool | None] = None

    def outputs(self, options: OptionsT) -> tuple[str, ...]:
        """The artifact kinds this configuration writes (a subset of ``produces``; e.g. LoRA: adapter)."""
        return self.produces

    def cache_key_extra(self, options: OptionsT, project_dir: Path) -> dict[str, Any]:
        """Anything else the result depends on that the options don't show (e.g. the content of a
        file named by a plain option); it enters the stage's cache key."""
        return {}

    def judges_used(self, options: OptionsT, project_dir: Path) -> list[str]:
        """The ``[judges.NAME]`` names this configuration asks: what those judges are (backend, model, prompt
        settings) enters the stage's cache key, so a changed judge judges again."""
        return []

    def check(self, options: OptionsT, inputs: dict[str, Artifact], registry: Registry | None = None) -> list[Problem]:
        """Cheap preflight, run by ``validate`` and before ``run``: no heavy imports, no training.

        ``registry`` is the run's plugin :class:`llmforge.plugins.Registry` (to look a name up in a table,
        e.g. a chat template); an override that does not name the parameter is called without it."""
        return []

    def estimate(self, options: Any, env: PlanEnv) -> Estimate | None:
        """What the stage needs before it runs, for ``llmforge plan`` and the fit check of ``llmforge run``:
        peak memory of one process, host RAM beyond it, disk, as an :class:`llmforge.planning.Estimate`.

        ``env`` (:class:`llmforge.planning.PlanEnv`) gives the machine, ``env.device``, ``env.backend``
        (the launch's sharding) and the shapes of the model inputs (``env.shape_of("model")`` follows
        ``@stage`` references). llmforge.planning has the arithmetic: ``estimate_training`` for a stage
        that trains with the HF Trainer, or an Estimate of parts the stage counts itself. Called on
        every plan: arithmetic only, no torch, no model loaded. None (the default) shows "no estimate";
        raising ``llmforge.planning.ShapeUnknown`` shows "model shape unknown" with its message."""
        return None

    def output_shape(self, options: Any, env: PlanEnv) -> Shape | None:
        """The shape (:class:`llmforge.planning.Shape`) of the model this stage writes, for the estimates
        of the stages that read it (``@this``). None (the default): the stage writes no model, or cannot
        say before it runs."""
        return None

    def run(self, options: OptionsT, ctx: StageContext) -> Produced | None:  # pragma: no cover - abstract
        """Do the work; return what was produced: ``return ctx.published``.

        Publish each output through ``with ctx.artifact(kind) as folder:`` (atomic; see there what a crash
        or a stop leaves). The return value is the stage's account of its outputs: the runner checks that
        every kind it names was published through ``ctx.artifact`` (a folder written anywhere else is
        not atomic and nothing cleans it up) and that every kind of ``outputs(options)`` was. Return early
        after ``ctx.should_stop()`` said True: the stage is then recorded stopped, whatever it returns.
        None (stages written before this contract) is accepted: ``ctx.published`` alone counts then.
        """
        raise NotImplementedError


@dataclass
class StageContext:
    """What a running stage gets: its directories, inputs, and the ways to report.

    ``work_dir`` survives an interruption of the same run: keep checkpoints there so that
    ``llmforge run --resume`` can continue (``resume`` is True then).

    Under a launching backend the stage runs in several processes, each with its own context: ``rank``
    (0 .. ``world_size`` - 1) tells them apart. Only rank 0's events reach the run; on other ranks
    ``artifact()`` yields a scratch folder that is thrown away, so code that every rank runs (a
    collective save) needs no special case. ``backend`` is the run's :class:`llmforge.backend.Backend`
    (its ``settings`` are the ``[backend]`` table), or None outside a run.
    """

    stage_name: str
    run_id: str
    run_dir: Path
    stage_dir: Path
    inputs: dict[str, Artifact]
    emit: Callable[..., None]
    stop_check: Callable[[], bool]
    checkpoint_check: Callable[[], bool]
    resume: bool = False
    seed: int = 0
    project_dir: Path = field(default_factory=Path.cwd)
    published: dict[str, Artifact] = field(default_factory=dict)
    stop_seen: bool = False
    #: facts the stage records in the run manifest (e.g. the chat template's name and hash)
    info: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1
    backend: Backend | None = None
    #: the run's plugin registry (:class:`llmforge.plugins.Registry`): tables such as chat templates
    registry: Any = None
    #: the judges declared in forge.toml: name -> :class:`llmforge.judging.JudgeSpec` (the judges plugin opens one)
    judges: dict[str, Any] = field(default_factory=dict)

    @property
    def work_dir(self) -> Path:
        path = self.stage_dir / "work"
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ---- reporting -------------------------------------------------------------------------
    def log(self, message: str, level: str = "info") -> None:
        self.emit("log", level=level, message=str(message))

    def metric(self, step: int | None = None, **values: float) -> None:
        self.emit("metric", step=step, values=values)

    def progress(self, done: float, total: float | None = None, unit: str = "step", **extra: Any) -> None:
        self.emit("progress", done=done, total=total, unit=unit, **extra)

    # ---- control ---------------------------------------------------------------------------
    def should_stop(self) -> bool:
        """True once a stop was requested (``llmforge stop``, SIGINT, SIGTERM). Save and return."""
        if self.stop_check():
            self.stop_seen = True
            return True
        return False

    def checkpoint_requested(self) -> bool:
        """True once per ``llmforge checkpoint`` request: save a checkpoint now."""
        return self.checkpoint_check()

    # ---- artifacts -------------------------------------------------------------------------
    @contextlib.contextmanager
    def artifact(self, kind: str) -> Iterator[Path]:
        """Write an artifact atomically.

        Yields an empty temporary directory; when the block ends without error it is renamed to
        ``stage_dir/artifacts/<kind>``. A crash inside the block leaves only a ``.tmp-*`` directory
        that nothing mistakes for a finished artifact (and that the next attempt removes); a block
        left early after ``should_stop()`` returned True is discarded too.

        A stop and the artifact: a stage ends either ``done`` with every artifact published, or
        ``stopped``/``failed`` with none, never both.

        * A stop requested while the block runs (SIGTERM, Ctrl-C, ``llmforge stop``) does not interrupt
          it: the signal only sets a flag. If the stage does not ask ``should_stop()`` (a training stage
          saving its final model does not), the write finishes, the artifact is published, and when the
          stage returns with all its outputs it ends ``done``; the run then stops before the next stage.
          The stop was deferred until the artifact was in place.
        * If the stage asks and gets True (inside the block, or before it), it is stopped: this block's
          content is discarded, and the runner removes any artifact the stage had already published
          (the first of two, say).
        * A third Ctrl-C interrupts at once: the block's temporary folder is removed, the stage is
          stopped, nothing is published.
        """
        final = self.stage_dir / "artifacts" / kind
        tmp = final.parent / f".tmp-{kind}-{os.getpid()}-{time.monotonic_ns()}"
        tmp.mkdir(parents=True)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.rank != 0:
            # Rank 0 publishes; the other processes of a launch only took part (e.g. in a gathered save).
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if self.stop_seen:
            # The stage returned early because of a stop request: what it wrote is incomplete.
            shutil.rmtree(tmp, ignore_errors=True)
            return
        replace_dir(tmp, final)
        art = Artifact(kind=kind, path=final, stage=self.stage_name)
        self.published[kind] = art
        self.emit("artifact", kind=kind, path=str(final))


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory ``src`` to ``dst``, replacing an older ``dst``. The rename itself is atomic; an
    older ``dst`` is first moved aside so a crash never leaves a mix of old and new files."""
    if dst.exists():
        trash = dst.parent / f".old-{dst.name}-{os.getpid()}-{time.monotonic_ns()}"
        os.replace(dst, trash)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)


def input_marker(annotation: Any) -> Input | None:
    """Find an :class:`Input` marker in a field annotation (also inside list[...] / Optional[...])."""
    import typing

    for meta in getattr(annotation, "__metadata__", ()):
        if isinstance(meta, Input):
            return meta
    for arg in typing.get_args(annotation):
        found = input_marker(arg)
        if found is not None:
            return found
    return None


def _registered_kind(obj: Any) -> str:
    """The STAGES entry's name: the class's kind (raises TypeError when it has none)."""
    kind = stage_kind(obj) if isinstance(obj, type) else ""
    if not kind:
        raise TypeError(f'{getattr(obj, "__qualname__", repr(obj))} has no kind (kind = "...")')
    return kind


def _kind_set(cls: type[Stage]) -> None:
    """STAGES' own rules: pydantic options, and ``cls.kind`` filled from an older class's ``name`` so
    that every reader can use ``kind``."""
    pydantic_options(cls)
    if vars(cls).get("kind") != stage_kind(cls):
        cls.kind = stage_kind(cls)


# The extension point stages are registered through (declared by the core in llmforge.execution).
STAGES = ExtensionPoint(
    hook="register_stages",
    table="stages",
    label="stage",
    doc="""Register stage classes.

    Call ``register(StageClass)`` for each :class:`llmforge.stage.Stage` subclass the plugin
    provides. The class's ``kind`` is what ``uses = "<kind>"`` names in forge.toml (a class written
    before ``kind`` existed sets ``name`` instead, and registers under that). When two plugins
    register the same kind, the first in load order wins (built-in plugins first, then third-party
    distributions sorted by name) and the clash is reported by ``llmforge plugins list``.
    """,
    validate=subclass_of(Stage, check=_kind_set, name_of=_registered_kind),
    name_of=_registered_kind,
)
