"""RLAIF: the `preferences` generator (a policy's own samples, scored or compared pairwise, into preference
pairs). Real parts: the real answer-reading and sampling code, the real verifiers and scoring, the judges
plugin's real Judge (both orders) over rule backends, and a real tiny Llama sampled through the HF engine."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llmforge.errors import ConfigError
from llmforge.judging import JudgeBackend, JudgeOptions, JudgeSpec
from llmforge_plugins.judges.judge import Judge
from llmforge_plugins.synth.api import SynthEnv, Teacher
from llmforge_plugins.synth.preferences import PreferencesGenerator
from llmforge_plugins.synth.scoring import Scorers, score_batch
from llmforge_plugins.synth.verifiers import Numeric


class Adder(JudgeBackend):
    """A policy answering "add A B": the sum, off by (seed % 3) - 1 when sampling."""

    name = "adder"

    def complete(self, requests):
        out = []
        for r in requests:
            a, b = map(int, re.search(r"add (\d+) (\d+)", r.messages[-1]["content"]).groups())
            off = (r.seed % 3) - 1 if r.temperature > 0 else 0
            out.append(f"The sum is {a + b + off}." + (" Sure!" * (r.seed % 2)))
        return out

    def identity(self):
        return "adder"


class Longer(JudgeBackend):
    """A rule judge: pairwise, the answer with the right sum wins; a tie when both or neither are right.
    ``bias``: always "A" (a position-biased judge: its two orders disagree, so every pair is a tie)."""

    name = "longer"

    class Options(JudgeOptions):
        bias: bool = False

    def complete(self, requests):
        out = []
        for r in requests:
            asked = r.messages[1]["content"]
            a, b = map(int, re.search(r"add (\d+) (\d+)", asked).groups())
            pair = re.search(r"\[Answer A\]\n(.*?)\n\n\[Answer B\]\n(.*?)\n\nThe order", asked, re.S)
            ok = [str(a + b) in x for x in pair.groups()]
            w = "A" if self.options.bias else ("A" if ok[0] and not ok[1] else "B" if ok[1] and not ok[0] else "tie")
            out.append(f'{{"reason": "rule", "winner": "{w}"}}')
        return out

    def identity(self):
        return f"longer:{self.options.bias}"


@pytest.fixture
def prompts(tmp_path) -> Path:
    p = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"add {i} {i + 3}", "answer": 2 * i + 3, "kind": "sum"} for i in range(8)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return p


def _env(tmp_path: Path, judge=None) -> SynthEnv:
    return SynthEnv(
        teacher=Teacher(Adder(JudgeOptions(backend="adder"), base_dir=tmp_path), label="adder"),
        base_dir=tmp_path,
        judge=judge,
    )


def _run(gen, opts, env, samples=4, scorers=None):
    """What the stage does per batch, minus its journal: generate, score everything (no filter), pair."""
    units = list(gen.units(opts, env))
    per_unit = gen.generate(opts, units, samples, env)
    cands = [c for cs in per_unit for c in cs]
    if scorers is not None:
        score_batch(cands, scorers)
    rows = []
    for u, cs in zip(units, per_unit, strict=True):
        rows += gen.rows(opts, u, [c for c in cs if c.rejected is None], env)
    return units, per_unit, rows


def test_score_ranking_pairs_right_over_wrong_and_a_margin_makes_ties(tmp_path, prompts):
    gen = PreferencesGenerator()
    numeric = Scorers(verifier=Numeric(), verify_options=Numeric.Options(verifier="numeric"), filter=False)
    opts = gen.Options(kind="preferences", data=str(prompts))
    units, per_unit, rows = _run(gen, opts, _env(tmp_path), scorers=numeric)
    assert len(units) == 8 and all(len(cs) == 4 for cs in per_unit)
    assert len({c.provenance["seed"] for cs in per_unit for c in cs}) == 32  # one seed per sample
    mixed = [cs for cs in per_unit if len({c.scores["verify"] for c in cs}) == 2]
    assert rows and len(rows) == len(mixed)
    for r in rows:
        a, b = map(int, r["prompt"][-1]["content"].split()[1:])
        assert str(a + b) in r["chosen"][0]["content"] and str(a + b) not in r["rejected"][0]["content"]
        assert r["chosen"][0]["role"] == "assistant" and r["answer"] == a + b and r["kind"] == "sum"
        assert r["provenance"]["chosen_score"] == 1.0 and r["provenance"]["rejected_score"] == 0.0
    for cs in per_unit:
        reasons = [c.rejected for c in cs]
        if cs in mixed:  # the two in the pair stay, the others are not needed
            assert reasons.count(None) == 2 and all(r.startswith("best_of:") for r in reasons if r)
        else:
            assert all(r.startswith("tie:") for r in reasons)
    # a margin of 1 on a 0/1 score: no unit differs by more, so no pair at all
    opts = gen.Options(kind="preferences", data=str(prompts), margin=1.0)
    _, per_unit, rows = _run(gen, opts, _env(tmp_path), scorers=numeric)
    assert rows == [] and all(c.rejected.startswith("tie:") for cs in per_unit for c in cs)


def test_scores_are_needed_and_samples_at_least_two(tmp_path, prompts):
    gen = PreferencesGenerator()
    opts = gen.Options(kind="preferences", data=str(prompts))
    with pytest.raises(ConfigError, match="samples: 1"):
        _run(gen, opts, _env(tmp_path), samples=1)
    with pytest.raises(ConfigError, match="needs scores"):
        _run(gen, opts, _env(tmp_path))
    with pytest.raises(ConfigError, match="generator.score: .judge."):
        _run(gen, gen.Options(kind="preferences", data=str(prompts), score="judge"), _env(tmp_path))
    with pytest.raises(ConfigError, match="pairwise"):
        _run(gen, gen.Options(kind="preferences", data=str(prompts), rank="pairwise"), _env(tmp_path))


def test_pairwise_ranking_asks_the_judge_both_orders(tmp_path, prompts):
    gen = PreferencesGenerator()
    opts = gen.Options(kind="preferences", data=str(prompts), rank="pairwise")
    spec = JudgeSpec("rule", Longer, Longer.Options(backend="longer"), tmp_path)
    with Judge.open(spec, cache_dir=tmp_path / "j") as judge:
        _, per_unit, rows = _run(gen, opts, _env(tmp_path, judge))
        asked = judge.stats["requests"]
    assert rows and asked % 2 == 0
    for r in rows:
        a, b = map(int, r["prompt"][-1]["content"].split()[1:])
        assert str(a + b) in r["chosen"][0]["content"] and str(a + b) not in r["rejected"][0]["content"]
        assert r["provenance"]["rank"] == "pairwise"
    decisive = [cs for cs in per_unit if len({str(cs[0].row["answer"]) in c.answer for c in cs}) == 2]
    assert len(rows) == len(decisive)
    # a judge with a position bias disagrees with itself across the two orders: only ties
    biased = JudgeSpec("rule", Longer, Longer.Options(backend="longer", bias=True), tmp_path)
    with Judge.open(biased, cache_dir=tmp_path / "b") as judge:
        _, per_unit, rows = _run(gen, opts, _env(tmp_path, judge))
    assert rows == [] and all(c.rejected.startswith("tie:") for cs in per_unit for c in cs)


def test_pairs_from_a_tiny_models_own_samples(tmp_path, prompts, llmforge_tiny_model_dir):
    from llmforge_plugins.synth.teacher import open_teacher
    from llmforge_plugins.synth.verifiers import BUILTIN_VERIFIERS

    regex = next(v for v in BUILTIN_VERIFIERS if v.name == "regex")()
    # a rule verifier on the random model's text: does the answer contain an "e"? (about half do)
    scorers = Scorers(verifier=regex, verify_options=regex.Options(verifier="regex", pattern="e"), filter=False)
    teacher = open_teacher(teacher=None, model=llmforge_tiny_model_dir, judges={}, base_dir=tmp_path)
    try:
        env = SynthEnv(teacher=teacher, base_dir=tmp_path)
        gen = PreferencesGenerator()
        opts = gen.Options(kind="preferences", data=str(prompts), limit=4, max_tokens=8)
        _, per_unit, rows = _run(gen, opts, env, samples=3, scorers=scorers)
    finally:
        teacher.backend.close()
    assert teacher.requests == 12
    assert len({c.answer for cs in per_unit for c in cs}) > 4  # the samples differ
    for r in rows:
        assert "e" in r["chosen"][0]["content"] and "e" not in r["rejected"][0]["content"]


# ------------------------------------------------------------------------------------------------
# the rlaif stage: rounds of sample -> pairs -> DPO on a tiny Llama, from forge.toml

QA = Path(__file__).parent / "fixtures" / "eval" / "qa.jsonl"


def _rlaif_project(root: Path, model: Path, rounds: int = 2):
    from llmforge.testing import ForgeProject

    proj = ForgeProject(root)
    proj.write_rows("data/prompts.jsonl", [{"prompt": f"Say something about {w}."} for w in "abcdefgh"])
    proj.write(
        f"""
        [[stages]]
        name = "rlaif"
        uses = "rlaif"
        model = "{model}"
        data = "data/prompts.jsonl"
        rounds = {rounds}
        samples = 3
        max_tokens = 6
        # a rule verifier on the random model's text: is there an "e"? (about half of its answers)
        verify = {{ verifier = "regex", pattern = "e" }}
        dpo = {{ max_steps = 2, micro_batch_size = 2, max_length = 64, learning_rate = 1e-4 }}
        eval = [{{ name = "qa", kind = "multiple_choice", data = "{QA}" }}]
        """
    )
    return proj


@pytest.mark.slow
def test_rlaif_rounds_keep_each_rounds_pairs_and_model_and_resume_skips_a_finished_round(
    tmp_path, llmforge_tiny_model_dir
):
    proj = _rlaif_project(tmp_path, llmforge_tiny_model_dir)
    # stop once round 2 begins: round 1 is finished and journaled
    out = proj.run(stop_when=lambda e: "round 2/2: sampling" in str(e.get("message", "")))
    assert out.status == "stopped", out.events[-5:]
    work = out.run_dir / "stages" / "rlaif" / "work"
    assert (work / "round-1" / "round.json").exists() and not (work / "round-2" / "round.json").exists()
    model1 = (work / "round-1" / "model" / "model.safetensors").stat().st_mtime_ns

    out = proj.run(resume=True)
    assert out.exit_code == 0, out.events[-5:]
    logs = [str(e.get("message", "")) for e in out.events]
    assert any("round 1: finished in an earlier attempt" in m for m in logs)
    assert (work / "round-1" / "model" / "model.safetensors").stat().st_mtime_ns == model1
    report = json.loads((out.artifact("rlaif", "report") / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert "qa.acc" in report["baseline"]
    for r in report["rounds"]:
        assert r["pairs"] + r["ties"] == r["units"] == 8 and r["pairs"] > 0
        assert r["mean_chosen"] == 1.0 and r["mean_rejected"] == 0.0 and 0 < r["preferred_rate"] < 1
        assert "qa.acc" in r["eval"] and (work / r["model"] / "config.json").exists()
        assert (work / r["data"] / "data.jsonl").exists()
    rows = [json.loads(x) for x in (out.artifact("rlaif", "dataset") / "data.jsonl").read_text().splitlines()]
    assert [sum(r["provenance"]["round"] == k for r in rows) for k in (1, 2)] == [x["pairs"] for x in report["rounds"]]
    assert all("e" in r["chosen"][0]["content"] and "e" not in r["rejected"][0]["content"] for r in rows)
    # the published model is the last round's, and it differs from round 1's
    from safetensors.torch import load_file

    last = load_file(out.artifact("rlaif", "model") / "model.safetensors")
    r2 = load_file(work / "round-2" / "model" / "model.safetensors")
    r1 = load_file(work / "round-1" / "model" / "model.safetensors")
    assert all((last[k] == r2[k]).all() for k in r2) and any((r1[k] != r2[k]).any() for k in r2)
    assert "| 2 |" in (out.artifact("rlaif", "report") / "report.md").read_text()


def test_the_demo_worlds_rule_judge_scores_direct_hedging_and_wrong_answers():
    from llmforge.plugins import load_registry

    demo = load_registry().table("synth_verifiers")["demo_world"]  # registered by the demo plugin
    row = {
        "messages": [{"role": "user", "content": "What is the capital of Zorvia?"}],
        "answer": "Arkel",
        "kind": "capital",
        "values": ["Arkel", "Bistro"],
    }
    answers = [
        "The capital of Zorvia is Arkel.",
        "Hmm, I am not sure, but I think the capital of Zorvia is Arkel.",
        "The capital of Zorvia is Bistro.",
        "Hmm, I am not sure, but I think the capital of Zorvia is Bistro.",
    ]
    got = demo.verify(demo.Options(verifier="demo_world"), [row] * 4, answers)
    assert [v.score for v in got] == [1.0, 0.5, 0.5, 0.0] and [v.passed for v in got] == [True, False, False, False]
