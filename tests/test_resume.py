"""Stops, kills and resumes of real training runs through the real CLI, at exact moments.

The interrupt-plugin fixture (tests/fixtures/plugins/interrupt-plugin) is an `on_event` observer that stops
(`request(run_dir, STOP_REQUEST)`), signals or kills the `llmforge run` process at a chosen event, so that
each interruption lands where a user's Ctrl-C, `kill` or power cut would, but at the same step every time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from training_data import PRETRAIN, SFT, write_data

# A tiny two-stage pipeline; sft logs every step and saves a checkpoint every 4.
PIPELINE = PRETRAIN.format(steps=8) + SFT.format(steps=10).replace("log_every = 2", "log_every = 1\nsave_every = 4")


@pytest.fixture(scope="module")
def site(plugin_site):
    return plugin_site("interrupt-plugin")


def cli(project, site, *args, rules=None, timeout=300):
    env = {"LLMFORGE_TEST_INTERRUPT": json.dumps(rules or []), "OMP_NUM_THREADS": "1"}
    return project.run(*args, plugins=[site], env=env, timeout=timeout)


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def run_dirs(project) -> list[Path]:
    """The project's runs, oldest first."""
    return sorted(
        (p for p in project.runs.iterdir() if (p / "manifest.json").exists()), key=lambda p: manifest(p)["created"]
    )


def last_attempt(run_dir: Path) -> list[dict]:
    """The events of the run's latest attempt (after its last run_start)."""
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines() if x.strip()]
    starts = [i for i, e in enumerate(events) if e["type"] == "run_start"]
    return events[starts[-1] :]


def steps_of(events: list[dict], stage: str) -> list[int]:
    return [int(e["step"]) for e in events if e["type"] == "metric" and e.get("stage") == stage]


def weights(model_dir: str | Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def assert_same_weights(a, b) -> None:
    import torch

    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), (k, float((wa[k] - wb[k]).abs().max()))


def sft_model(run_dir: Path) -> Path:
    return Path(manifest(run_dir)["stages"]["sft"]["artifacts"]["model"]["path"])


@pytest.mark.slow  # 15-50 s of training runs: the default run stays under 15 minutes; .ci/run's slow pass runs it
def test_forced_stage_stopped_then_resumed_continues_from_its_checkpoint(project, site):
    """`run --stage sft --force`, Ctrl-C at step 5, then `run --resume`: the forced stage re-trains from
    checkpoint-5 (not "cached" from the first run) and ends with the weights of an uninterrupted forced run."""
    write_data(project.root)
    project.write(PIPELINE)
    assert cli(project, site, "run").returncode == 0

    stopped = cli(
        project,
        site,
        "run",
        "--stage",
        "sft",
        "--force",
        rules=[{"type": "progress", "stage": "sft", "done": 4, "action": "sigint"}],
    )  # Ctrl-C
    assert stopped.returncode == 130, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    forced_dir = run_dirs(project)[-1]
    assert manifest(forced_dir)["stages"]["sft"]["status"] == "stopped"
    assert (forced_dir / "stages/sft/work/checkpoints/checkpoint-5/llmforge-complete").exists()

    resumed = cli(project, site, "run", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "sft cached" not in resumed.stdout
    events = last_attempt(forced_dir)
    assert not [e for e in events if e["type"] == "stage_cached" and e["stage"] == "sft"]
    start = next(e for e in events if e["type"] == "stage_start" and e["stage"] == "sft")
    assert start["resume"] is True
    assert any(e["type"] == "log" and e.get("message") == "resuming from checkpoint-5" for e in events)
    assert steps_of(events, "sft") == [6, 7, 8, 9, 10]
    m = manifest(forced_dir)
    assert m["selection"] == {"stages": ["sft"], "from": None, "force": True}
    assert m["status"] == "done" and m["stages"]["sft"]["status"] == "done"
    assert m["stages"]["pretrain"]["status"] == "cached"
    assert sft_model(forced_dir).is_relative_to(forced_dir)

    again = cli(project, site, "run", "--stage", "sft", "--force")  # the same forced run, uninterrupted
    assert again.returncode == 0
    assert_same_weights(sft_model(forced_dir), sft_model(run_dirs(project)[-1]))


@pytest.mark.slow  # 15-50 s of training runs: the default run stays under 15 minutes; .ci/run's slow pass runs it
def test_template_edit_forced_rerun_stopped_and_resumed_keeps_the_new_template(project, site):
    """After a `.jinja` template edit, a forced re-run stopped and resumed ends with a model carrying the
    edited template, trained in that run, never the result built with the old one."""
    write_data(project.root)
    source = project.root / "t.jinja"
    body = (
        '{#- llmforge: {"eos": "<|im_end|>"} -#}\n{#- VERSION -#}\n{%- for m in messages %}\n'
        "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}\n{%- endfor %}\n"
        "{%- if add_generation_prompt %}\n{{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
    )
    source.write_text(body.replace("VERSION", "version one"))
    project.write(
        PIPELINE.replace(
            'data = { path = "data/chat.jsonl" }', 'data = { path = "data/chat.jsonl" }\ntemplate = "t.jinja"'
        )
    )
    assert cli(project, site, "run").returncode == 0
    first = run_dirs(project)[-1]

    source.write_text(body.replace("VERSION", "version two"))
    assert (
        cli(
            project,
            site,
            "run",
            "--stage",
            "sft",
            "--force",
            rules=[{"type": "progress", "stage": "sft", "done": 4, "action": "sigint"}],
        ).returncode
        == 130
    )
    forced_dir = run_dirs(project)[-1]
    resumed = cli(project, site, "run", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    model = sft_model(forced_dir)
    assert model.is_relative_to(forced_dir) and not model.is_relative_to(first)
    assert "version two" in (model / "chat_template.jinja").read_text()
    assert steps_of(last_attempt(forced_dir), "sft") == [6, 7, 8, 9, 10]


@pytest.mark.slow  # 15-50 s of training runs: the default run stays under 15 minutes; .ci/run's slow pass runs it
def test_run_from_stopped_and_resumed_detached_as_the_tui_does(project, site):
    """The TUI's `f` (run from the selected stage), `s` (stop) and `e` (resume) go through
    llmforge.tui.launch: detached `llmforge run --from sft`, a stop request from another process, a
    detached `--resume`. The resume continues the stopped stage from its checkpoint."""
    from llmforge.tui.launch import Launch, request_stop, start_detached

    write_data(project.root)
    project.write(PRETRAIN.format(steps=8) + SFT.format(steps=150).replace("log_every = 2", "log_every = 1"))
    assert cli(project, site, "run").returncode == 0  # a finished run, whose sft a resume must not reuse

    def wait(pred, what, timeout=240.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if pred():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

    def ended(run_dir: Path) -> bool:
        return (
            (run_dir / "manifest.json").exists()
            and manifest(run_dir)["status"] not in ("running", "starting")
            and not (run_dir / "lock").exists()
        )

    cfg = project.config
    started = start_detached(Launch(cfg, from_stage="sft"))
    run_dir = started.run_dir
    wait(
        lambda: (run_dir / "events.jsonl").exists() and any(s >= 3 for s in steps_of(last_attempt(run_dir), "sft")),
        "sft to train a few steps",
    )
    request_stop(run_dir)
    wait(lambda: ended(run_dir), "the run to stop")
    m = manifest(run_dir)
    assert m["status"] == "stopped" and m["stages"]["sft"]["status"] == "stopped", m["stages"]
    saved = [e["step"] for e in last_attempt(run_dir) if e["type"] == "checkpoint"][-1]

    again = start_detached(Launch(cfg, resume=True))
    assert again.run_id == run_dir.name
    wait(lambda: ended(run_dir) and manifest(run_dir)["pid"] == again.pid, "the resumed run to end")
    events = last_attempt(run_dir)
    assert manifest(run_dir)["status"] == "done", (run_dir / "process.log").read_text()[-2000:]
    assert not [e for e in events if e["type"] == "stage_cached" and e["stage"] == "sft"]
    assert any(e["type"] == "log" and e.get("message") == f"resuming from checkpoint-{saved}" for e in events)
    assert steps_of(events, "sft")[0] == saved + 1 and steps_of(events, "sft")[-1] == 150
    assert manifest(run_dir)["selection"] == {"stages": [], "from": "sft", "force": False}


@pytest.mark.slow  # 15-50 s of training runs: the default run stays under 15 minutes; .ci/run's slow pass runs it
@pytest.mark.parametrize(
    "rule",
    [
        {"type": "checkpoint", "stage": "sft", "step": 8, "action": "sigkill"},  # killed while writing outputs
        {"type": "progress", "stage": "sft", "done": 7, "action": "stop"},  # stopped at the last step
    ],
    ids=["killed-after-last-checkpoint", "stopped-at-last-step"],
)
def test_resume_from_the_final_checkpoint_trains_nothing_more(project, site, rule):
    """Interrupted after its last checkpoint (checkpoint-8 of 8), sft resumes to write its outputs only:
    no step 9, no checkpoint-9, the weights of an uninterrupted run."""
    write_data(project.root)
    project.write(PIPELINE.replace("max_steps = 10", "max_steps = 8"))
    interrupted = cli(project, site, "run", rules=[rule])
    assert interrupted.returncode in (-9, 130), interrupted.stdout[-2000:] + interrupted.stderr[-2000:]
    run_dir = run_dirs(project)[-1]
    checkpoints = run_dir / "stages/sft/work/checkpoints"
    assert (checkpoints / "checkpoint-8/llmforge-complete").exists()
    assert not (run_dir / "stages/sft/artifacts/model").exists()

    resumed = cli(project, site, "run", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    events = last_attempt(run_dir)
    assert steps_of(events, "sft") == []  # no step 9 of 8
    assert not [e for e in events if e["type"] in ("progress", "checkpoint") and e.get("stage") == "sft"]
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert any(e["type"] == "log" and "step 8 of 8 already trained" in e.get("message", "") for e in events)
    m = manifest(run_dir)
    assert m["stages"]["sft"]["status"] == "done" and m["stages"]["sft"]["info"]["steps"] == 8

    reference = cli(project, site, "run", "--stage", "sft", "--force")  # the same stage, uninterrupted
    assert reference.returncode == 0
    assert_same_weights(sft_model(run_dir), sft_model(run_dirs(project)[-1]))


@pytest.mark.slow
def test_sigterm_while_the_artifacts_are_written_finishes_publishing(project, site):
    """SIGTERM after sft's adapter is published and before its merged model is: the stop waits for the
    artifacts, the stage ends done with both, and the run stops before the next stage; resume runs only it."""
    write_data(project.root)
    project.write(
        PIPELINE
        + "lora = { enabled = true, r = 4, alpha = 8 }\nmerge = true\n"
        + """
[[stages]]
name = "after"
uses = "copy"
sources = ["@sft.model"]
"""
    )
    res = cli(
        project, site, "run", rules=[{"type": "artifact", "stage": "sft", "kind": "adapter", "action": "sigterm"}]
    )
    assert res.returncode == 130, res.stdout[-2000:] + res.stderr[-2000:]
    run_dir = run_dirs(project)[-1]
    events = last_attempt(run_dir)
    end = next(e for e in events if e["type"] == "stage_end" and e["stage"] == "sft")
    assert end["status"] == "done"
    assert [e["kind"] for e in events if e["type"] == "artifact" and e.get("stage") == "sft"] == ["adapter", "model"]
    m = manifest(run_dir)
    assert m["status"] == "stopped" and m["stages"]["sft"]["status"] == "done"
    assert m["stages"]["after"]["status"] == "pending"
    for art in m["stages"]["sft"]["artifacts"].values():
        assert Path(art["path"]).is_dir()

    resumed = cli(project, site, "run", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    events = last_attempt(run_dir)
    assert not [e for e in events if e["type"] == "stage_start" and e["stage"] == "sft"]
    assert manifest(run_dir)["stages"]["after"]["status"] == "done"


def test_a_stage_stopped_between_two_artifacts_publishes_neither(project, site):
    project.write("""
        [[stages]]
        name = "two"
        uses = "two_artifacts"
    """)
    res = cli(project, site, "run", rules=[{"type": "artifact", "stage": "two", "kind": "first", "action": "stop"}])
    assert res.returncode == 130, res.stdout + res.stderr
    run_dir = run_dirs(project)[-1]
    st = manifest(run_dir)["stages"]["two"]
    assert st["status"] == "stopped" and st["artifacts"] == {}
    assert not (run_dir / "stages/two/artifacts/first").exists()
    assert not (run_dir / "stages/two/artifacts/second").exists()


def test_a_stop_requested_by_an_observer_is_honoured_however_soon(project, site):
    """An on_event observer gets the run folder and may ask the run to stop: the stage's next
    should_stop() sees it, even right after the previous poll of the stop file."""
    project.write("""
        [[stages]]
        name = "quick"
        uses = "shell"
        command = "echo hi > $LLMFORGE_OUT/hi.txt"
    """)
    res = cli(project, site, "run", rules=[{"type": "stage_start", "stage": "quick", "action": "stop"}])
    assert res.returncode == 130, res.stdout + res.stderr
    run_dir = run_dirs(project)[-1]
    st = manifest(run_dir)["stages"]["quick"]
    assert st["status"] == "stopped" and st["artifacts"] == {}
    assert not (run_dir / "stop.request").exists()  # consumed: the resume is not stopped by it
    resumed = cli(project, site, "run", "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert manifest(run_dir)["stages"]["quick"]["status"] == "done"
