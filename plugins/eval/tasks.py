"""The built-in task kinds: ``perplexity``, ``multiple_choice`` and ``generation``.

Each is an :class:`~llmforge_plugins.eval.api.EvalTask` registered through ``register_eval_tasks``, as a
third-party kind would be. They read their items with :mod:`llmforge_plugins.eval.spec` (a bad row names
file, line and field) and ask the model in one batched call per chunk of items, so that the model runner
can sort and share prefixes.

**perplexity**: the rolling log-likelihood of each text (a ``text`` field, or the blank-line separated
documents of a ``.txt`` file). Metrics as lm-evaluation-harness reports them for wikitext, summed over all
texts before dividing: ``perplexity`` = exp(-Σ log p / Σ tokens) (per token of this model's tokenizer, so
compare models with different tokenizers on ``bits_per_byte``), ``word_perplexity`` (per whitespace-split
word), ``byte_perplexity`` and ``bits_per_byte`` (per UTF-8 byte). Lower is better; no standard error.

**multiple_choice**: the item's question rendered with ``template`` is the context; each choice, after
``choice_prefix``, a continuation; the model's log-likelihood of each continuation picks its answer.
With ``num_fewshot``, examples (``template`` + ``choice_prefix`` + their right choice) come first, joined by
``fewshot_separator``. This is lm-evaluation-harness's ``multiple_choice`` output type with
``doc_to_text = template``, ``target_delimiter = choice_prefix``, ``fewshot_delimiter = fewshot_separator``::

    Question: What is 2 + 2?
    Answer: 4            <- context "Question: What is 2 + 2?\\nAnswer:", continuation " 4"

``acc``: the choice with the highest log-likelihood is the answer (the first on a tie). ``acc_norm``: the
highest log-likelihood divided by the choice's length in characters (the choice's text, without the
prefix), as lm-eval defines it; it removes the bias towards short choices. Both with the standard error
of a mean. With ``chat = true`` the question is asked through the model's chat template and each choice is
the assistant's answer (lm-eval's ``--apply_chat_template``: no prefix), examples as earlier turns.

**generation**: the model answers the rendered ``template`` (through its chat template when it has one,
unless ``chat = false``), greedily, up to ``max_new_tokens`` or a ``stop`` string; ``scorer`` compares the
answer with the item's ``target`` (a string, a number, or a list of accepted answers):

* ``exact_match``: equal after normalisation (``strip``, ``ignore_case``, ``ignore_punctuation``);
* ``contains``: the target appears in the answer (same normalisation);
* ``regex``: with ``pattern``, its first match in the answer (its first group, when it has one) equals the
  target; without, the target is itself a pattern the whole answer must match;
* ``numeric``: the last number in the answer equals the target's (its last number: ``#### 42`` is 42)
  within ``tolerance``; commas in numbers (1,234) are ignored.

The metric is named after the scorer (``exact_match``, ``contains``, ``regex``, ``numeric``).
"""

from __future__ import annotations

import json
import math
import re
import string
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import Field

from llmforge.errors import DataError, Problem
from llmforge_plugins.eval.api import EvalModel, EvalTask, Metric, TaskEnv, TaskOptions, TaskResult, mean_metric
from llmforge_plugins.eval.spec import Items, fewshot_indices, item_field, read_items

#: Requests sent to the model in one call: large enough for the runner to batch and share prefixes, small
#: enough that progress is reported and a stop request is honoured within seconds.
CHUNK = 1024


# ------------------------------------------------------------------------------------------------
# shared helpers


def template_problems(template: str, key: str = "template") -> list[Problem]:
    """A template that str.format cannot parse (an unclosed brace), found before any model is loaded."""
    try:
        list(string.Formatter().parse(template))
    except ValueError as exc:
        return [Problem(key, f"not a valid template: {exc} (write {{{{ and }}}} for literal braces)")]
    return []


def render(template: str, fields: dict, where: str, key: str = "template") -> str:
    """``template`` with ``{field}`` replaced by the item's fields, or a DataError naming the item and the
    field it lacks."""
    try:
        return template.format_map(fields)
    except KeyError as exc:
        name = exc.args[0]
        raise DataError(
            f"{where}: {key}: the item has no field {{{name}}} (its fields: {', '.join(map(str, fields)) or 'none'})",
            hint="change the template, or name the field in the task's spec",
        ) from None
    except (IndexError, AttributeError, ValueError) as exc:
        raise DataError(f"{where}: {key}: cannot fill the template: {exc}") from None


def _chunks(n: int, size: int) -> list[range]:
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


def _chat_prompt(model: EvalModel, options: TaskOptions, shots: list[tuple[str, str]], question: str) -> str:
    """The question through the model's chat template, few-shot examples as earlier user/assistant turns."""
    messages: list[dict[str, str]] = []
    if options.system:
        messages.append({"role": "system", "content": options.system})
    for asked, answered in shots:
        messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
    messages.append({"role": "user", "content": question})
    return model.prompt(messages)


def _fewshot_pool(options: TaskOptions, env: TaskEnv) -> Items | None:
    if options.num_fewshot and options.fewshot_data:
        return read_items(options, env.base_dir, path=options.fewshot_data)
    return None


# ------------------------------------------------------------------------------------------------
# perplexity


class PerplexityOptions(TaskOptions):
    text: str = Field(
        "text", description="The field holding each text (a .txt file: its blank-line separated documents)."
    )


class PerplexityTask(EvalTask):
    kind = "perplexity"
    summary = "Perplexity and bits per byte of texts (a .txt file, or a text field), as lm-eval's wikitext."
    Options = PerplexityOptions
    primary = "perplexity"

    def check(self, options: Any) -> list[Any]:
        problems = []
        if options.data is None:
            problems.append(Problem("data", "required: the texts to score (a .txt, .jsonl, .csv or .parquet file)"))
        if options.num_fewshot:
            problems.append(Problem("num_fewshot", "perplexity has no few-shot examples"))
        return problems

    def run(self, options: Any, model: EvalModel, env: TaskEnv) -> TaskResult:
        started = time.perf_counter()
        items = read_items(options, env.base_dir)
        texts = []
        for i, item in enumerate(items):
            text = item_field(item, items.where(i), options.text, kinds=(str,), what="a string")
            if not text:
                raise DataError(f"{items.where(i)}: {options.text}: empty text")
            texts.append(text)
        scored: list[tuple[float, int]] = []
        stopped = False
        for chunk in _chunks(len(texts), CHUNK):
            if env.should_stop():
                stopped = True
                break
            scored += model.loglikelihood_rolling([texts[i] for i in chunk])
            env.progress(len(scored), len(texts))
        if stopped and not scored:
            return TaskResult({}, [], {"stopped": True})
        return perplexity_result(texts[: len(scored)], scored, items.wheres, started, stopped)


def count_words(text: str) -> int:
    """Words as lm-eval counts them for word perplexity: the pieces between runs of whitespace."""
    return len(re.split(r"\s+", text))


def perplexity_result(
    texts: Sequence[str],
    scored: Sequence[tuple[float, int]],
    wheres: Sequence[str] = (),
    started: float | None = None,
    stopped: bool = False,
) -> TaskResult:
    """The perplexity metrics of texts from their (summed log-likelihood, tokens scored)."""
    total_ll = sum(ll for ll, _ in scored)
    tokens = sum(n for _, n in scored)
    words = sum(count_words(t) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    n = len(scored)
    if tokens == 0:
        raise DataError("perplexity: no token was scored (the texts are too short for this model)")

    def low(value: float) -> Metric:
        return Metric(value, None, n, higher_is_better=False)

    metrics = {
        "perplexity": low(math.exp(-total_ll / tokens)),
        "word_perplexity": low(math.exp(-total_ll / words)),
        "byte_perplexity": low(math.exp(-total_ll / nbytes)),
        "bits_per_byte": low(-total_ll / nbytes / math.log(2)),
    }
    records = []
    for i, (text, (ll, ntok)) in enumerate(zip(texts, scored)):
        records.append(
            {
                "where": wheres[i] if i < len(wheres) else None,
                "prompt": text if len(text) <= 300 else text[:300] + "…",
                "answer": None,
                # the item's own perplexity: what to sort by when looking for the texts a model finds hardest
                "score": math.exp(-ll / ntok) if ntok else None,
                "loglikelihood": ll,
                "tokens": ntok,
                "bytes": len(text.encode("utf-8")),
                "words": count_words(text),
            }
        )
    info: dict[str, Any] = {"tokens": tokens, "bytes": nbytes, "words": words}
    if started is not None:
        info["seconds"] = round(time.perf_counter() - started, 3)
    if stopped:
        info["stopped"] = True
    return TaskResult(metrics, records, info)


# ------------------------------------------------------------------------------------------------
# multiple choice


class MultipleChoiceOptions(TaskOptions):
    question: str = Field("question", description="The field holding the question (the template's {question}).")
    choices: str | list[str] = Field(
        "choices",
        description="The field holding the list of choices (in a CSV: a JSON list), or a list of fields holding "
        'one choice each (choices = ["A", "B", "C", "D"]).',
    )
    answer: str = Field(
        "answer",
        description="The field holding the right choice: its text, its 0-based index, or its letter (A, B, ...).",
    )
    template: str = Field(
        "Question: {question}\nAnswer:",
        description="The context of each choice, filled with the item's fields ({question} is the question field).",
    )
    choice_prefix: str = Field(" ", description="Put between the context and each choice (lm-eval's target_delimiter).")
    fewshot_separator: str = Field("\n\n", description="Between few-shot examples and the question.")


class MultipleChoiceTask(EvalTask):
    kind = "multiple_choice"
    summary = "Multiple choice by log-likelihood: acc and acc_norm as lm-evaluation-harness defines them."
    Options = MultipleChoiceOptions
    primary = "acc"

    def check(self, options: Any) -> list[Any]:
        problems = template_problems(options.template)
        if options.data is None:
            problems.append(Problem("data", "required: the items (a .jsonl, .csv or .parquet file)"))
        if isinstance(options.choices, list) and len(options.choices) < 2:
            problems.append(Problem("choices", "list at least two fields, or name one field holding a list"))
        return problems

    def parse(self, options: Any, item: dict, where: str) -> tuple[dict, list[str], int]:
        """The item's template fields, its choices and the index of its right choice."""
        if isinstance(options.choices, list):
            choices = [_choice_text(item_field(item, where, f), where, f) for f in options.choices]
        else:
            value = item_field(item, where, options.choices)
            if isinstance(value, str) and value.lstrip().startswith("["):
                try:  # a CSV cell holding a JSON list
                    value = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: {options.choices}: not a JSON list: {exc.msg}") from None
            if not isinstance(value, (list, tuple)):
                from llmforge.data import describe

                raise DataError(f"{where}: {options.choices}: expected a list of choices, got {describe(value)}")
            choices = [_choice_text(c, where, f"{options.choices}[{j}]") for j, c in enumerate(value)]
        if len(choices) < 2:
            raise DataError(f"{where}: {options.choices}: expected at least two choices, got {len(choices)}")
        gold = _gold(item_field(item, where, options.answer), choices, where, options.answer)
        fields = dict(item)
        if options.question in item:  # else the template names its fields itself (a missing one is reported)
            fields["question"] = item[options.question]
        return fields, choices, gold

    def run(self, options: Any, model: EvalModel, env: TaskEnv) -> TaskResult:
        started = time.perf_counter()
        items = read_items(options, env.base_dir)
        pool = _fewshot_pool(options, env)
        source = pool if pool is not None else items
        parsed = [self.parse(options, item, items.where(i)) for i, item in enumerate(items)]
        shots_parsed = parsed if pool is None else [self.parse(options, it, pool.where(j)) for j, it in enumerate(pool)]
        chat = bool(options.chat)  # never by default for log-likelihood tasks, as lm-eval
        prefix = "" if chat else options.choice_prefix

        contexts = []
        for i, (fields, _, _) in enumerate(parsed):
            question = render(options.template, fields, items.where(i))
            shots = []
            for j in fewshot_indices(options, items, i, pool=pool):
                f, c, g = shots_parsed[j]
                shots.append((render(options.template, f, source.where(j)), c[g]))
            if chat:
                contexts.append(_chat_prompt(model, options, shots, question))
            else:
                examples = [asked + prefix + answered for asked, answered in shots]
                contexts.append(options.fewshot_separator.join([*examples, question]))

        requests = [(contexts[i], prefix + c) for i, (_, choices, _) in enumerate(parsed) for c in choices]
        # Chunks of whole items: each item's choices go to the model together (they share the context).
        lls: list[float] = []
        done_items = 0
        stopped = False
        for chunk in _item_chunks([len(c) for _, c, _ in parsed], CHUNK):
            if env.should_stop():
                stopped = True
                break
            lo, hi = chunk
            lls += [ll for ll, _ in model.loglikelihood(requests[lo:hi])]
            done_items = _items_done(parsed, len(lls))
            env.progress(done_items, len(parsed))

        accs, norms, records = [], [], []
        at = 0
        for i, (_, choices, gold) in enumerate(parsed[:done_items]):
            item_lls = lls[at : at + len(choices)]
            at += len(choices)
            chosen, chosen_norm = choose(item_lls, choices)
            accs.append(float(chosen == gold))
            norms.append(float(chosen_norm == gold))
            records.append(
                {
                    "where": items.where(i),
                    "prompt": contexts[i],
                    "choices": choices,
                    "loglikelihoods": item_lls,
                    "chosen": chosen,
                    "chosen_norm": chosen_norm,
                    "target": gold,
                    "answer": choices[chosen],
                    "score": accs[-1],
                    "score_norm": norms[-1],
                }
            )
        info: dict[str, Any] = {"requests": len(lls), "seconds": round(time.perf_counter() - started, 3)}
        if stopped:
            info["stopped"] = True
        return TaskResult({"acc": mean_metric(accs), "acc_norm": mean_metric(norms)}, records, info)


def choose(lls: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(the choice with the highest log-likelihood, the one with the highest log-likelihood per character):
    lm-eval's ``acc`` and ``acc_norm`` picks. A tie goes to the first, as numpy's argmax."""
    best = max(range(len(lls)), key=lambda j: (lls[j], -j))
    best_norm = max(range(len(lls)), key=lambda j: (lls[j] / len(choices[j]), -j))
    return best, best_norm


def _item_chunks(sizes: list[int], limit: int) -> list[tuple[int, int]]:
    """Request ranges covering whole items, each about ``limit`` requests (at least one item)."""
    out, lo, hi = [], 0, 0
    for n in sizes:
        if hi > lo and hi - lo + n > limit:
            out.append((lo, hi))
            lo = hi
        hi += n
    if hi > lo:
        out.append((lo, hi))
    return out


def _items_done(parsed: list, answered: int) -> int:
    done = 0
    for _, choices, _ in parsed:
        if answered < len(choices):
            break
        answered -= len(choices)
        done += 1
    return done


def _choice_text(value: Any, where: str, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        from llmforge.data import describe

        raise DataError(f"{where}: {field}: expected a choice's text, got {describe(value)}")
    text = str(value)
    if not text:
        # acc_norm divides by the choice's length
        raise DataError(f"{where}: {field}: empty choice")
    return text


def _gold(value: Any, choices: list[str], where: str, field: str) -> int:
    """The right choice's index from the answer field: a choice's text first (so that numeric choices are
    matched as text), then a 0-based index (an integer, or digits in a CSV cell), then a letter (A = 0)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, str) and value in choices:
        return choices.index(value)
    elif isinstance(value, str) and value.strip().isdigit():
        index = int(value.strip())
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in string.ascii_uppercase:
        index = string.ascii_uppercase.index(value.strip().upper())
    else:
        from llmforge.data import describe

        raise DataError(
            f"{where}: {field}: {describe(value)} is not one of the choices, nor an index or a letter",
            hint="the answer is the right choice's text, its 0-based index, or its letter (A, B, ...)",
        )
    if not 0 <= index < len(choices):
        raise DataError(f"{where}: {field}: answer {value!r} is out of range ({len(choices)} choices)")
    return index


# ------------------------------------------------------------------------------------------------
# generation

Scorer = Literal["exact_match", "contains", "regex", "numeric"]


class GenerationOptions(TaskOptions):
    template: str = Field("{question}", description="The prompt, filled with the item's fields.")
    target: str = Field(
        "answer", description="The field holding the expected answer (a string, a number, or a list of accepted ones)."
    )
    scorer: Scorer = Field("exact_match", description="How an answer is compared with the target.")
    max_new_tokens: int = Field(128, gt=0, description="The longest answer, in tokens.")
    stop: list[str] | None = Field(
        None,
        description="Strings that end an answer (default: none with a chat template, which ends the turn; "
        "else the few-shot separator).",
    )
    strip: bool = Field(True, description="Ignore whitespace around the answer and the target.")
    ignore_case: bool = Field(False, description="exact_match, contains, regex: compare without regard to case.")
    ignore_punctuation: bool = Field(False, description="exact_match, contains, regex: drop punctuation first.")
    pattern: str | None = Field(
        None,
        description="regex: the pattern whose first match (its first group, if any) is compared with the target; "
        "unset: the target is a pattern the whole answer must match.",
    )
    tolerance: float = Field(1e-6, ge=0, description="numeric: the largest difference counted as equal.")
    answer_prefix: str = Field(" ", description="Without chat: put between a few-shot example's prompt and its answer.")
    fewshot_separator: str = Field("\n\n", description="Without chat: between few-shot examples and the prompt.")


class GenerationTask(EvalTask):
    kind = "generation"
    summary = "Generated answers scored by exact match, contains, regex or numeric answer."
    Options = GenerationOptions
    primary = "exact_match"

    def primary_for(self, options: Any) -> str:
        """The metric is named after the scorer."""
        return str(options.scorer)

    def check(self, options: Any) -> list[Any]:
        problems = template_problems(options.template)
        if options.data is None:
            problems.append(Problem("data", "required: the items (a .jsonl, .csv or .parquet file)"))
        if options.pattern is not None:
            if options.scorer != "regex":
                problems.append(Problem("pattern", f'only used with scorer = "regex" (scorer is "{options.scorer}")'))
            else:
                try:
                    re.compile(options.pattern)
                except re.error as exc:
                    problems.append(Problem("pattern", f"not a valid regular expression: {exc}"))
        return problems

    def run(self, options: Any, model: EvalModel, env: TaskEnv) -> TaskResult:
        started = time.perf_counter()
        items = read_items(options, env.base_dir)
        pool = _fewshot_pool(options, env)
        source = pool if pool is not None else items
        chat = model.has_chat_template if options.chat is None else options.chat
        stop = options.stop if options.stop is not None else ([] if chat else [options.fewshot_separator])
        scorer = SCORERS[options.scorer]

        prompts, targets = [], []
        for i, item in enumerate(items):
            where = items.where(i)
            targets.append(_target(item_field(item, where, options.target), where, options.target))
            question = render(options.template, item, where)
            shots = []
            for j in fewshot_indices(options, items, i, pool=pool):
                shot, shot_where = source[j], source.where(j)
                answer = _target(item_field(shot, shot_where, options.target), shot_where, options.target)[0]
                shots.append((render(options.template, shot, shot_where), str(answer)))
            if chat:
                prompts.append(_chat_prompt(model, options, shots, question))
            else:
                head = [options.system] if options.system else []
                examples = [asked + options.answer_prefix + answered for asked, answered in shots]
                prompts.append(options.fewshot_separator.join([*head, *examples, question]))

        answers: list[str] = []
        stopped = False
        for chunk in _chunks(len(prompts), max(1, CHUNK // 8)):  # generation is slower: report more often
            if env.should_stop():
                stopped = True
                break
            answers += model.generate(
                [prompts[i] for i in chunk], max_new_tokens=options.max_new_tokens, stop=stop, seed=env.seed
            )
            env.progress(len(answers), len(prompts))

        scores, records = [], []
        for i, answer in enumerate(answers):
            score, extracted = scorer(answer, targets[i], options)
            scores.append(score)
            record = {
                "where": items.where(i),
                "prompt": prompts[i],
                "answer": answer,
                "target": targets[i] if len(targets[i]) > 1 else targets[i][0],
                "score": score,
            }
            if extracted is not None:
                record["extracted"] = extracted
            records.append(record)
        info: dict[str, Any] = {
            "chat": chat,
            "primary": options.scorer,
            "seconds": round(time.perf_counter() - started, 3),
        }
        if stopped:
            info["stopped"] = True
        return TaskResult({options.scorer: mean_metric(scores)}, records, info)


def _target(value: Any, where: str, field: str) -> list[Any]:
    """The accepted answers: a list of strings or numbers (one, unless the field holds a list)."""
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, (str, int, float)) for v in values):
        from llmforge.data import describe

        raise DataError(f"{where}: {field}: expected a string, a number or a list of them, got {describe(value)}")
    return values


# -- scorers: (answer, accepted targets, options) -> (score 0/1, what was extracted or None) --------------

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise(text: str, options: Any) -> str:
    """The text as exact_match / contains / regex compare it (lm-eval's exact_match options, plus strip)."""
    if options.ignore_case:
        text = text.lower()
    if options.ignore_punctuation:
        text = text.translate(_PUNCTUATION)
    return text.strip() if options.strip else text


def score_exact_match(answer: str, targets: Sequence[Any], options: Any) -> tuple[float, str | None]:
    got = normalise(answer, options)
    return float(any(got == normalise(str(t), options) for t in targets)), None


def score_contains(answer: str, targets: Sequence[Any], options: Any) -> tuple[float, str | None]:
    got = normalise(answer, options)
    return float(any(normalise(str(t), options) in got for t in targets)), None


def score_regex(answer: str, targets: Sequence[Any], options: Any) -> tuple[float, str | None]:
    if options.pattern is None:
        # The target is the pattern: the whole (stripped) answer must match one of them.
        flags = re.DOTALL | (re.IGNORECASE if options.ignore_case else 0)
        text = answer.strip() if options.strip else answer
        return float(any(re.fullmatch(str(t), text, flags) for t in targets)), None
    match = re.search(options.pattern, answer)
    if match is None:
        return 0.0, None
    found = match.group(1) if match.re.groups else match.group(0)
    found = found or ""
    return float(any(normalise(found, options) == normalise(str(t), options) for t in targets)), found


_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def last_number(text: str) -> float | None:
    """The last number written in a text (``-1,234.5`` is -1234.5), or None."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def score_numeric(answer: str, targets: Sequence[Any], options: Any) -> tuple[float, str | None]:
    got = last_number(answer)
    if got is None:
        return 0.0, None
    for t in targets:
        want = float(t) if isinstance(t, (int, float)) else last_number(t)
        if want is not None and abs(got - want) <= options.tolerance:
            return 1.0, _number_text(got)
    return 0.0, _number_text(got)


def _number_text(x: float) -> str:
    return str(int(x)) if x.is_integer() else str(x)


SCORERS: dict[str, Callable[[str, Sequence[Any], Any], tuple[float, str | None]]] = {
    "exact_match": score_exact_match,
    "contains": score_contains,
    "regex": score_regex,
    "numeric": score_numeric,
}

#: What the eval plugin registers.
BUILTIN_TASKS = (PerplexityTask, MultipleChoiceTask, GenerationTask)
