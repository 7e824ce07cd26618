"""Start runs and send them requests, the way `llmforge run --detach`, `stop` and `checkpoint` do.

Training never runs inside the TUI: a run is its own process, in its own session, writing the run
store, so closing the TUI (or losing its terminal) neither stalls nor kills it. The TUI follows it
through manifest.json and events.jsonl like any other reader.

Starting is the core's `llmforge.detach.start_detached`, the same function `llmforge run --detach` calls.
These functions block for up to a few seconds: call them from a worker.
"""

from __future__ import annotations

from pathlib import Path

from llmforge.detach import Launch, Started, start_detached  # noqa: F401 - the screens start runs through here
from llmforge.errors import UsageError


def _live_run(run_dir: Path):
    from llmforge.runs import RunStore, lock_is_live, read_lock

    run = RunStore(run_dir.parent).get(str(run_dir))
    if not lock_is_live(read_lock(run.dir)):
        raise UsageError(f"run {run.id} is not running (status: {run.status})")
    return run


def request_stop(run_dir: Path) -> None:
    """Ask a running run to stop cleanly: the running stage stops at its next safe point (a training stage
    saves a checkpoint first; a shell or copy stage just stops and runs again on resume); exit code 130."""
    from llmforge.runs import STOP_REQUEST, request

    request(_live_run(Path(run_dir)).dir, STOP_REQUEST)


def request_checkpoint(run_dir: Path) -> None:
    """Ask a running training stage to save a checkpoint now and go on."""
    from llmforge.runs import CHECKPOINT_REQUEST, request

    request(_live_run(Path(run_dir)).dir, CHECKPOINT_REQUEST)
