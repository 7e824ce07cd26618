"""Plugin loading: the pluggy manager, entry points one at a time, extension points, load errors, clashes.

Built-in plugins (entry points of the `llmforge` distribution itself) and third-party ones load
through the same `llmforge` entry-point group. LLMFORGE_LOAD_PLUGINS chooses what loads:
unset = everything installed; empty = only the built-ins; "a,b" = the built-ins plus the named
distributions. A plugin that fails to import, implements an unknown (misspelt) hook, fails to
register with pluggy, or raises inside a hook the loader calls is recorded in `Registry.errors`, never
raised; plugins handed over in process (`load_registry(extra=...)`, how tests add one) get the same
checks.

The loader knows no extension point by name. Building a registry goes in three steps, each paid for
only when something needs it:

1. `load_registry()` imports the entry points and registers them (and the core's own hook module,
   llmforge.execution, first). This is all `llmforge --help` pays for: it only calls `register_commands`.
2. On first use of anything else (`points()`, `table()`, `plugins`, `errors`, `hook`, ...), every
   plugin's `extension_points()` is asked, one plugin at a time; each point's hookspec is added to the
   manager; only then are hook names checked, so a plugin implementing a hook that no point declares
   is refused (with a did-you-mean). The core's points import pydantic models (`Stage` and friends),
   which is why this step waits: the help screen must not pay for them.
3. Each table (`registry.table("stages")`) is filled on its first read, one point at a time: reading
   the stages does not import a single data reader.

The registry is a value: the CLI, the TUI, the tests and the launched worker each build one and pass it
down (``ctx.registry`` inside a stage). There is no process-wide registry.
"""

from __future__ import annotations

import os
import threading
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any

import pluggy

from llmforge import hookspecs
from llmforge.extension import ExtensionPoint, hook_names

if TYPE_CHECKING:  # the tables' entry types, for annotations only: `llmforge --help` must not import them
    from llmforge.backend import Backend
    from llmforge.chat import ChatTemplate
    from llmforge.data import Reader, RowFormat
    from llmforge.stage import Stage
    from llmforge.trackers import Tracker

GROUP = "llmforge"
BUILTIN_DIST = "llmforge"
ENV_VAR = "LLMFORGE_LOAD_PLUGINS"
CORE = "llmforge.execution"  # the core's own hook module: the default execute_stage, the core's points
IN_PROCESS = "(in-process)"


@dataclass
class PluginInfo:
    name: str  # entry-point name
    dist: str  # distribution name
    version: str
    module: str  # entry-point value
    builtin: bool
    hooks: list[str] = field(default_factory=list)
    provides: dict[str, list[str]] = field(default_factory=dict)  # registry table -> names, filled as tables are

    @property
    def stages(self) -> list[str]:
        """The stage kinds this plugin registered (once the stages table was read)."""
        return self.provides.get("stages", [])

    def to_json(self) -> dict:
        return {**self.__dict__, "stages": list(self.stages)}


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
    label: str  # the point's label: "stage", "reader", "merge method", ...
    name: str
    winner: str
    loser: str

    def __str__(self) -> str:
        return f"{self.label} '{self.name}' is registered by both {self.winner} and {self.loser}; using {self.winner}"

    def to_json(self) -> dict:
        return {**self.__dict__, "message": str(self)}


class Registry:
    """The loaded plugins and what they registered. Built by :func:`load_registry`; passed down.

    Read a table with ``table(point or table name)``; the core's tables also have typed properties
    (``stages``, ``readers``, ``row_formats``, ``chat_templates``, ``trackers``, ``backends``). Call the
    lifecycle hooks through ``hook`` (``registry.hook.on_event(...)``): it declares the extension points
    first, so a refused plugin's hooks never run. ``pm`` is the raw manager, what ``--help`` uses to add
    the plugins' commands without declaring anything.
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._plugins: list[PluginInfo] = []
        self._errors: list[LoadError] = []
        self.conflicts: list[Conflict] = []
        self.owners: dict[tuple[str, str], str] = {}  # (table, name) -> plugin
        self._points: dict[str, ExtensionPoint] | None = None  # table -> point, once declared
        self._tables: dict[str, dict[str, Any]] = {}  # filled tables
        # Declaring and filling store the (empty) dict first and fill it in place, so that a hook reading the
        # registry meanwhile finds it; another thread must not: it waits (the TUI reads from several threads).
        self._lock = threading.RLock()

    # -- step 2: extension points ----------------------------------------------------------------

    def points(self) -> dict[str, ExtensionPoint]:
        """Every declared extension point, by table name (declared on the first call)."""
        with self._lock:
            if self._points is None:
                self._points = {}
                _declare(self)
            return self._points

    def point(self, name: str | ExtensionPoint) -> ExtensionPoint:
        """The point for a table name, a hook name or the point itself; KeyError names the known tables."""
        key = name.table if isinstance(name, ExtensionPoint) else name
        points = self.points()
        found = points.get(key) or next((p for p in points.values() if p.hook == key), None)
        if found is None:
            raise KeyError(f"no extension point '{key}' (declared: {', '.join(sorted(points)) or 'none'})")
        return found

    @property
    def plugins(self) -> list[PluginInfo]:
        """The plugins that loaded (a plugin refused for an unknown hook is not among them)."""
        self.points()
        return self._plugins

    @property
    def errors(self) -> list[LoadError]:
        """Every load error so far: imports, unknown hooks, failing hooks (a table read may add more)."""
        self.points()
        return self._errors

    @property
    def hook(self) -> Any:
        """The lifecycle hooks (``registry.hook.on_event(...)``), with every extension point declared."""
        self.points()
        return self.pm.hook

    # -- step 3: tables ----------------------------------------------------------------------------

    def table(self, point: str | ExtensionPoint) -> dict[str, Any]:
        """The entries of one extension point, name -> what its ``validate`` stored. Filled on first read:
        only this point's registration hooks run."""
        p = self.point(point)
        with self._lock:
            found = self._tables.get(p.table)
            if found is None:
                found = self._tables[p.table] = {}
                _fill(self, p, found)
            return found

    def collect(self) -> Registry:
        """Fill every table (what `plugins list` shows); returns the registry."""
        for p in list(self.points().values()):
            self.table(p)
        return self

    def owner(self, point: str | ExtensionPoint, name: str) -> str | None:
        """The plugin that registered ``name`` in that table, or None."""
        p = self.point(point)
        self.table(p)
        return self.owners.get((p.table, name))

    # The core's own tables, typed for readers (declared next to their base classes, e.g. llmforge.stage).
    @property
    def stages(self) -> dict[str, type[Stage]]:
        """Stage kind -> Stage subclass."""
        return self.table("stages")

    @property
    def readers(self) -> dict[str, Reader]:
        """Reader name -> Reader instance."""
        return self.table("readers")

    @property
    def row_formats(self) -> dict[str, RowFormat]:
        """Row format name -> RowFormat instance."""
        return self.table("row_formats")

    @property
    def chat_templates(self) -> dict[str, ChatTemplate]:
        """Template name -> ChatTemplate."""
        return self.table("chat_templates")

    @property
    def trackers(self) -> dict[str, type[Tracker]]:
        """Tracker name -> Tracker subclass."""
        return self.table("trackers")

    @property
    def backends(self) -> dict[str, type[Backend]]:
        """Backend name -> Backend subclass."""
        return self.table("backends")

    def stage_class(self, name: str) -> type[Stage] | None:
        return self.stages.get(name)


# --------------------------------------------------------------------------------------------
# step 1: entry points
# --------------------------------------------------------------------------------------------


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


def load_registry(env: str | None | Any = ..., extra: list[tuple[str, Any]] | None = None) -> Registry:
    """Build a fresh registry: load the entry points (and `extra`), register them with pluggy.

    `env` is LLMFORGE_LOAD_PLUGINS's value (default: read from the environment). `extra` adds
    (name, plugin object) pairs after the entry points (used by tests and embedders). They are checked
    like entry points: one that implements an unknown (misspelt) hook, or whose name is taken, is
    recorded in `errors` and left out, never raised. Extension points are declared on first use.
    """
    if env is ...:
        env = os.environ.get(ENV_VAR)
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    reg = Registry(pm)

    # The core's own hooks first: the default execute_stage that wrappers wrap, and the core's
    # extension points (declared before any plugin's, so a plugin cannot take a core table's name).
    from llmforge import execution

    pm.register(execution, name=CORE)

    wanted = _wanted(env)
    found_dists = set()
    ordered = []
    dists: dict[str, tuple[str, str]] = {}
    for ep in metadata.entry_points(group=GROUP):
        dist, version = _dist_of(ep, dists)
        builtin = _norm(dist) == BUILTIN_DIST
        found_dists.add(_norm(dist))
        if not builtin and wanted is not None and _norm(dist) not in wanted:
            continue
        ordered.append((not builtin, _norm(dist), ep.name, ep, dist, version, builtin))
    # Deterministic order: built-ins first, then distributions by name, then entry-point name.
    ordered.sort(key=lambda t: t[:3])
    for *_, ep, dist, version, builtin in ordered:
        if pm.has_plugin(ep.name) or any(p.name == ep.name for p in reg._plugins):
            reg._errors.append(LoadError(ep.name, dist, f"an entry point named '{ep.name}' is already loaded", ""))
            continue
        try:
            pm.register(ep.load(), name=ep.name)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - a bad plugin (even one calling sys.exit) must not brick the tool
            reg._errors.append(LoadError(ep.name, dist, _short_error(exc), traceback.format_exc()))
            continue
        reg._plugins.append(PluginInfo(ep.name, dist, version, ep.value, builtin))
    if wanted:
        for missing in sorted(wanted - found_dists):
            reg._errors.append(LoadError(missing, missing, f"{ENV_VAR} names '{missing}', which is not installed", ""))
    for name, obj in extra or []:
        # The same checks as an entry point: `extra` is how plugin authors test, so a misspelt hook
        # must show up there, not only once the plugin is installed.
        if pm.has_plugin(name) or any(p.name == name for p in reg._plugins):
            reg._errors.append(LoadError(name, IN_PROCESS, f"a plugin named '{name}' is already loaded", ""))
            continue
        try:
            pm.register(obj, name=name)
        except Exception as exc:  # noqa: BLE001 - recorded like an entry point's failure
            reg._errors.append(LoadError(name, IN_PROCESS, _short_error(exc), traceback.format_exc()))
            continue
        reg._plugins.append(PluginInfo(name, IN_PROCESS, "", repr(obj), False))
    _list_hooks(reg)
    return reg


def _list_hooks(reg: Registry) -> None:
    for info in reg._plugins:
        plugin = reg.pm.get_plugin(info.name)
        info.hooks = sorted(h.name for h in reg.pm.get_hookcallers(plugin) or [])


# --------------------------------------------------------------------------------------------
# step 2: declaring the extension points, then checking hook names
# --------------------------------------------------------------------------------------------


def _where(reg: Registry, plugin_name: str) -> str:
    return next((p.dist for p in reg._plugins if p.name == plugin_name), plugin_name)


def _refuse(reg: Registry, plugin_name: str, error: str, details: str = "") -> None:
    """Take a plugin out: unregistered (none of its hooks run) and recorded."""
    reg._errors.append(LoadError(plugin_name, _where(reg, plugin_name), error, details))
    plugin = reg.pm.get_plugin(plugin_name)
    if plugin is not None:
        reg.pm.unregister(plugin, name=plugin_name)
    reg._plugins[:] = [p for p in reg._plugins if p.name != plugin_name]


def _declare(reg: Registry) -> None:
    """Ask each plugin (the core first, then load order) for its extension points; add their hookspecs;
    then refuse the plugins that implement a hook nobody declared."""
    assert reg._points is not None
    pm = reg.pm
    order = [CORE] + [p.name for p in reg._plugins]
    impls = {i.plugin_name: i for i in pm.hook.extension_points.get_hookimpls()}
    for plugin_name in order:
        impl = impls.get(plugin_name)
        if impl is None:
            continue
        try:
            declared: Any = impl.function()
            points: list[Any] = list(declared or [])
            for p in points:
                if not isinstance(p, ExtensionPoint):
                    raise TypeError(f"extension_points() must return ExtensionPoint values, got {p!r}")
        except Exception as exc:  # noqa: BLE001 - one plugin's failure stays its own
            reg._errors.append(
                LoadError(
                    plugin_name,
                    _where(reg, plugin_name),
                    f"extension_points failed: {_short_error(exc)}",
                    traceback.format_exc(),
                )
            )
            continue
        for p in points:
            problem = _clash(reg, p)
            if problem:
                reg._errors.append(LoadError(plugin_name, _where(reg, plugin_name), problem, ""))
                continue
            # Implementations registered before the spec existed were never checked by pluggy: a wrong
            # signature would make add_hookspecs raise for everyone, so refuse those plugins first.
            caller = getattr(pm.hook, p.hook, None)
            for hi in list(caller.get_hookimpls()) if caller is not None else []:
                extra_args = set(hi.argnames) - {"register"}
                if extra_args:
                    _refuse(
                        reg,
                        hi.plugin_name,
                        f"{p.hook}() takes {', '.join(sorted(extra_args))}, but the hook only passes 'register'",
                    )
            try:
                pm.add_hookspecs(p.hookspec())
            except Exception as exc:  # noqa: BLE001
                reg._errors.append(
                    LoadError(
                        plugin_name,
                        _where(reg, plugin_name),
                        f"extension point '{p.table}': {_short_error(exc)}",
                        traceback.format_exc(),
                    )
                )
                continue
            reg._points[p.table] = p
    known = hook_names(pm)
    for info in list(reg._plugins):
        try:
            _check_hook_names(pm, pm.get_plugin(info.name), known)
        except ValueError as exc:
            _refuse(reg, info.name, _short_error(exc), traceback.format_exc())
    _list_hooks(reg)


def _check_hook_names(pm: pluggy.PluginManager, plugin: Any, known: set[str]) -> None:
    """A misspelt hook would silently do nothing: refuse the plugin and say which name was meant."""
    unknown = sorted(c.name for c in pm.get_hookcallers(plugin) or [] if c.name not in known)
    if unknown:
        from llmforge.schema import did_you_mean  # pydantic: only on this error path

        raise ValueError(f"implements unknown hook '{unknown[0]}'{did_you_mean(unknown[0], known)}")


def _clash(reg: Registry, p: ExtensionPoint) -> str | None:
    """Why a new point cannot be declared, or None: its table or hook is taken (the first declaration
    wins), or its hook is one of the core's fixed hooks."""
    assert reg._points is not None
    for other in reg._points.values():
        if other.table == p.table:
            return f"extension point '{p.table}' is already declared (hook {other.hook})"
        if other.hook == p.hook:
            return f"hook '{p.hook}' is already declared by extension point '{other.table}'"
    if hasattr(hookspecs, p.hook):
        return f"extension point '{p.table}': '{p.hook}' is a core hook"
    return None


# --------------------------------------------------------------------------------------------
# step 3: filling one table
# --------------------------------------------------------------------------------------------


def _fill(reg: Registry, point: ExtensionPoint, table: dict[str, Any]) -> None:
    """Call each plugin's registration hook for this point on its own, so one failure stays that
    plugin's problem. The first registration of a name wins (load order); later ones are conflicts."""
    infos = {p.name: p for p in reg._plugins}
    order = [CORE] + [p.name for p in reg._plugins]
    # pluggy lists implementations last-registered first; we want load order.
    impls = sorted(
        getattr(reg.pm.hook, point.hook).get_hookimpls(),
        key=lambda i: order.index(i.plugin_name) if i.plugin_name in order else len(order),
    )
    for impl in impls:
        plugin = impl.plugin_name

        def register(obj: Any, _plugin: str = plugin) -> None:
            value = point.validate(obj)
            name = point.name_of(obj)
            current = table.get(name)
            if current is not None:
                # The same object registered twice (two entry points of one module) is no clash.
                if not (current is obj or type(current) is obj or current == obj):
                    owner = reg.owners[(point.table, name)]
                    reg.conflicts.append(Conflict(point.label, name, _label(reg, owner), _label(reg, _plugin)))
                return
            table[name] = value
            reg.owners[(point.table, name)] = _plugin
            if _plugin in infos:
                infos[_plugin].provides.setdefault(point.table, []).append(name)

        try:
            impl.function(register=register) if "register" in impl.argnames else impl.function()
        except Exception as exc:  # noqa: BLE001
            reg._errors.append(
                LoadError(
                    plugin, _where(reg, plugin), f"{point.hook} failed: {_short_error(exc)}", traceback.format_exc()
                )
            )


def _label(reg: Registry, plugin_name: str) -> str:
    for p in reg._plugins:
        if p.name == plugin_name:
            return f"{p.name} ({p.dist})"
    return plugin_name
