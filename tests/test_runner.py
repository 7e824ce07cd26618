"""The pipeline runner through the real CLI: caching, selection, failures, SIGKILL, detach/stop/resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import _env

# A stage that counts to N, saving its count in its work folder (its checkpoint) and continuing from
# it when resumed. Slow enough (0.05 s a step) to be stopped or killed midway.
COUNTER = """
[[stages]]
name = "count"
uses = "shell"
command = '''
n=$(cat count 2>/dev/null || echo 0)
echo "resume=$LLMFORGE_RESUME start=$n"
while [ "$n" -lt {n} ]; do n=$((n+1)); echo "$n" > count.tmp && mv count.tmp count; sleep 0.05; done
echo "$n" > "$LLMFORGE_OUT/final.txt"
'''

[[stages]]
name = "bundle"
uses = "copy"
sources = ["@count"]
"""


def status(project, run: str | None = None) -> dict:
    res = project.run("status", *([run] if run else []), "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def wait_for(pred, timeout: float = 30.0, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]


def three_stage(project, a_cmd="echo a > $LLMFORGE_OUT/a.txt"):
    project.write("data.txt", "data.txt")
    project.write(f"""
        [[stages]]
        name = "a"
        uses = "shell"
        command = "{a_cmd}"

        [[stages]]
        name = "b"
        uses = "copy"
        sources = ["@a", "data.txt"]

        [[stages]]
        name = "c"
        uses = "shell"
        command = "echo c > $LLMFORGE_OUT/c.txt"
    """)


def test_cache_skips_unchanged_and_reruns_downstream_of_a_change(project):
    three_stage(project)
    first = project.run("run")
    assert first.returncode == 0, first.stderr
    st1 = status(project)
    assert {n: s["status"] for n, s in st1["stages"].items()} == {"a": "done", "b": "done", "c": "done"}
    b_files = Path(st1["stages"]["b"]["artifacts"]["files"]["path"])
    assert (b_files / "a" / "a.txt").read_text() == "a\n"
    assert (b_files / "data.txt").exists()

    second = project.run("run")
    assert second.returncode == 0
    st2 = status(project)
    assert {n: s["status"] for n, s in st2["stages"].items()} == {"a": "cached", "b": "cached", "c": "cached"}
    assert st2["stages"]["a"]["cached_from"] == st1["id"]

    # A changed option re-runs that stage and what depends on it, not the independent one.
    third = project.run("run", "--set", "a.command=echo changed > $LLMFORGE_OUT/a.txt")
    assert third.returncode == 0, third.stderr
    st3 = status(project)
    assert {n: s["status"] for n, s in st3["stages"].items()} == {"a": "done", "b": "done", "c": "cached"}
    b_files = Path(st3["stages"]["b"]["artifacts"]["files"]["path"])
    assert (b_files / "a" / "a.txt").read_text() == "changed\n"

    # A changed input file re-runs the stage that reads it.
    (project.root / "data.txt").write_text("new data")
    assert project.run("run", "--set", "a.command=echo changed > $LLMFORGE_OUT/a.txt").returncode == 0
    st4 = status(project)
    assert {n: s["status"] for n, s in st4["stages"].items()} == {"a": "cached", "b": "done", "c": "cached"}


def test_stage_and_from_select_what_runs(project):
    three_stage(project)
    only_b = project.run("run", "--stage", "b")
    assert only_b.returncode == 0, only_b.stderr
    st = status(project)
    assert {n: s["status"] for n, s in st["stages"].items()} == {"a": "done", "b": "done", "c": "skipped"}

    from_b = project.run("run", "--from", "b")
    assert from_b.returncode == 0
    st = status(project)
    assert {n: s["status"] for n, s in st["stages"].items()} == {"a": "cached", "b": "done", "c": "done"}

    bad = project.run("run", "--stage", "bb")
    assert bad.returncode == 2
    assert "no stage named 'bb'; did you mean 'b'?" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_failed_stage_blocks_downstream_and_exits_1(project):
    three_stage(project, a_cmd="echo boom; exit 3")
    res = project.run("run")
    assert res.returncode == 1
    assert "command exited with code 3" in res.stdout
    st = status(project)
    assert st["status"] == "failed"
    assert st["stages"]["a"]["status"] == "failed"
    assert "exit" in st["stages"]["a"]["error"]
    # Failing fast: nothing after the failed stage ran, and no artifact was published for it.
    assert st["stages"]["b"]["status"] in ("pending", "blocked")
    assert not (Path(st["dir"]) / "stages" / "a" / "artifacts" / "files").exists()
    assert "Traceback" not in res.stderr


def _start_run(project, *args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "llmforge", "run", *args],
        cwd=project.root,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _latest_run_dir(project) -> Path:
    runs = [p for p in project.runs.iterdir() if (p / "manifest.json").exists()]
    if not runs:
        return None
    return max(runs, key=lambda p: json.loads((p / "manifest.json").read_text())["created"])


def test_sigkill_leaves_no_half_artifact_and_next_runs_take_over(project):
    project.write(COUNTER.replace("{n}", "60"))
    proc = _start_run(project)
    run_dir = wait_for(
        lambda: project.runs.exists() and any(project.runs.iterdir()) and _latest_run_dir(project), what="run dir"
    )
    work = run_dir / "stages" / "count" / "work"
    wait_for(lambda: (work / "count").exists() and int((work / "count").read_text() or 0) >= 5, what="progress")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)

    arts = run_dir / "stages" / "count" / "artifacts"
    assert not (arts / "files").exists(), "a killed stage must not leave a finished-looking artifact"
    assert (run_dir / "lock").exists()  # the stale lock of the dead writer
    st = status(project, run_dir.name)
    assert st["status"] == "killed"
    assert st["stages"]["count"]["status"] == "killed"

    # --resume takes over the stale lock and continues from the saved count.
    saved = int((work / "count").read_text())
    res = project.run("run", "--resume", timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "took over the stale lock" in res.stdout
    assert f"resume=1 start={saved}" in res.stdout
    st = status(project, run_dir.name)
    assert st["status"] == "done"
    final = Path(st["stages"]["count"]["artifacts"]["files"]["path"]) / "final.txt"
    assert final.read_text().strip() == "60"
    assert not any(p.name.startswith(".tmp-") for p in arts.iterdir())
    assert not (run_dir / "lock").exists()


def test_new_run_takes_over_stale_lock_of_killed_run(project):
    project.write(COUNTER.replace("{n}", "60"))
    proc = _start_run(project)
    run_dir = wait_for(
        lambda: project.runs.exists() and any(project.runs.iterdir()) and _latest_run_dir(project), what="run dir"
    )
    wait_for(lambda: (run_dir / "stages" / "count" / "work" / "count").exists(), what="progress")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    res = project.run("run", "--set", "count.command=echo quick > $LLMFORGE_OUT/final.txt")
    assert res.returncode == 0, res.stderr
    assert f"run {run_dir.name} was killed; took over its stale lock" in res.stdout
    old = json.loads((run_dir / "manifest.json").read_text())
    assert old["status"] == "killed"
    assert not (run_dir / "lock").exists()


def test_detach_status_stop_resume(project):
    project.write(COUNTER.replace("{n}", "400"))
    res = project.run("run", "--detach")
    assert res.returncode == 0, res.stderr
    run_id = res.stdout.strip().splitlines()[-1]
    run_dir = project.runs / run_id
    assert (run_dir / "manifest.json").exists()
    work = run_dir / "stages" / "count" / "work"
    wait_for(lambda: (work / "count").exists(), what="the detached run to start counting")

    st = status(project, run_id)
    assert st["status"] == "running"
    assert st["stages"]["count"]["status"] == "running"

    # A second run of the same forge.toml is refused while the first one lives.
    again = project.run("run")
    assert again.returncode == 2
    assert f"run {run_id} of this forge.toml is still running" in again.stderr

    stop = project.run("stop", run_id, timeout=60)
    assert stop.returncode == 0, stop.stderr
    st = status(project, run_id)
    assert st["status"] == "stopped"
    assert st["exit_code"] == 130
    assert st["stages"]["count"]["status"] == "stopped"
    assert not (run_dir / "stages" / "count" / "artifacts" / "files").exists()
    stopped_at = int((work / "count").read_text())
    assert 0 < stopped_at < 400

    log = project.run("logs", run_id)
    assert "stopped" in log.stdout

    # Resuming with a changed command: a changed stage must not continue from the old checkpoint.
    res = project.run("run", "--resume", "--set", "count.command=" + _fast_counter(400), timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resume=0 start=0" in res.stdout
    st = status(project, run_id)
    assert st["status"] == "done"


def _fast_counter(n: int) -> str:
    return (
        'n=$(cat count 2>/dev/null || echo 0); echo "resume=$LLMFORGE_RESUME start=$n"; '
        f'echo {n} > "$LLMFORGE_OUT/final.txt"'
    )


def test_stop_then_resume_continues_from_checkpoint(project):
    project.write(COUNTER.replace("{n}", "100"))
    res = project.run("run", "--detach")
    run_id = res.stdout.strip().splitlines()[-1]
    work = project.runs / run_id / "stages" / "count" / "work"
    wait_for(lambda: (work / "count").exists() and int((work / "count").read_text() or 0) >= 3, what="progress")
    assert project.run("stop", run_id, timeout=60).returncode == 0
    saved = int((work / "count").read_text())
    resumed = project.run("run", "--resume", timeout=60)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resume=1 start={saved}" in resumed.stdout
    st = status(project, run_id)
    assert st["status"] == "done"
    assert st["stages"]["bundle"]["status"] == "done"
    final = Path(st["stages"]["bundle"]["artifacts"]["files"]["path"]) / "count" / "final.txt"
    assert final.read_text().strip() == "100"
    kinds = [e["type"] for e in events(project.runs / run_id)]
    assert kinds.count("run_start") == 2 and kinds.count("run_end") == 2


def test_sigint_stops_foreground_run_with_130(project):
    project.write(COUNTER.replace("{n}", "400"))
    proc = _start_run(project)
    run_dir = wait_for(
        lambda: project.runs.exists() and any(project.runs.iterdir()) and _latest_run_dir(project), what="run dir"
    )
    wait_for(lambda: (run_dir / "stages" / "count" / "work" / "count").exists(), what="progress")
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, out + err
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "stopped"
    assert "llmforge run --resume" in out


def test_logs_follow_reads_a_live_run_to_its_end(project):
    project.write(COUNTER.replace("{n}", "30"))
    res = project.run("run", "--detach")
    run_id = res.stdout.strip().splitlines()[-1]
    follow = project.run("logs", run_id, "-f", timeout=60)
    assert follow.returncode == 0
    assert "✓ count done" in follow.stdout
    assert follow.stdout.rstrip().endswith("done")
    raw = project.run("logs", run_id, "--raw")
    types = [json.loads(line)["type"] for line in raw.stdout.splitlines()]
    assert types[0] == "run_start" and types[-1] == "run_end"


@pytest.mark.slow  # 15-50 s of training runs: the default run stays under 15 minutes; .ci/run's slow pass runs it
def test_resume_keeps_the_selection_a_forced_run_was_started_with(project):
    """`run --stage count --force`, stopped, then `run --resume`: the forced stage continues from what it
    saved, with the recorded selection; it is not taken from the cache of the first run."""
    project.write(COUNTER.replace("{n}", "100"))
    assert project.run("run", timeout=60).returncode == 0
    res = project.run("run", "--stage", "count", "--force", "--detach")
    assert res.returncode == 0, res.stderr
    run_id = res.stdout.strip().splitlines()[-1]
    run_dir = project.runs / run_id
    work = run_dir / "stages" / "count" / "work"
    wait_for(lambda: (work / "count").exists() and int((work / "count").read_text() or 0) >= 3, what="progress")
    assert project.run("stop", run_id, timeout=60).returncode == 0
    saved = int((work / "count").read_text())

    resumed = project.run("run", "--resume", timeout=60)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "count cached" not in resumed.stdout
    assert f"resume=1 start={saved}" in resumed.stdout
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["selection"] == {"stages": ["count"], "from": None, "force": True}
    st = status(project, run_id)
    assert st["stages"]["count"]["status"] == "done"
    assert st["stages"]["bundle"]["status"] == "skipped"  # not selected by --stage count
    assert Path(st["stages"]["count"]["artifacts"]["files"]["path"]).is_relative_to(run_dir)


@pytest.mark.slow  # 15-50 s of training runs: the default run stays under 15 minutes; .ci/run's slow pass runs it
def test_resume_whose_recorded_stage_is_gone_says_so(project):
    """The recorded --stage names a stage the edited forge.toml no longer has: exit 2, one message naming
    the run and its selection, no traceback; the run stays resumable once the selection is given."""
    project.write(COUNTER.replace("{n}", "400"))
    res = project.run("run", "--stage", "count", "--detach")
    run_id = res.stdout.strip().splitlines()[-1]
    work = project.runs / run_id / "stages" / "count" / "work"
    wait_for(lambda: (work / "count").exists(), what="progress")
    assert project.run("stop", run_id, timeout=60).returncode == 0
    project.write(
        COUNTER.replace("{n}", "400").replace('name = "count"', 'name = "tally"').replace('"@count"', '"@tally"')
    )
    bad = project.run("run", "--resume")
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert f"run {run_id} was started with --stage count: no stage named 'count'" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not (project.runs / run_id / "lock").exists()
    ok = project.run("run", "--resume", "--stage", "tally", timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
