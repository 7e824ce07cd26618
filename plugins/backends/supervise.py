"""Node 0's share of a launch, run by the `llmforge run` process: start launch-node-0.sh in its own
session, relay rank 0's events into the run while it runs, pass stop requests on, and turn the end of the
launch into the stage's outcome."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llmforge_plugins.backends.failures import failure
from llmforge_plugins.backends.files import Launch, read_json, write_atomic

POLL_S = 0.2


class EventTail:
    """Reads the new complete lines of a JSON-lines file each time it is called (a line still being
    written is held back)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.buf = b""

    def __call__(self) -> list[dict]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        out = []
        for line in lines:
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out


def run_node(launch: Launch, ctx: Any, world_size: int) -> None:
    """Run node 0's script, relay rank 0's events, and turn the outcome into the stage's outcome."""
    events = EventTail(launch.events)
    log = open(launch.logs / "launcher.log", "ab")  # noqa: SIM115 - closed below
    # Its own session: Ctrl-C in the terminal reaches this process only, which asks every rank to stop
    # at the same step (stop.request) instead of killing them mid-step.
    proc = subprocess.Popen(
        ["bash", str(launch.node_script(0))],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=str(ctx.project_dir),
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    asked_stop = False
    try:
        while True:
            for event in events():
                relay(ctx, event)
            if proc.poll() is not None:
                break
            if not asked_stop and ctx.stop_check():
                asked_stop = True
                write_atomic(launch.stop, "stop requested\n")
            time.sleep(POLL_S)
    except BaseException:
        terminate(proc)
        raise
    finally:
        log.close()
    for event in events():
        relay(ctx, event)
    result = read_json(launch.result) or {}
    ctx.info.update(result.get("info") or {})
    if result.get("stopped"):
        ctx.stop_seen = True
    if proc.returncode == 0 and result.get("status") == "done":
        return
    raise failure(launch, proc.returncode, world_size, ctx)


def _die_with_parent() -> None:
    """In the launcher's process, before it starts: get SIGTERM when `llmforge run` dies (Linux), so that
    a killed run never leaves a launch training on, unseen, on the GPUs."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def relay(ctx: Any, event: dict) -> None:
    kind = event.pop("type", None)
    if not kind:
        return
    for key in ("time", "run", "stage"):
        event.pop(key, None)
    if kind == "artifact" and event.get("kind") and event.get("path"):
        from llmforge.stage import Artifact

        ctx.published[event["kind"]] = Artifact(kind=event["kind"], path=Path(event["path"]), stage=ctx.stage_name)
    ctx.emit(kind, **event)


def terminate(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """Stop a launch: SIGTERM to its whole process group (the launcher tears its workers down), then
    SIGKILL for anything still there after `grace` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
