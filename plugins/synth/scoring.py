"""Filtering and ranking a batch's candidates: verify, judge, reward model, then keep the best of a unit's
samples (or all that passed). Rejection reasons are ``"<category>: <detail>"`` (verify, judge, reward,
best_of, empty), which the report counts by category.

For a generator whose output is ``preference`` nothing is rejected here: every candidate is scored, and the
generator's ``rows`` picks the pair (a poor answer is exactly what a rejected side needs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from llmforge_plugins.synth.api import Candidate


@dataclass
class Scorers:
    """What a stage filters with: a verifier and its options, an opened judge with its rubric and threshold,
    a reward scorer with its threshold. Any of them may be absent."""

    verifier: Any = None
    verify_options: Any = None
    judge: Any = None
    rubric: str | None = None
    judge_min: float | None = None
    reward: Any = None
    reward_min: float | None = None
    keep: str = "best"
    filter: bool = True  # False for preference generators: score only


def _fmt(x: float) -> str:
    return f"{x:g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.3g}"


def prompt_messages(c: Candidate) -> list[dict[str, str]]:
    """The conversation the candidate answers: its messages without the final assistant turn (a reward
    model scores the answer in that context)."""
    msgs = c.row.get("messages")
    if isinstance(msgs, list) and msgs:
        if msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]
        return [dict(m) for m in msgs]
    prompt = c.row.get("prompt")
    if isinstance(prompt, list):
        return [dict(m) for m in prompt]
    return [{"role": "user", "content": c.prompt}]


def score_batch(candidates: Sequence[Candidate], scorers: Scorers, log: Callable[[str], Any] | None = None) -> None:
    """Score and filter every candidate of a batch in place (one call per scorer for the whole batch, so that
    judges and reward models batch too)."""
    live = [c for c in candidates if c.rejected is None]
    if scorers.filter:
        for c in live:
            if not c.answer.strip():
                c.rejected = "empty: the teacher gave no answer"
        live = [c for c in live if c.rejected is None]
    if scorers.verifier is not None and live:
        verdicts = scorers.verifier.verify(scorers.verify_options, [c.row for c in live], [c.answer for c in live])
        for c, v in zip(live, verdicts, strict=True):
            c.scores["verify"] = float(v.score)
            c.passed = bool(v.passed)
            if not v.passed and scorers.filter:
                c.rejected = f"verify: {v.reason or 'failed'}"
        live = [c for c in live if c.rejected is None]
    if scorers.judge is not None and live:
        judgments = scorers.judge.pointwise_many(
            [{"question": c.prompt, "answer": c.answer, "rubric": scorers.rubric} for c in live]
        )
        for c, j in zip(live, judgments, strict=True):
            if not j.ok or j.score is None:
                if scorers.filter:
                    c.rejected = "judge: no verdict"
                continue
            c.scores["judge"] = float(j.score)
            if scorers.filter and scorers.judge_min is not None and j.score < scorers.judge_min:
                c.rejected = f"judge: score {_fmt(j.score)} < {_fmt(scorers.judge_min)}"
        live = [c for c in live if c.rejected is None]
    if scorers.reward is not None and live:
        values = scorers.reward.score([prompt_messages(c) for c in live], [c.answer for c in live])
        for c, r in zip(live, values, strict=True):
            c.scores["reward"] = float(r)
            if scorers.filter and scorers.reward_min is not None and r < scorers.reward_min:
                c.rejected = f"reward: score {_fmt(float(r))} < {_fmt(scorers.reward_min)}"


def rank_key(c: Candidate) -> tuple[float, ...]:
    """Higher is better: the judge's score, then the reward model's, then the verifier's share of tests passed;
    a candidate without a score ranks below one with it. Ties keep the earlier sample (a stable sort)."""
    return tuple(c.scores.get(name, float("-inf")) for name in ("judge", "reward", "verify"))


def keep_best(candidates: Sequence[Candidate], keep: str) -> list[Candidate]:
    """A unit's candidates with the best kept: with ``keep = "best"``, of the samples answering the same prompt
    (``Candidate.prompt``: a self-instruct round or a passage asks several questions, each its own group) only
    the best that passed is kept, the others rejected ``best_of``. Returns the kept candidates first, best
    first within each prompt, then the rejected ones."""
    groups: dict[str, list[Candidate]] = {}
    for c in candidates:
        if c.rejected is None:
            groups.setdefault(c.prompt, []).append(c)
    kept: list[Candidate] = []
    for alive in groups.values():
        ranked = sorted(alive, key=rank_key, reverse=True)
        if keep == "best" and len(ranked) > 1:
            for c in ranked[1:]:
                # a tie keeps the earlier sample (sorted is stable): say so rather than claim a higher score
                how = "scored higher" if rank_key(ranked[0]) > rank_key(c) else "scored the same, and came first"
                c.rejected = f"best_of: sample {ranked[0].sample} {how}"
            ranked = ranked[:1]
        kept += ranked
    return kept + [c for c in candidates if c.rejected is not None]
