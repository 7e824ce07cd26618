"""Library chatter: what the ML libraries print on every training stage, kept out of the user's face.

DeepSpeed logs `Setting accelerator to CPU` to stdout at import, transformers raises FutureWarnings about
its own internals and logs `missing keys ... ['lm_head.weight']` when a tied-embedding model is resumed
(expected: the head shares the embedding's weights). None of it is something the user can act on, so
inside a stage it becomes a `debug` log event: kept in events.jsonl (the run's log), shown by
`llmforge logs --debug` and `llmforge run --debug`, hidden otherwise. Errors from those libraries stay
visible as warnings. Nothing here imports a library: the loggers and warnings are matched by name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator

#: top-level packages whose routine output is chatter (their logger names match their package names,
#: except DeepSpeed's, which is "DeepSpeed")
LIBRARIES = (
    "transformers",
    "torch",
    "deepspeed",
    "accelerate",
    "trl",
    "peft",
    "datasets",
    "tokenizers",
    "huggingface_hub",
    "safetensors",
    "bitsandbytes",
)
LOGGERS = ("DeepSpeed", *LIBRARIES)
#: warning categories that are about a library's own future, not about the user's run
CHATTY_WARNINGS = (FutureWarning, DeprecationWarning, PendingDeprecationWarning)


def _library_dirs() -> tuple[str, ...]:
    dirs = []
    for name in LIBRARIES:
        mod = sys.modules.get(name)
        for d in getattr(mod, "__path__", None) or ():
            dirs.append(os.path.join(os.path.realpath(d), ""))
    return tuple(dirs)


def is_library_chatter(category: type[Warning], filename: str) -> bool:
    """A deprecation/future warning raised from inside one of LIBRARIES (only those already imported:
    a warning can only come from a module that is loaded)."""
    if not issubclass(category, CHATTY_WARNINGS):
        return False
    path = os.path.realpath(filename or "")
    if any(path.startswith(d) for d in _library_dirs()):
        return True
    # a library module not (or no longer) in sys.modules: an installed package's path names it right
    # after site-packages (a user's own folder that happens to be called "torch" does not count)
    parts = path.replace("\\", "/").split("/")
    return any(a in ("site-packages", "dist-packages") and b in LIBRARIES for a, b in zip(parts, parts[1:]))


class _Divert(logging.Filter):
    """A filter that hands a record to `sink(level, text)` and stops it from reaching any handler."""

    def __init__(self, sink: Callable[[str, str], None]):
        super().__init__()
        self.sink = sink
        self._last: int | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if id(record) != self._last:  # one record can pass a logger's filter and then a handler's
            self._last = id(record)
            try:
                text = record.getMessage()
            except Exception:  # noqa: BLE001 - a badly formatted library message is still chatter
                text = str(record.msg)
            level = "warning" if record.levelno >= logging.ERROR else "debug"
            self.sink(level, f"{record.name}: {text}")
        return False


_ACTIVE: list[tuple[_Divert, list[logging.Filterer]]] = []


def _cover(divert: _Divert, touched: list[logging.Filterer]) -> None:
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for target in [logger, *logger.handlers]:
            if divert not in target.filters:
                target.addFilter(divert)
                touched.append(target)


@contextlib.contextmanager
def library_logs_to(sink: Callable[[str, str], None]) -> Iterator[None]:
    """While inside, records of the LOGGERS (and their children) go to `sink(level, text)` instead of the
    terminal: errors as "warning", the rest as "debug".

    A filter on each library's logger catches what is logged on it directly, even through handlers added
    later (DeepSpeed adds its stdout handler at import, possibly inside this block); a filter on the
    handlers catches what child loggers (transformers.trainer) propagate to them. A library imported
    inside the block adds its handler after this ran: code that imports one calls cover_late_handlers().
    """
    divert = _Divert(sink)
    touched: list[logging.Filterer] = []
    _cover(divert, touched)
    _ACTIVE.append((divert, touched))
    try:
        yield
    finally:
        _ACTIVE.remove((divert, touched))
        for target in touched:
            target.removeFilter(divert)


def cover_late_handlers() -> None:
    """Extend the active diversion to handlers the libraries added since it began (transformers adds its
    own at first import). Cheap; call it after importing transformers and friends."""
    for divert, touched in _ACTIVE:
        _cover(divert, touched)
