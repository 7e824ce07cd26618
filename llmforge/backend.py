"""The backend API: how the processes of a stage are started.

A backend is a class registered through the ``register_backends`` hook and chosen by ``[backend] type``
in forge.toml. The same pipeline runs under every backend; only ``[backend]`` changes. The core makes
one instance per run (``Backend(settings)``, ``settings`` being the validated ``[backend]`` table) and
hands it to every stage as ``ctx.backend``. For each stage, the core's ``execute_stage`` asks
``backend.handles(stage, options)``: when True, ``backend.launch(stage, options, ctx)`` runs the stage
(in other processes, on other machines); otherwise the stage runs in the ``llmforge run`` process.

A launching backend runs the stage unchanged in each process it starts and keeps the run store's rules:
only rank 0 writes events, artifacts and checkpoint markers; the ``llmforge run`` process alone writes
the manifest. The built-in ones (``local``, ``accelerate``, ``deepspeed``) and the launch machinery they
share are a plugin like any other (``plugins/backends/``), registered through ``BACKENDS``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from llmforge.config import BackendSection, ForgeConfig
from llmforge.extension import ExtensionPoint, subclass_of

if TYPE_CHECKING:
    from llmforge.errors import Problem
    from llmforge.plugins import Registry
    from llmforge.stage import StageContext


class Backend:
    """Base class of every backend. Subclasses set ``name``, ``summary`` and ``Options``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: the whole ``[backend]`` table: ``BackendSection`` (the shared keys) plus this backend's own tables
    Options: ClassVar[type[BackendSection]] = BackendSection

    def __init__(self, settings: BackendSection):
        self.settings = settings

    @property
    def world_size(self) -> int:
        return self.settings.num_processes * self.settings.num_nodes

    def check(self, cfg: Any) -> list[Problem]:
        """Cheap preflight of the whole configuration (``llmforge validate`` and ``run``): settings that
        cannot work together, stages this backend cannot run as configured. No heavy imports, no launch.
        Problems carry key paths (``backend.num_processes``, ``stages[1].lora.merge``)."""
        return []

    def handles(self, stage: Any, options: Any) -> bool:
        """True when this backend starts the stage's processes itself; False runs it in this process."""
        return False

    def launch(self, stage: Any, options: Any, ctx: StageContext) -> None:
        """Run one stage to its end (only called when ``handles`` said True).

        Relay the stage's events through ``ctx.emit`` (``artifact`` events mark what was published:
        record them in ``ctx.published``), copy the stage's ``info`` into ``ctx.info``, set
        ``ctx.stop_seen`` when the stage stopped on request, and raise a ``ForgeError`` naming the
        failed process (its rank) when a process fails.
        """
        raise NotImplementedError(f"backend {self.name!r} does not launch stages")

    def trainer_args(self, ctx: StageContext) -> dict[str, Any]:
        """Extra ``TrainingArguments`` for a training stage running under this backend (for example
        ``deepspeed=<path to the JSON>``). Read by the built-in training loop in every process."""
        return {}


def stage_is_distributed(stage: Any, options: Any) -> bool | None:
    """What a stage class says about running in every process of a launch: its ``distributed``
    attribute (True, False), or None when it leaves the choice to the backend."""
    return getattr(type(stage), "distributed", None)


def build_backend(cfg: ForgeConfig, registry: Registry) -> Backend | None:
    """The run's backend instance, or None when the selected type is not installed (only possible for
    the default `local` when its plugin failed to load: stages then run in this process)."""
    cls = registry.backends.get(cfg.backend.type)
    return cls(cfg.backend) if cls is not None else None


def _backend_rules(cls: type[Backend]) -> None:
    if not (isinstance(getattr(cls, "Options", None), type) and issubclass(cls.Options, BackendSection)):
        raise TypeError(f"{cls.__qualname__}.Options must subclass llmforge.config.BackendSection")


# The extension point backends are registered through (declared by the core in llmforge.execution).
BACKENDS = ExtensionPoint(
    hook="register_backends",
    table="backends",
    label="backend",
    doc="""Register backends: :class:`llmforge.backend.Backend` subclasses, how stages' processes are launched.

    ``[backend] type = "<name>"`` in forge.toml selects one; its ``Options`` (a subclass of
    :class:`llmforge.config.BackendSection`, the shared keys plus the backend's own tables) validate the
    whole ``[backend]`` table with key paths, and its ``check(cfg)`` runs with ``llmforge validate``.
    During a run the core's ``execute_stage`` hands each stage the backend ``handles()`` to its
    ``launch()``; the others run in the ``llmforge run`` process. The built-in backends (``local``,
    ``accelerate``, ``deepspeed``) are registered through this hook too.
    """,
    validate=subclass_of(Backend, check=_backend_rules),
)
