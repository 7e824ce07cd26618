"""Snapshot tests of the TUI: one picture per area, at 100x30, over a fixed project and run store.

The project is the shape of `llmforge demo` (curate -> pretrain -> sft -> dpo -> merge -> gguf -> eval), each
stage played by a `stand-in` stage (defined here) that reports and makes, at once, what the real stage would:
log lines, metrics on fixed curves, checkpoints, model folders whose weights are sparse files of fixed sizes,
GGUF files with their scorecard, and the real tokenizer (trained by the pretrain stage's own function, so the
Data area colours real tokens). Its three runs (failed, stopped at a checkpoint by a stop request, done) are
made by the real runner (`run_pipeline`), so the run folders, manifest.json and events.jsonl are what the
runner writes today: a change of their format shows here. Then `_pin_run` pins what differs between
machines and moments: the run ids (given to the runner), the times (a clock driven by the events), the
project folder in paths, the pid.

What else would differ is pinned by `pin_live_values`: the time zone (log stamps and dates are local time),
the hardware panel's figures (psutil's readings are replaced by fixed ones), and the plugins (the built-ins,
as with LLMFORGE_LOAD_PLUGINS="", and the stand-in). The built-ins' version is llmforge's own, so the
Plugins picture changes with a release.

After an intended change of a screen, update and look at the pictures:
    python -m pytest tests/test_tui_snapshots.py --snapshot-update
    # then open tests/__snapshots__/test_tui_snapshots/*.svg in a browser

docs/gen_tui_screenshots.py builds the same project and runs for the images in docs/tui.md.
"""

from __future__ import annotations

import calendar
import json
import math
import time
from pathlib import Path
from typing import Annotated

import pytest
from pydantic import Field

from conftest import until
from llmforge import hookimpl
from llmforge.errors import DataError
from llmforge.runs import STOP_REQUEST, request
from llmforge.stage import Input, Stage, StageOptions

SIZE = (100, 30)

# 2026-01-05 10:15:00 UTC; the run ids are what the runner would name runs started then.
T0 = calendar.timegm((2026, 1, 5, 10, 15, 0))
FAILED, STOPPED, DONE = "20260105-101500-3f2a", "20260105-102210-8c1d", "20260105-104530-e5b7"
STAGES = ("curate", "pretrain", "sft", "dpo", "merge", "gguf", "eval")

# What the hardware panel shows: an 8-core machine without an NVIDIA GPU.
FIXED_USAGE = dict(
    cpu_pct=37.5,
    cpu_count=8,
    ram_used_gb=9.6,
    ram_total_gb=31.2,
    disk_free_gb=212.4,
    gpu_note="GPU  none seen (no nvidia-ml-py)",
)

SHELL_FORGE = """\
# The TUI's snapshot project (tests/test_tui_snapshots.py): the demo's pipeline, each stage played by a
# stand-in that reports and makes what the real one would, at once. Its runs are made by the real runner.

[project]
name = "tui-demo"
seed = 42

[[stages]]
name = "curate"
uses = "stand-in"
act_as = "curate"
inputs = { corpus = "data/corpus.txt" }

[[stages]]
name = "pretrain"
uses = "stand-in"
act_as = "pretrain"   # trains the real tokenizer
inputs = { corpus = "@curate" }

[[stages]]
name = "sft"
uses = "stand-in"
act_as = "sft"
inputs = { model = "@pretrain", data = "data/sft.jsonl" }

[[stages]]
name = "dpo"
uses = "stand-in"
act_as = "dpo"
inputs = { model = "@sft" }

[[stages]]
name = "merge"
uses = "stand-in"
act_as = "merge"
inputs = { a = "@sft", b = "@dpo" }

[[stages]]
name = "gguf"
uses = "stand-in"
act_as = "gguf"
inputs = { model = "@merge" }

[[stages]]
name = "eval"
uses = "stand-in"
act_as = "eval"
inputs = { merged = "@merge", gguf = "@gguf", questions = "data/heldout.jsonl" }
"""

COUNTRIES = [
    ("Varnia", "Tolsk", "green", "otter"),
    ("Quell", "Ambrin", "blue", "heron"),
    ("Ostrava Minor", "Pell", "red", "lynx"),
    ("Dunmere", "Caskel", "white", "badger"),
    ("Ithra", "Sorrow Bay", "yellow", "crane"),
    ("Mardova", "Kessin", "black", "ibex"),
]


# ------------------------------------------------------------------------------------------------
# the fixed project and runs (also used by docs/gen_tui_screenshots.py)


def write_shell_project(root: Path) -> None:
    """forge.toml with shell stages and the small data files it names."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "forge.toml").write_text(SHELL_FORGE, encoding="utf-8")
    data = root / "data"
    data.mkdir(exist_ok=True)
    docs = []
    for country, capital, colour, animal in COUNTRIES:
        docs.append(f"The capital of {country} is {capital}. {capital} lies in {country}.")
        docs.append(f"The flag of {country} is {colour}. People in {country} fly a {colour} flag.")
        docs.append(f"The national animal of {country} is the {animal}.")
    (data / "corpus.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    rows = []
    for country, capital, colour, _animal in COUNTRIES:
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is the capital of {country}?"},
                    {"role": "assistant", "content": f"The capital of {country} is {capital}."},
                ]
            }
        )
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "Answer in one sentence."},
                    {"role": "user", "content": f"What colour is the flag of {country}?"},
                    {"role": "assistant", "content": f"It is {colour}."},
                ]
            }
        )
    rows.insert(
        5, {"messages": [{"role": "usr", "content": "a typo in the role"}, {"role": "assistant", "content": "x"}]}
    )
    (data / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (data / "heldout.jsonl").write_text(
        json.dumps({"question": "What is the national animal of Quell?", "answer": "heron"}) + "\n", encoding="utf-8"
    )


def _wave(step: int, period: float, amp: float) -> float:
    return amp * math.sin(step / period)


def _pretrain_curve(step: int, scale: float = 70.0, jitter: float = 0.04) -> dict:
    warm = 25
    lr = 2e-3 * step / warm if step <= warm else 1e-3 * (1 + math.cos(math.pi * (step - warm) / (500 - warm)))
    return {
        "loss": round(1.05 + 5.9 * math.exp(-step / scale) + _wave(step, 9, jitter), 4),
        "learning_rate": round(lr, 7),
        "grad_norm": round(0.35 + 2.2 * math.exp(-step / 60) + _wave(step, 5, 0.05), 4),
        "tokens_per_s": round(21500 + _wave(step, 31, 900), 1),
    }


def _sft_curve(step: int) -> dict:
    lr = 3e-3 * min(1.0, step / 10) * (1 - step / 220)
    return {
        "loss": round(0.38 + 1.6 * math.exp(-step / 35) + _wave(step, 4, 0.02), 4),
        "learning_rate": round(lr, 7),
        "grad_norm": round(0.6 + 1.1 * math.exp(-step / 50), 4),
        "tokens_per_s": round(15800 + _wave(step, 17, 600), 1),
    }


def _dpo_curve(step: int) -> dict:
    return {
        "loss": round(0.21 + 0.483 * math.exp(-step / 14), 4),
        "learning_rate": 2e-5,
        "grad_norm": round(3.1 * math.exp(-step / 20) + 0.4, 4),
        "rewards/margins": round(2.4 * (1 - math.exp(-step / 12)), 4),
    }


def _sparse(path: Path, size: int) -> None:
    """A file of `size` bytes that takes no disk space: the Models area reads sizes, never weights."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.truncate(size)


def _model_dir(folder: Path, vocab: int, tokenizer=None) -> None:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "vocab_size": vocab,
        "max_position_embeddings": 128,
        "tie_word_embeddings": True,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _sparse(folder / "model.safetensors", 4 * (3_162_368 + vocab * 256))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def train_tokenizer(corpus: Path, vocab: int):
    """A tokenizer exactly as the pretrain stage trains one (byte-level BPE reserving chatml's tokens)."""
    from llmforge.chat import apply_template, resolve_template
    from llmforge_plugins.training.models import train_tokenizer as pretrain_tokenizer

    template = resolve_template("chatml", registry().chat_templates)
    docs = [d for d in corpus.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    tok = pretrain_tokenizer(docs, vocab, template)
    apply_template(tok, template)
    return tok


def _gguf_folder(folder: Path, vocab: int, final: Path) -> None:
    """The gguf stage's files and scorecard in `folder`, their paths written as `final` (where they end up)."""
    params = 3_162_368 + vocab * 256
    # Sizes as llama.cpp makes them for this shape: bits per weight 32, 8.5 and (Q6_K embeddings) 5.6.
    files = [
        ("model-f32.gguf", "F32", 4 * params + 41_216, 3.5124, 2.1e-7, 1.0),
        ("model-Q8_0.gguf", "Q8_0", int(1.0625 * params) + 41_216, 3.5161, 3.9e-4, 0.9963),
        ("model-Q4_K_M.gguf", "Q4_K_M", int(0.7 * params) + 41_216, 3.6017, 0.0213, 0.9512),
    ]
    rows = []
    for name, qtype, size, ppl, kld, top1 in files:
        _sparse(folder / name, size)
        (folder / name).with_suffix(".Modelfile").write_text(f"FROM ./{name}\n")
        rows.append(
            {
                "file": str(final / name),
                "type": qtype,
                "bytes": size,
                "bpw": size * 8 / params,
                "ppl": ppl,
                "delta_ppl": round(ppl - 3.5124, 4),
                "mean_kld": kld,
                "top1": top1,
                "tokenization_ok": True,
            }
        )
    card = {
        "model": "@merge",
        "parameters": params,
        "tokens": 412,
        "windows": 4,
        "window": 128,
        "hf_ppl": 3.5124,
        "reference": None,
        "reference_ppl": None,
        "probe_tokens": 57,
        "rows": rows,
    }
    report = {"card": card, "thresholds": {"max_kld": 0.1, "min_top1": 0.85}, "failures": []}
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------
# the runs: made by the real runner, then their volatile parts pinned


class StandInOptions(StageOptions):
    act_as: str = Field(
        description="The demo stage this one stands in for: curate, pretrain, sft, dpo, merge, gguf or eval."
    )
    inputs: dict[str, Annotated[str, Input(must_exist=False)]] = Field(
        default_factory=dict, description="What the real stage reads: paths or @stage references."
    )


class StandInStage(Stage):
    """What each of the demo's stages reports and makes, in a moment: its log lines, its metrics (the curves
    above, through ctx.metric and ctx.progress, checkpoints as the training loop reports them) and its
    artifacts (model folders of sparse files, the pretrain stage's real tokenizer, GGUF files and their
    scorecard). The runner around it is the real one: run folder, manifest, events.jsonl, stop, failure."""

    kind = "stand-in"
    summary = "Reports and makes what a demo stage would, at once (the TUI snapshots' runs)."
    Options = StandInOptions
    produces = ("model", "adapter", "gguf", "report", "dataset")

    def outputs(self, options):
        return PRODUCES[options.act_as]

    def run(self, options, ctx) -> None:
        getattr(self, "_" + options.act_as)(ctx)

    # -- one method per demo stage -------------------------------------------------------------------
    def _curate(self, ctx) -> None:
        if SCENARIO["fail_curate"]:
            ctx.log("reading data/corpus.txt")
            raise DataError("data/corpus.txt: empty file (no rows)")
        ctx.log("curate: kept 3197 of 3197 rows (normalize: 0 rewritten)")
        ctx.info.update(rows_in=3197, rows_out=3197)
        with ctx.artifact("dataset") as out:
            (out / "corpus.txt").write_text("\n")

    def _train(self, ctx, steps: int, curve, log_every: int = 10, stop_at: int | None = None) -> dict | None:
        ctx.log(f"tokenized: {steps * 24} sequences, truncated 0 (0.0%) at max_length 128")
        ctx.log(f"training: {steps} steps, precision fp32")
        last: dict = {}
        for step in range(log_every, steps + 1, log_every):
            ctx.progress(step, steps, unit="step", eta_s=round((steps - step) * STEP_S, 1))
            last = curve(step)
            ctx.metric(step=step, **last, epoch=round(step / steps * 3, 3))
            checkpoint = ctx.stage_dir / "checkpoints" / f"checkpoint-{step}"
            if step == stop_at:
                request(ctx.run_dir, STOP_REQUEST)  # what `s` in the Monitor does
            if ctx.should_stop():
                ctx.log(f"stop requested: saving a checkpoint at step {step}")
                ctx.emit("checkpoint", step=step, path=str(checkpoint))
                ctx.info["steps"] = step
                return None
            if step % 200 == 0:
                ctx.emit("checkpoint", step=step, path=str(checkpoint))
        ctx.info.update(final_loss=last["loss"], eval_loss=None, steps=steps, chat_template=TEMPLATE)
        return last

    def _pretrain(self, ctx) -> None:
        stopped = SCENARIO["stop_pretrain"]
        curve = (lambda s: _pretrain_curve(s, scale=85, jitter=0.06)) if stopped else _pretrain_curve
        tokenizer = train_tokenizer(ctx.project_dir / "data" / "corpus.txt", SCENARIO["vocab"])
        ctx.log(f"trained a byte-level BPE tokenizer: {len(tokenizer)} tokens")
        if self._train(ctx, 500, curve, stop_at=240 if stopped else None) is None:
            return
        ctx.info["parameters"] = 3_162_368 + SCENARIO["vocab"] * 256
        with ctx.artifact("model") as out:
            _model_dir(out, SCENARIO["vocab"], tokenizer)

    def _sft(self, ctx) -> None:
        self._train(ctx, 200, _sft_curve)
        with ctx.artifact("adapter") as out:
            (out / "adapter_config.json").write_text(
                json.dumps(
                    {
                        "peft_type": "LORA",
                        "r": 16,
                        "lora_alpha": 32,
                        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                        "base_model_name_or_path": str(Path("runs") / ctx.run_id / "stages/pretrain/artifacts/model"),
                    },
                    indent=2,
                )
                + "\n"
            )
            _sparse(out / "adapter_model.safetensors", 458_752 + 1_024)
        with ctx.artifact("model") as out:
            _model_dir(out, SCENARIO["vocab"])

    def _dpo(self, ctx) -> None:
        last = self._train(ctx, 40, _dpo_curve, log_every=2)
        ctx.info.update(reward_margin_first=0.19, reward_margin_last=last["rewards/margins"])
        with ctx.artifact("model") as out:
            _model_dir(out, SCENARIO["vocab"])

    def _merge(self, ctx) -> None:
        ctx.log("slerp of 2 models, t = 0.5: 39 tensors")
        ctx.info.update(method="slerp", tensors=39)
        with ctx.artifact("model") as out:
            _model_dir(out, SCENARIO["vocab"])

    def _gguf(self, ctx) -> None:
        for i, message in enumerate(
            (
                "exporting runs/.../merge/artifacts/model to model-f32.gguf",
                "quantizing model-f32.gguf to Q8_0",
                "quantizing model-f32.gguf to Q4_K_M",
                "checking 3 file(s) against the merged model",
            )
        ):
            ctx.log(message)
            ctx.progress(i + 1, 4, unit="step")
        with ctx.artifact("gguf") as out:
            _gguf_folder(out, SCENARIO["vocab"], Path("runs") / ctx.run_id / "stages/gguf/artifacts/gguf")

    def _eval(self, ctx) -> None:
        for message in (
            "accuracy on 12 held-out questions: pretrained 0%, SFT 58%, DPO 67%, merged 67%",
            "direct answers: SFT 42%, DPO 92%",
            "llama.cpp (model-f32.gguf) answers as transformers does: 12 of 12",
        ):
            ctx.log(message)
        ctx.info["accuracy"] = {"sft": 0.58, "dpo": 0.67, "merged": 0.67}
        with ctx.artifact("report") as out:
            (out / "report.json").write_text("{}\n")


PRODUCES = {
    "curate": ("dataset",),
    "pretrain": ("model",),
    "sft": ("adapter", "model"),
    "dpo": ("model",),
    "merge": ("model",),
    "gguf": ("gguf",),
    "eval": ("report",),
}
TEMPLATE = {"name": "chatml", "hash": "4be0ac5d21f3", "eos": "<|im_end|>"}
STEP_S = 0.3  # the pinned clock's seconds per training step
# How the stand-ins behave in the run being made (the runs are made one after another, in this process).
SCENARIO = {"fail_curate": False, "stop_pretrain": False, "vocab": 400}


class StandInPlugin:
    @hookimpl
    def register_stages(self, register):
        register(StandInStage)


def registry():
    """The built-in plugins (as with LLMFORGE_LOAD_PLUGINS="") and the stand-in stage."""
    from llmforge.plugins import load_registry

    return load_registry(env="", extra=[("tui-snapshot-stand-in", StandInPlugin())])


def _pin_run(root: Path, run_id: str, created: float) -> None:
    """Make a run made now look the same on every machine and at every moment: its times on a clock that
    starts at `created` and advances by what happened (STEP_S a training step, a moment for anything else),
    the project folder out of its paths (the pictures show them relative, as when opened in the project),
    the pid fixed. Everything else is as the runner wrote it."""
    run_dir = root / "runs" / run_id
    prefix = str(root) + "/"
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    clock, done = created, {}
    times = {}
    for event in events:
        kind, stage = event["type"], event.get("stage")
        if kind == "progress" and event.get("unit") == "step":
            clock += STEP_S * max(0, event.get("done", 0) - done.get(stage, 0)) if stage != "gguf" else 2.5
            done[stage] = event.get("done", 0)
        elif kind != "metric":  # a metric comes with its progress event
            clock += 0.05
        event["time"] = round(clock, 3)
        if kind in ("stage_start", "stage_end"):
            times[(stage, kind)] = event["time"]
    for event in events:
        if event["type"] == "stage_end" and "duration" in event:
            event["duration"] = round(times[(event["stage"], "stage_end")] - times[(event["stage"], "stage_start")], 3)
    text = "".join(json.dumps(e) + "\n" for e in events).replace(prefix, "")
    (run_dir / "events.jsonl").write_text(text, encoding="utf-8")

    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest.update(created=created, finished=events[-1]["time"], pid=4242)
    for name, st in manifest.get("stages", {}).items():
        if (name, "stage_start") in times:
            st["started"] = times[(name, "stage_start")]
        if (name, "stage_end") in times:
            st["ended"] = times[(name, "stage_end")]
            st["duration"] = round(st["ended"] - st["started"], 3)
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2).replace(prefix, "") + "\n", encoding="utf-8")


def write_runs(root: Path, vocab: int = 400) -> None:
    """The three runs of the project at `root`, made by the real runner with the stand-in stages: failed at
    once, stopped at step 240 (a stop request, as the Monitor's `s` makes), done. Then pinned (_pin_run)."""
    import os

    from llmforge.pipeline import load_pipeline
    from llmforge.runner import RunRequest, run_pipeline

    reg = registry()
    pipe = load_pipeline(root / "forge.toml", registry=reg)
    assert pipe.names == list(STAGES), "the runs are of the demo's seven stages"
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for run_id, created, scenario in (
            (FAILED, T0, dict(fail_curate=True, stop_pretrain=False)),
            (STOPPED, calendar.timegm((2026, 1, 5, 10, 22, 10)), dict(fail_curate=False, stop_pretrain=True)),
            (DONE, calendar.timegm((2026, 1, 5, 10, 45, 30)), dict(fail_curate=False, stop_pretrain=False)),
        ):
            SCENARIO.update(scenario, vocab=vocab)
            run_pipeline(pipe, RunRequest(run_ref=run_id, force=True), registry=reg)
            _pin_run(root, run_id, created)
    finally:
        os.chdir(cwd)
        SCENARIO.update(fail_curate=False, stop_pretrain=False)


def build(root: Path) -> None:
    """The snapshot project at `root`: forge.toml, data, runs."""
    write_shell_project(root)
    write_runs(root)


def pin_live_values(setattr) -> None:
    """Fix what differs between machines and moments; `setattr` is pytest's monkeypatch.setattr (undone
    after the test) or the builtin. Dates and log stamps are local time: set TZ=UTC (and time.tzset())
    too."""
    from llmforge.tui import hardware

    setattr(hardware.HardwareMonitor, "sample", lambda self: hardware.Usage(**FIXED_USAGE))


# ------------------------------------------------------------------------------------------------
# driving each area to the state its picture shows (also used by docs/gen_tui_screenshots.py)


def _text(widget) -> str:
    return str(widget.content)


async def _settle(pilot) -> None:
    """Let the last updates paint: the screenshot is taken right after."""
    await pilot.pause(0.3)
    await pilot.pause()


async def ready_project(pilot) -> None:
    from textual.widgets import DataTable

    from llmforge.tui.widgets.text import styled

    s = pilot.app.screen
    await until(
        pilot,
        lambda: s.view is not None and s.run_info is not None and s.run_info.id == DONE,
        what="the pipeline and the latest run",
    )
    await until(pilot, lambda: "RAM" in _text(s.query_one("#proj-hw-text")), what="the hardware panel")
    await until(
        pilot, lambda: all(s._cells.get((n, "status")) == styled("done") for n in STAGES), what="every stage done"
    )
    table = s.query_one(DataTable)
    # The screen updates the status and time cells without `update_width`, so those columns keep the width
    # of whatever they held when the table first measured its rows ("pending" or "done", "-" or "2m33s"):
    # it depends on whether the pipeline or the latest run was read first. Set the same values again with
    # `update_width`, as the screen should (reported); once it does, this changes nothing.
    for name in STAGES:
        for col in ("status", "time"):
            table.update_cell(name, col, table.get_cell(name, col), update_width=True)
    await until(
        pilot,
        lambda: (
            table.ordered_columns[0].content_width >= len("pretrain")
            and table.ordered_columns[3].content_width >= len("2m33s")
        ),
        what="the table to measure its cells",
    )
    await _settle(pilot)


async def ready_monitor(pilot) -> None:
    s = pilot.app.screen
    await until(
        pilot,
        lambda: (
            s.model is not None
            and s.model.run_id == STOPPED
            and s.model.status == "stopped"
            and "exit 130" in s._texts.get("mon-title", "")
            and s.query_one("#chart-loss").plotted
            # the title can have the exit code from the manifest before the run_end event's log line is drawn
            and any("exit code 130" in line for line in s.query_one("#mon-log").lines)
        ),
        what="the stopped run with its charts and its last log line",
    )
    await _settle(pilot)


async def ready_runs(pilot) -> None:
    from llmforge.tui.screens.runs import LossChart

    s = pilot.app.screen
    await until(pilot, lambda: s.loaded and len(s.rows) == 3, what="the runs")
    await pilot.press("space", "down", "space")  # mark the done and the stopped run: their curves overlaid
    await until(
        pilot, lambda: s.query_one(LossChart).chart_title == f"loss: {DONE} vs {STOPPED}", what="the compared curves"
    )
    await _settle(pilot)


async def ready_data(pilot, data: str = "data/sft.jsonl") -> None:
    from textual.widgets import DataTable, Input

    s = pilot.app.screen
    s.query_one("#data-path", Input).value = data
    s.query_one("#model-path", Input).value = f"runs/{DONE}/stages/pretrain/artifacts/model"
    await pilot.press("ctrl+l")
    await until(
        pilot, lambda: s.result is not None and s.query_one("#row-text").content, timeout=120, what="the data to load"
    )
    s.query_one("#rows", DataTable).focus()  # browsing the rows; no blinking cursor in an input
    await _settle(pilot)


async def ready_models(pilot) -> None:
    from textual.widgets import DataTable, Input

    s = pilot.app.screen
    await until(pilot, lambda: len(s.entries) == 8, what="the models")
    table = s.query_one(DataTable)
    table.focus()
    table.move_cursor(row=[e.name for e in s.entries].index("model-Q4_K_M.gguf"))
    await pilot.press("c")  # chosen for the chat (the model loads only when a message is sent)
    field = s.query_one("#chat-input", Input)
    await until(
        pilot, lambda: field.has_focus and "model-Q4_K_M.gguf" in _text(s.query_one("#chat-title")), what="the chat"
    )
    field.cursor_blink = False  # after the focus, which restarts the blinking: a steady cursor
    await _settle(pilot)


async def ready_plugins(pilot) -> None:
    s = pilot.app.screen
    await until(pilot, lambda: s.loaded, what="the plugins")
    await _settle(pilot)


async def ready_config(pilot) -> None:
    s = pilot.app.screen
    await until(
        pilot,
        lambda: s.form is not None and "valid" in _text(s.query_one("#problems")),
        what="the form of the first stage",
    )
    await _settle(pilot)


READY = {
    "project": ready_project,
    "monitor": ready_monitor,
    "runs": ready_runs,
    "data": ready_data,
    "models": ready_models,
    "plugins": ready_plugins,
    "config": ready_config,
}


def make_app(area: str):
    """The app on one area of the project in the current folder, the stopped run selected for the monitor."""
    from llmforge.tui.app import LlmforgeApp
    from llmforge.tui.state import AppState

    state = AppState(
        config_path=Path("forge.toml"),
        runs_dir=Path("runs"),
        selected_run=STOPPED if area == "monitor" else None,
        plugin_registry=registry(),
    )
    return LlmforgeApp(state, area=area)


# ------------------------------------------------------------------------------------------------
# the tests


@pytest.fixture(scope="module")
def snapshot_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("tui-snap") / "demo"
    build(root)
    return root


@pytest.fixture
def pinned(snapshot_project, monkeypatch):
    monkeypatch.chdir(snapshot_project)
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    pin_live_values(monkeypatch.setattr)
    yield snapshot_project
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("area", list(READY))
def test_area_snapshot(area, pinned, snap_compare):
    app = make_app(area)
    assert snap_compare(app, terminal_size=SIZE, run_before=READY[area])
    assert not app.unexpected_errors, app.unexpected_errors
    assert not app.shown_errors, app.shown_errors


def test_fixed_runs_read_as_the_runner_writes_them(pinned):
    """The runs the runner made say what the pictures claim: statuses, exit codes, a checkpoint, the models."""
    from llmforge.runs import RunStore
    from llmforge.tui.screens.models import collect_models

    runs = {r.id: r for r in RunStore(Path("runs")).list()}
    assert [(runs[i].status, runs[i].manifest["exit_code"]) for i in (FAILED, STOPPED, DONE)] == [
        ("failed", 2),
        ("stopped", 130),
        ("done", 0),
    ]  # a data error is bad input: exit code 2
    assert {runs[DONE].stage_status(n) for n in STAGES} == {"done"}
    events = [json.loads(line) for line in (runs[STOPPED].dir / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [200, 240]
    assert sorted(e.name for e in collect_models(Path("runs"))) == sorted(
        [
            "pretrain/model",
            "sft/adapter",
            "sft/model",
            "dpo/model",
            "merge/model",
            "model-f32.gguf",
            "model-Q8_0.gguf",
            "model-Q4_K_M.gguf",
        ]
    )
