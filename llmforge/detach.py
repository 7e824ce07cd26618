"""Start a run in its own process, detached: what `llmforge run --detach` and the TUI's run keys do.

The child is `python -m llmforge run ... --run ID` in a new process session, writing the run store;
closing the terminal (or the TUI) that started it neither stalls nor kills it. `start_detached`
returns once the child owns the run (its manifest exists, or for a resumed run, names the child's
pid), or raises ForgeError with the end of the child's process.log if it failed before that. UI-free.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from llmforge.errors import ForgeError


@dataclass
class Launch:
    """What to run: the options of `llmforge run`."""

    config: Path
    stages: list[str] = field(default_factory=list)  # --stage
    from_stage: str | None = None  # --from
    overrides: list[str] = field(default_factory=list)  # --set
    # A resume names no --stage/--from/--force (the TUI's `e`): the runner continues with the selection
    # the run recorded in its manifest, exactly as `llmforge run --resume` does. Given, they replace it.
    resume: bool = False
    run_ref: str | None = None  # --run
    force: bool = False
    # The fit check (RunRequest.fit): "check" refuses a stage that cannot fit this machine, here before
    # the child starts and again in the child; "skip" (--no-fit-check) starts anyway.
    fit: Literal["check", "skip"] = "check"

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
        if self.fit == "skip":
            argv.append("--no-fit-check")
        return argv


@dataclass
class Started:
    run_id: str
    run_dir: Path
    pid: int


def start_detached(launch: Launch, wait_s: float = 30.0, pipe=None, registry=None) -> Started:
    """Validate, choose the run id, start `python -m llmforge run ...` detached; return once the child
    owns the run (its manifest exists). A configuration error is raised here, before any process.
    `pipe`: the pipeline already loaded from `launch.config` with `launch.overrides`, if the caller has it;
    else it is loaded here with `registry` (the caller's plugins; default: a fresh registry, as the child
    process loads its own)."""
    from llmforge.pipeline import load_pipeline
    from llmforge.planning import fit_check
    from llmforge.runner import find_resumable
    from llmforge.runs import MANIFEST, RunStore, new_run_id

    if pipe is None:
        if registry is None:
            from llmforge.plugins import load_registry

            registry = load_registry()
        pipe = load_pipeline(launch.config, launch.overrides, registry=registry)  # ConfigError with every problem
    if launch.fit == "check":
        # A stage that cannot fit is refused here, with the check's own message, before a run folder or
        # a process exists (the child, given the same decision, would refuse it only after both).
        fit_check(pipe, launch.stages, launch.from_stage)
    store = RunStore(pipe.config.runs_dir)
    run_id = (
        find_resumable(store, pipe.config, launch.run_ref).id if launch.resume else (launch.run_ref or new_run_id())
    )
    run_dir = store.dir / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "process.log", "ab") as log:
        proc = subprocess.Popen(
            launch.argv(run_id),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=Path.cwd(),
        )
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
                raise ForgeError(
                    f"the detached run exited with code {code}:\n" + "\n".join(tail),
                    hint=f"see {run_dir / 'process.log'}",
                )
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
