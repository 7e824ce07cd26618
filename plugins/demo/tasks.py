"""The demo's eval task kinds: did the demo's models learn? Registered through `register_eval_tasks`, as a
third-party plugin would register its own, and run by the `eval` stage (plugins/eval) on every model of the
demo's pipeline (pretrained, SFT, DPO, merged, each GGUF file), in one leaderboard.

* `demo_qa`: each held-out question, formatted with the model's own chat template, answered greedily. Its
  metrics:

  - accuracy: the answer names the expected value (out of every known capital, colour, animal or number,
    from the world file) as its answer: the last value it names, as answers restate the question ("8 plus 6
    equals 14."), and no other value beyond those in the question, so that a model which lists many values
    does not score by luck; and the answer ends its turn (see ended_turn);
  - ended_turn: the answer ends (end-of-turn token or stop string) within max_new_tokens. A model that has
    not learnt the chat format rambles on in corpus style and may name the right value on the way;
  - preferred_rate (by generation): the answer has the direct style the DPO pairs prefer: one sentence that
    names an answer value, without hedging ("I think", "not sure", ...), right or not;
  - preferred_and_correct, and accuracy_<kind> per kind of fact;
  - probe: the model completing the start of a corpus sentence ("The capital of X is"), plain text, no chat:
    whether pretraining stored the held-out facts that SFT then makes answerable.

* `demo_margin`: on held-out direct-vs-hedging pairs, log p(direct) - log p(hedging), each summed over the
  answer and the end-of-turn marker (EvalModel.loglikelihood: the quantity DPO works on). The hedging
  answer is longer, so even an untrained model favours the direct one by this sum; what tells is the change
  between models: :func:`demo_figures` reads the per-item margins of the report and gives the DPO reward
  accuracy, the share of pairs whose margin DPO raised over the SFT model's (DPO's own "rewards/accuracies",
  on questions it was not trained on).

:func:`demo_figures` turns an eval report folder into the demo's summary (the figures `llmforge demo` prints
and its tests assert). No torch here: the eval models load the models.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from llmforge_plugins.eval.api import EvalTask, TaskEnv, TaskOptions, TaskResult, mean_metric

# Markers of the dispreferred, hedging style (the demo's data hedges with these words).
HEDGING = re.compile(
    r"\b(hmm|not sure|i think|i believe|perhaps|maybe|could be wrong|not certain|let me think|"
    r"hard one)\b",
    re.IGNORECASE,
)

KINDS = ("capital", "colour", "animal", "sum")


# ------------------------------------------------------------------------------------------------
# scoring (the rules demo_eval used, unchanged)


def read_answers(path: Path) -> dict[str, list[str]]:
    """Every known answer value per kind of fact, from the demo's world.json (``{"answers": {kind: [...]}}``)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return {k: [str(v) for v in vs] for k, vs in data.get("answers", {}).items()}


def named(text: str, candidates: list[str]) -> list[str]:
    """The candidate values `text` names (whole words, any case), in order of appearance."""
    found = []
    for c in candidates:
        for m in re.finditer(rf"(?<!\w){re.escape(c)}(?!\w)", text, flags=re.IGNORECASE):
            found.append((m.start(), c))
    return [c for _, c in sorted(found)]


def score(item: dict, answer: str, values: dict[str, list[str]], ended: bool = True) -> dict:
    """An answer may restate the question ("8 plus 6 equals 14."), so its value is the LAST value it
    names; naming more than one value the question does not contain is a list of guesses: wrong.
    An answer that never ends its turn (`ended` False) is not an answer: a model that has not learnt
    the chat format rambles on in corpus style and may name the right value on the way."""
    expected = item["answer"]
    candidates = values.get(item.get("kind", ""), []) or [expected]
    said = named(answer, candidates)
    in_question = set(named(item.get("question", ""), candidates))
    guesses = {v for v in said if v not in in_question}
    value = said[-1] if said and len(guesses) <= 1 else None
    correct = ended and value is not None and value.lower() == expected.lower()
    text = answer.strip()
    # Direct: an answer (it names a value), in one sentence, without hedging.
    direct = (
        ended
        and value is not None
        and text.endswith(".")
        and not re.search(r"[.?!]\s", text)
        and not HEDGING.search(text)
    )
    return {"correct": correct, "direct": direct}


def _items(options: TaskOptions, env: TaskEnv, need: tuple[str, ...]) -> list[dict]:
    from llmforge_plugins.eval.spec import item_field, read_items

    items = read_items(options, env.base_dir)
    for i, item in enumerate(items):
        for key in need:
            item_field(item, items.where(i), key, kinds=(str,))
    return list(items)


# ------------------------------------------------------------------------------------------------
# demo_qa


class DemoQAOptions(TaskOptions):
    answers_data: str | None = Field(
        None,
        description='JSON file with the known answer values per kind ({"answers": {kind: [...]}}, the demo\'s '
        "world.json); without it, an answer is right when the expected value is the last value it names.",
    )
    max_new_tokens: int = Field(40, gt=0, le=512, description="Longest generated answer, in tokens.")
    probe_tokens: int = Field(8, ge=0, description="Tokens of the corpus-sentence completion (0: no probe).")


class DemoQATask(EvalTask):
    kind = "demo_qa"
    summary = "The demo's held-out questions: accuracy, answers that end their turn, direct answers, the probe."
    Options = DemoQAOptions
    primary = "accuracy"

    def run(self, options: DemoQAOptions, model, env: TaskEnv) -> TaskResult:
        started = time.perf_counter()
        items = _items(options, env, ("question", "answer"))
        values = read_answers(Path(options.answers_data)) if options.answers_data else {}
        prompts = [model.prompt([{"role": "user", "content": it["question"]}]) for it in items]
        limit = options.max_new_tokens
        answers = [a.strip() for a in model.generate(prompts, max_new_tokens=limit, seed=env.seed)]
        env.progress(len(items) // 2, len(items))
        # Did an answer end its turn within the limit? The eval model returns text only: greedy decoding with
        # one token more gives the same text exactly when it stopped on its own. Only an answer of `limit`
        # characters or more can have used `limit` tokens (every token of this ASCII world is a character or
        # more), so only those are asked again.
        longer = [i for i, a in enumerate(answers) if len(a) >= limit]
        again = model.generate([prompts[i] for i in longer], max_new_tokens=limit + 1, seed=env.seed) if longer else []
        ended = [True] * len(items)
        for i, a in zip(longer, again):
            ended[i] = a.strip() == answers[i]
        probes: list[str | None] = [None] * len(items)
        if options.probe_tokens and all(isinstance(it.get("probe"), str) for it in items):
            out = model.generate([it["probe"] for it in items], max_new_tokens=options.probe_tokens, seed=env.seed)
            # the first sentence of the continuation completes the probe; later ones are new text
            probes = [o.split("\n\n")[0].strip() for o in out]
        env.progress(len(items), len(items))

        records, scored = [], []
        for i, (it, answer) in enumerate(zip(items, answers)):
            s = score(it, answer, values, ended[i])
            scored.append(s)
            record = {
                "question": it["question"],
                "prompt": prompts[i],
                "answer": answer,
                "target": it["answer"],
                "kind": it.get("kind"),
                "ended": ended[i],
                "score": float(s["correct"]),
                "direct": s["direct"],
            }
            completion = probes[i]
            if completion is not None:
                record["probe"] = f"{it['probe']} {completion}"
                record["probe_correct"] = score(it, completion.split(". ")[0], values)["correct"]
            records.append(record)
        metrics = {
            "accuracy": mean_metric(float(s["correct"]) for s in scored),
            "ended_turn": mean_metric(float(e) for e in ended),
            "preferred_rate": mean_metric(float(s["direct"]) for s in scored),
            "preferred_and_correct": mean_metric(float(s["direct"] and s["correct"]) for s in scored),
        }
        for kind in sorted({str(it.get("kind")) for it in items if it.get("kind")}):
            metrics[f"accuracy_{kind}"] = mean_metric(
                float(s["correct"]) for it, s in zip(items, scored) if it.get("kind") == kind
            )
        if all(r.get("probe") for r in records):
            metrics["probe"] = mean_metric(float(r["probe_correct"]) for r in records)
        info = {"asked_again": len(longer), "seconds": round(time.perf_counter() - started, 3)}
        return TaskResult(metrics, records, info)


# ------------------------------------------------------------------------------------------------
# demo_margin


class DemoMarginOptions(TaskOptions):
    end_of_turn: str = Field(
        "<|im_end|>",
        description="The end-of-turn marker scored after each answer (the demo's models use chatml's).",
    )


class DemoMarginTask(EvalTask):
    kind = "demo_margin"
    summary = "The demo's held-out preference pairs: log p(direct) - log p(hedging), and pairs won."
    Options = DemoMarginOptions
    primary = "logp_margin"

    def run(self, options: DemoMarginOptions, model, env: TaskEnv) -> TaskResult:
        items = _items(options, env, ("question", "chosen", "rejected"))
        prompts = [model.prompt([{"role": "user", "content": it["question"]}]) for it in items]
        requests = []
        for p, it in zip(prompts, items):
            requests += [(p, it["chosen"] + options.end_of_turn), (p, it["rejected"] + options.end_of_turn)]
        lls = [ll for ll, _ in model.loglikelihood(requests)]
        env.progress(len(items), len(items))
        margins = [lls[2 * i] - lls[2 * i + 1] for i in range(len(items))]
        records = [
            {
                "question": it["question"],
                "prompt": p,
                "answer": None,
                "chosen": it["chosen"],
                "rejected": it["rejected"],
                "margin": m,
                "score": float(m > 0),
            }
            for p, it, m in zip(prompts, items, margins)
        ]
        metrics = {
            "logp_margin": mean_metric(margins),
            "pair_win_rate": mean_metric(float(m > 0) for m in margins),
        }
        return TaskResult(metrics, records)


DEMO_TASKS = (DemoQATask, DemoMarginTask)


# ------------------------------------------------------------------------------------------------
# the demo's figures, read from an eval report


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _items_of(folder: Path, result: dict) -> list[dict]:
    rel = result.get("items")
    return _read_jsonl(folder / rel) if isinstance(rel, str) else []


def demo_figures(folder: Path) -> dict[str, Any]:
    """The demo's evaluation, from the eval stage's report folder (report.json and items/): per HF model the
    figures demo_eval reported (accuracy, ended_turn, preferred_rate, preferred_and_correct, accuracy_by_kind,
    logp_margin, pair_win_rate), the DPO reward accuracy, the knowledge probe of the pretrained model, and the
    GGUF files: llama.cpp's F32 answers against transformers' on the exported (merged) model, one quantized
    file's chat answer, and the gguf stage's scorecard rows."""
    folder = Path(folder)
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    tasks = {t["name"]: t for t in report.get("tasks", [])}
    qa = next((n for n, t in tasks.items() if t.get("kind") == "demo_qa"), None)
    margin = next((n for n, t in tasks.items() if t.get("kind") == "demo_margin"), None)
    by = {(r["model"], r["task"]): r for r in report.get("results", [])}
    models = report.get("models", [])
    hf = [m["label"] for m in models if m.get("engine") == "hf"]
    gguf = [m for m in models if m.get("engine") == "gguf"]

    def value(label: str, task: str | None, metric: str) -> float | None:
        m = (by.get((label, task or "")) or {}).get("metrics", {}).get(metric)
        return None if m is None else round(float(m["value"]), 4)

    results: dict[str, dict] = {}
    n_items = 0
    for label in hf:
        res: dict[str, Any] = {}
        for metric in ("accuracy", "ended_turn", "preferred_rate", "preferred_and_correct"):
            res[metric] = value(label, qa, metric)
        res["accuracy_by_kind"] = {k: v for k in KINDS if (v := value(label, qa, f"accuracy_{k}")) is not None}
        for metric in ("pair_win_rate", "logp_margin"):
            v = value(label, margin, metric)
            if v is not None:
                res[metric] = v
        results[label] = res
        n_items = max(
            n_items, int(((by.get((label, qa or "")) or {}).get("metrics", {}).get("accuracy") or {}).get("n", 0))
        )
    out: dict[str, Any] = {"items": n_items, "results": results}

    if margin and "sft" in hf and "dpo" in hf:
        sft = [r["margin"] for r in _items_of(folder, by.get(("sft", margin), {}))]
        dpo = [r["margin"] for r in _items_of(folder, by.get(("dpo", margin), {}))]
        if sft and len(sft) == len(dpo):
            out["dpo_reward_accuracy"] = round(sum(d > s for d, s in zip(dpo, sft)) / len(sft), 4)
    first = "pretrained" if "pretrained" in hf else (hf[0] if hf else None)
    probe = value(first, qa, "probe") if first else None
    out["knowledge_probe"] = {"model": first, "accuracy": probe} if probe is not None else None

    if gguf and qa:
        section: dict[str, Any] = {"questions": 0, "same_greedy": 0}
        f32 = next((m for m in gguf if str(m.get("quant")).upper() == "F32"), None)
        # the file was exported from the merged model (else the last HF model): the same greedy answers?
        exported = next((label for label in ("merged", "merge") if label in hf), hf[-1] if hf else None)
        if f32 is not None and exported is not None:
            a = _items_of(folder, by.get((exported, qa), {}))
            b = _items_of(folder, by.get((f32["label"], qa), {}))
            section["questions"] = min(len(a), len(b))
            section["same_greedy"] = sum(x["answer"] == y["answer"] for x, y in zip(a, b))
            section["compared_with"] = exported
        quantized = [m for m in gguf if m is not f32]
        chat = next((m for m in quantized if str(m.get("quant")).upper() == "Q8_0"), quantized[0] if quantized else f32)
        if chat is not None:
            recs = _items_of(folder, by.get((chat["label"], qa), {}))
            if recs:
                section["chat"] = {
                    "file": Path(chat["path"]).name,
                    "question": recs[0]["question"],
                    "answer": recs[0]["answer"],
                }
        card = Path(gguf[0]["path"]).parent / "report.json"
        if card.is_file():
            rows = json.loads(card.read_text(encoding="utf-8"))["card"]["rows"]
            keys = ("type", "top1", "mean_kld", "ppl", "bytes", "bpw")
            section["scorecard"] = [{"file": Path(r["file"]).name, **{k: r.get(k) for k in keys}} for r in rows]
        section["accuracy"] = {Path(m["path"]).name: value(m["label"], qa, "accuracy") for m in gguf}
        out["gguf"] = section
    return out
