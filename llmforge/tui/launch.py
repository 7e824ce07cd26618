"""Start runs and send them requests, the way `llmforge run --detach`, `stop` and `checkpoint` do.

Training never runs inside the TUI: a run is its own process, in its own session, writing the run
store, so closing the TUI (or losing its terminal) neither stalls nor kills it. The TUI follows it
through manifest.json and events.jsonl like any other reader.

`start_detached` does what cli/run_cmd.py::_detach does (same child command line, same process.log,
same wait for the manifest) but returns the run id instead of printing it, and raises ForgeError
instead of exiting. These functions block for up to a few seconds: call them from a worker.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmforge.errors import ForgeError, UsageError


@dataclass
class Launch:
    """What to run: the options of `llmforge run`."""

    config: Path
    stages: list[str] = field(default_factory=list)  # --stage
    from_stage: str | None = None  # --from
    overrides: list[str] = field(default_factory=list)  # --set
    resume: bool = False
    run_ref: str | None = None  # --run
    force: bool = False

    def argv(self, run_id: str) -> list[str]:
        argv = [sys.executable, "-m", "llmforge", "run", "-c", str(Path(self.config).resolve()), "--run", run_id]
        for s in self.stages:
            argv += ["--stage", s]
        if self.from_stage:
            argv += ["--from", self.from_stage]
        for o in self.overrides:
            argv += ["--set", o]
        if self.resume:
            argv.append("--resume")
        if self.force:
            argv.append("--force")
        return argv


@dataclass
class Started:
    run_id: str
    run_dir: Path
    pid: int


def start_detached(launch: Launch, wait_s: float = 30.0) -> Started:
    """Validate, choose the run id, start `python -m llmforge run ...` detached; return once the child
    owns the run (its manifest exists). A configuration error is raised here, before any process."""
    from llmforge.pipeline import load_pipeline
    from llmforge.runner import find_resumable
    from llmforge.runs import MANIFEST, RunStore, new_run_id

    pipe = load_pipeline(launch.config, launch.overrides)  # ConfigError with every problem
    store = RunStore(pipe.config.runs_dir)
    run_id = find_resumable(store, pipe.config, launch.run_ref).id if launch.resume else (launch.run_ref or new_run_id())
    run_dir = store.dir / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "process.log", "ab") as log:
        proc = subprocess.Popen(launch.argv(run_id), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=Path.cwd())
    # The TUI outlives many runs: reap each child when it ends so that none lingers as a zombie.
    threading.Thread(target=proc.wait, name=f"reap-{run_id}", daemon=True).start()
    manifest = run_dir / MANIFEST
    # A resumed run already has a manifest: wait for the child's pid in it instead.
    deadline = time.time() + wait_s
    while time.time() < deadline:
        code = proc.poll()
        if _owned(manifest, proc.pid, launch.resume):
            break
        if code is not None:  # ended before owning the run: a bad --stage, a live lock, ...
            if code != 0:
                tail = (run_dir / "process.log").read_text(errors="replace").strip().splitlines()[-5:]
                raise ForgeError(f"the detached run exited with code {code}:\n" + "\n".join(tail),
                                 hint=f"see {run_dir / 'process.log'}")
            break
        time.sleep(0.05)
    return Started(run_id, run_dir, proc.pid)


def _owned(manifest: Path, pid: int, resume: bool) -> bool:
    if not manifest.exists():
        return False
    if not resume:
        return True
    import json

    try:
        return json.loads(manifest.read_text()).get("pid") == pid
    except (OSError, ValueError):
        return False


def _live_run(run_dir: Path):
    from llmforge.runs import RunStore, lock_is_live, read_lock

    run = RunStore(run_dir.parent).get(str(run_dir))
    if not lock_is_live(read_lock(run.dir)):
        raise UsageError(f"run {run.id} is not running (status: {run.status})")
    return run


def request_stop(run_dir: Path) -> None:
    """Ask a running run to stop cleanly (the stage saves a checkpoint, the run ends with exit 130)."""
    from llmforge.runs import STOP_REQUEST, request

    request(_live_run(Path(run_dir)).dir, STOP_REQUEST)


def request_checkpoint(run_dir: Path) -> None:
    """Ask a running training stage to save a checkpoint now and go on."""
    from llmforge.runs import CHECKPOINT_REQUEST, request

    request(_live_run(Path(run_dir)).dir, CHECKPOINT_REQUEST)
