"""The `preferences` generator: preference pairs from a policy's own samples (RLAIF).

One unit per prompt row (``p0``, ``p1``, ...: the rows of the ``answer`` generator, whose reading and sampling
this reuses); ``samples`` (>= 2) answers each from the stage's teacher, which here is the *policy* being
aligned, each with its own seed. The stage scores every answer with its ``verify``/``judge``/``reward_model``
and, the output being ``preference``, rejects none of them for a low score: a poor answer is exactly what a
pair's rejected side needs. :meth:`PreferencesGenerator.rows` then makes the unit's pair:

* ``rank = "score"``: chosen = the highest-scored answer, rejected = the lowest; a unit whose spread is within
  ``margin`` gives no pair (its answers are rejected ``tie: ...``: DPO learns nothing from two equals);
* ``rank = "pairwise"``: the stage's judge (``judge = { judge = "NAME" }``) compares the first answer with each
  other one, both orders; the first decisive verdict gives the pair (a judge whose two orders disagree has
  no preference: a tie).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from llmforge_plugins.synth.api import Candidate, SynthEnv, Unit
from llmforge_plugins.synth.generators import Answer, AnswerOptions

SCORE_ORDER = ("reward", "judge", "verify")  # "auto": the most informative score present first


class PreferencesOptions(AnswerOptions):
    temperature: float = Field(
        1.0, ge=0, description="Sampling temperature of the policy: the answers must differ to be compared."
    )
    rank: Literal["score", "pairwise"] = Field(
        "score",
        description="How the pair is chosen: score (highest vs lowest score) or pairwise (the stage's judge "
        "compares answers, both orders).",
    )
    score: Literal["auto", "reward", "judge", "verify"] = Field(
        "auto", description="The score rank = 'score' orders by; auto: the first present of reward, judge, verify."
    )
    margin: float = Field(
        0.0, ge=0, description="A unit whose best and worst scores differ by no more than this gives no pair."
    )


class PreferencesGenerator(Answer):
    """Preference pairs from a policy's own samples, judged. ``data``: prompt rows (a ``prompt`` column or
    ``messages`` ending in a user turn; other columns, e.g. the reference ``answer``, stay for the verifiers
    and on the pair's row). Rows: ``{"prompt": [...], "chosen": [assistant], "rejected": [assistant], ...}``
    with ``chosen_score``/``rejected_score`` in provenance."""

    kind = "preferences"
    summary = "Preference pairs from a policy's own samples, ranked by score or compared pairwise by a judge."
    Options = PreferencesOptions
    output = "preference"

    def check(self, options: Any, base_dir: Path) -> list[Any]:
        problems = super().check(options, base_dir)
        if options.reasoning != "none":
            problems.append("reasoning: preferences compare whole answers; leave reasoning = 'none'")
        return problems

    def generate(self, options: Any, units: Sequence[Unit], samples: int, env: SynthEnv) -> list[list[Candidate]]:
        if samples < 2:
            from llmforge.errors import ConfigError, Problem

            raise ConfigError(
                [Problem("samples", f"{samples}: the preferences generator needs at least 2 answers per prompt")]
            )
        return super().generate(options, units, samples, env)

    def rows(self, options: Any, unit: Unit, candidates: Sequence[Candidate], env: SynthEnv) -> list[dict[str, Any]]:
        cands = [c for c in candidates if c.rejected is None]
        if len(cands) < 2:
            _reject(cands, "tie: fewer than two answers to compare")
            return []
        if options.rank == "pairwise":
            return self._pairwise(options, cands, env)
        name = score_name(options.score, cands)
        scored = [c for c in cands if name in c.scores]
        _reject([c for c in cands if name not in c.scores], f"{name}: no score")
        if len(scored) < 2:
            _reject(scored, f"tie: fewer than two answers with a {name} score")
            return []
        # sorted() is stable: among equal scores the earlier sample wins the chosen side
        ranked = sorted(scored, key=lambda c: -c.scores[name])
        best, worst = ranked[0], ranked[-1]
        spread = best.scores[name] - worst.scores[name]
        if spread <= options.margin:
            _reject(ranked, f"tie: {name} scores within {options.margin:g} (best {best.scores[name]:g})")
            return []
        _reject(ranked[1:-1], "best_of: not the best or the worst of the samples")
        prov = {"chosen_score": best.scores[name], "rejected_score": worst.scores[name], "rank": name}
        return [_pair(best, worst, prov)]

    def _pairwise(self, options: Any, cands: list[Candidate], env: SynthEnv) -> list[dict[str, Any]]:
        if env.judge is None:
            from llmforge.errors import ConfigError, Problem

            raise ConfigError([Problem("generator.rank", "'pairwise' needs the stage's judge = { judge = \"NAME\" }")])
        first, rest = cands[0], cands[1:]
        # the same text twice cannot be preferred to itself: skip those without asking
        others = [c for c in rest if c.answer.strip() != first.answer.strip()]
        if not others:
            _reject(cands, "tie: every answer is the same")
            return []
        verdicts = env.judge.pairwise_many(
            [{"question": first.prompt, "a": first.answer, "b": c.answer} for c in others]
        )
        for c, j in zip(others, verdicts, strict=True):
            if j.ok and j.winner in ("a", "b"):
                chosen, rejected = (first, c) if j.winner == "a" else (c, first)
                _reject([x for x in cands if x is not chosen and x is not rejected], "best_of: not needed for the pair")
                prov = {
                    "chosen_score": chosen.scores.get("judge"),
                    "rejected_score": rejected.scores.get("judge"),
                    "rank": "pairwise",
                    "rejected_scores": dict(rejected.scores),
                    "compared": len(others),
                }
                return [_pair(chosen, rejected, prov)]
        failed = sum(not j.ok for j in verdicts)
        why = f"{failed} without a verdict" if failed else "the judge preferred none (or its two orders disagreed)"
        _reject(cands, f"tie: {len(others)} comparisons, {why}")
        return []


def score_name(wanted: str, cands: Sequence[Candidate]) -> str:
    """The score ``rank = "score"`` orders by; ``auto``: the first of reward, judge, verify that any answer has."""
    if wanted != "auto":
        if not any(wanted in c.scores for c in cands):
            from llmforge.errors import ConfigError, Problem

            raise ConfigError(
                [
                    Problem(
                        "generator.score",
                        f"'{wanted}': the answers have no such score (configure "
                        f"{'reward_model' if wanted == 'reward' else wanted} = ... on the stage)",
                    )
                ]
            )
        return wanted
    for name in SCORE_ORDER:
        if any(name in c.scores for c in cands):
            return name
    from llmforge.errors import ConfigError, Problem

    raise ConfigError(
        [Problem("generator", "the preferences generator needs scores: configure verify, judge or reward_model")]
    )


def _reject(cands: Sequence[Candidate], reason: str) -> None:
    for c in cands:
        if c.rejected is None:
            c.rejected = reason


def _pair(chosen: Candidate, rejected: Candidate, provenance: dict[str, Any]) -> dict[str, Any]:
    msgs = chosen.row["messages"]
    extra = {k: v for k, v in chosen.row.items() if k != "messages"}
    return {
        "prompt": [dict(m) for m in msgs[:-1]],
        "chosen": [dict(msgs[-1])],
        "rejected": [dict(rejected.row["messages"][-1])],
        **extra,
        "provenance": {**provenance, "rejected_scores": dict(rejected.scores)},
    }
