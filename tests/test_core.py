"""The core in-process: artifacts, locks, events, requests, the runner with a stage defined here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

import pytest
from pydantic import Field

from llmforge import hookimpl
from llmforge.errors import LockedError
from llmforge.events import EventWriter, read_events
from llmforge.pipeline import load_pipeline
from llmforge.plugins import load_registry
from llmforge.runner import RunRequest, run_pipeline
from llmforge.runs import CHECKPOINT_REQUEST, RunLock, request
from llmforge.stage import Input, Stage, StageContext, StageOptions


def make_ctx(tmp_path: Path, events: list) -> StageContext:
    return StageContext(stage_name="s", run_id="r", run_dir=tmp_path, stage_dir=tmp_path / "stages" / "s",
                        inputs={}, emit=lambda t, **d: events.append((t, d)), stop_check=lambda: False,
                        checkpoint_check=lambda: False)


def test_artifact_is_published_only_when_complete(tmp_path):
    events: list = []
    ctx = make_ctx(tmp_path, events)
    with pytest.raises(RuntimeError):
        with ctx.artifact("model") as out:
            (out / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash while writing")
    arts = tmp_path / "stages" / "s" / "artifacts"
    assert not (arts / "model").exists() and list(arts.iterdir()) == []

    with ctx.artifact("model") as out:
        (out / "weights.bin").write_bytes(b"v1")
    assert (arts / "model" / "weights.bin").read_bytes() == b"v1"
    with ctx.artifact("model") as out:  # a second write replaces the first as a whole
        (out / "other.bin").write_bytes(b"v2")
    assert sorted(p.name for p in (arts / "model").iterdir()) == ["other.bin"]
    assert ("artifact", {"kind": "model", "path": str(arts / "model")}) in events

    ctx.stop_check = lambda: True
    with ctx.artifact("report") as out:
        (out / "partial.txt").write_text("...")
        assert ctx.should_stop()
    assert not (arts / "report").exists(), "an artifact left early after a stop request is discarded"


def test_lock_refuses_live_writer_and_takes_over_dead_one(tmp_path):
    first = RunLock(tmp_path)
    assert first.acquire() is False
    with pytest.raises(LockedError, match="being written by pid"):
        RunLock(tmp_path).acquire()
    first.release()

    # A lock left by a process that has exited is stale.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    import platform

    (tmp_path / "lock").write_text(json.dumps({"pid": pid, "host": platform.node(), "started": 1.0}))
    second = RunLock(tmp_path)
    assert second.acquire() is True
    assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
    second.release()
    assert not (tmp_path / "lock").exists()


def test_event_reader_holds_back_a_partial_line_and_skips_torn_ones(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"type": "a"}\n{"type": "torn\n{"type": "b"}\n{"type": "c"')
    assert [e.type for e in read_events(path)] == ["a", "b"]
    with open(path, "a") as fh:
        fh.write("}\n")
    assert [e.type for e in read_events(path)] == ["a", "b", "c"]


def test_failing_observer_is_disabled_and_reported_not_raised(tmp_path):
    seen = []

    def bad(event):
        raise ValueError("observer bug")

    writer = EventWriter(tmp_path / "e.jsonl", "r", listeners=[bad, seen.append])
    writer.emit("log", message="one")
    writer.emit("log", message="two")
    writer.close()
    lines = [json.loads(x) for x in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [e.get("message") for e in seen] == ["one", "two"]
    assert sum("failed and is disabled" in (e.get("message") or "") for e in lines) == 1


class WaitOptions(StageOptions):
    source: Annotated[str, Input("files")] = Field(description="anything")
    limit: float = Field(20.0, gt=0)


class WaitForCheckpoint(Stage):
    """Loops until a checkpoint is requested, then records it: proves `llmforge checkpoint` reaches stages."""

    name = "wait-for-checkpoint"
    summary = "test stage"
    Options = WaitOptions
    produces = ("files",)

    def run(self, options, ctx):
        assert Path(options.source).is_dir(), "the @reference was resolved to the artifact's path"
        assert ctx.inputs["source"].stage == "first"
        deadline = time.time() + options.limit
        while time.time() < deadline:
            if ctx.checkpoint_requested():
                (ctx.work_dir / "checkpoint").write_text("saved")
                break
            time.sleep(0.02)
        with ctx.artifact("files") as out:
            (out / "result.txt").write_text((ctx.work_dir / "checkpoint").read_text())


class TestPlugin:
    @hookimpl
    def register_stages(self, register):
        register(WaitForCheckpoint)


def test_checkpoint_request_reaches_the_running_stage(tmp_path):
    (tmp_path / "forge.toml").write_text("""
[[stages]]
name = "first"
uses = "shell"
command = "true"

[[stages]]
name = "second"
uses = "wait-for-checkpoint"
source = "@first"
""")
    registry = load_registry(extra=[("test-plugin", TestPlugin())])
    pipe = load_pipeline(tmp_path / "forge.toml", registry=registry)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(r=run_pipeline(pipe, RunRequest(), registry)))
    worker.start()
    runs = tmp_path / "runs"
    deadline = time.time() + 20
    while time.time() < deadline:
        started = [d for d in runs.glob("*/stages/second")] if runs.exists() else []
        if started:
            break
        time.sleep(0.02)
    run_dir = started[0].parent.parent
    request(run_dir, CHECKPOINT_REQUEST)
    worker.join(timeout=30)
    res = result["r"]
    assert res.status == "done" and res.exit_code == 0
    out = Path(res.stages["second"]["artifacts"]["files"]["path"]) / "result.txt"
    assert out.read_text() == "saved"
    assert not (run_dir / CHECKPOINT_REQUEST).exists()


def test_misspelt_hook_is_refused_with_a_suggestion():
    from llmforge.plugins import _check_hook_names

    class Typo:
        @hookimpl
        def register_stage(self, register):  # the spec is register_stages
            register(WaitForCheckpoint)

    with pytest.raises(ValueError, match="unknown hook 'register_stage'; did you mean 'register_stages'"):
        _check_hook_names(Typo())
    _check_hook_names(TestPlugin())  # a correct plugin passes
