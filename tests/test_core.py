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
    return StageContext(
        stage_name="s",
        run_id="r",
        run_dir=tmp_path,
        stage_dir=tmp_path / "stages" / "s",
        inputs={},
        emit=lambda t, **d: events.append((t, d)),
        stop_check=lambda: False,
        checkpoint_check=lambda: False,
    )


def test_artifact_is_published_only_when_complete(tmp_path):
    events: list = []
    ctx = make_ctx(tmp_path, events)
    with pytest.raises(RuntimeError), ctx.artifact("model") as out:
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

    kind = "wait-for-checkpoint"
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
    worker = threading.Thread(target=lambda: result.update(r=run_pipeline(pipe, RunRequest(), registry=registry)))
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
    class Typo:
        @hookimpl
        def register_stage(self, register):  # the spec is register_stages
            register(WaitForCheckpoint)

    registry = load_registry(extra=[("typo", Typo()), ("test-plugin", TestPlugin())])
    (refused,) = [e for e in registry.errors if e.plugin == "typo"]
    assert "unknown hook 'register_stage'; did you mean 'register_stages'" in refused.error
    assert "wait-for-checkpoint" in registry.stages  # a correct plugin passes
    assert not [e for e in registry.errors if e.plugin == "test-plugin"]


# ---- the run protocol: typed events, Status, the manifest model, Stage.run's return ---------------------

# Lines as the runner and the stages write them, and wrote them before events were typed: the file format
# did not change. `run_start` without `selected` is how runs older than selections wrote it.
WRITTEN = [
    {"type": "run_start", "time": 1.0, "run": "r1", "config": "/p/forge.toml", "stages": ["a", "b"], "resume": False},
    {"type": "stage_start", "time": 1.1, "run": "r1", "stage": "a", "uses": "shell", "key": "k1", "resume": False},
    {"type": "log", "time": 1.2, "run": "r1", "stage": "a", "level": "warning", "message": "careful [red]x[/]"},
    {
        "type": "progress",
        "time": 1.3,
        "run": "r1",
        "stage": "a",
        "done": 3,
        "total": 10,
        "unit": "step",
        "eta_s": 4.0,
        "tokens": 99,
    },
    {"type": "metric", "time": 1.4, "run": "r1", "stage": "a", "step": 3, "values": {"loss": 1.5}},
    {"type": "checkpoint", "time": 1.5, "run": "r1", "stage": "a", "step": 3, "path": "/p/ckpt"},
    {"type": "artifact", "time": 1.6, "run": "r1", "stage": "a", "kind": "files", "path": "/p/a/files"},
    {"type": "stage_end", "time": 1.7, "run": "r1", "stage": "a", "status": "done", "duration": 0.5},
    {"type": "stage_cached", "time": 1.8, "run": "r1", "stage": "b", "from_run": "r0"},
    {"type": "dataset", "time": 1.85, "run": "r1", "stage": "b", "rows": 12, "format": "chat"},  # a plugin's own
    {"type": "from_a_newer_llmforge", "time": 1.9, "run": "r1", "payload": {"x": [1, 2]}},
    {
        "type": "run_end",
        "time": 2.0,
        "run": "r1",
        "status": "done",
        "exit_code": 0,
        "stages": {"a": "done", "b": "cached"},
    },
]


def _write_events(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_every_event_type_decodes_typed_and_round_trips(tmp_path):
    from llmforge.events import EVENT_TYPES, Event, Metric, RunStart, StageEnd, decode_event, from_dict, read_records
    from llmforge.status import Status

    path = tmp_path / "events.jsonl"
    _write_events(path, WRITTEN)
    events = list(read_events(path))
    assert set(EVENT_TYPES) <= {r["type"] for r in WRITTEN}, "every typed event has a sample above"
    for raw, ev in zip(WRITTEN, events):
        assert type(ev) is EVENT_TYPES.get(raw["type"], Event) and ev.type == raw["type"]
        assert ev.time == raw["time"] and ev.run == "r1" and ev.stage == raw.get("stage")
        # typed -> JSON line -> typed gives the same event; nothing written is lost on the way
        assert decode_event(json.dumps(ev.to_dict()).encode(), "x:1") == ev == from_dict(ev.to_dict())
        assert {k: v for k, v in raw.items()} == {k: v for k, v in ev.to_dict().items() if v is not None}
    start, metric, end = events[0], events[4], events[7]
    assert isinstance(start, RunStart) and start.stages == ["a", "b"] and start.selected is None
    assert isinstance(metric, Metric) and metric.step == 3 and metric.values == {"loss": 1.5}
    assert isinstance(end, StageEnd) and end.status == Status.DONE and end.duration == 0.5 and end.error is None
    assert events[3].eta_s == 4.0 and events[3].data == {"tokens": 99}  # a field the class does not name
    unknown = events[10]
    assert type(unknown) is Event and unknown.data == {"payload": {"x": [1, 2]}}
    assert list(read_records(path)) == WRITTEN  # the lines as written, for --raw and tools


def test_an_unknown_event_type_breaks_neither_the_printer_nor_the_tui_follower(tmp_path):
    from rich.console import Console

    from llmforge.cli.render import EventPrinter
    from llmforge.status import Status
    from llmforge.tui.follow import EventTail, RunModel

    path = tmp_path / "events.jsonl"
    _write_events(path, WRITTEN)
    printer = EventPrinter(every=0.0, live=False)
    printer.out = Console(record=True, width=200, color_system=None)
    for ev in read_events(path):
        printer.show(ev)
    for raw in WRITTEN:  # what `llmforge run` hands its listener: the dicts as written
        printer(raw)
    text = printer.out.export_text()
    assert "a | careful [red]x[/]" in text and "step 3  loss=1.5" in text and "run r1 done" in text

    model = RunModel("r1", tmp_path)
    model.apply(EventTail(path).read())
    assert model.events_seen == len(WRITTEN) and model.status == Status.DONE and model.exit_code == 0
    assert model.stages["a"].status == "done" and model.stages["b"].status == Status.CACHED
    assert model.checkpoints == [{"stage": "a", "step": 3, "path": "/p/ckpt"}]
    assert model.chart("loss").points() == ([3.0], [1.5])


# A manifest as the runner wrote it before manifests had a version.
OLD_MANIFEST = {
    "id": "20240101-000000-abcd",
    "created": 1700000000.0,
    "config_path": "/p/forge.toml",
    "project": "p",
    "config": {"stages": [{"name": "a", "uses": "shell"}]},
    "status": "stopped",
    "pid": 1,
    "exit_code": 130,
    "versions": {"python": "3.11"},
    "hardware": {},
    "resumed": [],
    "selection": {"stages": [], "from": None, "force": False},
    "stages": {
        "a": {
            "uses": "shell",
            "key": "k1",
            "status": "done",
            "started": 1.0,
            "error": None,
            "artifacts": {"files": {"kind": "files", "path": "/p/a"}},
            "ended": 2.0,
            "duration": 1.0,
            "info": {"shell": {"exit_code": 0}},
        },
        "b": {
            "uses": "copy",
            "key": "k2",
            "status": "cached",
            "cached_from": "r0",
            "artifacts": {},
            "duration": 0.0,
            "error": None,
        },
        "c": {
            "uses": "copy",
            "key": "k3",
            "status": "stopped",
            "started": 3.0,
            "error": "interrupted",
            "artifacts": {},
            "ended": 4.0,
            "duration": 1.0,
        },
        "d": {"uses": "copy", "key": "k4", "status": "pending"},
    },
    "finished": 5.0,
}


def test_a_manifest_written_before_versions_reads_and_writes_back_unchanged(tmp_path):
    from llmforge.runs import MANIFEST, MANIFEST_VERSION, Manifest, RunStore
    from llmforge.status import Status

    m = Manifest.from_dict(OLD_MANIFEST)
    assert m.version is None and m.status == Status.STOPPED and m.exit_code == 130
    assert m.stages["a"].info == {"shell": {"exit_code": 0}} and m.stages["b"].cached_from == "r0"
    assert m.to_dict() == OLD_MANIFEST  # a rewrite (a new run marking it killed) changes nothing else
    newer = {
        **OLD_MANIFEST,
        "version": 99,
        "from_the_future": {"x": 1},
        "stages": {"a": {**OLD_MANIFEST["stages"]["a"], "status": "quarantined", "extra": 1}},
    }
    back = Manifest.from_dict(newer)
    assert back.to_dict() == newer and back.stages["a"].status == "quarantined"  # kept, not refused

    run_dir = tmp_path / "runs" / OLD_MANIFEST["id"]
    run_dir.mkdir(parents=True)
    (run_dir / MANIFEST).write_text(json.dumps(OLD_MANIFEST))
    run = RunStore(tmp_path / "runs").get()
    assert run.status == Status.STOPPED and run.stage_status("c") == "stopped" and run.stage_status("x") == "pending"
    assert run.record.version is None and Manifest().version == MANIFEST_VERSION


def test_old_run_folders_read_through_the_cli(tmp_path):
    """`status`, `runs list` and `logs` on a run folder written the old way, with an event type they
    do not know: nothing breaks, the known events print."""
    from conftest import run_cli

    run_dir = tmp_path / "runs" / OLD_MANIFEST["id"]
    run_dir.mkdir(parents=True)
    (run_dir / "manifest.json").write_text(json.dumps(OLD_MANIFEST))
    _write_events(run_dir / "events.jsonl", WRITTEN)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return run_cli(*args, "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)

    logs = cli("logs", OLD_MANIFEST["id"])
    assert logs.returncode == 0, logs.stderr
    assert "careful [red]x[/]" in logs.stdout and "loss=1.5" in logs.stdout and "run r1 done" in logs.stdout
    raw = cli("logs", OLD_MANIFEST["id"], "--raw")
    assert [json.loads(line) for line in raw.stdout.splitlines()] == WRITTEN
    st = cli("status", "--json")
    assert st.returncode == 0, st.stderr
    assert json.loads(st.stdout)["stages"]["b"]["status"] == "cached"
    listed = cli("runs", "list", "--json")
    assert json.loads(listed.stdout)[0]["stages"] == {"a": "done", "b": "cached", "c": "stopped", "d": "pending"}


class ReturnOptions(StageOptions):
    publish: bool = True


class ReturnsWhatItMade(Stage):
    """Returns an artifact; with publish=false one it never published through ctx.artifact (a bug)."""

    kind = "returns-what-it-made"
    summary = "test stage"
    Options = ReturnOptions
    produces = ("files",)

    def run(self, options, ctx):
        if not options.publish:
            from llmforge.stage import Artifact

            stray = ctx.stage_dir / "elsewhere"
            stray.mkdir(parents=True)
            with ctx.artifact("files") as out:
                (out / "x.txt").write_text("x")
            return {**ctx.published, "report": Artifact("report", stray, ctx.stage_name)}
        with ctx.artifact("files") as out:
            (out / "x.txt").write_text("x")
        return ctx.published


class ReturnPlugin:
    @hookimpl
    def register_stages(self, register):
        register(ReturnsWhatItMade)


def test_stage_run_returns_its_outputs_and_the_runner_holds_it_to_them(tmp_path):
    (tmp_path / "forge.toml").write_text("""
[[stages]]
name = "good"
uses = "returns-what-it-made"

[[stages]]
name = "liar"
uses = "returns-what-it-made"
publish = false
""")
    registry = load_registry(extra=[("return-plugin", ReturnPlugin())])
    pipe = load_pipeline(tmp_path / "forge.toml", registry=registry)
    res = run_pipeline(pipe, RunRequest(), registry=registry)
    assert res.stages["good"]["status"] == "done"
    assert res.stages["liar"]["status"] == "failed" and res.exit_code == 1
    assert "returned report without publishing it through ctx.artifact()" in res.stages["liar"]["error"]
    assert res.stages["liar"]["artifacts"] == {}  # what it did publish is withdrawn with the failure
    manifest = json.loads((res.run_dir / "manifest.json").read_text())
    assert manifest["version"] == 1

    # The next run reads this run's manifest (as an older version wrote it: no version key) for its cache.
    del manifest["version"]
    (res.run_dir / "manifest.json").write_text(json.dumps(manifest))
    again = run_pipeline(pipe, RunRequest(only=["good"]), registry=registry)
    assert again.stages["good"]["status"] == "cached" and again.stages["good"]["cached_from"] == res.run_id
