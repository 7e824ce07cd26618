"""The eval plugin's task specs (spec.py) and built-in task kinds (tasks.py), on a real tiny model.

Spec loading names key paths and files; items name file, line and field; the figures each kind reports
are checked against a direct computation with transformers on the same model (log-likelihoods by hand,
acc and acc_norm as lm-evaluation-harness defines them, perplexity as exp of the mean token NLL, greedy
answers), and the generation scorers against answers given by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from llmforge.errors import EXIT_BAD_INPUT, ConfigError, DataError
from llmforge.testing import load_test_registry
from llmforge_plugins.eval.api import EVAL_TASKS, TaskEnv
from llmforge_plugins.eval.spec import fewshot, load_task_spec, load_task_specs, read_items
from llmforge_plugins.eval.tasks import (
    GenerationOptions,
    choose,
    last_number,
    score_contains,
    score_exact_match,
    score_numeric,
    score_regex,
)

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
REGISTRY = load_test_registry()
TASKS = REGISTRY.table(EVAL_TASKS)


def spec(value, base: Path = FIXTURES, where: str = "tasks"):
    return load_task_spec(value, TASKS, base, where)


def problems_of(values, base: Path = FIXTURES, where: str = "stages[3].tasks") -> list[str]:
    specs, problems = load_task_specs(values, TASKS, base, where)
    return [str(p) for p in problems]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------
# specs


def test_the_fixture_specs_load_with_their_paths_read_from_the_spec_file():
    specs, problems = load_task_specs(
        ["tasks/qa.toml", "tasks/qa_csv.toml", "tasks/arith.toml", "tasks/wiki.toml"], TASKS, FIXTURES, "tasks"
    )
    assert problems == []
    assert [(t.kind, o.name) for t, o in specs] == [
        ("multiple_choice", "qa"),
        ("multiple_choice", "qa_csv"),
        ("generation", "arith"),
        ("perplexity", "wiki"),
    ]
    # `data = "../qa.jsonl"` in tasks/qa.toml is read from tasks/, not from the declaring forge.toml's folder
    assert Path(specs[0][1].data) == (FIXTURES / "qa.jsonl").resolve()


def test_spec_problems_name_the_key_path_or_the_spec_file(tmp_path):
    found = problems_of(
        [
            {"name": "qa", "kind": "multiple_choise", "data": "qa.jsonl"},
            {"name": "qa", "kind": "multiple_choice", "data": "missing.jsonl"},
            {"name": "gen", "kind": "generation", "data": "arith.jsonl", "scorer": "exact", "max_new_tokens": 0},
            {"name": "re", "kind": "generation", "data": "arith.jsonl", "scorer": "regex", "pattern": "(unclosed"},
            {"name": "tpl", "kind": "multiple_choice", "data": "qa.jsonl", "template": "Q: {question\nA:"},
            "tasks/bad.toml",
            "tasks/nowhere.toml",
            {"kind": "perplexity"},
            42,
        ]
    )
    assert found[0].startswith(
        "stages[3].tasks[0].kind: unknown task kind 'multiple_choise'; did you mean 'multiple_choice'? (installed: "
    )
    assert all(kind in found[0] for kind in ("generation", "multiple_choice", "perplexity"))
    assert "stages[3].tasks[1].data: file not found: missing.jsonl" in found
    assert any(p.startswith("stages[3].tasks[2].scorer: must be one of") for p in found)
    assert "stages[3].tasks[2].max_new_tokens: must be > 0 (got 0)" in found
    assert any(p.startswith("stages[3].tasks[3].pattern: not a valid regular expression") for p in found)
    assert any(p.startswith("stages[3].tasks[4].template: not a valid template") for p in found)
    # inside a spec file: the file as written, then the key
    assert "tasks/bad.toml: choises: unknown key 'choises'; did you mean 'choices'?" in found
    assert "tasks/bad.toml: num_fewshot: must be >= 0 (got -1)" in found
    assert "stages[3].tasks[6]: task spec file not found: tasks/nowhere.toml" in found
    assert "stages[3].tasks[7].name: required key is missing" in found
    assert "stages[3].tasks[8]: expected a table or the path of a .toml task spec, got int" in found


def test_a_task_name_used_twice_is_refused():
    found = problems_of(["tasks/qa.toml", {"name": "qa", "kind": "perplexity", "data": "wiki.txt"}])
    assert found == [
        "stages[3].tasks[1].name: task name 'qa' is used twice (also at tasks/qa.toml: name); "
        "metrics are named <task>.<metric>, so each task needs its own name"
    ]


def test_a_bad_spec_is_a_config_error_with_exit_code_2(tmp_path):
    (tmp_path / "broken.toml").write_text('name = "x"\nkind = = 1\n')
    with pytest.raises(ConfigError) as err:
        spec("broken.toml", tmp_path, "--task")
    assert err.value.exit_code == EXIT_BAD_INPUT
    assert "broken.toml:2:" in err.value.message and "invalid TOML" in err.value.message


# ------------------------------------------------------------------------------------------------
# items


def test_items_from_jsonl_csv_parquet_and_txt_with_limit(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, qa = spec({"name": "qa", "kind": "multiple_choice", "data": "qa.jsonl", "limit": 2})
    items = read_items(qa)
    assert len(items) == 2 and items[1]["answer"] == "Town2" and items.where(1) == "tests/fixtures/eval/qa.jsonl:2"

    _, csv = spec("tasks/qa_csv.toml")
    assert [r["answer"] for r in read_items(csv)] == ["A", "B", "2"]

    pq.write_table(pa.table({"text": ["one doc", "two doc"]}), tmp_path / "t.parquet")
    _, par = spec({"name": "p", "kind": "perplexity", "data": "t.parquet"}, tmp_path)
    items = read_items(par)
    assert [r["text"] for r in items] == ["one doc", "two doc"] and items.where(1).endswith("t.parquet:row 1")

    _, wiki = spec("tasks/wiki.toml")
    docs = read_items(wiki)
    assert len(docs) == 3 and docs[1]["text"].endswith("It is a small town.")  # blank lines split documents


def test_bad_rows_and_fields_are_named_by_file_line_and_field(tmp_path):
    (tmp_path / "qa.jsonl").write_text(
        '{"question": "a?", "choices": ["x", "y"], "answer": 0}\n{"question": "b?", "choices": ["x", "y"], \n'
    )
    _, qa = spec({"name": "qa", "kind": "multiple_choice", "data": "qa.jsonl"}, tmp_path)
    with pytest.raises(DataError, match=r"qa\.jsonl:2: invalid JSON") as err:
        read_items(qa, tmp_path)
    assert err.value.exit_code == EXIT_BAD_INPUT

    task = TASKS["multiple_choice"]
    rows = [
        {"question": "a?", "choices": ["x", "y"], "answer": 0},
        {"question": "b?", "choices": "x", "answer": 0},
        {"question": "c?", "choices": ["x", "y"], "answer": 5},
        {"question": "d?", "choices": ["x", "y"]},
    ]
    for n, message in [
        (2, "choices: expected a list of choices"),
        (3, "answer: answer 5 is out of range (2 choices)"),
        (4, "answer: missing"),
    ]:
        write_jsonl(tmp_path / "qa.jsonl", [rows[0], rows[n - 1]])
        items = read_items(qa, tmp_path)
        with pytest.raises(DataError) as err:
            task.parse(qa, items[1], items.where(1))
        assert err.value.message.startswith(f"{tmp_path / 'qa.jsonl'}:2: {message}"), err.value.message

    # a template field the items lack: named with the item, when the task runs
    write_jsonl(tmp_path / "qa.jsonl", [rows[0]])
    _, tpl = spec({"name": "t", "kind": "multiple_choice", "data": "qa.jsonl", "template": "{prompt}"}, tmp_path)
    with pytest.raises(DataError, match=r"qa\.jsonl:1: template: the item has no field \{prompt\}"):
        task.run(tpl, None, TaskEnv(base_dir=tmp_path))


def test_fewshot_never_shows_the_item_asked_and_is_deterministic(tmp_path):
    rows = [{"q": f"q{i}", "a": i} for i in range(8)] + [{"q": "q0", "a": 0}]  # the last is a copy of item 0
    write_jsonl(tmp_path / "x.jsonl", rows)
    _, options = spec({"name": "g", "kind": "generation", "data": "x.jsonl", "num_fewshot": 3}, tmp_path)
    picks = [fewshot(options, rows, i) for i in range(len(rows))]
    for i, shots in enumerate(picks):
        assert len(shots) == 3 and rows[i] not in shots
    assert picks == [fewshot(options, rows, i) for i in range(len(rows))]  # the same on every call
    other_seed = options.model_copy(update={"fewshot_seed": 7})
    assert picks != [fewshot(other_seed, rows, i) for i in range(len(rows))]

    pool = [{"q": "q0", "a": 0}, {"q": "p1", "a": 1}, {"q": "p2", "a": 2}, {"q": "p3", "a": 3}]
    assert all(rows[0] not in fewshot(options, rows, 0, pool=pool) for _ in range(3))
    with pytest.raises(DataError, match="num_fewshot = 3 but fewshot_data holds only 2 other examples"):
        fewshot(options, rows, 0, pool=pool[:3])


# ------------------------------------------------------------------------------------------------
# on a real tiny model


@pytest.fixture(scope="module")
def model(llmforge_tiny_model_dir):
    from llmforge_plugins.eval.models import open_model

    opened = open_model(llmforge_tiny_model_dir, REGISTRY, label="tiny")
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def direct(llmforge_tiny_model_dir):
    """The same model and tokenizer loaded by hand: the reference the tasks' figures are checked against."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llmforge_tiny_model_dir)
    lm = AutoModelForCausalLM.from_pretrained(llmforge_tiny_model_dir, dtype="float32").eval()
    return tok, lm


def logprobs(direct, prefix_ids: list[int], ids: list[int]) -> float:
    """The summed log-probability of ``ids`` after ``prefix_ids``, by one plain forward."""
    import torch

    _, lm = direct
    whole = torch.tensor([prefix_ids + ids])
    with torch.no_grad():
        logp = lm(whole).logits.float().log_softmax(-1)[0]
    start = len(prefix_ids)
    return sum(logp[start + k - 1, t].item() for k, t in enumerate(ids))


def test_multiple_choice_acc_and_acc_norm_equal_a_hand_computation(model, direct):
    tok, _ = direct
    _, options = spec({"name": "qa", "kind": "multiple_choice", "data": "qa.jsonl"})
    result = TASKS["multiple_choice"].run(options, model, TaskEnv(base_dir=FIXTURES))
    items = read_items(options)
    assert len(result.items) == len(items) == 6
    accs, norms = [], []
    for record, item in zip(result.items, items):
        context = f"Question: {item['question']}\nAnswer:"
        assert record["prompt"] == context and record["choices"] == item["choices"]
        # each choice's log-likelihood, by hand: context tokens, then what " choice" adds after them
        ctx = tok(context)["input_ids"]
        lls = [logprobs(direct, ctx, tok(context + " " + c)["input_ids"][len(ctx) :]) for c in item["choices"]]
        assert record["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
        best = max(range(3), key=lambda j: lls[j])
        best_norm = max(range(3), key=lambda j: lls[j] / len(item["choices"][j]))
        assert (record["chosen"], record["chosen_norm"]) == (best, best_norm)
        accs.append(float(best == record["target"]))
        norms.append(float(best_norm == record["target"]))
    assert [r["target"] for r in result.items] == [0, 1, 2, 0, 1, 2]  # index, text, index, letter, ...
    n = len(accs)
    for name, values in (("acc", accs), ("acc_norm", norms)):
        mean = sum(values) / n
        assert result.metrics[name].value == pytest.approx(mean) and result.metrics[name].n == n
        stderr = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
        assert result.metrics[name].stderr == pytest.approx(stderr)


def test_acc_and_acc_norm_differ_where_a_long_choice_is_likelier_per_character(model, tmp_path):
    # A one-character choice against a long sentence the tiny tokenizer was trained on: the short one has the
    # higher total log-likelihood, the long one the higher log-likelihood per character.
    long = "The capital of Land1 is Town1. The capital of Land2 is Town2."
    rows = [{"question": f"What is the capital of Land{i}?", "choices": ["Z", long], "answer": 1} for i in range(3)]
    write_jsonl(tmp_path / "mc.jsonl", rows)
    _, options = spec({"name": "mc", "kind": "multiple_choice", "data": "mc.jsonl"}, tmp_path)
    result = TASKS["multiple_choice"].run(options, model, TaskEnv(base_dir=tmp_path))
    for r in result.items:
        ll_short, ll_long = r["loglikelihoods"]
        assert ll_short > ll_long and ll_long / len(long) > ll_short / 1  # what makes the two picks differ
        assert (r["chosen"], r["chosen_norm"]) == choose(r["loglikelihoods"], r["choices"]) == (0, 1)
    assert result.metrics["acc"].value == 0.0 and result.metrics["acc_norm"].value == 1.0


def test_multiple_choice_few_shot_and_csv_columns(model):
    _, options = spec("tasks/qa.toml")  # num_fewshot = 1
    result = TASKS["multiple_choice"].run(options, model, TaskEnv(base_dir=FIXTURES))
    items = read_items(options)
    for i, record in enumerate(result.items):
        shots = fewshot(options, items, i)
        right = shots[0]["choices"][result.items[items.index(shots[0])]["target"]]
        assert record["prompt"] == (
            f"Question: {shots[0]['question']}\nAnswer: {right}\n\nQuestion: {items[i]['question']}\nAnswer:"
        )
    _, csv = spec("tasks/qa_csv.toml")
    result = TASKS["multiple_choice"].run(csv, model, TaskEnv(base_dir=FIXTURES))
    assert [r["choices"] for r in result.items][0] == ["Town1", "Town2", "Town3"]
    assert [r["target"] for r in result.items] == [0, 1, 2]  # letter A, letter B, index "2"


def test_perplexity_equals_exp_of_the_mean_token_nll(model, direct):
    tok, _ = direct
    _, options = spec("tasks/wiki.toml")
    result = TASKS["perplexity"].run(options, model, TaskEnv(base_dir=FIXTURES))
    texts = [r["text"] for r in read_items(options)]
    # no BOS in this tokenizer: the first token of each text is predicted from EOS, as lm-eval does
    nll = tokens = 0.0
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        nll -= logprobs(direct, [tok.eos_token_id], ids)
        tokens += len(ids)
    nbytes = sum(len(t.encode()) for t in texts)
    words = sum(len(t.split()) for t in texts)
    m = result.metrics
    assert m["perplexity"].value == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    assert m["bits_per_byte"].value == pytest.approx(nll / nbytes / math.log(2), rel=1e-4)
    assert m["word_perplexity"].value == pytest.approx(math.exp(nll / words), rel=1e-4)
    assert m["perplexity"].stderr is None and not m["perplexity"].higher_is_better and m["perplexity"].n == 3
    assert sum(r["tokens"] for r in result.items) == tokens


def test_generation_end_to_end_greedy_answers_through_the_chat_template(model, direct, tmp_path):
    import torch

    tok, lm = direct
    _, options = spec(
        {"name": "cap", "kind": "generation", "data": "capitals.jsonl", "scorer": "contains", "max_new_tokens": 6}
    )
    result = TASKS["generation"].run(options, model, TaskEnv(base_dir=FIXTURES))
    assert result.info["chat"] is True  # the tiny tokenizer has a chat template: used by default
    first = result.items[0]
    assert first["prompt"] == tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of Land1?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(first["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        greedy = lm.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id)
    new = greedy[0, ids.shape[1] :].tolist()
    new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    assert first["answer"] == tok.decode(new, skip_special_tokens=True)
    assert result.items[3]["target"] == ["Town4", "town four"]
    for r in result.items:  # each score is the scorer's verdict on the answer given
        assert (
            r["score"]
            == score_contains(r["answer"], r["target"] if isinstance(r["target"], list) else [r["target"]], options)[0]
        )
    assert result.metrics["contains"].n == 4

    plain = options.model_copy(update={"chat": False, "template": "Q: {question}\nA:"})
    result = TASKS["generation"].run(plain, model, TaskEnv(base_dir=FIXTURES))
    assert (
        result.items[0]["prompt"] == "Q: What is the capital of Land1?\nA:" and "\n\n" not in result.items[0]["answer"]
    )


def opts(**kw) -> GenerationOptions:
    return GenerationOptions(name="g", kind="generation", **kw)


def test_scorers_on_given_answers():
    o = opts()
    assert score_exact_match("  Paris \n", ["Paris"], o)[0] == 1.0
    assert score_exact_match("paris", ["Paris"], o)[0] == 0.0
    assert score_exact_match("paris!", ["Paris"], opts(ignore_case=True, ignore_punctuation=True))[0] == 1.0
    assert score_exact_match(" Paris", ["Paris"], opts(strip=False))[0] == 0.0
    assert score_exact_match("Lyon", ["Paris", "Lyon"], o)[0] == 1.0  # any accepted answer
    assert score_contains("The capital is Paris.", ["Paris"], o)[0] == 1.0
    assert score_contains("The capital is PARIS.", ["paris"], opts(ignore_case=True))[0] == 1.0
    assert score_contains("Rome", ["Paris"], o)[0] == 0.0

    assert score_regex("The answer is (B).", ["B"], opts(pattern=r"\(([A-D])\)"))[0:2] == (1.0, "B")
    assert score_regex("The answer is (C).", ["B"], opts(pattern=r"\(([A-D])\)")) == (0.0, "C")
    assert score_regex("no letter", ["B"], opts(pattern=r"\(([A-D])\)")) == (0.0, None)
    assert score_regex("Town12", [r"Town\d+"], o)[0] == 1.0  # no pattern: the target must match the whole answer
    assert score_regex("Town12 and more", [r"Town\d+"], o)[0] == 0.0

    assert last_number("I think 3, no: -1,234.5 apples") == -1234.5
    assert score_numeric("2 + 3 = 5.", [5], o) == (1.0, "5")
    assert score_numeric("so 0.1 + 0.2 = 0.30000000000000004", ["0.3"], o)[0] == 1.0
    assert score_numeric("The total is $1,200", ["#### 1200"], o) == (1.0, "1200")  # the target's last number
    assert score_numeric("about 7", [7.5], opts(tolerance=0.6))[0] == 1.0
    assert score_numeric("about 7", [7.5], o)[0] == 0.0
    assert score_numeric("no number", [1], o) == (0.0, None)


def test_a_stop_request_ends_a_task_early_and_says_so(model):
    for spec_value in ("tasks/wiki.toml", "tasks/qa.toml", "tasks/arith.toml"):
        task, options = spec(spec_value)
        result = task.run(options, model, TaskEnv(base_dir=FIXTURES, should_stop=lambda: True))
        assert result.info["stopped"] is True and result.items == []
