"""What the terminal shows, through the real CLI with stdout a pipe (as `llmforge ... | grep` sees it):
full values one record per line, every metric line, text in [brackets], the stopped mark, the graph of
a branching pipeline, damaged run folders named, runs newest first, and no library chatter."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import _env

NARROW = {"COLUMNS": "80"}  # what a pipe gets when nothing sets COLUMNS: rich's default width

LONG_NAME = "continued_pretraining_on_the_domain_corpus"


def shell_stage(name: str, command: str, inputs: dict[str, str] | None = None) -> str:
    text = f'[[stages]]\nname = "{name}"\nuses = "shell"\ncommand = {json.dumps(command)}\n'
    if inputs:
        text += "inputs = { " + ", ".join(f'{k} = "{v}"' for k, v in inputs.items()) + " }\n"
    return text + "\n"


def events_of(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines() if x.strip()]


def test_piped_listings_print_whole_values_one_record_per_line(project):
    long_line = "word " * 60 + "END"
    project.write(shell_stage(LONG_NAME, f"echo '{long_line}'"))
    assert project.run("run").returncode == 0
    run_id = json.loads(project.run("runs", "list", "--json").stdout)[0]["id"]

    res = project.run("runs", "list", env=NARROW)
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["run", "started", "status", "stages", "duration"]
    assert len(lines) == 2 and lines[1].split()[0] == run_id and "done" in lines[1].split()
    assert "…" not in res.stdout

    res = project.run("status", run_id, env=NARROW)
    rows = [ln for ln in res.stdout.splitlines() if ln.startswith(LONG_NAME)]
    assert len(rows) == 1, res.stdout  # the whole stage name, and its artifact path, on one line
    assert rows[0].split()[-1].endswith(f"runs/{run_id}/stages/{LONG_NAME}/artifacts/files")

    res = project.run("stages", "list", env=NARROW)
    kinds = [ln.split()[0] for ln in res.stdout.splitlines()[1:]]
    assert "continued_pretrain" in kinds and "shell" in kinds and "…" not in res.stdout
    summaries = {ln.split()[0]: ln for ln in res.stdout.splitlines()[1:]}
    assert summaries["shell"].endswith(
        "Run a command; what it writes to $LLMFORGE_OUT becomes the stage's files artifact."
    )

    res = project.run("plugins", "list", env=NARROW)
    assert "…" not in res.stdout and any(ln.startswith("continued_pretrain ") for ln in res.stdout.splitlines())

    # `logs | grep` gets whole lines
    res = project.run("logs", run_id, env=NARROW)
    assert any(ln.endswith(long_line) and len(ln) > 80 for ln in res.stdout.splitlines()), res.stdout

    # every listing keeps --json
    for args in (
        ["runs", "list"],
        ["status", run_id],
        ["stages", "list"],
        ["plugins", "list"],
        ["stages", "show", "shell"],
        ["validate"],
    ):
        res = project.run(*args, "--json")
        assert res.returncode == 0, (args, res.stderr)
        json.loads(res.stdout)


def test_text_in_square_brackets_is_printed_as_is(project):
    project.write(shell_stage("fetch", "echo '[cache hit] reused [bold]data[/bold] [/]'"))
    res = project.run("run")
    assert res.returncode == 0, res.stderr
    assert "fetch | [cache hit] reused [bold]data[/bold] [/]" in res.stdout
    res = project.run("logs")
    assert "fetch | [cache hit] reused [bold]data[/bold] [/]" in res.stdout


def test_a_file_name_in_square_brackets_is_named_whole(project):
    data = project.write('{"text": "hello"}\n', name="data/notes[red].jsonl")
    res = project.run("data", "inspect", str(data))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0].startswith(f"{data}: 1 rows"), res.stdout


def test_a_shell_stage_closes_the_command_output(project):
    project.write(shell_stage("hello", "echo hi"))
    res = project.run("run")
    assert res.returncode == 0
    assert "ResourceWarning" not in res.stdout + res.stderr
    run_dir = Path(json.loads(project.run("status", "--json").stdout)["dir"])
    assert not [e for e in events_of(run_dir) if "ResourceWarning" in str(e.get("message", ""))]


def test_a_stopped_stage_is_marked_stopped_not_failed_and_no_checkpoint_is_promised(project):
    project.write(shell_stage("wait", "echo started; sleep 60"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmforge", "run"],
        cwd=project.root,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            events = list(project.runs.glob("*/events.jsonl"))
            if events and "started" in events[0].read_text():
                break
            time.sleep(0.2)
        stop = project.run("stop")
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, out + err
    assert "stage wait is stopping" in stop.stdout, stop.stdout
    assert "stopped (exit code 130)" in stop.stdout
    assert "saving a checkpoint" not in out + stop.stdout
    assert "wait | stop requested: ending the command" in out
    assert "■ wait stopped" in out and "✗" not in out, out


def test_validate_shows_the_graph_of_a_branching_pipeline(project):
    project.write(
        shell_stage("pretrain", "true")
        + shell_stage("sft", "true", {"base": "@pretrain"})
        + shell_stage("dpo", "true", {"base": "@sft"})
        + shell_stage("domain", "true", {"base": "@pretrain"})
    )
    res = project.run("validate")
    assert res.returncode == 0, res.stderr
    assert "pretrain -> sft -> dpo -> domain" not in res.stdout
    graph = {
        m.group(1): (m.group(2) or "").strip()
        for m in re.finditer(r"^  (\w+) \(shell\)\s*(?:<- (.+))?$", res.stdout, re.M)
    }
    assert graph == {"pretrain": "", "sft": "pretrain", "dpo": "sft", "domain": "pretrain"}, res.stdout
    needs = json.loads(project.run("validate", "--json").stdout)["needs"]
    assert needs == {"pretrain": [], "sft": ["pretrain"], "dpo": ["sft"], "domain": ["pretrain"]}


def test_runs_are_listed_newest_first(project):
    project.write(shell_stage("hello", "echo hi"))
    ids = []
    for _ in range(2):
        assert project.run("run").returncode == 0
        ids.append(json.loads(project.run("status", "--json").stdout)["id"])
        time.sleep(1.1)  # run ids and creation times are to the second
    listed = [r["id"] for r in json.loads(project.run("runs", "list", "--json").stdout)]
    assert listed == ids[::-1]
    lines = project.run("runs", "list").stdout.splitlines()[1:]
    assert [ln.split()[0] for ln in lines] == ids[::-1]


def test_a_damaged_run_folder_is_listed_and_named_never_dropped(project):
    project.write(shell_stage("hello", "echo hi; echo bye"))
    assert project.run("run").returncode == 0
    run_id = json.loads(project.run("status", "--json").stdout)["id"]
    run_dir = project.runs / run_id
    manifest = run_dir / "manifest.json"

    # events.jsonl with a line that is not UTF-8: logs names file:line and prints the rest
    events = (run_dir / "events.jsonl").read_bytes().splitlines(keepends=True)
    (run_dir / "events.jsonl").write_bytes(
        b"".join(events[:2]) + b'{"type": "log", "message": "\xff\xfe"}\n' + b"".join(events[2:])
    )
    res = project.run("logs", run_id)
    assert res.returncode == 0, res.stderr
    assert "events.jsonl:3: skipped a line that is not UTF-8" in res.stdout
    assert "hello | bye" in res.stdout and "run " + run_id in res.stdout.splitlines()[-1]

    manifest.write_text(manifest.read_text()[:40])  # torn
    res = project.run("runs", "list")
    assert res.returncode == 0 and "no runs yet" not in res.stdout
    row = [ln for ln in res.stdout.splitlines() if ln.startswith(run_id)]
    assert row and "damaged" in row[0] and str(manifest) in row[0], res.stdout
    listed = json.loads(project.run("runs", "list", "--json").stdout)
    assert listed[0]["id"] == run_id and listed[0]["status"] == "damaged" and str(manifest) in listed[0]["damaged"]
    res = project.run("status", run_id)
    assert res.returncode == 2 and "damaged" in res.stderr and str(manifest) in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    res = project.run("status")  # the latest run is damaged and the only one: say so, do not say "no runs"
    assert res.returncode == 2 and str(manifest) in res.stderr
    assert project.run("logs", run_id).returncode == 0  # the events do not need the manifest


def test_every_metric_is_printed_and_the_live_bar_shows_the_newest_loss():
    """The renderer as `llmforge run` uses it, on a recording console: the bar's loss is the metric just
    reported, not the one before."""
    from llmforge.cli.render import EventPrinter

    printer = EventPrinter(every=2.0, live=True)
    printer.out.record = True
    printer.out.file = open("/dev/null", "w")  # noqa: SIM115 - the recording is what is checked
    try:
        printer({"type": "stage_start", "stage": "sft", "uses": "sft"})
        for step, loss in [(5, 2.5), (10, 1.25), (12, 0.75)]:
            printer({"type": "progress", "stage": "sft", "done": step, "total": 12, "unit": "step"})
            printer({"type": "metric", "stage": "sft", "step": step, "values": {"loss": loss}})
            info = printer._progress.tasks[0].fields["info"]
            assert f"loss {loss:.4g}" in info, (step, info)
        printer({"type": "stage_end", "stage": "sft", "status": "done", "duration": 1.0})
        text = printer.out.export_text()
    finally:
        printer.out.file.close()
    assert [int(s) for s in re.findall(r"sft \| step (\d+)", text)] == [5, 10, 12]


@pytest.fixture(scope="module")
def resumed_training(tmp_path_factory):
    """A tiny pretrain -> LoRA DPO run through the CLI, stopped after pretrain's first checkpoint and
    resumed (the tied-embedding resume that makes transformers log `missing keys ['lm_head.weight']`)."""
    from conftest import Project
    from llmforge.runs import STOP_REQUEST, request
    from training_data import DPO, PRETRAIN, write_data

    project = Project(tmp_path_factory.mktemp("noise"))
    write_data(project.root)
    project.write(
        PRETRAIN.format(steps=100).replace("log_every = 2", "log_every = 5\nsave_every = 2")
        + DPO.replace("@sft", "@pretrain").format(steps=3)
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmforge", "run"],
        cwd=project.root,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            done = list(project.runs.glob("*/stages/pretrain/work/checkpoints/checkpoint-*/llmforge-complete"))
            if done:  # the request file `llmforge stop` writes, written at once (pretrain must still be running)
                request(done[0].parents[5], STOP_REQUEST)
                break
            time.sleep(0.1)
        first_out, first_err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, first_out[-3000:] + first_err[-3000:]
    res = project.run("run", "--resume", timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    st = json.loads(project.run("status", "--json").stdout)
    return project, first_out + first_err, res, events_of(Path(st["dir"]))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


CHATTER = ("Setting accelerator to CPU", "FutureWarning", "missing keys", "lm_head.weight")


@pytest.mark.slow  # 15-50 s of training runs: the default run stays under 15 minutes; .ci/run's slow pass runs it
def test_library_chatter_stays_in_the_debug_log(resumed_training):
    project, first, resumed, events = resumed_training
    assert "resuming from checkpoint-" in resumed.stdout
    for text in CHATTER:
        assert text not in first, (text, first[-3000:])
        assert text not in resumed.stdout + resumed.stderr, (text, resumed.stdout[-3000:])
    debug = "\n".join(e["message"] for e in events if e["type"] == "log" and e.get("level") == "debug")
    expected = list(CHATTER)
    if importlib.util.find_spec("deepspeed") is None or _cuda():
        expected.remove("Setting accelerator to CPU")  # DeepSpeed says it only where it is installed, on a CPU
    for text in expected:
        assert text in debug, (text, debug)
    assert "missing keys" not in project.run("logs").stdout
    assert "missing keys" in project.run("logs", "--debug").stdout


def test_every_metric_step_of_a_training_run_is_printed(resumed_training):
    _, _, resumed, events = resumed_training
    starts = [i for i, e in enumerate(events) if e["type"] == "run_start"]
    events = events[starts[-1] :]  # the resumed invocation's events (the file holds both)
    for stage in ("pretrain", "dpo"):
        logged = [
            e["step"]
            for e in events
            if e["type"] == "metric" and e.get("stage") == stage and e.get("step") is not None and "loss" in e["values"]
        ]
        printed = [int(s) for s in re.findall(rf"^{stage} \| step (\d+) ", resumed.stdout, re.M)]
        assert logged and printed == logged, (stage, printed, logged)
    assert "pretrain | step 100 " in resumed.stdout  # the last step, which the throttle used to drop
