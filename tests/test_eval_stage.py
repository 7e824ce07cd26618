"""The `eval` stage, its report, gates and select, and `llmforge eval`, with real tiny models.

One module-scoped project runs merge -> gguf (F32 + Q8_0) -> eval once: one leaderboard across the HF models
and each GGUF file through llama.cpp, a gate that passes, and select publishing the best model that a later
stage evaluates again through `@pick`. Later runs of the same project reuse merge and gguf from the cache, so
each further test pays only for its own evaluation. The report's gates and select are also tested as the
pure functions they are.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from llmforge.errors import DataError, UsageError
from llmforge.testing import ForgeProject
from llmforge_plugins.eval.report import (
    evaluate_gates,
    leaderboard_markdown,
    read_report,
    select_best,
    write_report,
)

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


# ------------------------------------------------------------------------------------------------
# gates and select: pure functions of a report


def _fig(value, stderr=0.1, n=10, hib=True):
    return {"value": value, "stderr": stderr, "n": n, "higher_is_better": hib}


def _report() -> dict:
    models = ["sft", "merge", "gguf:F32", "gguf:Q4_K_M"]
    acc = {"sft": 0.60, "merge": 0.64, "gguf:F32": 0.64, "gguf:Q4_K_M": 0.55}
    ppl = {"sft": 12.0, "merge": 11.0, "gguf:F32": 11.0, "gguf:Q4_K_M": 13.5}
    return {
        "models": [
            {
                "label": m,
                "path": f"/m/{m}",
                "engine": "gguf" if m.startswith("gguf") else "hf",
                "source": "@" + m.split(":")[0],
                "quant": m.split(":")[1] if ":" in m else None,
            }
            for m in models
        ],
        "tasks": [
            {"name": "qa", "kind": "multiple_choice", "primary": "acc", "spec": {}},
            {"name": "wiki", "kind": "perplexity", "primary": "perplexity", "spec": {}},
        ],
        "results": [
            r
            for m in models
            for r in (
                {"model": m, "task": "qa", "metrics": {"acc": _fig(acc[m]), "acc_norm": _fig(acc[m] - 0.1)}},
                {"model": m, "task": "wiki", "metrics": {"perplexity": _fig(ppl[m], None, 200, hib=False)}},
            )
        ],
        "gates": [],
        "selected": None,
    }


def test_a_min_gate_checks_every_model_or_the_one_named():
    report = _report()
    records = evaluate_gates(report, [{"metric": "qa.acc", "min": 0.58}])
    assert [(g["model"], g["passed"]) for g in records] == [
        ("sft", True),
        ("merge", True),
        ("gguf:F32", True),
        ("gguf:Q4_K_M", False),
    ]
    assert records[3]["message"] == "qa.acc of gguf:Q4_K_M = 0.550 < min 0.580"
    assert records[3]["value"] == 0.55 and records[3]["min"] == 0.58
    # one model by label; a task alone means its primary metric; max for perplexity
    (only,) = evaluate_gates(report, [{"metric": "qa", "model": "merge", "min": 0.7}])
    assert only["metric"] == "qa.acc" and not only["passed"]
    ppl = evaluate_gates(report, [{"metric": "wiki.perplexity", "model": "@gguf", "max": 12.0}])
    assert [(g["model"], g["passed"]) for g in ppl] == [("gguf:F32", True), ("gguf:Q4_K_M", False)]


def test_a_vs_gate_follows_the_metric_direction():
    report = _report()
    acc = evaluate_gates(report, [{"metric": "qa.acc", "vs": "@merge", "max_drop": 0.02}])
    assert {g["model"]: g["passed"] for g in acc} == {"sft": False, "gguf:F32": True, "gguf:Q4_K_M": False}
    q4 = next(g for g in acc if g["model"] == "gguf:Q4_K_M")
    assert q4["reference"] == 0.64 and q4["value"] == 0.55
    assert q4["message"] == "qa.acc of gguf:Q4_K_M = 0.550, 0.090 below merge's 0.640 (max_drop 0.020)"
    # perplexity: higher is worse, so a rise is the drop
    ppl = evaluate_gates(report, [{"metric": "wiki.perplexity", "vs": "merge", "max_drop": 1.5, "model": "@gguf"}])
    assert {g["model"]: g["passed"] for g in ppl} == {"gguf:F32": True, "gguf:Q4_K_M": False}
    assert "2.500 above merge's 11.000" in ppl[1]["message"]
    with pytest.raises(UsageError, match="vs '@gguf' must name one evaluated model"):
        evaluate_gates(report, [{"metric": "qa.acc", "vs": "@gguf", "max_drop": 0.0}])
    with pytest.raises(UsageError, match="no task 'qb'"):
        evaluate_gates(report, [{"metric": "qb.acc", "min": 0}])


def test_select_takes_the_best_by_the_metric_direction():
    report = _report()
    assert select_best(report, "qa.acc")["model"] == "merge"  # a tie with gguf:F32: the first listed wins
    assert select_best(report, "wiki.perplexity", ["@gguf"])["model"] == "gguf:F32"
    best = select_best(report, "qa.acc", ["sft", "gguf:Q4_K_M"])
    assert best == {"model": "sft", "metric": "qa.acc", "value": 0.6, "path": "/m/sft"}
    with pytest.raises(UsageError, match="'dpo' is not one of the evaluated models"):
        select_best(report, "qa.acc", ["dpo"])


def test_the_report_round_trips_and_its_markdown_is_the_leaderboard(tmp_path):
    report = _report()
    report["results"][0]["metrics"]["acc"]["value"] = math.nan  # a task with no items: null, strict JSON
    report["gates"] = evaluate_gates(report, [{"metric": "qa.acc", "min": 0.58}])
    write_report(tmp_path, report)
    back = read_report(tmp_path)
    assert back["version"] == 1 and back["results"][0]["metrics"]["acc"]["value"] is None
    json.loads((tmp_path / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    md = (tmp_path / "report.md").read_text()
    assert md == leaderboard_markdown(back)
    assert "| merge | 0.640 ± 0.100 (10) | 0.540 ± 0.100 (10) | 11.000 (200) |" in md
    assert "FAIL: qa.acc of gguf:Q4_K_M = 0.550 < min 0.580" in md
    with pytest.raises(DataError, match="no eval report here"):
        read_report(tmp_path / "nowhere")
    (tmp_path / "report.json").write_text('{"version": 9, "results": []}')
    with pytest.raises(DataError, match="version 9"):
        read_report(tmp_path / "report.json")


# ------------------------------------------------------------------------------------------------
# the stage, with real models


def _perturbed_copy(src: Path, dst: Path, seed: int) -> Path:
    """Another tiny model: the same architecture and tokenizer, weights moved by seeded noise."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    file = dst / "model.safetensors"
    tensors = load_file(file)
    gen = torch.Generator().manual_seed(seed)
    save_file(
        {k: v + 0.5 * v.std() * torch.randn(v.shape, generator=gen) if v.dim() > 1 else v for k, v in tensors.items()},
        file,
        metadata={"format": "pt"},
    )
    return dst


PIPELINE = """
[project]
name = "eval-test"

[[stages]]
name = "merge"
uses = "merge"
method = "linear"
models = [{{ model = "{tiny}", parameters = {{ weight = 0.5 }} }},
          {{ model = "{other}", parameters = {{ weight = 0.5 }} }}]

[[stages]]
name = "gguf"
uses = "gguf"
model = "@merge"
outtype = "f32"
quantize = ["Q8_0"]
check = false
"""

EVAL = """
[[stages]]
name = "eval"
uses = "eval"
models = ["{tiny}", "@merge", "@gguf"]
labels = {{ "{tiny_name}" = "tiny" }}
tasks = ["tasks/qa.toml", {{ name = "wiki", kind = "perplexity", data = "data/wiki.txt" }}]
{extra}
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory, llmforge_tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-models")
    tiny = shutil.copytree(llmforge_tiny_model_dir, root / "tiny")
    return {"tiny": tiny, "other": _perturbed_copy(tiny, root / "other", seed=1)}


@pytest.fixture(scope="module")
def project(tmp_path_factory, models) -> ForgeProject:
    proj = ForgeProject(tmp_path_factory.mktemp("eval-project"))
    (proj.root / "tasks").mkdir()
    shutil.copy(FIXTURES / "tasks" / "qa.toml", proj.root / "tasks" / "qa.toml")
    shutil.copytree(FIXTURES, proj.root / "data", ignore=shutil.ignore_patterns("tasks", "lmeval"))
    # qa.toml reads ../qa.jsonl: beside tasks/ in this project
    shutil.copy(FIXTURES / "qa.jsonl", proj.root / "qa.jsonl")
    return proj


def _config(project: ForgeProject, models: dict[str, Path], extra: str = "", name: str = "forge.toml") -> Path:
    body = PIPELINE.format(tiny=models["tiny"], other=models["other"])
    body += EVAL.format(tiny=models["tiny"], tiny_name=models["tiny"].name, extra=extra)
    return project.write(body, name)


@pytest.fixture(scope="module")
def first_run(project, models):
    _config(
        project,
        models,
        extra="""
gate = [{ metric = "qa.acc", min = 0.0 },
        { metric = "wiki.perplexity", vs = "@merge", max_drop = 1.0, model = "gguf:F32" }]
select = { metric = "wiki.perplexity", among = ["tiny", "@merge"] }

[[stages]]
name = "again"
uses = "eval"
models = ["@eval"]
tasks = ["tasks/qa.toml"]
""",
    )
    run = project.run()
    assert run.exit_code == 0, run.failure()
    return run


def test_one_leaderboard_across_hf_models_and_each_gguf_quant(first_run):
    folder = first_run.artifact("eval", "report")
    report = read_report(folder)
    labels = [m["label"] for m in report["models"]]
    assert labels == ["tiny", "merge", "gguf:F32", "gguf:Q8_0"]
    assert [(m["engine"], m["source"], m["quant"]) for m in report["models"]] == [
        ("hf", None, None),
        ("hf", "@merge", None),
        ("gguf", "@gguf", "F32"),
        ("gguf", "@gguf", "Q8_0"),
    ]
    assert [t["name"] for t in report["tasks"]] == ["qa", "wiki"]
    assert len(report["results"]) == 8
    fig = {(r["model"], r["task"]): r["metrics"] for r in report["results"]}
    for label in labels:
        assert fig[(label, "qa")]["acc"]["n"] == 6 and fig[(label, "qa")]["acc"]["stderr"] is not None
        assert fig[(label, "wiki")]["perplexity"]["higher_is_better"] is False
        items = folder / next(r["items"] for r in report["results"] if r["model"] == label and r["task"] == "qa")
        assert len(items.read_text().splitlines()) == 6
    # The F32 file is the merged model: llama.cpp gives the same figures as transformers.
    assert fig[("gguf:F32", "qa")]["acc"]["value"] == fig[("merge", "qa")]["acc"]["value"]
    hf, f32 = fig[("merge", "wiki")]["perplexity"]["value"], fig[("gguf:F32", "wiki")]["perplexity"]["value"]
    assert f32 == pytest.approx(hf, rel=1e-3)
    # and the models differ: the leaderboard tells them apart
    assert fig[("tiny", "wiki")]["perplexity"]["value"] != pytest.approx(hf, rel=1e-3)
    md = (folder / "report.md").read_text()
    assert "| gguf:Q8_0 |" in md and " ± " in md and "## Gates: 5 passed, 0 failed" in md
    info = first_run.stages["eval"]["info"]
    assert info["gates"] == {"passed": 5, "failed": 0}
    assert set(info["leaderboard"]) == set(labels)
    assert any(m.startswith("leaderboard:") for m in first_run.messages("eval"))


def test_select_publishes_the_best_model_for_later_stages(first_run):
    report = read_report(first_run.artifact("eval", "report"))
    ppl = {r["model"]: r["metrics"]["perplexity"]["value"] for r in report["results"] if r["task"] == "wiki"}
    best = min(["tiny", "merge"], key=lambda m: ppl[m])
    assert report["selected"]["model"] == best and report["selected"]["kind"] == "model"
    assert first_run.stages["eval"]["info"]["selected"] == best
    published = first_run.artifact("eval", "model")
    assert (published / "config.json").is_file() and (published / "model.safetensors").is_file()
    # the later stage evaluated exactly that model, through @eval
    again = read_report(first_run.artifact("again", "report"))
    assert again["models"][0]["source"] == "@eval" and again["models"][0]["path"] == str(published)
    qa = {r["model"]: r["metrics"]["acc"]["value"] for r in report["results"] if r["task"] == "qa"}
    assert again["results"][0]["metrics"]["acc"]["value"] == qa[best]


def _invoke(args: list[str], cwd: Path) -> tuple[int, str, str]:
    """`llmforge ARGS` as its entry point runs it, in this process (torch and the libraries stay imported):
    (exit code, stdout, stderr)."""
    import contextlib
    import io
    import os

    from llmforge.cli import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    old = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(old)
    return code, out.getvalue(), err.getvalue()


def test_a_failing_gate_fails_the_run_with_exit_1_naming_gate_model_and_numbers(project, models):
    proj = ForgeProject(project.root / "gate")
    proj.write(f"""
[[stages]]
name = "eval"
uses = "eval"
models = ["{models["tiny"]}"]
labels = {{ tiny = "base" }}
tasks = [{{ name = "qa", kind = "multiple_choice", data = "{FIXTURES / "qa.jsonl"}" }}]
gate = [{{ metric = "qa.acc", min = 0.0 }}, {{ metric = "qa.acc", min = 1.01, model = "base" }}]
""")
    code, out, err = _invoke(["run"], proj.root)
    assert code == 1, out + err
    assert "1 eval gate failed: qa.acc of base = " in out + err and "< min 1.010" in out + err, out + err
    assert "Traceback" not in out + err
    # the report is kept beside the failed stage, not published
    (run_dir,) = proj.runs_dir.iterdir()
    kept = read_report(run_dir / "stages" / "eval" / "report")
    assert [(g["model"], g["passed"]) for g in kept["gates"]] == [("base", True), ("base", False)]
    assert not (run_dir / "stages" / "eval" / "artifacts" / "report").exists()


def test_a_resumed_eval_does_not_redo_finished_pairs(project, models):
    proj = ForgeProject(project.root / "resume")
    proj.write(f"""
[[stages]]
name = "eval"
uses = "eval"
models = ["{models["tiny"]}", "{models["other"]}"]
tasks = [{{ name = "qa", kind = "multiple_choice", data = "{FIXTURES / "qa.jsonl"}" }},
         {{ name = "wiki", kind = "perplexity", data = "{FIXTURES / "wiki.txt"}" }}]
""")
    pairs: list[dict] = []

    def after_two_pairs(event: dict) -> bool:
        if event.get("type") == "progress" and event.get("unit") == "task":
            pairs.append(event)
        return len(pairs) == 2

    stopped = proj.run(stop_when=after_two_pairs)
    assert stopped.exit_code == 130, stopped.failure()
    assert [(e["model"], e["task"]) for e in pairs] == [("tiny", "qa"), ("tiny", "wiki")]
    resumed = proj.run(resume=True)
    assert resumed.exit_code == 0, resumed.failure()
    # the run's events hold both attempts: this one's begin at its stage_start
    last = max(i for i, e in enumerate(resumed.events) if e["type"] == "stage_start")
    messages = [e["message"] for e in resumed.events[last:] if e["type"] == "log" and e.get("stage") == "eval"]
    assert "reused 2 finished model × task results from an earlier attempt" in messages
    # the first model's pairs were done: it is not even opened again
    assert [m.split(" (")[0] for m in messages if m.startswith("opening ")] == ["opening other"]
    report = read_report(resumed.artifact("eval", "report"))
    assert [(r["model"], r["task"]) for r in report["results"]] == [
        ("tiny", "qa"),
        ("tiny", "wiki"),
        ("other", "qa"),
        ("other", "wiki"),
    ]


def test_bad_eval_options_are_named_by_key_path(project, models):
    proj = ForgeProject(project.root / "bad")
    shutil.copytree(project.root / "tasks", proj.root / "tasks")
    shutil.copy(FIXTURES / "tasks" / "bad.toml", proj.root / "tasks" / "bad.toml")
    shutil.copy(FIXTURES / "qa.jsonl", proj.root / "qa.jsonl")
    head = (
        PIPELINE.format(tiny=models["tiny"], other=models["other"])
        + f"""
[[stages]]
name = "eval"
uses = "eval"
models = ["{models["tiny"]}", "@merge", "@gguf"]
"""
    )
    proj.write(head + 'tasks = ["tasks/qa.toml"]\ngate = { metric = "qa.acc", max_drop = 0.1 }\n')
    assert "max_drop compares with another model" in proj.problems()["stages[2].gate[0]"]
    proj.write(
        head
        + """
labels = { "@sft" = "x" }
tasks = ["tasks/qa.toml", "tasks/bad.toml", { name = "inline", kind = "multiple_choise", data = "qa.jsonl" }]
gate = { metric = "qa.acc", vs = "@dpo", max_drop = 0.1 }
select = { metric = "qa.acc", among = ["merge", "gguf:Q8_0", "nobody"] }
"""
    )
    problems = proj.problems()
    assert "tasks/bad.toml: choises: " in problems["stages[2].tasks[1]"]
    assert "tasks/bad.toml: num_fewshot: " in problems["stages[2].tasks[1]"]
    assert "unknown task kind 'multiple_choise'" in problems["stages[2].tasks[2].kind"]
    assert "'@dpo' is not one of the evaluated models" in problems["stages[2].gate[0].vs"]
    assert "is a GGUF file, but select publishes" in problems["stages[2].select.among[1]"]
    assert "'nobody' is not one of the evaluated models" in problems["stages[2].select.among[2]"]
    assert "'@sft' names none of the models" in problems["stages[2].labels.@sft"]
    proj.write(head + 'tasks = ["tasks/qa.toml"]\ngate = { metric = "qb.acc", min = 0.1 }\n')
    assert proj.problems() == {"stages[2].gate[0].metric": "'qb.acc' names no task of this stage (tasks: qa)"}


# ------------------------------------------------------------------------------------------------
# llmforge eval


def test_llmforge_eval_prints_the_leaderboard_and_json(models, tmp_path):
    args = [str(models["tiny"]), str(models["other"]), "--task", str(FIXTURES / "tasks" / "qa.toml")]
    args += ["--task", f"perplexity:{FIXTURES / 'wiki.txt'}", "--limit", "4"]
    code, out, err = _invoke(["eval", *args, "--json", "--out", str(tmp_path / "out")], tmp_path)
    assert code == 0, out + err
    report = json.loads(out)
    assert [m["label"] for m in report["models"]] == ["tiny", "other"]
    assert [t["name"] for t in report["tasks"]] == ["qa", "wiki"]
    assert {r["metrics"]["acc"]["n"] for r in report["results"] if r["task"] == "qa"} == {4}
    assert read_report(tmp_path / "out")["results"] == [
        {**r, "items": f"items/{r['model']}/{r['task']}.jsonl"} for r in report["results"]
    ]
    assert "tiny × qa done (1/4)" in err
    code, out, err = _invoke(["eval", *args], tmp_path)
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[1].split()[:3] == ["model", "qa.acc", "qa.acc_norm"]
    assert lines[2].startswith("tiny ") and " ± " in lines[2] and "(4)" in lines[2]
    code, out, err = _invoke(["eval", str(models["tiny"]), "--task", "multiple_choise:qa.jsonl"], tmp_path)
    assert code == 2 and "--task multiple_choise:qa.jsonl: expected a .toml task spec or KIND:DATAFILE" in err


def test_a_gguf_artifact_expands_per_file_and_select_can_publish_a_quant(first_run, tmp_path):
    from llmforge.stage import Artifact
    from llmforge_plugins.eval.stage import EvalOptions, EvalStage, _publish, expand_models

    folder = first_run.artifact("gguf", "gguf")
    art = Artifact(kind="gguf", path=folder, stage="gguf")
    entries = expand_models([str(folder)], {"models[0]": art}, {"@gguf": "q"})
    assert [(e.label, e.quant, e.engine, e.path.name) for e in entries] == [
        ("q:F32", "F32", "gguf", "model-f32.gguf"),
        ("q:Q8_0", "Q8_0", "gguf", "model-Q8_0.gguf"),
    ]
    # a plain folder of .gguf files is the same, labelled by the folder's name
    assert [e.label for e in expand_models([str(folder)], {}, {})] == ["gguf:F32", "gguf:Q8_0"]
    # candidates that are all GGUF files: the winner is published as a gguf artifact, its Modelfile along
    options = EvalOptions.model_validate(
        {"models": ["@gguf"], "tasks": ["qa.toml"], "select": {"metric": "qa.acc", "among": ["gguf:Q8_0"]}}
    )
    assert EvalStage().outputs(options) == ("report", "gguf")
    _publish(entries[1].path, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-Q8_0.Modelfile", "model-Q8_0.gguf"]
    assert (tmp_path / "model-Q8_0.gguf").read_bytes() == entries[1].path.read_bytes()


def test_a_metric_the_task_does_not_have_is_named_with_the_ones_it_has():
    report = _report()
    (first, *_) = evaluate_gates(report, [{"metric": "qa.accuracy", "min": 0.1}])
    assert not first["passed"]
    assert first["message"] == "qa.accuracy: no value for sft (qa has no metric 'accuracy'; its metrics: acc, acc_norm)"
    with pytest.raises(UsageError, match="qa has no metric 'accuracy'; its metrics: acc, acc_norm"):
        select_best(report, "qa.accuracy")
