"""`llmforge demo`: the README's first command, run for real (in its quick setting) through the CLI.

The quick setting is the full pipeline on a smaller world and a shorter pretraining (about a minute
on 2 cores), big enough to show the learning effect's direction, which a test asserts: SFT answers
more held-out questions than the pretrained model by a clear margin, DPO raises the model's preference
for direct answers on held-out pairs, and so does the RLAIF step (DPO on pairs of the SFT model's own
answers, judged by the demo_world rule). The other tests check that the whole pipeline runs and reports
what it should (summary table, evaluation, report artifact, caching), and that the generated data keeps
its promises (deterministic by seed, held-out questions never in the SFT, DPO or RLAIF data). The full
setting's figures, per CPU type, are in docs/benchmarks.md ("Demo").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli

# The demo's quick run (~90 s) is shared by every test here: the default run stays under 15 minutes, and
# .ci/run's slow pass runs these.
pytestmark = pytest.mark.slow


def _status(root: Path) -> dict:
    res = run_cli("status", "--json", "--runs-dir", str(root / "runs"))
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One quick demo run, shared by the tests below."""
    cwd = tmp_path_factory.mktemp("demo")
    res = run_cli("demo", "--quick", "--dir", "proj", cwd=cwd, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return cwd / "proj", res


def test_demo_runs_every_stage_and_prints_summary_and_evaluation(demo):
    root, res = demo
    out = res.stdout
    # the summary table: its columns and one row per stage
    for col in ("stage", "status", "time", "final loss", "artifact"):
        assert col in out
    for stage in ("curate", "pretrain", "sft", "dpo", "rlaif_pairs", "rlaif_dpo", "merge", "gguf", "eval"):
        assert any(line.strip("│┃ ").startswith(stage) and "done" in line for line in out.splitlines()), stage
    assert "evaluation: accuracy pretrained" in out and "-> SFT" in out and "-> DPO" in out
    assert "evaluation: preferred answers SFT" in out and "RLAIF (pairs of its own answers" in out
    assert "merged (SFT and DPO, halfway)" in out
    assert f"llmforge run -c {root.resolve() / 'forge.toml'}" in out
    st = _status(root)
    assert st["status"] == "done"
    for name in ("pretrain", "sft", "dpo"):
        assert isinstance(st["stages"][name]["info"]["final_loss"], float), name
    # every final loss in the table is the one the manifest recorded
    for name in ("pretrain", "sft", "dpo"):
        assert f"{st['stages'][name]['info']['final_loss']:.4f}" in out


def _figures(st: dict) -> dict:
    """The demo's figures, read from the eval stage's report as `llmforge demo` reads them."""
    from llmforge_plugins.demo.tasks import demo_figures

    return demo_figures(Path(st["stages"]["eval"]["artifacts"]["report"]["path"]))


def test_report_artifact_has_the_numbers(demo):
    root, _ = demo
    st = _status(root)
    ev = st["stages"]["eval"]
    assert ev["uses"] == "eval"  # the eval stage, running the demo plugin's own task kinds
    report_dir = Path(ev["artifacts"]["report"]["path"])
    board = json.loads((report_dir / "report.json").read_text())
    labels = ["pretrained", "sft", "dpo", "rlaif", "merged", "gguf:F32", "gguf:Q4_K_M", "gguf:Q8_0"]
    assert [m["label"] for m in board["models"]] == labels
    assert [(t["name"], t["kind"]) for t in board["tasks"]] == [("qa", "demo_qa"), ("pairs", "demo_margin")]
    report = _figures(st)
    n_items = len((root / "data" / "heldout.jsonl").read_text().splitlines())
    assert report["items"] == n_items > 0
    assert set(report["results"]) == {"pretrained", "sft", "dpo", "rlaif", "merged"}
    for label, res in report["results"].items():
        for key in ("accuracy", "ended_turn", "preferred_rate", "preferred_and_correct", "pair_win_rate"):
            assert 0.0 <= res[key] <= 1.0, (label, key, res[key])
        assert res["preferred_and_correct"] <= min(res["accuracy"], res["preferred_rate"])
        assert isinstance(res["logp_margin"], float)
        assert set(res["accuracy_by_kind"]) == {"capital", "colour", "animal", "sum"}
    assert 0.0 <= report["dpo_reward_accuracy"] <= 1.0
    assert 0.0 <= report["knowledge_probe"]["accuracy"] <= 1.0
    # the key numbers are in the manifest too, for the summary and `llmforge status`
    for label, res in report["results"].items():
        assert ev["info"]["leaderboard"][label]["qa.accuracy"] == pytest.approx(res["accuracy"], abs=1e-4)
        assert ev["info"]["leaderboard"][label]["pairs.logp_margin"] == pytest.approx(res["logp_margin"], abs=1e-4)
    assert ev["info"]["selected"] in ("sft", "dpo", "merged")  # select published the best chat model
    assert (Path(ev["artifacts"]["model"]["path"]) / "config.json").exists()
    md = (report_dir / "report.md").read_text()
    assert "| model |" in md and "| pretrained |" in md and "| gguf:Q4_K_M |" in md
    for result in board["results"]:  # the answers, per model and task, for inspection
        if result["task"] != "qa":
            continue
        answers = [json.loads(x) for x in (report_dir / result["items"]).read_text().splitlines()]
        assert len(answers) == n_items and {"question", "answer", "target", "ended", "score"} <= set(answers[0])


def test_quick_demo_shows_the_learning_effect(demo):
    """The README's promise, in the quick setting: SFT makes held-out questions (facts only read in the
    pretraining corpus) answerable, by a clear margin over the pretrained model, and DPO raises the
    preference for direct answers over the SFT model. Seeded, in fp32 on every CPU (precision "auto" at this
    size).

    DPO's effect is asserted on what it optimises, measured on the held-out pairs: the log-probability of the
    direct answer over the hedging one rises for (nearly) every pair, and the mean margin clearly. The share of
    direct *generations* is asserted not to fall: on 16 greedy answers it moves in steps of 1/16 and measured
    0.44 -> 0.50 with 2 threads and 0.19 -> 0.56 with 1 thread on the same Intel machine, too coarse and
    thread-dependent for a margin (the full setting's figures are in docs/benchmarks.md)."""
    root, res = demo
    st = _status(root)
    report = _figures(st)
    r = report["results"]
    assert r["sft"]["accuracy"] >= r["pretrained"]["accuracy"] + 0.15, r
    assert r["dpo"]["preferred_rate"] >= r["sft"]["preferred_rate"], r
    assert r["dpo"]["logp_margin"] >= r["sft"]["logp_margin"] + 0.2, r
    assert r["dpo"]["accuracy"] >= r["pretrained"]["accuracy"] + 0.15, r  # DPO keeps what SFT made answerable
    assert report["dpo_reward_accuracy"] >= 0.9  # the margin rose over the SFT model's on that share of pairs
    # RLAIF: DPO on pairs of the SFT model's own answers, judged by the demo_world rule, raises the share of
    # direct answers (measured 0.19 -> 0.56 on the quick setting's 16 held-out questions, 1 thread) and the
    # log p(direct) - log p(hedging) margin, with no answer written by hand
    assert r["rlaif"]["preferred_rate"] > r["sft"]["preferred_rate"], r
    assert r["rlaif"]["logp_margin"] > r["sft"]["logp_margin"], r
    pairs = st["stages"]["rlaif_pairs"]["info"]
    assert pairs["rows"] > 0 and pairs["candidates"] == 4 * len(
        (root / "data" / "rlaif.jsonl").read_text().splitlines()
    )
    import torch

    if not torch.cuda.is_available():  # the demo's 3 M model trains in fp32 on every CPU
        for stage in ("pretrain", "sft", "dpo"):
            assert any(
                line.startswith(f"{stage} | training: ") and "precision fp32 (auto: " in line
                for line in res.stdout.splitlines()
            ), stage


def test_pretraining_corpus_goes_through_curate(demo):
    root, res = demo
    st = _status(root)
    info = st["stages"]["curate"]["info"]["curate"]
    documents = (root / "data" / "corpus.txt").read_text().strip().split("\n\n")
    # the generated corpus is clean: curation keeps every document, unchanged, and says so
    assert info["rows_in"] == info["rows_out"] == len(documents)
    assert info["removed"] == {"normalize": 0, "pii": 0, "quality": 0, "language": 0}
    assert f"curate: kept {len(documents)} of {len(documents)} corpus documents" in res.stdout
    curated = Path(st["stages"]["curate"]["artifacts"]["dataset"]["path"]) / "data.jsonl"
    assert [json.loads(x)["text"] for x in curated.read_text().splitlines()] == documents
    report = Path(st["stages"]["curate"]["artifacts"]["report"]["path"])
    assert {p.name for p in report.iterdir()} == {"report.json", "report.md", "reasons.jsonl"}
    # pretraining read the curated dataset
    manifest = json.loads((Path(st["dir"]) / "manifest.json").read_text())
    assert manifest["config"]["stages"][1]["data"] == {"path": "@curate"}


def test_merge_stage_writes_a_model_between_sft_and_dpo(demo):
    import torch
    from safetensors.torch import load_file

    root, _ = demo
    st = _status(root)
    arts = {name: Path(st["stages"][name]["artifacts"]["model"]["path"]) for name in ("sft", "dpo", "merge")}
    assert (arts["merge"] / "config.json").exists() and (arts["merge"] / "tokenizer.json").exists()
    sft, dpo, merged = (load_file(str(arts[n] / "model.safetensors")) for n in ("sft", "dpo", "merge"))
    assert set(merged) >= set(sft)
    # slerp at t = 0.5 lies between the two: each tensor within the span of the endpoints' distance
    name = "model.layers.0.self_attn.q_proj.weight"
    a, b, m = (t[name].float() for t in (sft, dpo, merged))
    assert torch.linalg.norm(m - a) <= torch.linalg.norm(b - a) + 1e-6
    assert torch.linalg.norm(m - b) <= torch.linalg.norm(b - a) + 1e-6


def test_gguf_stage_and_llama_cpp_answers_like_transformers(demo):
    root, res = demo
    st = _status(root)
    folder = Path(st["stages"]["gguf"]["artifacts"]["gguf"]["path"])
    names = {p.name for p in folder.iterdir()}
    assert {"model-f32.gguf", "model-Q8_0.gguf", "model-Q4_K_M.gguf", "model-Q8_0.Modelfile"} <= names, names
    g = _figures(st)["gguf"]
    # the F32 export answers every held-out question with transformers' greedy answer
    assert g["questions"] > 0 and g["same_greedy"] == g["questions"], g
    assert g["chat"]["file"] == "model-Q8_0.gguf" and g["chat"]["question"]
    rows = {r["type"].upper(): r for r in g["scorecard"]}
    assert {"F32", "Q8_0", "Q4_K_M"} <= set(rows)
    assert rows["F32"]["top1"] == 1.0 and rows["F32"]["mean_kld"] < 1e-4
    assert 0.0 <= rows["Q8_0"]["top1"] <= 1.0
    assert f"{g['same_greedy']}/{g['questions']} held-out questions" in res.stdout
    assert "gguf: chat with model-Q8_0.gguf" in res.stdout


def test_forge_toml_is_documented_and_runs_with_llmforge_run(demo):
    root, _ = demo
    text = (root / "forge.toml").read_text()
    assert text.startswith("# Written by `llmforge demo`")
    assert f"#   llmforge run -c {root.resolve() / 'forge.toml'}" in text
    res = run_cli("validate", str(root / "forge.toml"))
    assert res.returncode == 0, res.stdout + res.stderr


def test_second_demo_reuses_cached_stages(demo):
    root, first = demo
    res = run_cli("demo", "--quick", "--dir", str(root), timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for stage in ("curate", "pretrain", "sft", "dpo", "rlaif_pairs", "rlaif_dpo", "merge", "gguf", "eval"):
        assert f"↺ {stage} cached" in res.stdout
    st = _status(root)
    assert all(s["status"] == "cached" for s in st["stages"].values())
    # the summary still shows the losses and the evaluation of the run that computed them
    prev = json.loads((root / "runs" / st["stages"]["pretrain"]["cached_from"] / "manifest.json").read_text())
    assert f"{prev['stages']['pretrain']['info']['final_loss']:.4f}" in res.stdout
    assert "evaluation: accuracy pretrained" in res.stdout
    assert "forge.toml differed" not in res.stdout  # same setting: the file is left as it was


# ----------------------------------------------------------------------------------------------
# the generated data


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "data").iterdir())}


def test_generated_data_is_deterministic_by_seed(tmp_path):
    from llmforge_plugins.demo.project import write_project

    for quick in (True, False):
        a, _, _ = write_project(tmp_path / f"a{quick}", quick=quick, seed=7)
        b, _, _ = write_project(tmp_path / f"b{quick}", quick=quick, seed=7)
        c, _, _ = write_project(tmp_path / f"c{quick}", quick=quick, seed=8)
        assert _files(a.parent) == _files(b.parent)
        assert set(_files(a.parent)) == {
            "corpus.txt",
            "sft.jsonl",
            "dpo.jsonl",
            "rlaif.jsonl",
            "heldout.jsonl",
            "heldout.txt",
            "world.json",
        }
        assert _files(a.parent)["corpus.txt"] != _files(c.parent)["corpus.txt"]
        # forge.toml differs only by the path in its header
        assert a.read_text().replace(str(a), "X") == b.read_text().replace(str(b), "X")


def test_heldout_questions_never_appear_in_sft_or_dpo_data(tmp_path):
    from llmforge_plugins.demo import world
    from llmforge_plugins.demo.project import write_project

    config, counts, _ = write_project(tmp_path, quick=False, seed=42)
    data = tmp_path / "data"
    held = [json.loads(x) for x in (data / "heldout.jsonl").read_text().splitlines()]
    sft = [json.loads(x) for x in (data / "sft.jsonl").read_text().splitlines()]
    dpo = [json.loads(x) for x in (data / "dpo.jsonl").read_text().splitlines()]
    assert len(held) >= 24 and counts["eval_items"] == len(held)
    asked = {m["content"] for r in sft for m in r["messages"] if m["role"] == "user"}
    asked |= {m["content"] for r in dpo for m in r["prompt"]}
    rlaif = [json.loads(x) for x in (data / "rlaif.jsonl").read_text().splitlines()]
    assert rlaif and counts["rlaif_prompts"] == len(rlaif)
    asked |= {r["prompt"] for r in rlaif}  # the RLAIF step samples training questions only
    corpus = (data / "corpus.txt").read_text()
    facts = {f["id"]: f for f in json.loads((data / "world.json").read_text())["facts"]}
    for item in held:
        fact = facts[item["id"]]
        kind, subject = item["id"].split(":", 1)
        args = {"c": subject} if kind != "sum" else dict(zip("ab", map(int, subject.split("+"))))
        # no wording of a held-out question is ever asked in training...
        for wording in world.QUESTIONS[kind]:
            assert wording.format(**args) not in asked, item
        # ...but every held-out fact is stated in the pretraining corpus
        assert world.Fact(kind, subject, fact["value"], args).statement(world.PHRASINGS[kind][0]) in corpus
        assert item["answer"] == fact["value"]
    # and the evaluation covers every kind of fact
    assert {i["kind"] for i in held} == {"capital", "colour", "animal", "sum"}


def test_answer_scoring():
    from llmforge_plugins.demo.tasks import score as _score

    values = {"capital": ["Arkel", "Bistro"], "sum": [str(n) for n in range(20)]}
    item = {"kind": "capital", "answer": "Arkel", "question": "What is the capital of Zorvia?"}
    assert _score(item, "The capital of Zorvia is Arkel.", values) == {"correct": True, "direct": True}
    assert _score(item, "Hmm, I am not sure, but I think the capital of Zorvia is Arkel.", values) == {
        "correct": True,
        "direct": False,
    }
    assert _score(item, "The capital of Zorvia is Bistro.", values) == {"correct": False, "direct": True}
    # listing values is guessing: wrong, whichever comes last
    assert _score(item, "Bistro or Arkel.", values)["correct"] is False
    assert _score(item, "Arkelton.", values) == {"correct": False, "direct": False}  # whole words only
    # an answer restates the question: the value is the last one named, operands don't count as guesses
    s = {"kind": "sum", "answer": "14", "question": "What is 8 plus 6?"}
    assert _score(s, "8 plus 6 equals 14.", values)["correct"]
    assert not _score(s, "8 plus 6 equals 13.", values)["correct"]
    assert not _score(s, "7 plus 6 equals 14.", values)["correct"]  # 7 and 14: two guesses
    z = {"kind": "sum", "answer": "0", "question": "What is 0 plus 0?"}
    assert _score(z, "0 plus 0 equals 0.", values)["correct"]
    # a reply that never ends its turn is no answer, even when it names the right value on the way
    assert _score(item, "The capital of Zorvia is Arkel. The flag of", values, ended=False) == {
        "correct": False,
        "direct": False,
    }
