"""Eval reports in the front ends: `llmforge runs compare A B` and the TUI's Models screen (the leaderboard).

The runs are made by the real runner from a forge.toml: a `trained` stage (defined here, registered in-process
as tests/test_tui_screens.py does) records a final loss as the training stages do, and a `scored` stage writes a
`report` artifact in the eval report layout (docs/eval.md: models, tasks, results with value, stderr and n,
gates, the selected model) with the numbers its options give, so that every figure compared is known. The
command runs as a user runs it, in a subprocess; the TUI under Textual's `run_test()`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import pytest
from pydantic import Field

from conftest import run_cli, until
from llmforge import hookimpl
from llmforge.stage import Input, Stage, StageOptions

# ------------------------------------------------------------------------------------------------
# the runs


class TrainedOptions(StageOptions):
    final_loss: float = Field(1.0)


class TrainedStage(Stage):
    """Records a final loss and publishes a model folder, as a training stage does."""

    kind = "trained"
    summary = "a final loss and a model folder, for the eval UI tests"
    Options = TrainedOptions
    produces = ("model",)

    def run(self, o: TrainedOptions, ctx) -> None:
        ctx.info.update(final_loss=o.final_loss, eval_loss=o.final_loss + 0.25)
        with ctx.artifact("model") as out:
            (out / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["X"]}))


class ScoredOptions(StageOptions):
    sft: Annotated[str, Input("model")] = Field(description="@trained model: evaluated as `sft`")
    acc: list[float] = Field(description="qa.acc of sft and dpo")
    ppl: list[float] = Field(description="wiki.perplexity of sft and dpo")
    gate_min: float = Field(0.4)


def eval_report(sft_path: str, acc: list[float], ppl: list[float], gate_min: float) -> dict:
    """A report.json as the eval stage writes it (the shared layout of docs/eval.md)."""
    labels = ["sft", "dpo"]
    results = []
    for label, a, p in zip(labels, acc, ppl):
        results.append(
            {
                "model": label,
                "task": "qa",
                "metrics": {
                    "acc": {"value": a, "stderr": 0.05, "n": 100, "higher_is_better": True},
                    "acc_norm": {"value": a - 0.1, "stderr": 0.05, "n": 100, "higher_is_better": True},
                },
                "info": {},
            }
        )
        results.append(
            {
                "model": label,
                "task": "wiki",
                "metrics": {"perplexity": {"value": p, "stderr": None, "n": 2000, "higher_is_better": False}},
                "info": {},
            }
        )
    best = max(range(len(labels)), key=lambda i: acc[i])
    return {
        "version": 1,
        "models": [
            {"label": "sft", "path": sft_path, "engine": "hf", "source": "@sft", "quant": None},
            {"label": "dpo", "path": "/nowhere/dpo", "engine": "hf", "source": None, "quant": None},
        ],
        "tasks": [
            {"name": "qa", "kind": "multiple_choice", "primary": "acc", "spec": {}},
            {"name": "wiki", "kind": "perplexity", "primary": "perplexity", "spec": {}},
        ],
        "results": results,
        "gates": [
            {
                "metric": "qa.acc",
                "model": label,
                "min": gate_min,
                "max_drop": None,
                "vs": None,
                "value": a,
                "reference": None,
                "passed": a >= gate_min,
                "message": f"qa.acc of {label} {a:.3f} {'>=' if a >= gate_min else '<'} min {gate_min}",
            }
            for label, a in zip(labels, acc)
        ],
        "selected": {"model": labels[best], "metric": "qa.acc", "value": acc[best], "path": sft_path},
    }


class ScoredStage(Stage):
    kind = "scored"
    summary = "an eval report with given numbers, for the eval UI tests"
    Options = ScoredOptions
    produces = ("report",)

    def run(self, o: ScoredOptions, ctx) -> None:
        report = eval_report(o.sft, o.acc, o.ppl, o.gate_min)
        with ctx.artifact("report") as out:
            (out / "report.json").write_text(json.dumps(report, indent=2))
            (out / "report.md").write_text("| model | qa.acc |\n")


class EvalUiPlugin:
    @hookimpl
    def register_stages(self, register):
        register(TrainedStage)
        register(ScoredStage)


def make_run(root: Path, loss: float, acc: list[float], ppl: list[float], eval_stage: str = "eval"):
    from llmforge.pipeline import load_pipeline
    from llmforge.plugins import load_registry
    from llmforge.runner import RunRequest, run_pipeline

    (root / "forge.toml").write_text(f"""
[project]
name = "eval-ui"

[[stages]]
name = "sft"
uses = "trained"
final_loss = {loss}

[[stages]]
name = "{eval_stage}"
uses = "scored"
sft = "@sft"
acc = {acc}
ppl = {ppl}
""")
    registry = load_registry(env="", extra=[("eval-ui-test", EvalUiPlugin())])
    result = run_pipeline(load_pipeline(root / "forge.toml", registry=registry), RunRequest(), registry=registry)
    assert result.exit_code == 0, result.stages
    return result


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-ui")
    a = make_run(root, 1.5, [0.5, 0.6], [12.0, 11.0])
    b = make_run(root, 1.25, [0.625, 0.3], [10.0, 11.5], eval_stage="bench")  # another name: still matched
    return root, a, b


# ------------------------------------------------------------------------------------------------
# runs compare


def test_runs_compare_json_pairs_every_metric_with_its_delta(two_runs):
    root, a, b = two_runs
    res = run_cli("runs", "compare", a.run_id, b.run_id, "--json", "--runs-dir", str(root / "runs"))
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["a"]["id"] == a.run_id and data["b"]["id"] == b.run_id
    assert [r["stage"] for r in data["a"]["reports"]] == ["eval"]
    assert [r["stage"] for r in data["b"]["reports"]] == ["bench"]
    rows = {(e["model"], e["name"]): e for e in data["evals"]}
    assert set(rows) == {(m, n) for m in ("sft", "dpo") for n in ("qa.acc", "qa.acc_norm", "wiki.perplexity")}
    acc = rows[("sft", "qa.acc")]
    assert acc["stage"] == "eval / bench" and acc["primary"] is True
    assert acc["a"] == {"value": 0.5, "stderr": 0.05, "n": 100} and acc["b"]["value"] == 0.625
    assert acc["delta"] == pytest.approx(0.125) and acc["better"] is True
    assert rows[("dpo", "qa.acc")]["delta"] == pytest.approx(-0.3) and rows[("dpo", "qa.acc")]["better"] is False
    assert rows[("sft", "qa.acc_norm")]["primary"] is False
    # perplexity: lower is better, so a fall is an improvement
    ppl = rows[("sft", "wiki.perplexity")]
    assert ppl["delta"] == pytest.approx(-2.0) and ppl["better"] is True and ppl["higher_is_better"] is False
    assert rows[("dpo", "wiki.perplexity")]["better"] is False
    # the stages: status, duration, final losses of both
    stages = {s["name"]: s for s in data["stages"]}
    assert stages["sft"]["a"]["final_loss"] == 1.5 and stages["sft"]["b"]["final_loss"] == 1.25
    assert stages["sft"]["b"]["eval_loss"] == 1.5 and stages["sft"]["a"]["status"] == "done"
    assert stages["eval"]["b"] is None and stages["bench"]["a"] is None
    assert isinstance(stages["sft"]["a"]["duration"], float)
    # gates and selections of both runs
    gates = {(g["run"], g["model"]): g["passed"] for g in data["gates"]}
    assert gates == {("a", "sft"): True, ("a", "dpo"): True, ("b", "sft"): True, ("b", "dpo"): False}
    assert data["selected"]["a"][0]["model"] == "dpo" and data["selected"]["b"][0]["model"] == "sft"


def test_runs_compare_prints_the_leaderboards_side_by_side(two_runs):
    root, a, b = two_runs
    res = run_cli("runs", "compare", a.run_id, str(Path(b.run_dir)), "--runs-dir", str(root / "runs"))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == f"A = {a.run_id} (done), B = {b.run_id} (done)"
    sft = next(line for line in lines if line.startswith("sft ") and "1.5000" in line)
    assert "1.5000 (eval 1.7500)" in sft and "1.2500 (eval 1.5000)" in sft
    row = next(line for line in lines if line.split()[:2] == ["sft", "qa.acc"])
    assert "0.500 ± 0.050 (100)" in row and "0.625 ± 0.050 (100)" in row and "+0.125 better" in row
    row = next(line for line in lines if line.split()[:2] == ["sft", "wiki.perplexity"])
    assert "12.000 (2000)" in row and "10.000 (2000)" in row and "-2.000 better" in row
    row = next(line for line in lines if line.split()[:2] == ["dpo", "qa.acc"])
    assert "-0.300 worse" in row
    assert f"gate qa.acc on dpo in {b.run_id}: FAILED. qa.acc of dpo 0.300 < min 0.4" in res.stdout
    assert f"selected in {a.run_id}: dpo (qa.acc 0.600)" in res.stdout


def test_runs_compare_unknown_run_is_a_usage_error(two_runs):
    root, a, _ = two_runs
    res = run_cli("runs", "compare", a.run_id, "nope", "--runs-dir", str(root / "runs"))
    assert res.returncode == 2
    assert "no run 'nope'" in res.stderr and "Traceback" not in res.stderr


def test_runs_compare_without_eval_reports(tmp_path):
    from llmforge.pipeline import load_pipeline
    from llmforge.plugins import load_registry
    from llmforge.runner import RunRequest, run_pipeline

    (tmp_path / "forge.toml").write_text('[[stages]]\nname = "hi"\nuses = "shell"\ncommand = "echo hi"\n')
    registry = load_registry(env="")
    ids = []
    for _ in range(2):
        r = run_pipeline(load_pipeline(tmp_path / "forge.toml", registry=registry), RunRequest(), registry=registry)
        ids.append(r.run_id)
    res = run_cli("runs", "compare", *ids, "--runs-dir", str(tmp_path / "runs"))
    assert res.returncode == 0, res.stderr
    assert "no eval reports in either run" in res.stdout and "hi" in res.stdout


# ------------------------------------------------------------------------------------------------
# the TUI's Models screen


def plain(renderable, width: int = 200) -> str:
    import io

    from rich.console import Console

    console = Console(width=width, file=io.StringIO(), color_system=None, markup=False, highlight=False)
    console.print(renderable)
    return console.file.getvalue()


def test_models_screen_shows_the_leaderboard_that_scored_the_model(two_runs):
    from llmforge.tui.app import LlmforgeApp
    from llmforge.tui.state import AppState

    root, a, b = two_runs
    app = LlmforgeApp(AppState(config_path=None, runs_dir=root / "runs"), area="models")

    def line(text: str, start: str) -> str:
        return next(x for x in text.splitlines() if x.strip().startswith(start))

    async def scenario():
        from llmforge.tui.screens.models import ModelsScreen

        async with app.run_test(size=(160, 50)) as pilot:
            await until(pilot, lambda: isinstance(app.screen, ModelsScreen), what="the Models screen")
            screen = app.screen
            await until(pilot, lambda: len(screen.entries) == 2 and len(screen.boards) == 2, what="models and boards")
            assert [e.run for e in screen.entries] == [b.run_id, a.run_id]  # newest run first
            detail = screen.query_one("#models-detail-text")

            # B's SFT model: B's report scored it (by path); it is also B's selected model
            text = plain(detail.content)
            assert f"leaderboard of bench (run {b.run_id})" in text
            assert "qa.acc ↑ n=100" in text and "wiki.perplexity ↓ n=2000" in text
            row = line(text, "★ ▶ sft")
            assert "0.625 ± 0.050" in row and "10.000" in row
            assert "0.300 ± 0.050" in line(text, "dpo") and "11.500" in line(text, "dpo")
            assert "✗ qa.acc of dpo 0.300 < min 0.4" in text and "✓ qa.acc of sft 0.625 >= min 0.4" in text
            assert "★ selected: sft (qa.acc 0.625)" in text

            # A's SFT model: A's report, where dpo was selected
            await pilot.press("down")
            await until(pilot, lambda: f"run {a.run_id})" in plain(detail.content), what="A's leaderboard")
            text = plain(detail.content)
            assert "0.500 ± 0.050" in line(text, "▶ sft") and "12.000" in line(text, "▶ sft")
            assert "0.600 ± 0.050" in line(text, "★ dpo")
            assert all(g in text for g in ("✓ qa.acc of sft 0.500 >= min 0.4", "✓ qa.acc of dpo 0.600 >= min 0.4"))

            # l: the next leaderboard (B's), whatever is highlighted; moving the highlight goes back to its own
            await pilot.press("l")
            await until(pilot, lambda: f"run {b.run_id})" in plain(detail.content), what="the next leaderboard")
            assert "▶" not in plain(detail.content).split("leaderboard of")[1]  # A's model is not in B's report
            await pilot.press("up", "down")
            await until(pilot, lambda: f"run {a.run_id})" in plain(detail.content), what="back to A's")
            assert app.is_running and not app.unexpected_errors

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------------------
# the GGUF scorecard's downstream deltas

FACTS = [f"Q: What is the capital of Land{i}?\nA: The capital of Land{i} is Town{i}." for i in range(1, 9)]


@pytest.fixture(scope="module")
def gguf_project(tmp_path_factory):
    """A small Llama (hidden 256: llama.cpp makes real K-quants of its rows) trained a little on question/answer
    lines, and a forge.toml whose gguf stage exports it (F32), quantizes it (Q4_K_M) and checks both with two
    eval tasks: multiple choice by log-likelihood and generation."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmforge.chat import resolve_template
    from llmforge.plugins import load_registry
    from llmforge_plugins.training.models import train_tokenizer

    root = tmp_path_factory.mktemp("gguf-downstream")
    tok = train_tokenizer(FACTS * 20, 300, resolve_template("chatml", load_registry(env="").chat_templates))
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    net = LlamaForCausalLM(cfg)
    ids = torch.tensor(tok("\n".join(FACTS * 3))["input_ids"])
    batch = torch.stack([ids[i : i + 48] for i in range(0, len(ids) - 48, 48)][:6])
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(15):
            net(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    net.eval()
    model = root / "model"
    net.save_pretrained(str(model))
    tok.save_pretrained(str(model))
    data = root / "data"
    data.mkdir()
    with open(data / "qa.jsonl", "w") as fh:
        for i in range(1, 9):
            choices = [f"Town{i}", f"Town{i % 8 + 1}", f"Town{(i + 3) % 8 + 1}"]
            fh.write(
                json.dumps({"question": f"What is the capital of Land{i}?", "choices": choices, "answer": 0}) + "\n"
            )
    with open(data / "cap.jsonl", "w") as fh:
        for i in range(1, 9):
            fh.write(json.dumps({"question": f"What is the capital of Land{i}?", "answer": f"Town{i}"}) + "\n")
    (root / "tasks").mkdir()
    (root / "tasks" / "qa.toml").write_text(
        'name = "qa"\nkind = "multiple_choice"\ndata = "../data/qa.jsonl"\n'
        'template = "Q: {question}\\nA: The capital of Land is"\n'
    )
    (root / "tasks" / "capitals.toml").write_text(
        'name = "capitals"\nkind = "generation"\ndata = "../data/cap.jsonl"\nmax_new_tokens = 8\n'
    )
    (root / "forge.toml").write_text(f"""
[[stages]]
name = "gguf"
uses = "gguf"
model = "{model}"
outtype = "f32"
quantize = ["Q4_K_M"]
max_kld = 10.0
min_top1 = 0.0
tasks = [
  "tasks/qa.toml",
  {{ name = "cap", kind = "generation", data = "data/cap.jsonl", scorer = "contains", max_new_tokens = 8 }},
]
""")
    return root, model


@pytest.mark.slow  # ~100 s on 2 shared cores: llama.cpp runs the logits check and both tasks on two files
def test_gguf_stage_scorecard_has_downstream_deltas_and_answer_similarity(gguf_project, monkeypatch):
    from llmforge.pipeline import load_pipeline
    from llmforge.plugins import load_registry
    from llmforge.runner import RunRequest, run_pipeline

    root, model = gguf_project
    monkeypatch.chdir(root)  # inline task specs' data paths are relative to forge.toml
    registry = load_registry(env="")
    result = run_pipeline(load_pipeline(root / "forge.toml", registry=registry), RunRequest(), registry=registry)
    assert result.exit_code == 0, result.stages
    folder = Path(result.stages["gguf"]["artifacts"]["gguf"]["path"])
    card = json.loads((folder / "report.json").read_text())["card"]
    down = card["downstream"]
    assert [(t["name"], t["kind"], t["primary"]) for t in down["tasks"]] == [
        ("qa", "multiple_choice", "acc"),
        ("cap", "generation", "contains"),
    ]
    assert down["hf"]["qa"]["acc"]["n"] == 8 and down["hf"]["cap"]["contains"]["n"] == 8
    rows = {r["type"]: r for r in down["rows"]}
    assert set(rows) == {"F32", "Q4_K_M"}
    f32, q4 = rows["F32"], rows["Q4_K_M"]
    # the F32 file is the model: same figures, the same answers
    for task, metric in (("qa", "acc"), ("qa", "acc_norm"), ("cap", "contains")):
        m = f32["results"][task][metric]
        assert m["value"] == down["hf"][task][metric]["value"] and m["delta"] == 0.0, (task, metric, m)
    assert set(f32["similarity"]) == {"cap"}  # only generated answers are compared
    sim = f32["similarity"]["cap"]
    assert sim["n"] == 8 and sim["identical"] == 1.0 and sim["cosine"] == pytest.approx(1.0, abs=1e-6)
    # Q4_K_M: measured, each delta is its value minus the HF model's
    for task, metric in (("qa", "acc"), ("cap", "contains")):
        m = q4["results"][task][metric]
        assert m["delta"] == pytest.approx(m["value"] - down["hf"][task][metric]["value"])
    assert -1.0 <= q4["similarity"]["cap"]["cosine"] <= 1.0 + 1e-6 and q4["similarity"]["cap"]["n"] == 8
    # the Markdown card and the manifest carry them too
    md = (folder / "report.md").read_text()
    assert "Downstream: the same tasks" in md and "| HF model |" in md
    line = next(x for x in md.splitlines() if x.startswith("| model-f32.gguf |") and "+0.000" in x)
    assert "1.0000 (100%)" in line
    info = result.stages["gguf"]["info"]["downstream"]
    assert info["model-f32.gguf"]["qa.acc"]["delta"] == 0.0 and info["model-f32.gguf"]["cap.similarity"] > 0.999
    print(
        "Q4_K_M:",
        {k: v for k, v in info["model-Q4_K_M.gguf"].items()},
        "HF:",
        {t: down["hf"][t] for t in ("qa", "cap")},
    )


def test_gguf_check_rejects_a_bad_task_before_loading_anything(tmp_path):
    res = run_cli("gguf", "check", str(tmp_path / "no-model"), str(tmp_path / "no.gguf"), "--task", "nonsense")
    assert res.returncode == 2 and "--task nonsense" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("gguf", "check", "m", "m.gguf", "--task", "generation:missing.jsonl", cwd=tmp_path)
    assert res.returncode == 2 and "missing.jsonl" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow  # torch and llama.cpp in a subprocess, the logits check, the task on both sides
def test_gguf_check_command_takes_tasks(gguf_project, tmp_path):
    root, model = gguf_project
    gguf = tmp_path / "m.gguf"
    from llmforge_plugins.gguf.export import export_gguf

    export_gguf(model, gguf, "f32")
    res = run_cli(
        "gguf",
        "check",
        str(model),
        str(gguf),
        "--task",
        "tasks/capitals.toml",
        "--limit",
        "3",
        "--json",
        cwd=root,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    down = json.loads(res.stdout)["downstream"]
    assert down["tasks"][0]["name"] == "capitals" and down["hf"]["capitals"]["exact_match"]["n"] == 3
    row = down["rows"][0]
    assert row["results"]["capitals"]["exact_match"]["delta"] == 0.0
    assert row["similarity"]["capitals"]["n"] == 3 and row["similarity"]["capitals"]["identical"] == 1.0


def test_runs_screen_compares_the_two_marked_runs(two_runs):
    from llmforge.tui.app import LlmforgeApp
    from llmforge.tui.state import AppState

    root, a, b = two_runs
    app = LlmforgeApp(AppState(config_path=None, runs_dir=root / "runs"), area="runs")

    async def scenario():
        from llmforge.tui.screens.runs import CompareScreen, RunsScreen

        async with app.run_test(size=(160, 50)) as pilot:
            await until(pilot, lambda: isinstance(app.screen, RunsScreen), what="the Runs screen")
            screen = app.screen
            await until(pilot, lambda: len(screen.rows) == 2, what="two runs")
            await pilot.press("v")  # nothing marked: says what to do
            await pilot.pause()
            assert not isinstance(app.screen, CompareScreen)
            await pilot.press("down", "space", "up", "space")  # A (the older run) first, then B
            assert screen.marked == [a.run_id, b.run_id]
            await pilot.press("v")
            await until(pilot, lambda: isinstance(app.screen, CompareScreen), what="the comparison")
            text = plain(app.screen.query_one("#compare-text").content)
            assert f"A = {a.run_id} (done), B = {b.run_id} (done)" in text
            row = next(x for x in text.splitlines() if x.split()[:2] == ["sft", "qa.acc"])
            assert "0.500 ± 0.050" in row and "0.625 ± 0.050" in row and "+0.125 better" in row
            row = next(x for x in text.splitlines() if x.split()[:2] == ["dpo", "wiki.perplexity"])
            assert "+0.500 worse" in row
            assert "✗ B: qa.acc of dpo 0.300 < min 0.4" in text and "★ A selected dpo (qa.acc)" in text
            await pilot.press("escape")
            await until(pilot, lambda: isinstance(app.screen, RunsScreen), what="back to the runs")
            assert app.is_running and not app.unexpected_errors

    asyncio.run(scenario())
