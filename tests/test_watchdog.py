"""The training watchdog and a rank that dies: a real SFT whose step 2 hangs makes every process dump its
Python stacks into the stage folder (stacks-rank-R.txt) and a `watchdog` event reach the run, with the
local backend and with 2 accelerate processes (where the hung rank holds the other one in a collective);
killing the hung rank then fails the run within seconds, naming rank 1, instead of leaving rank 0 waiting.

The hanging stage is a test plugin written into a temporary folder: a real training stage (llmforge's own
training loop, the HF Trainer) with one extra Trainer callback that sleeps at step 2 on one rank.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from test_backends import events_of, free_port, tiny_base, wait_for
from training_data import write_data

STALL_MODULE = '''
import os
import time

from transformers import TrainerCallback

from llmforge import hookimpl
from llmforge.stage import Stage
from llmforge_plugins.sft import SftOptions


class Stall(TrainerCallback):
    """Step 2 does not end on rank STALL_RANK (a hung step)."""

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 2 and os.environ.get("RANK", "0") == os.environ["STALL_RANK"]:
            time.sleep(float(os.environ["STALL_SECONDS"]))


class StallingSft(Stage):
    kind = "stalling_sft"
    summary = "SFT whose step 2 hangs on one rank (test)."
    Options = SftOptions
    produces = ("model",)
    distributed = True

    def run(self, o, ctx):
        from llmforge.chat import resolve_template
        from llmforge_plugins.training import common, factory, loop, models

        tokenizer = models.load_tokenizer(o.model)
        model = models.load_model(o.model)
        template = resolve_template(o.template, ctx.registry.chat_templates, tokenizer, base_dir=ctx.project_dir)
        rows = common.load_rows(o.data, ctx, expect=("chat",)).rows
        train, _ = common.tokenize_split(ctx, rows, "chat", tokenizer, template, o)
        training = factory.build_trainer(factory.SFT, ctx=ctx, opts=o, model=model, tokenizer=tokenizer,
                                         train_rows=train, eval_rows=None, extra_callbacks=[Stall()])
        outcome = loop.run_trainer(training, ctx)
        if not outcome.stopped:
            common.save_outputs(ctx, training.trainer, tokenizer, template, None, False)


@hookimpl
def register_stages(register):
    register(StallingSft)
'''

FORGE = """
[backend]
type = "{backend}"
num_processes = {nproc}
main_process_port = {port}
watchdog_minutes = {minutes}

[[stages]]
name = "sft"
uses = "stalling_sft"
model = "{base}"
data = {{ path = "data/chat.jsonl" }}
max_steps = 4
max_length = 128
micro_batch_size = 4
log_every = 1
precision = "fp32"
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("base"))


@pytest.fixture
def stall_plugin(tmp_path, monkeypatch):
    """The hanging stage as an importable module, here and in launched processes (PYTHONPATH)."""
    folder = tmp_path / "plugin"
    folder.mkdir()
    (folder / "lf_stall_stage.py").write_text(STALL_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
    sys.modules.pop("lf_stall_stage", None)
    return importlib.import_module("lf_stall_stage")


def _pipeline(root: Path, base: Path, plugin, **fmt):
    from llmforge.pipeline import load_pipeline
    from llmforge.plugins import load_registry

    write_data(root)
    (root / "forge.toml").write_text(FORGE.format(base=base, port=free_port(), **fmt))
    registry = load_registry(env="", extra=[("stall", plugin)])
    return load_pipeline(root / "forge.toml", registry=registry), registry


def test_watchdog_thread_fires_once_per_stall_and_is_off_at_zero(tmp_path):
    from llmforge_plugins.training.watchdog import Watchdog

    seen: list[tuple[str, dict]] = []
    dog = Watchdog(0.002, tmp_path, rank=3, emit=lambda t, **d: seen.append((t, d)), step=lambda: 7).start()
    wait_for(lambda: any(t == "watchdog" for t, _ in seen), 10, "the first dump")
    time.sleep(0.4)  # still stalled: no second dump
    assert [t for t, _ in seen] == ["watchdog", "log"]
    dog.beat()  # a step completed: armed again
    wait_for(lambda: len(seen) == 4, 10, "the second dump")
    dog.stop()
    event = seen[0][1]
    assert event["rank"] == 3 and event["step"] == 7 and event["stacks"] == str(tmp_path / "stacks-rank-3.txt")
    text = (tmp_path / "stacks-rank-3.txt").read_text()
    assert text.count("llmforge watchdog: rank 3") == 2 and "--- thread MainThread" in text
    off = Watchdog(0, tmp_path / "off", rank=0, emit=lambda t, **d: seen.append((t, d))).start()
    time.sleep(0.2)
    off.stop()
    assert len(seen) == 4 and not (tmp_path / "off").exists()


@pytest.mark.timeout(300)
def test_local_stage_that_stops_stepping_dumps_its_stacks_and_emits_the_event(
    base, tmp_path, stall_plugin, monkeypatch
):
    from llmforge.runner import RunRequest, run_pipeline

    monkeypatch.setenv("STALL_RANK", "0")
    monkeypatch.setenv("STALL_SECONDS", "5")
    pipe, registry = _pipeline(tmp_path, base, stall_plugin, backend="local", nproc=1, minutes=0.03)
    result = run_pipeline(pipe, RunRequest(), registry=registry)
    assert result.status == "done", result.stages  # the step ended after all: training went on
    stage_dir = result.run_dir / "stages" / "sft"
    dumps = (stage_dir / "stacks-rank-0.txt").read_text().split("llmforge watchdog: rank 0")[1:]
    events = events_of(result.run_dir)
    dogs = [e for e in events if e["type"] == "watchdog"]
    # (on a busy machine a slow first step may trip a 1.8 s watchdog too: each dump has its event)
    assert len(dogs) == len(dumps)
    (dog,) = [e for e in dogs if e["step"] == 2]  # the hung step: one dump, though it hung 5 s
    assert dog["stage"] == "sft" and dog["rank"] == 0
    assert dog["stacks"] == str(stage_dir / "stacks-rank-0.txt")
    assert any("in on_step_end" in d and "time.sleep" in d for d in dumps)  # where it hung
    assert any(
        e["type"] == "log" and e["level"] == "warning" and e["message"].startswith("watchdog: no training step")
        for e in events
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_rank_dumps_a_hang_and_killing_the_hung_rank_fails_the_run_fast(
    base, tmp_path, stall_plugin, monkeypatch
):
    from llmforge.runner import RunRequest, run_pipeline

    monkeypatch.setenv("STALL_RANK", "1")
    monkeypatch.setenv("STALL_SECONDS", "600")
    pipe, registry = _pipeline(tmp_path, base, stall_plugin, backend="accelerate", nproc=2, minutes=0.05)
    results: list = []
    runner = threading.Thread(target=lambda: results.append(run_pipeline(pipe, RunRequest(), registry=registry)))
    runner.start()
    try:
        stage_dir = wait_for(lambda: next(tmp_path.glob("runs/2*/stages/sft"), None), 60, "the stage folder")
        files = [stage_dir / f"stacks-rank-{r}.txt" for r in (0, 1)]
        wait_for(lambda: all(f.exists() for f in files), 180, "both ranks' stack dumps")
        run_dir = stage_dir.parent.parent
        wait_for(lambda: any(e["type"] == "watchdog" for e in events_of(run_dir)), 30, "the watchdog event")
        # rank 1 sleeps in its hung step; rank 0 waits for it in a collective (torch.distributed)
        assert "time.sleep" in wait_for(lambda: files[1].read_text(), 5, "rank 1's stacks")
        assert "torch/distributed/" in files[0].read_text() and "in _inner_training_loop" in files[0].read_text()
        (dog,) = [e for e in events_of(run_dir) if e["type"] == "watchdog"]
        assert dog["rank"] == 0  # only rank 0 writes events; every rank writes its stacks

        record = json.loads((stage_dir / "launch" / "ranks" / "rank-1.json").read_text())
        os.kill(record["pid"], signal.SIGKILL)
        killed = time.monotonic()
        runner.join(timeout=120)
        assert not runner.is_alive(), "the run hangs after a rank was killed"
        assert time.monotonic() - killed < 60
    finally:
        if runner.is_alive():  # never leave processes behind a failed assertion
            for rec in stage_dir.glob("launch/ranks/rank-*.json"):
                try:
                    os.kill(json.loads(rec.read_text())["pid"], signal.SIGKILL)
                except (OSError, ValueError):
                    pass
            runner.join(timeout=60)
    (result,) = results
    assert (result.status, result.exit_code) == ("failed", 1)
    error = result.stages["sft"]["error"]
    assert error.startswith(f"rank 1 (node 0, pid {record['pid']}") and "SIGKILL" in error, error
    (failed,) = [e for e in events_of(result.run_dir) if e["type"] == "rank_failed"]
    assert failed["rank"] == 1 and failed["log"] == str(stage_dir / "logs" / "rank-1.log")
