"""lm-evaluation-harness parity and the `lm_eval` task kind, with real models and real lm-eval.

* parity: a local multiple-choice task (tests/fixtures/eval/lmeval/: 40 questions and lm-eval's YAML for
  them) scored by llmforge's ``multiple_choice`` kind on the ``hf`` eval model and by lm-eval itself with its
  own ``hf`` model (``simple_evaluate(model="hf", ...)``) on the same tiny model: same acc, same acc_norm,
  the same answer chosen on every item;
* the ``lm_eval`` kind runs that lm-eval task on our ``hf`` model and on our ``gguf`` model (an F32 export
  of the same model, through llama.cpp) and gets lm-eval's numbers;
* the errors: lm_eval not installed, a task lm-eval does not know, a task whose data is not local.

The model is a tiny Llama trained for a few seconds on the capitals the questions ask about, so that it
prefers some answers over others (a random model's choices would be close to ties, which makes a parity
check weak).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
from pathlib import Path

import pytest

from llmforge.errors import DataError, UsageError

FIXTURE = Path(__file__).parent / "fixtures" / "eval" / "lmeval"
TASK = "llmforge_capitals"
ITEMS = 40
GGUF_ITEMS = 12


def _needs_lm_eval():
    return pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the lmeval extra (in the test extra)")


# ------------------------------------------------------------------------------------------------
# fixtures: one trained tiny model, its GGUF, lm-eval's own figures (once per module)


@pytest.fixture(scope="module")
def trained(llmforge_tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama after 150 steps on 'Question: What is the capital of LandN?\\nAnswer: TownN' (about a
    second): it has learned that a town answers, and some of which town."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llmforge_tiny_model_dir)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(llmforge_tiny_model_dir, dtype=torch.float32)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        texts = [f"Question: What is the capital of Land{i}?\nAnswer: Town{i}" for i in range(ITEMS)]
        rng = random.Random(0)
        for _ in range(150):
            enc = tok(rng.sample(texts, 16), return_tensors="pt", padding=True)
            labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
            model(**enc, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
    out = tmp_path_factory.mktemp("lmeval-model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gguf_f32(trained, tmp_path_factory) -> Path:
    from llmforge_plugins.gguf.export import export_gguf

    out = tmp_path_factory.mktemp("lmeval-gguf") / "model-f32.gguf"
    export_gguf(trained, out, "f32")
    return out


@pytest.fixture(scope="module")
def lm_eval_own(trained) -> dict:
    """lm-eval on its own: its `hf` model on the trained folder, the fixture's YAML through its TaskManager.
    The YAML's data file is relative: lm-eval reads it from the working directory, as its users do."""
    lm_eval = _needs_lm_eval()
    from lm_eval.tasks import TaskManager

    cwd = os.getcwd()
    os.chdir(FIXTURE)
    try:
        res = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={trained},dtype=float32,device=cpu",
            tasks=[TASK],
            task_manager=TaskManager(include_path=str(FIXTURE), include_defaults=False),
            batch_size=8,
        )
    finally:
        os.chdir(cwd)
    assert res is not None
    scores = res["results"][TASK]
    samples = sorted(res["samples"][TASK], key=lambda s: s["doc_id"])
    chosen = [max(range(4), key=lambda j: (s["filtered_resps"][j][0], -j)) for s in samples]
    return {"acc": scores["acc,none"], "acc_norm": scores["acc_norm,none"], "chosen": chosen, "samples": samples}


@pytest.fixture(scope="module")
def registry():
    from llmforge.testing import load_test_registry

    return load_test_registry()


@pytest.fixture(scope="module")
def tasks(registry):
    from llmforge_plugins.eval.api import EVAL_TASKS

    return registry.table(EVAL_TASKS)


def _open(path: Path, registry):
    from llmforge_plugins.eval.models import open_model

    return open_model(path, registry)


def _env():
    from llmforge_plugins.eval.api import TaskEnv

    return TaskEnv(base_dir=FIXTURE, log=lambda _m: None)


def _run(tasks, spec: dict, model):
    task = tasks[spec["kind"]]
    return task.run(task.Options(**spec), model, _env())


# ------------------------------------------------------------------------------------------------
# parity: llmforge's multiple_choice == lm-eval's multiple_choice on the same model and items


def test_multiple_choice_equals_lm_eval_on_the_same_model_and_items(trained, lm_eval_own, tasks, registry):
    model = _open(trained, registry)
    try:
        ours = _run(tasks, {"name": "capitals", "kind": "multiple_choice", "data": "capitals_mc.jsonl"}, model)
    finally:
        model.close()
    # the model has learned something, and not everything: a parity on 0/40 or 40/40 would prove little
    assert 0.3 < lm_eval_own["acc"] < 1.0
    assert ours.metrics["acc"].n == ours.metrics["acc_norm"].n == ITEMS
    assert ours.metrics["acc"].value == pytest.approx(lm_eval_own["acc"], abs=1e-9)
    assert ours.metrics["acc_norm"].value == pytest.approx(lm_eval_own["acc_norm"], abs=1e-9)
    assert [r["chosen"] for r in ours.items] == lm_eval_own["chosen"]
    # the same requests, and the same log-likelihoods to float32 precision
    for record, sample in zip(ours.items, lm_eval_own["samples"]):
        assert [(record["prompt"], " " + c) for c in record["choices"]] == [tuple(a) for a in sample["arguments"]]
        theirs = [r[0] for r in sample["filtered_resps"]]
        assert record["loglikelihoods"] == pytest.approx(theirs, abs=1e-4)
    # acc_norm is a different figure on this task (a long wrong choice): the test covers its normalisation
    assert [r["chosen_norm"] for r in ours.items] != [r["chosen"] for r in ours.items]


# ------------------------------------------------------------------------------------------------
# the lm_eval kind: lm-eval's task on our eval models


def _lm_eval_spec(**extra) -> dict:
    return {"name": "capitals", "kind": "lm_eval", "task": TASK, "include_path": ".", **extra}


def test_lm_eval_kind_on_the_hf_model_matches_lm_eval(trained, lm_eval_own, tasks, registry):
    _needs_lm_eval()
    model = _open(trained, registry)
    try:
        result = _run(tasks, _lm_eval_spec(), model)
    finally:
        model.close()
    acc, acc_norm = result.metrics["acc"], result.metrics["acc_norm"]
    assert abs(acc.value - lm_eval_own["acc"]) < 1e-6 and abs(acc_norm.value - lm_eval_own["acc_norm"]) < 1e-6
    assert acc.n == ITEMS and acc.higher_is_better and acc_norm.higher_is_better
    # lm-eval's stderr of a mean: sample standard deviation over sqrt(n)
    p = acc.value
    assert acc.stderr == pytest.approx((p * (1 - p) * ITEMS / (ITEMS - 1) / ITEMS) ** 0.5, rel=1e-6)
    assert [r["chosen"] for r in result.items] == lm_eval_own["chosen"]
    assert result.items[0]["prompt"] == "Question: What is the capital of Land0?\nAnswer:"
    assert result.info["lm_eval_task"] == TASK and result.info["num_fewshot"] == 0


def test_lm_eval_kind_on_the_gguf_model_matches_lm_eval(gguf_f32, lm_eval_own, tasks, registry):
    """The same task on an F32 GGUF of the model through llama.cpp: the same tokens and weights, summed in a
    different order (llama.cpp's kernels), so log-likelihoods agree to ~1e-5, far below the gaps between this
    model's choices: the same answers, hence lm-eval's acc and acc_norm on the same items. The first GGUF_ITEMS
    items only: the gguf model evaluates one request at a time in a child process (~0.1-0.2 s each here)."""
    _needs_lm_eval()
    model = _open(gguf_f32, registry)
    try:
        result = _run(tasks, _lm_eval_spec(limit=GGUF_ITEMS), model)
    finally:
        model.close()
    theirs = lm_eval_own["samples"][:GGUF_ITEMS]
    assert result.metrics["acc"].n == GGUF_ITEMS
    assert result.metrics["acc"].value == pytest.approx(sum(s["acc"] for s in theirs) / GGUF_ITEMS, abs=1e-6)
    assert result.metrics["acc_norm"].value == pytest.approx(sum(s["acc_norm"] for s in theirs) / GGUF_ITEMS, abs=1e-6)
    assert [r["chosen"] for r in result.items] == lm_eval_own["chosen"][:GGUF_ITEMS]
    for record, sample in zip(result.items, theirs):
        assert record["loglikelihoods"] == pytest.approx([r[0] for r in sample["filtered_resps"]], abs=1e-3)


def test_lm_eval_kind_limit_and_relative_include_path(trained, tasks, registry, tmp_path):
    """`limit` takes the first items; include_path is relative to the spec's folder and the YAML's data file to
    the YAML's (here a copy of the fixture in another folder, the working directory elsewhere)."""
    _needs_lm_eval()
    own = tmp_path / "my tasks"
    own.mkdir()
    for f in FIXTURE.iterdir():
        (own / f.name).write_bytes(f.read_bytes())
    from llmforge_plugins.eval.api import TaskEnv

    task = tasks["lm_eval"]
    model = _open(trained, registry)
    try:
        options = task.Options(**{**_lm_eval_spec(limit=5), "include_path": "my tasks"})
        result = task.run(options, model, TaskEnv(base_dir=tmp_path, log=lambda _m: None))
    finally:
        model.close()
    assert result.metrics["acc"].n == 5 and len(result.items) == 5


def test_lm_eval_kind_generation_and_rolling_requests(trained, tasks, registry):
    """lm-eval's other two request types reach the model: generate_until (greedy, cut at the task's `until`,
    at most `max_gen_toks`) and loglikelihood_rolling (perplexity metrics, lower is better)."""
    _needs_lm_eval()
    model = _open(trained, registry)
    try:
        gen = _run(tasks, _lm_eval_spec(task="llmforge_capitals_gen", limit=4, primary="exact_match"), model)
        ppl = _run(tasks, _lm_eval_spec(task="llmforge_capitals_ppl", limit=4, primary="word_perplexity"), model)
        rolling = model.loglikelihood_rolling([f"What is the capital of Land{i}?" for i in range(4)])
    finally:
        model.close()
    assert gen.metrics["exact_match"].n == 4 and gen.metrics["exact_match"].higher_is_better
    assert all(r["answer"] and "\n" not in r["answer"] for r in gen.items)
    assert [r["target"] for r in gen.items][0].startswith(" Town")
    for name in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert not ppl.metrics[name].higher_is_better and ppl.metrics[name].n == 4
    # lm-eval's word perplexity from our model's rolling log-likelihoods: exp(-sum ll / words), 6 words each
    expected = math.exp(-sum(ll for ll, _ in rolling) / (6 * 4))
    assert ppl.metrics["word_perplexity"].value == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# errors


@pytest.mark.slow  # lm-eval indexes its ~15,000 task YAMLs to say a name is unknown: ~10-20 s
def test_unknown_lm_eval_task_is_a_usage_error_with_suggestions(tasks):
    _needs_lm_eval()
    task = tasks["lm_eval"]
    with pytest.raises(UsageError) as err:
        task.run(task.Options(**_lm_eval_spec(task="llmforge_capitols")), object(), _env())  # type: ignore[arg-type]
    assert "unknown lm-eval task 'llmforge_capitols'" in str(err.value)
    assert "llmforge_capitals" in (err.value.hint or "")


def test_task_without_local_data_says_so_at_once(tasks, tmp_path):
    """A task whose dataset is on the Hub (not cached here) fails in well under lm-eval's half-minute of
    retries, naming the task and saying the data is not available locally."""
    _needs_lm_eval()
    import time

    (tmp_path / "hub.yaml").write_text(
        "task: llmforge_hub_only\ndataset_path: llmforge-test/no-such-dataset\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: 0\ndoc_to_choice: '{{[a, b]}}'\n"
    )
    task = tasks["lm_eval"]
    started = time.monotonic()
    with pytest.raises(DataError) as err:
        options = task.Options(name="hub", kind="lm_eval", task="llmforge_hub_only", include_path=str(tmp_path))
        task.run(options, object(), _env())  # type: ignore[arg-type]
    assert time.monotonic() - started < 10
    assert "llmforge_hub_only" in str(err.value) and "not available locally" in str(err.value)


def test_missing_lm_eval_names_the_extra(tasks, monkeypatch):
    """Without lm-eval installed (its import fails, as in an install without the extra) the kind still
    registers, and running it says which extra to install."""
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    task = tasks["lm_eval"]
    with pytest.raises(UsageError) as err:
        task.run(task.Options(**_lm_eval_spec()), object(), _env())  # type: ignore[arg-type]
    assert "lm-evaluation-harness" in str(err.value)
    assert "llmforge[lmeval]" in (err.value.hint or "")


def test_spec_checks(tasks):
    task = tasks["lm_eval"]
    assert task.check(task.Options(**_lm_eval_spec())) == []
    problems = task.check(task.Options(**_lm_eval_spec(data="x.jsonl")))
    assert any("data" in str(p) for p in problems)
    assert task.Options(**_lm_eval_spec()).num_fewshot is None  # the lm-eval task's own default
    # the primary metric is the spec's (a gate on "capitals" alone takes it): acc unless the task says otherwise
    assert task.primary_for(task.Options(**_lm_eval_spec())) == "acc"
    assert task.primary_for(task.Options(**_lm_eval_spec(primary="word_perplexity"))) == "word_perplexity"


def test_fixture_is_the_task_the_yaml_declares():
    rows = [json.loads(line) for line in (FIXTURE / "capitals_mc.jsonl").read_text().splitlines()]
    assert len(rows) == ITEMS and all(len(r["choices"]) == 4 and 0 <= r["answer"] < 4 for r in rows)
