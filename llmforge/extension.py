"""Extension points: what a plugin can register, declared once next to the base class it extends.

An extension point is one value: the registration hook's name and documentation, the registry table the
entries land in, what one entry is called in messages, and how a registered object is checked. The core
declares its own next to their base classes (``llmforge.stage.STAGES`` beside ``Stage``,
``llmforge.data.READERS`` beside ``Reader``, ...); a plugin declares more for other plugins in the same
way (the merge plugin's merge methods, the curate plugin's curation steps), as pytest plugins add hooks.
The loader (llmforge.plugins) knows none of them by name: it asks every plugin's ``extension_points()``
hook, turns each declaration into a pluggy hookspec, and fills the tables on first use.

A new extension point is therefore one declaration::

    WIDGETS = ExtensionPoint(
        hook="register_widgets", table="widgets", label="widget",
        doc="Register widgets: Widget subclasses, by name.",
        validate=subclass_of(Widget),
    )

plus an ``extension_points()`` hook implementation that returns it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pluggy

from llmforge.hookspecs import hookspec


def entry_name(obj: Any) -> str:
    """How most entries are named: their ``name`` attribute (a class attribute, or an instance's)."""
    name = getattr(obj, "name", None)
    if not name or not isinstance(name, str):
        raise TypeError(f"{getattr(obj, '__qualname__', repr(obj))} has no name")
    return name


@dataclass(frozen=True)
class ExtensionPoint:
    """One kind of thing plugins register.

    ``validate`` receives exactly what a plugin passed to ``register(...)``, raises TypeError with a
    sentence a plugin author understands when it is wrong, and returns what the table stores (the class
    itself, or an instance of it). ``name_of`` gives the entry's name (default: its ``name`` attribute).
    """

    hook: str  # the registration hook, e.g. "register_stages"
    table: str  # the registry table, e.g. "stages": Registry.table("stages")
    label: str  # one entry in messages, e.g. "stage" ("stage 'x' is registered by both a and b")
    doc: str  # the hook's documentation (what `register` expects); shown by pluggy and the plugin guide
    validate: Callable[[Any], Any]
    name_of: Callable[[Any], str] = entry_name

    def hookspec(self) -> type:
        """A pluggy hookspec holder for this point: a class with one spec function named ``hook``, taking
        ``register``. Built from the declaration so that the name and the documentation live in one place."""

        def spec(register: Callable[[Any], None]) -> None:
            """(built from an ExtensionPoint)"""

        spec.__name__ = spec.__qualname__ = self.hook
        spec.__doc__ = self.doc
        return type(f"{self.hook}_spec", (), {self.hook: staticmethod(hookspec(spec))})


_T = TypeVar("_T")


def subclass_of(
    base: type[_T],
    *,
    instantiate: bool = False,
    check: Callable[[type[_T]], None] | None = None,
    name_of: Callable[[Any], str] = entry_name,
) -> Callable[[Any], Any]:
    """The usual validator: ``register()`` must get a named subclass of ``base``. ``check`` adds the point's
    own rules (raise TypeError); ``instantiate`` stores an instance instead of the class; ``name_of`` is
    the point's own (a stage is named by its ``kind``) and raises TypeError when there is none."""

    def validate(obj: Any) -> Any:
        if not (isinstance(obj, type) and issubclass(obj, base)):
            raise TypeError(f"register() expects a {base.__name__} subclass, got {obj!r}")
        name_of(obj)
        if check is not None:
            check(obj)
        return obj() if instantiate else obj

    return validate


def pydantic_options(cls: type) -> None:
    """A rule shared by the points whose entries carry an ``Options`` model (stages, trackers, steps)."""
    from pydantic import BaseModel

    options = getattr(cls, "Options", None)
    if not (isinstance(options, type) and issubclass(options, BaseModel)):
        raise TypeError(f"{cls.__qualname__}.Options must be a pydantic model (StageOptions subclass)")


def hook_names(pm: pluggy.PluginManager) -> set[str]:
    """Every hook the manager knows a spec for: the core's and those added by extension points."""
    return {name for name, caller in vars(pm.hook).items() if getattr(caller, "spec", None) is not None}
