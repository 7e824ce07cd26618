"""The status of a run and of each of its stages: one vocabulary for the runner, the manifest, the events
and every front end.

`Status` is a str-valued enum: a member *is* its string (``Status.DONE == "done"``, it hashes the same and
``json.dumps`` writes ``"done"``), so manifests and events on disk are unchanged and code comparing with
plain strings keeps working. Imports nothing heavy: the CLI and the TUI load it at start-up.
"""

from __future__ import annotations

from enum import Enum


class Status(str, Enum):
    """Where a run or a stage stands.

    Stage statuses: ``pending`` (not reached yet), ``running``, ``done``, ``cached`` (its result was
    taken from an earlier run or attempt), ``skipped`` (not selected by --stage), ``blocked`` (an input
    stage did not finish), ``stopped`` (a stop request was honoured; resumable), ``failed``, ``killed``
    (its writer died without recording an end: SIGKILL, power loss). A run uses ``running``, ``done``,
    ``stopped``, ``failed`` and ``killed``; readers add ``damaged`` (its manifest cannot be read) and
    ``unknown`` (a manifest without a status). ``starting`` is only ever read, from older manifests.
    """

    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    DONE = "done"
    CACHED = "cached"
    SKIPPED = "skipped"
    BLOCKED = "blocked"
    STOPPED = "stopped"
    FAILED = "failed"
    KILLED = "killed"
    DAMAGED = "damaged"
    UNKNOWN = "unknown"

    def __str__(self) -> str:  # "done", not "Status.DONE", in messages and f-strings
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def of(cls, value: object) -> Status | str:
        """The member for a status read from a file, or the string itself when it is one this version
        does not know (a newer writer's): readers show it rather than fail."""
        try:
            return cls(value)
        except ValueError:
            return str(value)


#: a stage with one of these has its result: downstream stages and the cache may use its artifacts
FINISHED = frozenset({Status.DONE, Status.CACHED})
#: a stage with one of these was interrupted mid-way: `--resume` may continue it from its checkpoints
#: ("running" is what a stage shows when its writer died before it could record anything else)
INTERRUPTED = frozenset({Status.STOPPED, Status.FAILED, Status.KILLED, Status.RUNNING})
#: a run with one of these will not change any more (until a resume starts it again)
ENDED = frozenset({Status.DONE, Status.FAILED, Status.STOPPED, Status.KILLED})
#: a run written as running by a writer that may be gone: check its lock before believing it
LIVE = frozenset({Status.RUNNING, Status.STARTING})
