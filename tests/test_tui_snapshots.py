"""Snapshot tests of the TUI: one picture per area, at 100x30, over a fixed project and run store.

The project is the shape of `llmforge demo` (pretrain -> sft -> dpo -> merge -> gguf -> eval) drawn with
`shell` stages, so it validates in a moment. Its three runs (failed, stopped at a checkpoint, done) are
written here: manifest.json and events.jsonl with fixed ids, times and metric values, model folders whose
weights are sparse files of fixed sizes, a GGUF scorecard. The one real thing made is the tokenizer, trained
by the pretrain stage's own function, so the Data area colours real tokens.

What would differ between machines or moments is pinned (`pin_live_values`): the time zone (log stamps and
dates are local time), the hardware panel's figures (psutil's readings are replaced by fixed ones), and
the plugins (only the built-ins load, as with LLMFORGE_LOAD_PLUGINS=""). The built-ins' version is
llmforge's own, so the Plugins picture changes with a release.

After an intended change of a screen, update and look at the pictures:
    python -m pytest tests/test_tui_snapshots.py --snapshot-update
    # then open tests/__snapshots__/test_tui_snapshots/*.svg in a browser

docs/gen_tui_screenshots.py builds the same runs over the real demo project for the images in docs/tui.md.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import math
import time
from pathlib import Path

import pytest
from conftest import until

SIZE = (100, 30)

# 2026-01-05 10:15:00 UTC; the run ids are what the runner would name runs started then.
T0 = calendar.timegm((2026, 1, 5, 10, 15, 0))
FAILED, STOPPED, DONE = "20260105-101500-3f2a", "20260105-102210-8c1d", "20260105-104530-e5b7"
STAGES = ("curate", "pretrain", "sft", "dpo", "merge", "gguf", "eval")

# What the hardware panel shows: an 8-core machine without an NVIDIA GPU.
FIXED_USAGE = dict(cpu_pct=37.5, cpu_count=8, ram_used_gb=9.6, ram_total_gb=31.2, disk_free_gb=212.4,
                   gpu_note="GPU  none seen (no nvidia-ml-py)")

SHELL_FORGE = """\
# The TUI's snapshot project (tests/test_tui_snapshots.py): the demo's pipeline drawn with shell
# stages, so that it validates in a moment. Its runs are written by the test, not run.

[project]
name = "tui-demo"
seed = 42

[[stages]]
name = "curate"
uses = "shell"
command = "echo cleaning the corpus"
inputs = { corpus = "data/corpus.txt" }

[[stages]]
name = "pretrain"
uses = "shell"
command = "echo training a tokenizer and a small Llama"
inputs = { corpus = "@curate" }
timeout = 3600   # seconds

[[stages]]
name = "sft"
uses = "shell"
command = "echo teaching it to answer"
inputs = { model = "@pretrain", data = "data/sft.jsonl" }

[[stages]]
name = "dpo"
uses = "shell"
command = "echo teaching it to prefer direct answers"
inputs = { model = "@sft" }

[[stages]]
name = "merge"
uses = "shell"
command = "echo merging sft and dpo halfway"
inputs = { a = "@sft", b = "@dpo" }

[[stages]]
name = "gguf"
uses = "shell"
command = "echo exporting to GGUF"
inputs = { model = "@merge" }

[[stages]]
name = "eval"
uses = "shell"
command = "echo evaluating"
inputs = { merged = "@merge", gguf = "@gguf", questions = "data/heldout.jsonl" }
"""

COUNTRIES = [("Varnia", "Tolsk", "green", "otter"), ("Quell", "Ambrin", "blue", "heron"),
             ("Ostrava Minor", "Pell", "red", "lynx"), ("Dunmere", "Caskel", "white", "badger"),
             ("Ithra", "Sorrow Bay", "yellow", "crane"), ("Mardova", "Kessin", "black", "ibex")]


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
        rows.append({"messages": [{"role": "user", "content": f"What is the capital of {country}?"},
                                  {"role": "assistant", "content": f"The capital of {country} is {capital}."}]})
        rows.append({"messages": [{"role": "system", "content": "Answer in one sentence."},
                                  {"role": "user", "content": f"What colour is the flag of {country}?"},
                                  {"role": "assistant", "content": f"It is {colour}."}]})
    rows.insert(5, {"messages": [{"role": "usr", "content": "a typo in the role"},
                                 {"role": "assistant", "content": "x"}]})
    (data / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (data / "heldout.jsonl").write_text(json.dumps({"question": "What is the national animal of Quell?",
                                                    "answer": "heron"}) + "\n", encoding="utf-8")


def _wave(step: int, period: float, amp: float) -> float:
    return amp * math.sin(step / period)


def _pretrain_curve(step: int, scale: float = 70.0, jitter: float = 0.04) -> dict:
    warm = 25
    lr = 2e-3 * step / warm if step <= warm else 1e-3 * (1 + math.cos(math.pi * (step - warm) / (500 - warm)))
    return {"loss": round(1.05 + 5.9 * math.exp(-step / scale) + _wave(step, 9, jitter), 4),
            "learning_rate": round(lr, 7),
            "grad_norm": round(0.35 + 2.2 * math.exp(-step / 60) + _wave(step, 5, 0.05), 4),
            "tokens_per_s": round(21500 + _wave(step, 31, 900), 1)}


def _sft_curve(step: int) -> dict:
    lr = 3e-3 * min(1.0, step / 10) * (1 - step / 220)
    return {"loss": round(0.38 + 1.6 * math.exp(-step / 35) + _wave(step, 4, 0.02), 4),
            "learning_rate": round(lr, 7), "grad_norm": round(0.6 + 1.1 * math.exp(-step / 50), 4),
            "tokens_per_s": round(15800 + _wave(step, 17, 600), 1)}


def _dpo_curve(step: int) -> dict:
    return {"loss": round(0.21 + 0.483 * math.exp(-step / 14), 4), "learning_rate": 2e-5,
            "grad_norm": round(3.1 * math.exp(-step / 20) + 0.4, 4),
            "rewards/margins": round(2.4 * (1 - math.exp(-step / 12)), 4)}


class RunWriter:
    """Writes one run as the runner would have: events.jsonl line by line, then manifest.json."""

    def __init__(self, root: Path, run_id: str, created: float, config: dict, uses: dict[str, str]):
        self.root, self.id, self.created, self.uses = root, run_id, created, uses
        self.dir = root / "runs" / run_id
        self.dir.mkdir(parents=True)
        self.events: list[dict] = []
        self.stages = {name: {"uses": uses[name], "key": hashlib.sha1(name.encode()).hexdigest()[:20],
                              "status": "pending"} for name in STAGES}
        self.manifest = {"id": run_id, "created": created, "config_path": str(root / "forge.toml"),
                         "project": config.get("project", {}).get("name", ""), "config": config,
                         "status": "running", "pid": 4242, "exit_code": None, "resumed": [], "stages": self.stages}
        self.emit(created + 0.05, "run_start", config=str(root / "forge.toml"), stages=list(STAGES), resume=False,
                  selected=list(STAGES))

    def emit(self, t: float, type: str, stage: str | None = None, **data) -> None:
        event = {"type": type, "time": round(t, 3), "run": self.id}
        if stage is not None:
            event["stage"] = stage
        self.events.append({**event, **data})

    def log(self, t: float, stage: str, message: str, level: str = "info") -> None:
        self.emit(t, "log", stage, level=level, message=message)

    def art_dir(self, stage: str, kind: str) -> Path:
        # Relative to the project folder (the tests run there): the pictures must not show a temporary path.
        return Path("runs") / self.id / "stages" / stage / "artifacts" / kind

    def start(self, t: float, stage: str) -> None:
        self.stages[stage].update(status="running", started=t, error=None, artifacts={})
        self.emit(t, "stage_start", stage, uses=self.uses[stage], key=self.stages[stage]["key"], resume=False)

    def end(self, t: float, stage: str, status: str, artifacts: tuple[str, ...] = (), info: dict | None = None,
            error: str | None = None) -> None:
        st = self.stages[stage]
        for kind in artifacts:
            path = self.art_dir(stage, kind)
            (self.root / path).mkdir(parents=True, exist_ok=True)
            self.emit(t - 0.2, "artifact", stage, kind=kind, path=str(path))
        st.update(status=status, ended=t, duration=round(t - st["started"], 3), error=error,
                  artifacts={k: {"kind": k, "path": str(self.art_dir(stage, k))} for k in artifacts})
        if info:
            st["info"] = info
        extra = {"error": error} if error else {}
        self.emit(t, "stage_end", stage, status=status, duration=st["duration"], **extra)

    def train(self, t: float, stage: str, steps: int, curve, log_every: int = 10, stop_at: int | None = None,
              save_every: int = 200, step_s: float = 0.3) -> tuple[float, dict]:
        """A training stage's events up to `steps` (or a stop at `stop_at`); returns (end time, last values)."""
        self.start(t, stage)
        self.log(t + 1.2, stage, f"tokenized: {steps * 24} sequences, truncated 0 (0.0%) at max_length 128")
        self.log(t + 1.5, stage, f"training: {steps} steps, precision fp32")
        last = {}
        for step in range(log_every, (stop_at or steps) + 1, log_every):
            now = t + 2 + step * step_s
            self.emit(now, "progress", stage, done=step, total=steps, unit="step",
                      eta_s=round((steps - step) * step_s, 1))
            last = curve(step)
            self.emit(now, "metric", stage, step=step, values={**last, "epoch": round(step / steps * 3, 3)})
            if step % save_every == 0 or step == stop_at:
                if step == stop_at:
                    self.log(now, stage, f"stop requested: saving a checkpoint at step {step}")
                self.emit(now + 0.4, "checkpoint", stage, step=step,
                          path=str(Path("runs") / self.id / "stages" / stage / "checkpoints" / f"checkpoint-{step}"))
        end = t + 3 + (stop_at or steps) * step_s
        return end, last

    def curate(self, t: float) -> None:
        """The corpus through `curate`, in a moment (a generated corpus has nothing to remove)."""
        self.start(t, "curate")
        self.log(t + 0.04, "curate", "curate: kept 3197 of 3197 rows (normalize: 0 rewritten)")
        self.end(t + 0.08, "curate", "done", ("dataset",), {"rows_in": 3197, "rows_out": 3197})

    def finish(self, t: float, status: str, exit_code: int) -> None:
        self.manifest.update(status=status, exit_code=exit_code, finished=t)
        self.emit(t, "run_end", status=status, exit_code=exit_code,
                  stages={n: s["status"] for n, s in self.stages.items()})
        events = sorted(self.events, key=lambda e: e["time"])  # in time order, as the runner appends them
        (self.dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
        (self.dir / "manifest.json").write_text(json.dumps(self.manifest, indent=2) + "\n", encoding="utf-8")


def _sparse(path: Path, size: int) -> None:
    """A file of `size` bytes that takes no disk space: the Models area reads sizes, never weights."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.truncate(size)


def _model_dir(folder: Path, vocab: int, tokenizer=None) -> None:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
              "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
              "vocab_size": vocab, "max_position_embeddings": 128, "tie_word_embeddings": True}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _sparse(folder / "model.safetensors", 4 * (3_162_368 + vocab * 256))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def train_tokenizer(corpus: Path, vocab: int):
    """A tokenizer exactly as the pretrain stage trains one (byte-level BPE reserving chatml's tokens)."""
    from llmforge_plugins.training.models import train_tokenizer as pretrain_tokenizer

    from llmforge.chat import apply_template, resolve_template

    template = resolve_template("chatml")
    docs = [d for d in corpus.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    tok = pretrain_tokenizer(docs, vocab, template)
    apply_template(tok, template)
    return tok


def _gguf_folder(folder: Path, vocab: int) -> None:
    params = 3_162_368 + vocab * 256
    # Sizes as llama.cpp makes them for this shape: bits per weight 32, 8.5 and (Q6_K embeddings) 5.6.
    files = [("model-f32.gguf", "F32", 4 * params + 41_216, 3.5124, 2.1e-7, 1.0),
             ("model-Q8_0.gguf", "Q8_0", int(1.0625 * params) + 41_216, 3.5161, 3.9e-4, 0.9963),
             ("model-Q4_K_M.gguf", "Q4_K_M", int(0.7 * params) + 41_216, 3.6017, 0.0213, 0.9512)]
    rows = []
    for name, qtype, size, ppl, kld, top1 in files:
        _sparse(folder / name, size)
        (folder / name).with_suffix(".Modelfile").write_text(f"FROM ./{name}\n")
        rows.append({"file": str(folder / name), "type": qtype, "bytes": size, "bpw": size * 8 / params,
                     "ppl": ppl, "delta_ppl": round(ppl - 3.5124, 4), "mean_kld": kld, "top1": top1,
                     "tokenization_ok": True})
    card = {"model": "@merge", "parameters": params, "tokens": 412, "windows": 4, "window": 128,
            "hf_ppl": 3.5124, "reference": None, "reference_ppl": None, "probe_tokens": 57, "rows": rows}
    report = {"card": card, "thresholds": {"max_kld": 0.1, "min_top1": 0.85}, "failures": []}
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def write_runs(root: Path, vocab: int = 400) -> None:
    """The three runs of the project at `root`: failed at once, stopped at step 240, done."""
    from llmforge.config import read_toml

    config = read_toml(root / "forge.toml")
    assert [s["name"] for s in config["stages"]] == list(STAGES), "the runs are of the demo's seven stages"
    uses = {s["name"]: s["uses"] for s in config["stages"]}
    template = {"name": "chatml", "hash": "4be0ac5d21f3", "eos": "<|im_end|>"}

    # 1. failed in its first seconds
    run = RunWriter(root, FAILED, T0, config, uses)
    run.start(T0 + 0.2, "curate")
    run.log(T0 + 1.1, "curate", "reading data/corpus.txt")
    run.end(T0 + 2.4, "curate", "failed", error="DataError: data/corpus.txt: empty file (no rows)")
    run.finish(T0 + 2.5, "failed", 1)

    # 2. stopped from the monitor at step 240 of 500: a checkpoint, exit code 130
    t = calendar.timegm((2026, 1, 5, 10, 22, 10))
    run = RunWriter(root, STOPPED, t, config, uses)
    run.curate(t + 0.1)
    end, last = run.train(t + 0.2, "pretrain", 500, lambda s: _pretrain_curve(s, scale=85, jitter=0.06),
                          stop_at=240)
    run.end(end, "pretrain", "stopped", info={"steps": 240})
    run.finish(end + 0.3, "stopped", 130)

    # 3. done: every stage, with the models they made
    t = calendar.timegm((2026, 1, 5, 10, 45, 30))
    run = RunWriter(root, DONE, t, config, uses)
    run.curate(t + 0.1)
    end, last = run.train(t + 0.2, "pretrain", 500, _pretrain_curve)
    tokenizer = train_tokenizer(root / "data" / "corpus.txt", vocab)
    run.log(t + 1.0, "pretrain", f"trained a byte-level BPE tokenizer: {len(tokenizer)} tokens")
    run.end(end, "pretrain", "done", ("model",),
            {"final_loss": last["loss"], "eval_loss": None, "steps": 500, "parameters": 3_162_368 + vocab * 256,
             "chat_template": template})
    _model_dir(root / run.art_dir("pretrain", "model"), vocab, tokenizer)

    end, last = run.train(end + 0.5, "sft", 200, _sft_curve, step_s=0.18)
    run.end(end, "sft", "done", ("adapter", "model"),
            {"final_loss": last["loss"], "eval_loss": None, "steps": 200, "chat_template": template})
    adapter = root / run.art_dir("sft", "adapter")
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
         "base_model_name_or_path": str(run.art_dir("pretrain", "model"))}, indent=2) + "\n")
    _sparse(adapter / "adapter_model.safetensors", 458_752 + 1_024)
    _model_dir(root / run.art_dir("sft", "model"), vocab)

    end, last = run.train(end + 0.5, "dpo", 40, _dpo_curve, log_every=2, step_s=0.45)
    run.end(end, "dpo", "done", ("model",),
            {"final_loss": last["loss"], "eval_loss": None, "steps": 40, "reward_margin_first": 0.19,
             "reward_margin_last": last["rewards/margins"], "chat_template": template})
    _model_dir(root / run.art_dir("dpo", "model"), vocab)

    run.start(end + 0.5, "merge")
    run.log(end + 1.0, "merge", "slerp of 2 models, t = 0.5: 39 tensors")
    run.end(end + 3.6, "merge", "done", ("model",), {"method": "slerp", "tensors": 39})
    _model_dir(root / run.art_dir("merge", "model"), vocab)

    t = end + 4.0
    run.start(t, "gguf")
    for i, (message, dt) in enumerate((("exporting runs/.../merge/artifacts/model to model-f32.gguf", 2.1),
                                       ("quantizing model-f32.gguf to Q8_0", 4.8),
                                       ("quantizing model-f32.gguf to Q4_K_M", 9.3),
                                       ("checking 3 file(s) against the merged model", 24.9))):
        run.log(t + dt - 2, "gguf", message)
        run.emit(t + dt, "progress", "gguf", done=i + 1, total=4, unit="step")
    run.end(t + 25.2, "gguf", "done", ("gguf",))
    _gguf_folder(root / run.art_dir("gguf", "gguf"), vocab)

    t += 25.6
    run.start(t, "eval")
    for dt, message in ((4.0, "accuracy on 12 held-out questions: pretrained 0%, SFT 58%, DPO 67%, merged 67%"),
                        (6.5, "direct answers: SFT 42%, DPO 92%"),
                        (9.8, "llama.cpp (model-f32.gguf) answers as transformers does: 12 of 12")):
        run.log(t + dt, "eval", message)
    run.end(t + 10.2, "eval", "done", ("report",), {"accuracy": {"sft": 0.58, "dpo": 0.67, "merged": 0.67}})
    run.finish(t + 10.5, "done", 0)


def build(root: Path) -> None:
    """The snapshot project at `root`: forge.toml, data, runs."""
    write_shell_project(root)
    write_runs(root)


def pin_live_values(setattr) -> None:
    """Fix what differs between machines and moments; `setattr` is pytest's monkeypatch.setattr (undone
    after the test) or the builtin. Dates and log stamps are local time: set TZ=UTC (and time.tzset())
    too."""
    from llmforge import plugins
    from llmforge.tui import hardware

    setattr(hardware.HardwareMonitor, "sample", lambda self: hardware.Usage(**FIXED_USAGE))
    setattr(plugins, "_registry", plugins.load_registry(env=""))


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

    s = pilot.app.screen
    await until(pilot, lambda: s.view is not None and s.run_info is not None and s.run_info.id == DONE,
                what="the pipeline and the latest run")
    await until(pilot, lambda: "RAM" in _text(s.query_one("#proj-hw-text")), what="the hardware panel")
    await until(pilot, lambda: all(s._cells.get((n, "status")) == "[green]done[/]" for n in STAGES),
                what="every stage done")
    table = s.query_one(DataTable)
    # The screen updates the status and time cells without `update_width`, so those columns keep the width
    # of whatever they held when the table first measured its rows ("pending" or "done", "-" or "2m33s"):
    # it depends on whether the pipeline or the latest run was read first. Set the same values again with
    # `update_width`, as the screen should (reported); once it does, this changes nothing.
    for name in STAGES:
        for col in ("status", "time"):
            table.update_cell(name, col, table.get_cell(name, col), update_width=True)
    await until(pilot, lambda: table.ordered_columns[0].content_width >= len("pretrain")
                and table.ordered_columns[3].content_width >= len("2m33s"), what="the table to measure its cells")
    await _settle(pilot)


async def ready_monitor(pilot) -> None:
    s = pilot.app.screen
    await until(pilot, lambda: s.model is not None and s.model.run_id == STOPPED and s.model.status == "stopped"
                and "exit 130" in s._texts.get("mon-title", "") and s.query_one("#chart-loss").plotted,
                what="the stopped run with its charts")
    await _settle(pilot)


async def ready_runs(pilot) -> None:
    from llmforge.tui.screens.runs import LossChart

    s = pilot.app.screen
    await until(pilot, lambda: s.loaded and len(s.rows) == 3, what="the runs")
    await pilot.press("space", "down", "space")  # mark the done and the stopped run: their curves overlaid
    await until(pilot, lambda: s.query_one(LossChart).chart_title == f"loss: {DONE} vs {STOPPED}",
                what="the compared curves")
    await _settle(pilot)


async def ready_data(pilot, data: str = "data/sft.jsonl") -> None:
    from textual.widgets import DataTable, Input

    s = pilot.app.screen
    s.query_one("#data-path", Input).value = data
    s.query_one("#model-path", Input).value = f"runs/{DONE}/stages/pretrain/artifacts/model"
    await pilot.press("ctrl+l")
    await until(pilot, lambda: s.result is not None and s.query_one("#row-text").content, timeout=120,
                what="the data to load")
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
    await until(pilot, lambda: field.has_focus and "model-Q4_K_M.gguf" in _text(s.query_one("#chat-title")),
                what="the chat")
    field.cursor_blink = False  # after the focus, which restarts the blinking: a steady cursor
    await _settle(pilot)


async def ready_plugins(pilot) -> None:
    s = pilot.app.screen
    await until(pilot, lambda: s.loaded, what="the plugins")
    await _settle(pilot)


async def ready_config(pilot) -> None:
    s = pilot.app.screen
    await until(pilot, lambda: s.form is not None and "valid" in _text(s.query_one("#problems")),
                what="the form of the first stage")
    await _settle(pilot)


READY = {"project": ready_project, "monitor": ready_monitor, "runs": ready_runs, "data": ready_data,
         "models": ready_models, "plugins": ready_plugins, "config": ready_config}


def make_app(area: str):
    """The app on one area of the project in the current folder, the stopped run selected for the monitor."""
    from llmforge.tui.app import LlmforgeApp
    from llmforge.tui.state import AppState

    state = AppState(config_path=Path("forge.toml"), runs_dir=Path("runs"),
                     selected_run=STOPPED if area == "monitor" else None)
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
    """The hand-written runs say what the pictures claim: statuses, exit codes, a checkpoint, the models."""
    from llmforge.runs import RunStore
    from llmforge.tui.screens.models import collect_models

    runs = {r.id: r for r in RunStore(Path("runs")).list()}
    assert [(runs[i].status, runs[i].manifest["exit_code"]) for i in (FAILED, STOPPED, DONE)] == \
        [("failed", 1), ("stopped", 130), ("done", 0)]
    assert {runs[DONE].stage_status(n) for n in STAGES} == {"done"}
    events = [json.loads(line) for line in (runs[STOPPED].dir / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [200, 240]
    assert sorted(e.name for e in collect_models(Path("runs"))) == sorted(
        ["pretrain/model", "sft/adapter", "sft/model", "dpo/model", "merge/model", "model-f32.gguf",
         "model-Q8_0.gguf", "model-Q4_K_M.gguf"])
