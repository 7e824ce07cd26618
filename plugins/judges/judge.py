"""A judge: a language model that scores an answer or picks the better of two, shared by evaluation,
synthetic data and RL stages.

    judge = Judge.open(env.judges["local"], cache_dir=env.cache_dir, log=env.log)
    j = judge.pointwise("What is 2+2?", "4", rubric="Is it correct?")        # Judgment(score=9.0, ...)
    j = judge.reference_guided("What is 2+2?", "5", reference="4")             # pointwise, with the reference
    j = judge.pairwise("What is 2+2?", "4", "5")                               # Judgment(winner="a", ...)
    js = judge.pointwise_many([{"question": ..., "answer": ...}, ...])         # batched and concurrent

What it adds to a backend (which only answers chat requests):

* **prompts per mode** (prompts.py), answers parsed leniently (a JSON object or a ``Score: N`` line); an
  answer without a verdict is asked about again (``retries`` times, with the bad answer and a reminder of
  the format in the conversation, so that even a greedy judge answers differently); one that never gives
  a verdict is a **failure**: ``ok`` False, counted in :attr:`Judge.stats`, never a silent zero;
* **both orders** of a pair: A/B and B/A are asked; answers that disagree (position bias) are a tie;
* a **cache** of judgments keyed by a content hash of the judge's identity (backend, model file, endpoint),
  the mode, the prompt template's hash and the inputs: a JSONL file under ``cache_dir``, appended as each
  judgment is made, so a re-run or a resumed (even killed) run never asks twice;
* a **request budget** (``max_requests``): the judge stops cleanly, keeping what it made, with a message
  saying how to go on; **concurrency** (``concurrency`` requests per call to the backend) and
  **timeouts** (the backend raises :class:`llmforge.judging.JudgeUnavailable` with the reason).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmforge.errors import ForgeError
from llmforge.judging import JudgeBackend, JudgeRequest, JudgeSpec, JudgeUnavailable
from llmforge_plugins.judges import prompts

SCALE = (1.0, 10.0)


class JudgeBudgetSpent(ForgeError):
    """A judge reached its ``max_requests``: what it judged so far is cached, the rest is not done."""


@dataclass
class Judgment:
    """One verdict. Pointwise: ``score`` on the judge's scale. Pairwise: ``winner`` ``"a"``, ``"b"`` or
    ``"tie"`` (``orders`` holds the two single-order verdicts, ``consistent`` whether they agreed). ``ok``
    False means no verdict could be parsed (``error`` says why): a failure, to be counted, not scored.
    ``raw`` is every answer the judge gave (retries included); ``cached`` means no request was made."""

    mode: str
    ok: bool
    score: float | None = None
    winner: str | None = None
    reason: str = ""
    raw: list[str] = field(default_factory=list)
    attempts: int = 0
    cached: bool = False
    error: str | None = None
    consistent: bool | None = None
    orders: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, [], "")}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Judgment:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


class JudgmentCache:
    """Judgments by key in a JSONL file: read whole at open (a last line cut by a kill is skipped), one
    line appended and flushed per judgment."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        if path is not None and path.is_file():
            with path.open(encoding="utf-8") as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                        self.entries[rec["key"]] = rec["judgment"]
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut short by a killed run: that judgment is asked again

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: str, judgment: dict[str, Any]) -> None:
        with self._lock:
            self.entries[key] = judgment
            if self.path is None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"key": key, "judgment": judgment}, ensure_ascii=False) + "\n")
                fh.flush()


@dataclass
class _Ask:
    """One single-order question in flight: its cache key, its conversation so far, what was answered."""

    key: str
    messages: list[dict[str, str]]
    raw: list[str] = field(default_factory=list)
    result: Judgment | None = None


class Judge:
    """A judge opened from a :class:`JudgeSpec` (see the module's doc). ``scale`` is the pointwise range."""

    def __init__(
        self,
        spec: JudgeSpec,
        backend: JudgeBackend,
        *,
        cache_dir: Path | None = None,
        log: Callable[[str], Any] | None = None,
        scale: tuple[float, float] = SCALE,
    ) -> None:
        self.spec, self.backend, self.name = spec, backend, spec.name
        self.options = spec.options
        self.log = log or (lambda message: None)
        self.scale = scale
        self.identity = backend.identity()
        self.cache = JudgmentCache(Path(cache_dir) / f"judge-{spec.name}.jsonl" if cache_dir is not None else None)
        #: requests sent to the backend (retries included), judgments taken from the cache, verdicts that
        #: could not be parsed (each retry), single-order judgments that ended without a verdict
        self.stats = {"requests": 0, "cached": 0, "retries": 0, "failures": 0, "judgments": 0}
        self._done: list[tuple[int, str, _Ask]] = []  # the current call's finished questions

    @classmethod
    def open(cls, spec: JudgeSpec, *, cache_dir: Path | None = None, log: Callable[[str], Any] | None = None) -> Judge:
        """Open the backend (load the model, make the client); a problem with a key names it in full."""
        try:
            backend = spec.open(log=log)
        except JudgeUnavailable as exc:
            raise JudgeUnavailable(f"judge '{spec.name}': {exc.message}", hint=exc.hint) from None
        except ForgeError as exc:
            # backends name the key (`model: no such file ...`); the judge's table is known here
            exc.message = f"judges.{spec.name}.{exc.message}"
            raise
        return cls(spec, backend, cache_dir=cache_dir, log=log)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Judge:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- modes --------------------------------------------------------------------------------------

    def pointwise(
        self, question: str, answer: str, rubric: str | None = None, reference: str | None = None
    ) -> Judgment:
        return self.pointwise_many(
            [{"question": question, "answer": answer, "rubric": rubric, "reference": reference}]
        )[0]

    def reference_guided(self, question: str, answer: str, reference: str, rubric: str | None = None) -> Judgment:
        """Pointwise, with a reference answer the judge is told is correct."""
        return self.pointwise(question, answer, rubric=rubric, reference=reference)

    def pairwise(self, question: str, a: str, b: str, rubric: str | None = None) -> Judgment:
        return self.pairwise_many([{"question": question, "a": a, "b": b, "rubric": rubric}])[0]

    def pointwise_many(self, items: Sequence[dict[str, Any]]) -> list[Judgment]:
        """Each item: ``question``, ``answer``, optional ``rubric`` and ``reference`` (reference-guided)."""
        low, high = self.scale
        asks = []
        for it in items:
            mode = "reference_guided" if it.get("reference") is not None else "pointwise"
            fields = {
                "question": str(it["question"]),
                "answer": str(it["answer"]),
                "rubric": it.get("rubric") or prompts.DEFAULT_RUBRIC,
                "reference": it.get("reference"),
                "low": _num(low),
                "high": _num(high),
            }
            asks.append((mode, fields))
        return self._run(asks)

    def pairwise_many(self, items: Sequence[dict[str, Any]]) -> list[Judgment]:
        """Each item: ``question``, ``a``, ``b``, optional ``rubric``. Both orders are asked; the verdict is
        the one they agree on, a tie when they disagree."""
        asks = []
        for it in items:
            base = {"question": str(it["question"]), "rubric": it.get("rubric") or prompts.DEFAULT_RUBRIC}
            asks.append(("pairwise", {**base, "a": str(it["a"]), "b": str(it["b"])}))
            asks.append(("pairwise", {**base, "a": str(it["b"]), "b": str(it["a"])}))
        singles = self._run(asks)
        return [_resolve_pair(singles[2 * i], singles[2 * i + 1]) for i in range(len(items))]

    # -- the machinery ------------------------------------------------------------------------------

    def key(self, mode: str, fields: dict[str, Any]) -> str:
        blob = json.dumps(
            {
                "judge": self.identity,
                "mode": mode,
                "template": prompts.template_hash(mode),
                "inputs": fields,
                "max_tokens": self.options.max_tokens,
                "temperature": self.options.temperature,
                "seed": self.options.seed,
            },
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def _run(self, asks: list[tuple[str, dict[str, Any]]]) -> list[Judgment]:
        self._done = []
        results: list[Judgment | None] = [None] * len(asks)
        pending: list[tuple[int, str, _Ask]] = []
        for i, (mode, fields) in enumerate(asks):
            key = self.key(mode, fields)
            hit = self.cache.get(key)
            if hit is not None:
                results[i] = Judgment.from_json({**hit, "cached": True})
                self.stats["cached"] += 1
                continue
            text = prompts.TEMPLATES[mode].format(**fields)
            messages = [{"role": "system", "content": prompts.SYSTEM}, {"role": "user", "content": text}]
            pending.append((i, mode, _Ask(key, messages)))
        for attempt in range(self.options.retries + 1):
            if not pending:
                break
            pending = self._attempt(pending, attempt)
        for i, _, ask in self._done:
            results[i] = ask.result
        self._done = []
        return [r if r is not None else Judgment("pointwise", ok=False, error="not judged") for r in results]

    def _attempt(self, pending: list[tuple[int, str, _Ask]], attempt: int) -> list[tuple[int, str, _Ask]]:
        """One round: every pending question asked (in chunks of ``concurrency``, each chunk's verdicts
        cached as they arrive); those without a verdict go on to the next round, if there is one."""
        last = attempt == self.options.retries
        again: list[tuple[int, str, _Ask]] = []
        chunk_size = max(self.options.concurrency, getattr(self.options, "batch_size", 1))
        start = 0
        while start < len(pending):
            # what the budget still allows is sent (and cached) before the budget stops the judge
            chunk = pending[start : start + min(chunk_size, self._allowed())]
            start += len(chunk)
            reqs = [
                JudgeRequest(
                    messages=tuple(ask.messages),
                    max_tokens=self.options.max_tokens,
                    temperature=self.options.temperature,
                    seed=self.options.seed + attempt,
                )
                for _, _, ask in chunk
            ]
            try:
                answers = self.backend.complete(reqs)
            except JudgeUnavailable as exc:
                raise JudgeUnavailable(f"judge '{self.name}': {exc.message}", hint=exc.hint) from None
            self.stats["requests"] += len(chunk)
            for (i, mode, ask), answer in zip(chunk, answers, strict=True):
                ask.raw.append(answer)
                verdict = self._parse(mode, answer)
                if verdict is None and not last:
                    self.stats["retries"] += 1
                    ask.messages = [
                        *ask.messages,
                        {"role": "assistant", "content": answer},
                        {"role": "user", "content": prompts.retry_message(mode)},
                    ]
                    again.append((i, mode, ask))
                    continue
                if verdict is None:
                    self.stats["failures"] += 1
                    ask.result = Judgment(
                        mode, ok=False, raw=ask.raw, attempts=len(ask.raw), error=_no_verdict(mode, len(ask.raw))
                    )
                    self.log(f"judge '{self.name}': {ask.result.error}: {' '.join(answer.split())[:120]!r}")
                else:
                    value, reason = verdict
                    ask.result = Judgment(mode, ok=True, reason=reason, raw=ask.raw, attempts=len(ask.raw))
                    if mode == "pairwise":
                        ask.result.winner = str(value)
                    else:
                        ask.result.score = float(value)
                    self.stats["judgments"] += 1
                self.cache.put(ask.key, ask.result.to_json())
                self._done.append((i, mode, ask))
        return again

    def _parse(self, mode: str, answer: str) -> tuple[Any, str] | None:
        if mode == "pairwise":
            return prompts.parse_winner(answer)
        return prompts.parse_score(answer, *self.scale)

    def _allowed(self) -> int:
        """How many more requests the budget allows (at least 1), or JudgeBudgetSpent when none."""
        budget = self.options.max_requests
        if budget is None:
            return 1 << 30
        if self.stats["requests"] >= budget:
            raise JudgeBudgetSpent(
                f"judge '{self.name}' reached its request budget: max_requests = {budget} "
                f"({self.stats['requests']} requests sent, {self.stats['judgments'] + self.stats['failures']} "
                f"judgments made and cached, {self.stats['cached']} taken from the cache)",
                hint=f"raise judges.{self.name}.max_requests (or remove it) and run again with --resume: "
                "the judgments already made are not asked again",
            )
        return budget - self.stats["requests"]


def _resolve_pair(first: Judgment, second: Judgment) -> Judgment:
    """The pair's verdict from its two orders: ``first`` showed (a, b) as (A, B), ``second`` (b, a)."""
    orders = [first.to_json(), second.to_json()]
    cached = first.cached and second.cached
    raw = first.raw + second.raw
    attempts = first.attempts + second.attempts
    if not (first.ok and second.ok):
        error = first.error if not first.ok else second.error
        return Judgment("pairwise", ok=False, raw=raw, attempts=attempts, cached=cached, error=error, orders=orders)
    w1 = {"A": "a", "B": "b"}.get(str(first.winner), "tie")
    w2 = {"A": "b", "B": "a"}.get(str(second.winner), "tie")
    consistent = w1 == w2
    return Judgment(
        "pairwise",
        ok=True,
        winner=w1 if consistent else "tie",
        reason=first.reason if consistent else f"the two orders disagree ({w1} / {w2}): a tie",
        raw=raw,
        attempts=attempts,
        cached=cached,
        consistent=consistent,
        orders=orders,
    )


def _no_verdict(mode: str, attempts: int) -> str:
    what = "winner" if mode == "pairwise" else "score"
    return f"no {what} in the judge's answer after {attempts} attempt{'s' if attempts != 1 else ''}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
