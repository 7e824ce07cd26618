"""Plugin loading: the pluggy manager, entry points one at a time, load errors, name clashes.

Built-in plugins (entry points of the `llmforge` distribution itself) and third-party ones load
through the same `llmforge` entry-point group. LLMFORGE_LOAD_PLUGINS chooses what loads:
unset = everything installed; empty = only the built-ins; "a,b" = the built-ins plus the named
distributions. A plugin that fails to import, implements an unknown (misspelt) hook, fails to
register with pluggy, or raises inside a registration hook is recorded in `Registry.errors`, never
raised; plugins handed over in process (`load_registry(extra=...)`, how tests add one) get the same
checks.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from llmforge import hookspecs

GROUP = "llmforge"
BUILTIN_DIST = "llmforge"
ENV_VAR = "LLMFORGE_LOAD_PLUGINS"


@dataclass
class PluginInfo:
    name: str  # entry-point name
    dist: str  # distribution name
    version: str
    module: str  # entry-point value
    builtin: bool
    hooks: list[str] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)
    provides: dict[str, list[str]] = field(default_factory=dict)  # registry attribute -> names

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class LoadError:
    plugin: str
    dist: str
    error: str  # one line: the exception type and message
    details: str  # the traceback, for `plugins list --verbose` and --debug

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Conflict:
    kind: str  # "stage", "reader", "row format", "chat template", "tracker", "merge method", "backend",
    # "curation step"
    name: str
    winner: str
    loser: str

    def __str__(self) -> str:
        return f"{self.kind} '{self.name}' is registered by both {self.winner} and {self.loser}; using {self.winner}"

    def to_json(self) -> dict:
        return {**self.__dict__, "message": str(self)}


@dataclass
class StageEntry:
    cls: type
    plugin: str


@dataclass
class Registry:
    pm: pluggy.PluginManager
    plugins: list[PluginInfo] = field(default_factory=list)
    errors: list[LoadError] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    stages: dict[str, StageEntry] = field(default_factory=dict)
    readers: dict[str, Any] = field(default_factory=dict)
    row_formats: dict[str, Any] = field(default_factory=dict)
    chat_templates: dict[str, Any] = field(default_factory=dict)
    trackers: dict[str, type] = field(default_factory=dict)
    merge_methods: dict[str, Any] = field(default_factory=dict)  # name -> MergeMethod instance
    backends: dict[str, type] = field(default_factory=dict)  # name -> Backend subclass
    curation_steps: dict[str, type] = field(default_factory=dict)  # name -> CurationStep subclass
    owners: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, name) -> plugin
    # The registration hooks run on first use of any table (or of plugins/errors): `llmforge --help`
    # only needs register_commands, and must not pay for importing every stage's dependencies.
    _collected: bool = True

    def __getattribute__(self, name: str) -> Any:
        if name in _LAZY and not object.__getattribute__(self, "_collected"):
            object.__setattr__(self, "_collected", True)
            _collect(self)
        return object.__getattribute__(self, name)

    def stage_class(self, name: str) -> type | None:
        entry = self.stages.get(name)
        return entry.cls if entry else None


_LAZY = {"plugins", "errors", "conflicts", "stages", "readers", "row_formats", "chat_templates", "trackers",
         "owners", "merge_methods", "backends", "curation_steps"}


def _dist_of(ep: metadata.EntryPoint, seen: dict[str, tuple[str, str]] | None = None) -> tuple[str, str]:
    """(name, version) of the distribution an entry point comes from. Reading them parses the METADATA
    file, ~3 ms each: `seen` keeps them per dist-info folder, as every built-in shares one."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?", "?"
    key = str(getattr(dist, "_path", id(dist)))
    if seen is not None and key in seen:
        return seen[key]
    meta = dist.metadata
    found = (meta["Name"] or "?", meta["Version"] or "?")
    if seen is not None:
        seen[key] = found
    return found


def _wanted(env: str | None) -> set[str] | None:
    """Distribution names to load besides the built-ins; None = all."""
    if env is None:
        return None
    return {_norm(p) for p in env.split(",") if p.strip()}


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_registry(env: str | None | type(...) = ..., extra: list[tuple[str, Any]] | None = None) -> Registry:
    """Build a fresh registry: load entry points, then run the registration hooks plugin by plugin.

    `extra` adds (name, plugin object) pairs after the entry points (used by tests and embedders).
    They are checked like entry points: one that implements an unknown (misspelt) hook, or whose name
    is taken, is recorded in `errors` and left out, never raised.
    """
    if env is ...:
        env = os.environ.get(ENV_VAR)
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    reg = Registry(pm=pm)

    # The core's own implementation of execute_stage: the default that wrappers wrap.
    from llmforge import execution

    pm.register(execution, name="llmforge.execution")

    wanted = _wanted(env)
    eps = list(metadata.entry_points(group=GROUP))
    found_dists = set()
    ordered = []
    dists: dict[str, tuple[str, str]] = {}
    for ep in eps:
        dist, version = _dist_of(ep, dists)
        builtin = _norm(dist) == BUILTIN_DIST
        found_dists.add(_norm(dist))
        if not builtin and wanted is not None and _norm(dist) not in wanted:
            continue
        ordered.append((not builtin, _norm(dist), ep.name, ep, dist, version, builtin))
    # Deterministic order: built-ins first, then distributions by name, then entry-point name.
    ordered.sort(key=lambda t: t[:3])
    for *_, ep, dist, version, builtin in ordered:
        if pm.has_plugin(ep.name) or any(p.name == ep.name for p in reg.plugins):
            reg.errors.append(LoadError(ep.name, dist, f"an entry point named '{ep.name}' is already loaded", ""))
            continue
        try:
            obj = ep.load()
            _check_hook_names(obj)
            pm.register(obj, name=ep.name)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - a bad plugin (even one calling sys.exit) must not brick the tool
            reg.errors.append(LoadError(ep.name, dist, _short_error(exc), traceback.format_exc()))
            continue
        reg.plugins.append(PluginInfo(ep.name, dist, version, ep.value, builtin))
    if wanted:
        for missing in sorted(wanted - found_dists):
            reg.errors.append(LoadError(missing, missing, f"{ENV_VAR} names '{missing}', which is not installed", ""))
    for name, obj in extra or []:
        # The same checks as an entry point: `extra` is how plugin authors test, so a misspelt hook
        # must show up there, not only once the plugin is installed.
        if pm.has_plugin(name) or any(p.name == name for p in reg.plugins):
            reg.errors.append(LoadError(name, "(in-process)", f"a plugin named '{name}' is already loaded", ""))
            continue
        try:
            _check_hook_names(obj)
            pm.register(obj, name=name)
        except Exception as exc:  # noqa: BLE001 - recorded like an entry point's failure
            reg.errors.append(LoadError(name, "(in-process)", _short_error(exc), traceback.format_exc()))
            continue
        reg.plugins.append(PluginInfo(name, "(in-process)", "", repr(obj), False))

    for info in reg.plugins:
        plugin = pm.get_plugin(info.name)
        info.hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
    reg._collected = False  # the registration hooks run on first use (see Registry.__getattribute__)
    return reg


def _check_hook_names(plugin: Any) -> None:
    """A misspelt hook would silently do nothing: refuse the plugin and say which name was meant."""
    known = {n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), f"{GROUP}_spec")}
    for attr in dir(plugin):
        if attr.startswith("__"):
            continue
        try:
            value = getattr(plugin, attr)
        except Exception:  # noqa: BLE001 - odd attributes are not hooks
            continue
        if hasattr(value, f"{GROUP}_impl") and attr not in known:
            opts = getattr(value, f"{GROUP}_impl") or {}
            if isinstance(opts, dict) and opts.get("specname"):
                continue
            from llmforge.schema import (
                did_you_mean,  # pydantic: only on this error path (start-up time)
            )

            raise ValueError(f"implements unknown hook '{attr}'{did_you_mean(attr, known)}")


def _kinds() -> dict[str, tuple[str, str, Any]]:
    """Registration hooks: hook name -> (registry attribute, what it registers, validator)."""
    from pydantic import BaseModel

    from llmforge.backend import Backend
    from llmforge.chat import ChatTemplate
    from llmforge.config import BackendSection
    from llmforge.curation import STEP_KINDS, CurationStep
    from llmforge.data import KINDS, Reader, RowFormat
    from llmforge.merging import MergeMethod, Param
    from llmforge.stage import Stage
    from llmforge.trackers import Tracker

    def subclass(base: type, *, options: bool = False, instantiate: bool = False):
        def check(obj: Any) -> Any:
            if not (isinstance(obj, type) and issubclass(obj, base)):
                raise TypeError(f"register() expects a {base.__name__} subclass, got {obj!r}")
            if not obj.name or not isinstance(obj.name, str):
                raise TypeError(f"{obj.__qualname__} has no name")
            if options and not (isinstance(obj.Options, type) and issubclass(obj.Options, BaseModel)):
                raise TypeError(f"{obj.__qualname__}.Options must be a pydantic model (StageOptions subclass)")
            if base is Backend and not (isinstance(obj.Options, type) and issubclass(obj.Options, BackendSection)):
                raise TypeError(f"{obj.__qualname__}.Options must subclass llmforge.config.BackendSection")
            if base is RowFormat and obj.kind not in KINDS:
                raise TypeError(f"{obj.__qualname__}.kind must be one of {KINDS}, not {obj.kind!r}")
            if base is CurationStep and obj.kind not in STEP_KINDS:
                raise TypeError(f"{obj.__qualname__}.kind must be one of {STEP_KINDS}, not {obj.kind!r}")
            if base is MergeMethod:
                if obj.base not in ("required", "optional", "none"):
                    raise TypeError(f"{obj.__qualname__}.base must be 'required', 'optional' or 'none', "
                                    f"not {obj.base!r}")
                if not all(isinstance(p, Param) for p in obj.params):
                    raise TypeError(f"{obj.__qualname__}.params must be a tuple of llmforge.merging.Param")
            return obj() if instantiate else obj
        return check

    def template(obj: Any) -> Any:
        if not isinstance(obj, ChatTemplate):
            raise TypeError(f"register() expects a ChatTemplate, got {obj!r}")
        return obj

    return {
        "register_stages": ("stages", "stage", subclass(Stage, options=True)),
        "register_readers": ("readers", "reader", subclass(Reader, instantiate=True)),
        "register_row_formats": ("row_formats", "row format", subclass(RowFormat, instantiate=True)),
        "register_chat_templates": ("chat_templates", "chat template", template),
        "register_trackers": ("trackers", "tracker", subclass(Tracker, options=True)),
        "register_merge_methods": ("merge_methods", "merge method", subclass(MergeMethod, instantiate=True)),
        "register_backends": ("backends", "backend", subclass(Backend)),
        "register_curation_steps": ("curation_steps", "curation step", subclass(CurationStep, options=True)),
    }


def _collect(reg: Registry) -> None:
    """Call each plugin's registration hooks on their own, so one failure stays that plugin's problem.
    The first registration of a name wins (load order); later ones are recorded as conflicts."""
    infos = {p.name: p for p in reg.plugins}
    order = [p.name for p in reg.plugins]
    for hook, (attr, label, validate) in _kinds().items():
        table = getattr(reg, attr)
        # pluggy lists implementations last-registered first; we want load order.
        impls = sorted(getattr(reg.pm.hook, hook).get_hookimpls(),
                       key=lambda i: order.index(i.plugin_name) if i.plugin_name in infos else 10**6)
        for impl in impls:
            info = infos.get(impl.plugin_name)
            where = info.dist if info else impl.plugin_name

            def register(obj: Any, _plugin=impl.plugin_name) -> None:
                value = validate(obj)
                name = obj.name
                current = table.get(name)
                if current is not None:
                    same = (current.cls if attr == "stages" else current) is obj or \
                        type(current) is obj or current == obj
                    if not same:
                        owner = reg.owners[(attr, name)]
                        reg.conflicts.append(Conflict(label, name, _label(reg, owner), _label(reg, _plugin)))
                    return
                table[name] = StageEntry(value, _plugin) if attr == "stages" else value
                reg.owners[(attr, name)] = _plugin
                if _plugin in infos:
                    infos[_plugin].provides.setdefault(attr, []).append(name)
                    if attr == "stages":
                        infos[_plugin].stages.append(name)

            try:
                impl.function(register=register) if "register" in impl.argnames else impl.function()
            except Exception as exc:  # noqa: BLE001
                reg.errors.append(LoadError(impl.plugin_name, where, f"{hook} failed: {_short_error(exc)}",
                                            traceback.format_exc()))


def _label(reg: Registry, plugin_name: str) -> str:
    for p in reg.plugins:
        if p.name == plugin_name:
            return f"{p.name} ({p.dist})"
    return plugin_name


_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _registry
    if _registry is None:
        _registry = load_registry()
    return _registry


def reset_registry() -> None:
    global _registry
    _registry = None
