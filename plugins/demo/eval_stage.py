"""`demo_eval`: did the demo's models learn? Held-out questions, answered by each model.

The stage of projects written by an older `llmforge demo`; the demo now runs the `eval` stage with the demo
plugin's task kinds (tasks.py), which measure the same with the same rules.

For every model given (pretrained, after SFT, after DPO, merged) the stage formats each held-out question
with the model's own chat template, generates a greedy answer and scores it:

* accuracy: the generated answer names the expected value (out of every known capital, colour,
  animal or number) as its answer: the last value it names, as answers restate the question
  ("8 plus 6 equals 14."), and no other value beyond those in the question, so that a model which
  lists many values does not score by luck;
* preferred rate (by generation): the answer has the direct style the DPO pairs prefer: one
  sentence that names an answer value, without hedging ("I think", "not sure", ...), right or not;
* log-probability margin: on held-out direct-vs-hedging pairs, log p(direct) - log p(hedging)
  (summed over the answer tokens, the quantity DPO works on). The hedging answer is longer, so even
  an untrained model favours the direct one by this sum; what tells is the change: the DPO reward
  accuracy is the share of held-out pairs whose margin DPO raised over the SFT model's (DPO's own
  "rewards/accuracies", measured on questions it was not trained on).

The pretrained model is also probed with the start of a corpus sentence ("The capital of X is"),
which shows whether pretraining stored the held-out facts that SFT then makes answerable.

Writes a `report` artifact (report.json, report.md, answers.jsonl) and records the key numbers in
the manifest (ctx.info) and as one metric event.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from llmforge.stage import Input, Produced, Stage, StageContext, StageOptions

# The answer-matching rules are those of the demo's eval task kinds (tasks.py): one copy of them.
from llmforge_plugins.demo.tasks import HEDGING  # noqa: F401 - kept importable from here
from llmforge_plugins.demo.tasks import read_answers as _read_answers
from llmforge_plugins.demo.tasks import score as _score


class DemoEvalOptions(StageOptions):
    pretrained: Annotated[str, Input("model", "adapter")] = Field(
        description="The pretrained model (before any chat training): @stage or a HF directory."
    )
    sft: Annotated[str, Input("model", "adapter")] = Field(description="The model after SFT.")
    dpo: Annotated[str | None, Input("model", "adapter")] = Field(None, description="The model after DPO.")
    merged: Annotated[str | None, Input("model", "adapter")] = Field(
        None, description="A merged model (the demo merges the SFT and DPO models), evaluated like the others."
    )
    data: Annotated[str, Input()] = Field(
        description="Held-out items (JSON Lines: question, answer, kind, chosen, rejected, probe)."
    )
    gguf: Annotated[str | None, Input("gguf")] = Field(
        None,
        description="The gguf stage's folder (of the merged model, else the DPO or SFT one): its F32 file's "
        "greedy answers in llama.cpp are compared with transformers' on the held-out questions, "
        "and a quantized file answers one question as a chat.",
    )
    gguf_questions: int = Field(8, gt=0, description="Held-out questions both runtimes answer for the comparison.")
    answers: Annotated[str | None, Input()] = Field(
        None,
        description='JSON file with the known answer values per kind ({"answers": {kind: [...]}}); '
        "without it, an answer is right when the expected value is the last value it names.",
    )
    max_new_tokens: int = Field(40, gt=0, le=512, description="Longest generated answer, in tokens.")
    limit: int | None = Field(None, gt=0, description="Use at most this many held-out items.")
    batch_size: int = Field(16, gt=0, description="Prompts generated together.")


class DemoEvalStage(Stage):
    kind = "demo_eval"
    summary = "Held-out QA accuracy and preferred-answer rate of the demo's pretrained, SFT, DPO and merged models."
    Options = DemoEvalOptions
    produces = ("report",)
    version = "1"
    cache_libraries = ("torch", "transformers")

    def run(self, options: DemoEvalOptions, ctx: StageContext) -> Produced | None:
        import torch

        from llmforge.errors import DataError

        items = _read_items(Path(options.data))
        if options.limit:
            items = items[: options.limit]
        if not items:
            raise DataError(f"{options.data}: no held-out items")
        values = _read_answers(Path(options.answers)) if options.answers else {}
        torch.manual_seed(ctx.seed)
        models = (
            [("pretrained", options.pretrained), ("sft", options.sft)]
            + ([("dpo", options.dpo)] if options.dpo else [])
            + ([("merged", options.merged)] if options.merged else [])
        )
        ctx.log(
            f"evaluating {len(models)} models on {len(items)} held-out questions "
            f"(greedy, at most {options.max_new_tokens} new tokens)"
        )

        results: dict[str, dict] = {}
        answers: dict[str, list[str]] = {}
        margins: dict[str, list[float]] = {}
        probe: dict | None = None
        for i, (label, path) in enumerate(models):
            if ctx.should_stop():
                return ctx.published  # stopped: recorded as such, nothing published yet
            model, tok, stops = _load(path)
            prompts = [_chat_prompt(tok, it["question"]) for it in items]
            answers[label], ended = _generate(model, tok, prompts, stops, options.max_new_tokens, options.batch_size)
            scored = [_score(it, a, values, e) for it, a, e in zip(items, answers[label], ended)]
            res = {
                "accuracy": _mean(s["correct"] for s in scored),
                "ended_turn": _mean(ended),
                "preferred_rate": _mean(s["direct"] for s in scored),
                "preferred_and_correct": _mean(s["direct"] and s["correct"] for s in scored),
                "accuracy_by_kind": _by_kind(items, [s["correct"] for s in scored]),
            }
            if all("chosen" in it and "rejected" in it for it in items):
                margins[label] = _pair_margins(model, tok, prompts, items)
                res["pair_win_rate"] = _mean(m > 0 for m in margins[label])
                res["logp_margin"] = round(sum(margins[label]) / len(margins[label]), 4)
            if label == "pretrained" and all(it.get("probe") for it in items):
                probe_answers, _ = _generate(
                    model, tok, [it["probe"] for it in items], stops, 8, options.batch_size, plain=True
                )
                # the first sentence of the continuation completes the probe; later ones are new text
                probe = {
                    "accuracy": _mean(
                        _score(it, a.split(". ")[0], values)["correct"] for it, a in zip(items, probe_answers)
                    ),
                    "answers": probe_answers,
                }
            results[label] = res
            ctx.log(
                f"{label}: accuracy {res['accuracy']:.2f}, preferred style {res['preferred_rate']:.2f}"
                + (f", log-prob margin {res['logp_margin']:+.2f}" if "logp_margin" in res else "")
            )
            ctx.progress(i + 1, len(models), unit="model")
            del model

        report: dict[str, Any] = {
            "items": len(items),
            "models": {label: str(path) for label, path in models},
            "results": results,
            "knowledge_probe": {"accuracy": probe["accuracy"]} if probe else None,
            "method": {
                "accuracy": "greedy answer to the chat-formatted question; right when the model ends its turn "
                "(end-of-turn token within max_new_tokens), the last known answer value it names is "
                "the expected one, and it names no other value absent from the question",
                "ended_turn": "share of answers that end with the end-of-turn token within max_new_tokens",
                "preferred_rate": "share of greedy answers in the direct style: one sentence naming an answer "
                "value, with no hedging words",
                "preferred_and_correct": "share of greedy answers that are both direct and right",
                "logp_margin": "mean over held-out pairs of log p(direct answer) - log p(hedging answer), each "
                "summed over the answer tokens and the end-of-turn token (favours the shorter "
                "direct answer even before training; compare models)",
                "pair_win_rate": "share of held-out pairs with a positive logp_margin",
                "dpo_reward_accuracy": "share of held-out pairs whose logp_margin is larger after DPO than after SFT",
                "knowledge_probe": "pretrained model completing the start of a corpus-style sentence",
            },
        }
        if options.gguf and not ctx.should_stop():
            exported = options.merged or options.dpo or options.sft
            report["gguf"] = _gguf_section(
                Path(options.gguf), Path(exported), items[: options.gguf_questions], options.max_new_tokens
            )
            g = report["gguf"]
            ctx.log(
                f"gguf: the F32 file answers {g['same_greedy']}/{g['questions']} held-out questions with exactly "
                f"transformers' greedy tokens"
                + (f"; {g['chat']['file']}: {g['chat']['answer']!r}" if g.get("chat") else "")
            )
        headline = {
            "accuracy": {k: r["accuracy"] for k, r in results.items()},
            "preferred_rate": {k: r["preferred_rate"] for k, r in results.items()},
        }
        if all("logp_margin" in r for r in results.values()):
            headline["logp_margin"] = {k: r["logp_margin"] for k, r in results.items()}
        if "sft" in margins and "dpo" in margins:
            report["dpo_reward_accuracy"] = _mean(d > s for d, s in zip(margins["dpo"], margins["sft"]))
        report["headline"] = headline
        with ctx.artifact("report") as out:
            (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            (out / "report.md").write_text(_markdown(report))
            with open(out / "answers.jsonl", "w", encoding="utf-8") as fh:
                for n, it in enumerate(items):
                    row = {
                        "question": it["question"],
                        "expected": it["answer"],
                        "kind": it.get("kind"),
                        **{label: answers[label][n] for label in answers},
                    }
                    if probe:
                        row["probe"] = f"{it['probe']} {probe['answers'][n]}"
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        ctx.info.update(items=len(items), **headline)
        extra = {}
        if probe:
            ctx.info["knowledge_probe"] = extra["knowledge_probe"] = probe["accuracy"]
        if "dpo_reward_accuracy" in report:
            ctx.info["dpo_reward_accuracy"] = extra["dpo_reward_accuracy"] = report["dpo_reward_accuracy"]
        ctx.metric(**{f"{name}/{label}": v for name, by in headline.items() for label, v in by.items()}, **extra)
        return ctx.published


# ----------------------------------------------------------------------------------------------
# data and scoring


def _read_items(path: Path) -> list[dict]:
    from llmforge.errors import DataError

    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        for key in ("question", "answer"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise DataError(f"{path}:{n}: {key}: missing or not a string")
        items.append(row)
    return items


def _mean(xs) -> float:
    xs = list(xs)
    return round(sum(bool(x) for x in xs) / len(xs), 4) if xs else 0.0


def _by_kind(items: list[dict], correct: list[bool]) -> dict[str, float]:
    out: dict[str, list[bool]] = {}
    for it, c in zip(items, correct):
        out.setdefault(it.get("kind", "all"), []).append(c)
    return {k: _mean(v) for k, v in sorted(out.items())}


# ----------------------------------------------------------------------------------------------
# models


def _load(path: str):
    import torch

    from llmforge.chat import template_from_tokenizer
    from llmforge_plugins.training.models import load_model, load_tokenizer

    tok = load_tokenizer(path)
    tok.padding_side = "left"  # generation continues every prompt from its last token
    model = load_model(path, dtype=torch.float32)
    model.eval()
    model.config.use_cache = True
    stops = [tok.eos_token_id]
    try:
        template = template_from_tokenizer(tok)
        for s in template.stop_strings:
            ids = tok(s, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                stops.append(ids[0])
    except Exception:  # noqa: BLE001 - a tokenizer without a template still stops on EOS
        pass
    return model, tok, sorted({s for s in stops if s is not None})


def _chat_prompt(tok, question: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)


def _generate(
    model, tok, prompts: list[str], stops: list[int], max_new: int, batch: int, plain: bool = False
) -> tuple[list[str], list[bool]]:
    """Greedy continuations of `prompts`, and for each whether it stopped on a stop token."""
    import torch

    texts: list[str] = []
    ended: list[bool] = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        # Chat prompts carry their own markers; a plain probe starts like a corpus document (BOS if any).
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=plain)
        with torch.no_grad():
            gen = model.generate(
                **enc, max_new_tokens=max_new, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id
            )
        for row in gen[:, enc["input_ids"].shape[1] :]:
            ids = row.tolist()
            ended.append(any(t in stops for t in ids))
            text = tok.decode(row, skip_special_tokens=True)
            texts.append(text.split("\n\n")[0].strip() if plain else text.strip())
    return texts, ended


def _answer_logp(model, tok, prompt_ids: list[int], answer: str) -> float:
    import torch

    ids = tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"]
    full = torch.tensor([prompt_ids + ids])
    with torch.no_grad():
        logits = model(full).logits[0, len(prompt_ids) - 1 : -1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids)[:, None])
    return float(logp.sum())


def _pair_margins(model, tok, prompts: list[str], items: list[dict]) -> list[float]:
    """log p(chosen) - log p(rejected) per held-out pair."""
    out = []
    for prompt, it in zip(prompts, items):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        out.append(_answer_logp(model, tok, p, it["chosen"]) - _answer_logp(model, tok, p, it["rejected"]))
    return out


# ----------------------------------------------------------------------------------------------
# report


def _markdown(report: dict) -> str:
    res = report["results"]
    labels = list(res)
    lines = [
        f"# Demo evaluation ({report['items']} held-out questions)",
        "",
        "| metric | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    rows = [
        ("answers that end their turn", "ended_turn"),
        ("QA accuracy", "accuracy"),
        ("preferred style (generation)", "preferred_rate"),
        ("preferred and correct", "preferred_and_correct"),
        ("log p(direct) - log p(hedging)", "logp_margin"),
        ("pairs with a positive margin", "pair_win_rate"),
    ]
    for title, key in rows:
        if all(key in res[label] for label in labels):
            lines.append(f"| {title} | " + " | ".join(f"{res[label][key]:.2f}" for label in labels) + " |")
    kinds = sorted({k for r in res.values() for k in r["accuracy_by_kind"]})
    for kind in kinds:
        lines.append(
            f"| accuracy: {kind} | "
            + " | ".join(f"{res[label]['accuracy_by_kind'].get(kind, 0.0):.2f}" for label in labels)
            + " |"
        )
    if report.get("dpo_reward_accuracy") is not None:
        lines += [
            "",
            f"DPO reward accuracy on held-out pairs (margin raised over the SFT model): "
            f"{report['dpo_reward_accuracy']:.2f}",
        ]
    if report.get("knowledge_probe"):
        lines += [
            "",
            f"Knowledge probe (pretrained model completing corpus-style sentences): "
            f"{report['knowledge_probe']['accuracy']:.2f}",
        ]
    lines += ["", "How each number is measured:", ""]
    lines += [f"- {k}: {v}" for k, v in report["method"].items()]
    return "\n".join(lines) + "\n"


def _gguf_section(folder: Path, exported: Path, items: list[dict], max_new: int) -> dict:
    """The exported model and its F32 GGUF answer the same questions greedily, transformers against llama.cpp,
    token for token; a quantized GGUF answers the first question as a chat; the stage's scorecard rows."""
    from llmforge_plugins.gguf.chat import open_engine, reply

    files = sorted(folder.glob("*.gguf"))
    f32 = next((f for f in files if f.stem.lower().endswith("-f32")), None)
    quantized = [f for f in files if f != f32]
    section: dict = {"questions": 0, "same_greedy": 0}
    if f32 is not None:
        hf, gg = open_engine(exported), open_engine(f32)
        try:
            for it in items:
                messages = [{"role": "user", "content": it["question"]}]
                a = reply(hf, messages, max_new_tokens=max_new, temperature=0)
                b = reply(gg, messages, max_new_tokens=max_new, temperature=0)
                section["questions"] += 1
                section["same_greedy"] += a.token_ids == b.token_ids
        finally:
            gg.close()
            hf.close()
    chat_file = next((f for f in quantized if "q8_0" in f.stem.lower()), quantized[0] if quantized else f32)
    if chat_file is not None and items:
        engine = open_engine(chat_file)
        try:
            answer = reply(
                engine, [{"role": "user", "content": items[0]["question"]}], max_new_tokens=max_new, temperature=0
            )
        finally:
            engine.close()
        section["chat"] = {"file": chat_file.name, "question": items[0]["question"], "answer": answer.text.strip()}
    card = folder / "report.json"
    if card.exists():
        rows = json.loads(card.read_text(encoding="utf-8"))["card"]["rows"]
        section["scorecard"] = [
            {"file": Path(r["file"]).name, **{k: r.get(k) for k in ("type", "top1", "mean_kld", "ppl", "bytes", "bpw")}}
            for r in rows
        ]
    return section
