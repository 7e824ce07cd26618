"""Eval task kinds scored by a judge: ``judge`` (a rubric score per answer) and ``pairwise`` (win rate against
a reference model's answers, or the items' reference answers, both orders asked).

    [[stages]]
    name = "eval"
    uses = "eval"
    models = ["@sft", "@dpo"]
    tasks = [
      { name = "helpful", kind = "judge", data = "prompts.jsonl", judge = "local", rubric = "Is it helpful?" },
      { name = "vs_base", kind = "pairwise", data = "prompts.jsonl", judge = "local", reference = "models/base" },
    ]

Items have a ``prompt`` (the ``template`` fills the question from any fields) and, optionally, a
``reference`` answer (the judge then compares with it: reference-guided; pairwise: the answer to beat when
no reference model is named). The evaluated model answers through its chat template; the judge (a
``[judges.NAME]`` of forge.toml) scores. Judgments without a verdict are counted (``failures``) and left out
of the means, never scored zero. The judge's cache lives in the stage's work folder: a resumed eval asks
nothing twice.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import Field

from llmforge.errors import Problem, UsageError
from llmforge.schema import did_you_mean
from llmforge_plugins.eval.api import EvalModel, EvalTask, Metric, TaskEnv, TaskOptions, TaskResult, mean_metric


class _JudgedOptions(TaskOptions):
    judge: str = Field(description="The judge: the NAME of a [judges.NAME] table in forge.toml.")
    template: str = Field("{prompt}", description="The question asked to the evaluated model, from the item's fields.")
    rubric: str | None = Field(None, description="What the judge looks for (default: a general helpfulness rubric).")
    reference_field: str = Field(
        "reference", description="The items' field holding a reference answer (used where present)."
    )
    max_new_tokens: int = Field(256, gt=0, description="The evaluated model's longest answer, in tokens.")


class JudgeTaskOptions(_JudgedOptions):
    scale: tuple[float, float] = Field((1, 10), description="The lowest and highest score the judge gives.")


class PairwiseOptions(_JudgedOptions):
    reference: str | None = Field(
        None,
        description="A reference model (an HF folder or a .gguf; relative to the spec's file) whose answers are "
        "compared; unset: the items' reference answers.",
    )


def open_judge(options: Any, env: TaskEnv) -> Any:
    """The judge the spec names, opened with the task's cache folder, or a UsageError (exit 2) naming the
    declared ones."""
    from llmforge_plugins.judges.judge import Judge

    spec = env.judges.get(options.judge)
    if spec is None:
        declared = ", ".join(sorted(env.judges)) or "none"
        raise UsageError(
            f"{options.name}: judge: no judge named '{options.judge}'{did_you_mean(options.judge, env.judges)} "
            f"(declared in forge.toml: {declared})",
            hint=f'declare it: [judges.{options.judge}] backend = "gguf" | "hf" | "openai", model = "..."',
        )
    return Judge.open(spec, cache_dir=env.cache_dir, log=env.log)


def _questions(options: Any, env: TaskEnv) -> tuple[Any, list[str], list[str | None]]:
    from llmforge_plugins.eval.spec import read_items
    from llmforge_plugins.eval.tasks import render

    items = read_items(options, env.base_dir)
    questions, references = [], []
    for i, item in enumerate(items):
        where = items.where(i)
        questions.append(render(options.template, item, where))
        ref = item.get(options.reference_field)
        references.append(None if ref is None or ref == "" else str(ref))
    return items, questions, references


def _answers(model: EvalModel, options: Any, env: TaskEnv, questions: list[str]) -> tuple[list[str], list[str]]:
    """The model's prompts (its chat template, as it was trained) and answers."""
    chat = model.has_chat_template if options.chat is None else options.chat
    prompts = []
    for q in questions:
        if chat:
            messages = ([{"role": "system", "content": options.system}] if options.system else []) + [
                {"role": "user", "content": q}
            ]
            prompts.append(model.prompt(messages))
        else:
            prompts.append(q)
    answers: list[str] = []
    step = 16
    for start in range(0, len(prompts), step):
        if env.should_stop():
            break
        answers += model.generate(prompts[start : start + step], max_new_tokens=options.max_new_tokens, seed=env.seed)
        env.progress(len(answers), 2 * len(prompts))
    return prompts, answers


def _count(n: int, judged: int) -> Metric:
    """A count shown in the leaderboard (no spread), over the items judged."""
    return Metric(float(n), None, judged, higher_is_better=False)


class JudgeTask(EvalTask):
    kind = "judge"
    summary = "Open answers scored by a judge on a rubric (pointwise; reference-guided where items have one)."
    Options = JudgeTaskOptions
    primary = "score"

    def check(self, options: Any) -> list[Any]:
        problems = []
        if options.data is None:
            problems.append(Problem("data", "required: the items (a .jsonl, .csv or .parquet file with a prompt)"))
        low, high = options.scale
        if not low < high:
            problems.append(Problem("scale", f"the lowest score must be below the highest (got {low}, {high})"))
        return problems

    def run(self, options: Any, model: EvalModel, env: TaskEnv) -> TaskResult:
        started = time.perf_counter()
        items, questions, references = _questions(options, env)
        judge = open_judge(options, env)
        judge.scale = (float(options.scale[0]), float(options.scale[1]))
        try:
            prompts, answers = _answers(model, options, env, questions)
            asks = [
                {"question": questions[i], "answer": a, "rubric": options.rubric, "reference": references[i]}
                for i, a in enumerate(answers)
            ]
            judgments = judge.pointwise_many(asks)
        finally:
            judge.close()
        env.progress(2 * len(questions), 2 * len(questions))
        scores, records, failures = [], [], 0
        for i, j in enumerate(judgments):
            if j.ok:
                scores.append(float(j.score))
            else:
                failures += 1
            records.append(
                {
                    "where": items.where(i),
                    "prompt": prompts[i],
                    "answer": answers[i],
                    "score": j.score,
                    "judgment": j.to_json(),
                    **({"reference": references[i]} if references[i] is not None else {}),
                }
            )
        metrics = {"score": mean_metric(scores), "failures": _count(failures, len(judgments))}
        info = _info(judge, started, len(answers) < len(questions))
        return TaskResult(metrics, records, info)


class PairwiseTask(EvalTask):
    kind = "pairwise"
    summary = "Win rate against a reference model's answers (or reference answers), judged in both orders."
    Options = PairwiseOptions
    primary = "win_rate"

    def check(self, options: Any) -> list[Any]:
        problems = []
        if options.data is None:
            problems.append(Problem("data", "required: the items (a .jsonl, .csv or .parquet file with a prompt)"))
        ref = options.reference
        if ref is not None and Path(ref).expanduser().is_absolute() and not Path(ref).expanduser().exists():
            problems.append(Problem("reference", f"no such model file or folder: {ref}"))
        return problems

    def run(self, options: Any, model: EvalModel, env: TaskEnv) -> TaskResult:
        started = time.perf_counter()
        items, questions, references = _questions(options, env)
        if options.reference is not None:
            references = self._reference_answers(options, env, questions)
        missing = [items.where(i) for i, r in enumerate(references) if r is None]
        if missing:
            from llmforge.errors import DataError

            raise DataError(
                f"{missing[0]}: no '{options.reference_field}' answer to compare with"
                + (f" ({len(missing)} items lack one)" if len(missing) > 1 else ""),
                hint='give the items a reference answer, or name a reference model: reference = "path"',
            )
        judge = open_judge(options, env)
        try:
            prompts, answers = _answers(model, options, env, questions)
            pairs = [
                {"question": questions[i], "a": a, "b": references[i], "rubric": options.rubric}
                for i, a in enumerate(answers)
            ]
            judgments = judge.pairwise_many(pairs)
        finally:
            judge.close()
        points, records = [], []
        wins = ties = losses = failures = 0
        for i, j in enumerate(judgments):
            point: float | None = None
            if not j.ok:
                failures += 1
            elif j.winner == "a":
                wins, point = wins + 1, 1.0
            elif j.winner == "b":
                losses, point = losses + 1, 0.0
            else:
                ties, point = ties + 1, 0.5
            if point is not None:
                points.append(point)
            records.append(
                {
                    "where": items.where(i),
                    "prompt": prompts[i],
                    "answer": answers[i],
                    "reference": references[i],
                    "score": point,
                    "judgment": j.to_json(),
                }
            )
        n = len(points)
        metrics = {
            "win_rate": mean_metric(points),
            "wins": Metric(float(wins), None, n),
            "ties": Metric(float(ties), None, n),
            "losses": Metric(float(losses), None, n, higher_is_better=False),
            "failures": _count(failures, len(judgments)),
        }
        info = _info(judge, started, len(answers) < len(questions))
        info["inconsistent"] = sum(1 for j in judgments if j.ok and j.consistent is False)
        if options.reference is not None:
            info["reference"] = options.reference
        return TaskResult(metrics, records, info)

    def _reference_answers(self, options: Any, env: TaskEnv, questions: list[str]) -> list[str | None]:
        from llmforge_plugins.eval.models import open_model

        path = Path(options.reference).expanduser()
        path = path if path.is_absolute() else env.base_dir / path
        ref = open_model(path, env.registry, label="reference", log=env.log)
        try:
            _, answers = _answers(ref, options, env, questions)
        finally:
            ref.close()
        return list(answers)


def _info(judge: Any, started: float, stopped: bool) -> dict[str, Any]:
    info: dict[str, Any] = {
        "judge": judge.name,
        "judge_identity": judge.identity,
        "judge_requests": judge.stats["requests"],
        "judge_cached": judge.stats["cached"],
        "judge_retries": judge.stats["retries"],
        "judge_failures": judge.stats["failures"],
        "seconds": round(time.perf_counter() - started, 3),
    }
    if stopped:
        info["stopped"] = True
    return info


TASKS: list[type[EvalTask]] = [JudgeTask, PairwiseTask]
