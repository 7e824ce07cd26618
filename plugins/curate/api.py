"""The curation-step API: what a step declares, what it sees, and how it answers.

This module belongs to the curate plugin, which also declares the extension point a step is registered
through (``llmforge_plugins.curate.CURATION_STEPS``, hook ``register_curation_steps``): the core knows
nothing of curation. A third-party step imports its base class and helpers from here::

    from llmforge_plugins.curate.api import CurationStep, Drop, StepOptions, row_text

A step is a class registered through the ``register_curation_steps`` hook::

    class NoFoo(CurationStep[NoFooOptions]):   # the type parameter types `self.options` for a checker
        name = "no_foo"
        summary = "Drop rows that mention foo."
        action = "filter"                 # what it does to rows: filter, dedup or rewrite
        Options = NoFooOptions            # a StepOptions (pydantic) model: the step's settings

        def process(self, row):
            if "foo" in row_text(row):
                return Drop("mentions foo", code="foo")
            return row

Rows are the normalised shapes of ``llmforge.data`` (``{"text"}``, ``{"messages"}``, or
``{"prompt", "chosen", "rejected"}``). A step answers each row with the row itself (kept as it is),
a new dict (kept, rewritten), or a :class:`Drop` with a reason, which ends up in the per-row reasons
file and the report. A rewrite changes texts only (``map_text``): the row is then written back as it
came in, every column kept, with the new texts in the columns they were read from
(``llmforge.data.restore_row``); a rewrite that adds or removes turns is an error naming the row.
Rows flow through in small batches (``process_batch``), so a step that is faster on many rows at once
(MinHash) can override that instead; everything else is one row at a time, and nothing holds the
dataset in memory.

pydantic is imported here, so only import this module where steps are built (not at start-up): that is
why the extension point is declared in the package's ``__init__``, not here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from llmforge.stage import StageOptions

STEP_ACTIONS = ("filter", "dedup", "rewrite")
ROW_KINDS = ("text", "chat", "preference")


def step_rules(cls: Any) -> None:
    """What the engine relies on beyond the base class (checked when a step is registered): a known
    ``action`` and a pydantic ``Options`` model. A step written before ``action`` existed set ``kind``: it
    is read from there (the nearest of the two in the class's MRO), and ``cls.action`` is filled in."""
    from llmforge.extension import pydantic_options

    pydantic_options(cls)
    action = step_action(cls)
    if action not in STEP_ACTIONS:
        raise TypeError(f"{cls.__qualname__}.action must be one of {STEP_ACTIONS}, not {action!r}")
    cls.action = action


def step_action(cls: type) -> str:
    """What a step class does to rows: its nearest ``action``, or an older class's ``kind``."""
    for klass in cls.__mro__:
        for attr in ("action", "kind"):
            value = vars(klass).get(attr)
            if isinstance(value, str):
                return value
    return ""


class StepOptions(StageOptions):
    """Base class of a step's options: unknown keys are errors, as for stage options."""


class Drop:
    """A step's answer for a row it removes. ``reason`` is for people (the reasons file and the report
    examples: ``too short: 12 characters < min_chars 50``); ``code`` groups the reasons in the report's
    counts (``min_chars``) and defaults to the step's name."""

    __slots__ = ("reason", "code")

    def __init__(self, reason: str, code: str | None = None):
        self.reason = reason
        self.code = code

    def __repr__(self) -> str:
        return f"Drop({self.reason!r}, code={self.code!r})"


@dataclass
class StepEnv:
    """What a step may use besides its options: where relative paths start, the plugin registry
    (readers and row formats, for steps that read files of their own), the seed, and a logger."""

    base_dir: Path = field(default_factory=Path.cwd)
    registry: Any = None
    seed: int = 0
    log: Callable[[str], None] = lambda message: None

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p


#: a step's options class, the type parameter of :class:`CurationStep`
StepOptionsT = TypeVar("StepOptionsT", bound=StepOptions)


class CurationStep(Generic[StepOptionsT]):
    """Base class of every curation step. Subclasses set the class attributes and implement ``process``
    (or ``process_batch``).

    Name the options class as the type parameter, ``class NoFoo(CurationStep[NoFooOptions])``, and a type
    checker knows what ``self.options`` holds; a plain ``CurationStep`` subclass gets ``Any`` options."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: "filter" (drops rows by their content), "dedup" (drops rows seen before), "rewrite" (changes rows)
    action: ClassVar[str] = "filter"
    Options: ClassVar[type[StepOptions]] = StepOptions
    #: the row kinds the step works on; rows of other kinds pass through untouched
    row_kinds: ClassVar[tuple[str, ...]] = ROW_KINDS

    def __init__(self, options: StepOptionsT, env: StepEnv):
        self.options = options
        self.env = env

    @classmethod
    def check(cls, options: StepOptionsT, env: StepEnv) -> list[str]:
        """Cheap problems with the options that only show with the files at hand (a missing evaluation
        set); returned as messages, located by the caller. No heavy work here: ``validate`` runs it."""
        return []

    def process(self, row: dict) -> dict | Drop:  # pragma: no cover - abstract
        raise NotImplementedError

    def process_batch(self, rows: list[dict], wheres: list[str]) -> list[dict | Drop]:
        """One answer per row, in order. ``wheres`` are the rows' sources (``file:line``)."""
        return [self.process(row) for row in rows]

    def finish(self) -> dict:
        """Facts for the report once every row went through (counts of what was replaced, index size)."""
        return {}


# ------------------------------------------------------------------------------------------------
# helpers for steps: the text of a row, whatever its kind


def row_kind(row: dict) -> str:
    if "messages" in row:
        return "chat"
    if "chosen" in row:
        return "preference"
    return "text"


def _messages(row: dict) -> Iterable[dict]:
    if "messages" in row:
        yield from row["messages"]
    elif "chosen" in row:
        yield from row["prompt"]
        yield from row["chosen"]
        yield from row["rejected"]


def row_texts(row: dict) -> list[str]:
    """Every piece of text in a row: the text, or each turn's content in order."""
    if "text" in row and "messages" not in row and "chosen" not in row:
        return [row["text"]]
    return [m["content"] for m in _messages(row)]


def row_text(row: dict, sep: str = "\n") -> str:
    """A row as one string: a text row's text, a conversation's turns joined (what deduplication and
    the quality filters look at for chat and preference rows)."""
    texts = row_texts(row)
    return texts[0] if len(texts) == 1 else sep.join(texts)


def map_text(row: dict, fn: Callable[[str], str]) -> dict:
    """The row with ``fn`` applied to every piece of text; the row itself when nothing changed (so
    that the report counts only rows that were really rewritten)."""
    changed = False

    def apply(text: str) -> str:
        nonlocal changed
        new = fn(text)
        changed |= new != text
        return new

    def turns(messages: list[dict]) -> list[dict]:
        return [{**m, "content": apply(m["content"])} for m in messages]

    if "messages" in row:
        out = {**row, "messages": turns(row["messages"])}
    elif "chosen" in row:
        out = {
            **row,
            "prompt": turns(row["prompt"]),
            "chosen": turns(row["chosen"]),
            "rejected": turns(row["rejected"]),
        }
    else:
        out = {**row, "text": apply(row["text"])}
    return out if changed else row


def snippet(text: str, limit: int = 160) -> str:
    """A short, one-line excerpt of a row for the report's examples."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
