"""The judge's prompts, one per mode, and the lenient parsers of its answers.

Each mode asks for a JSON object on one line and, as a fallback a small model manages more often, a fixed
last line (``Score: 7``, ``Winner: A``). The parsers take either, wherever it is in the answer; an answer
that has neither (or a score off the scale) is a parse failure, which the judge asks again about and
counts, never a silent zero. A template's text is part of the judgment cache's key (:func:`template_hash`):
editing a prompt invalidates the judgments made with the old one.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

SYSTEM = (
    "You are a careful, impartial judge of answers written by AI assistants. You judge only what is asked, "
    "ignore the length and style of an answer unless they matter to the question, and always finish with the "
    "verdict in the exact format requested."
)

DEFAULT_RUBRIC = (
    "How well does the answer respond to the question: is it correct, relevant, complete and clearly written?"
)

POINTWISE = """Rate the answer below on a scale from {low} to {high} ({low}: very poor, {high}: excellent).

Criteria: {rubric}

[Question]
{question}

[Answer]
{answer}

Explain your rating in one or two sentences, then give it as a JSON object on its own line:
{{"reason": "...", "score": <a number from {low} to {high}>}}
and finally a last line of the form: Score: <number>"""

REFERENCE_GUIDED = """Rate the answer below on a scale from {low} to {high} ({low}: very poor, {high}: excellent), by \
comparing it with the reference answer, which is correct.

Criteria: {rubric}

[Question]
{question}

[Reference answer]
{reference}

[Answer]
{answer}

Explain your rating in one or two sentences, then give it as a JSON object on its own line:
{{"reason": "...", "score": <a number from {low} to {high}>}}
and finally a last line of the form: Score: <number>"""

PAIRWISE = """Compare the two answers below to the same question and decide which one is better.

Criteria: {rubric}

[Question]
{question}

[Answer A]
{a}

[Answer B]
{b}

The order of the answers says nothing about their quality. Explain your choice in one or two sentences, then \
give it as a JSON object on its own line:
{{"reason": "...", "winner": "A" or "B" or "tie"}}
and finally a last line of the form: Winner: A (or Winner: B, or Winner: tie)"""

RETRY = """Your reply did not end with a verdict in the required format. Reply again with only the JSON object \
{example} on one line, followed by the line {line}."""

TEMPLATES = {"pointwise": POINTWISE, "reference_guided": REFERENCE_GUIDED, "pairwise": PAIRWISE}


def template_hash(mode: str) -> str:
    """What identifies the wording a mode's judgments were made with (system, template, retry prompt)."""
    blob = "\x00".join((SYSTEM, TEMPLATES[mode], RETRY))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def retry_message(mode: str) -> str:
    if mode == "pairwise":
        return RETRY.format(example='{"reason": "...", "winner": "A"}', line="Winner: A (or B, or tie)")
    return RETRY.format(example='{"reason": "...", "score": 7}', line="Score: 7")


# ------------------------------------------------------------------------------------------------
# parsing


def _json_objects(text: str) -> list[dict[str, Any]]:
    """Every JSON object in the text (balanced braces, strings respected), in order; broken ones skipped."""
    found: list[dict[str, Any]] = []
    decoder = json.JSONDecoder()
    i = text.find("{")
    while i != -1:
        try:
            obj, end = decoder.raw_decode(text, i)
        except ValueError:
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            found.append(obj)
        i = text.find("{", end)
    return found


_NUMBER = r"(-?\d+(?:\.\d+)?)"
_SCORE_LINE = re.compile(r"(?:score|rating)\s*[:=]?\s*\**\s*\[*\s*" + _NUMBER, re.IGNORECASE)
_OUT_OF = re.compile(_NUMBER + r"\s*(?:/|out of)\s*(\d+)", re.IGNORECASE)
_WINNER_LINE = re.compile(
    r"(?:winner|verdict|better answer)\s*(?:is)?\s*[:=]?\s*\**\s*\[*\s*\"?(A|B|tie)\b", re.IGNORECASE
)
_BRACKETED = re.compile(r"\[\[(A|B|C|tie)\]\]", re.IGNORECASE)


def parse_score(text: str, low: float, high: float) -> tuple[float, str] | None:
    """The score (on [low, high]) and the reason given in a judge's answer, or None when it has none.

    Tried in order: a JSON object with "score" (the last one), a ``Score: N`` / ``Rating: N`` line (the
    last one), ``N/high`` or ``N out of high``. A score off the scale is not a score."""
    reason = ""
    for obj in reversed(_json_objects(text)):
        value = obj.get("score", obj.get("rating"))
        reason = str(obj.get("reason", obj.get("explanation", ""))) or reason
        try:
            score = float(value)
        except (TypeError, ValueError):
            continue
        if low <= score <= high:
            return score, reason
    candidates = [float(m.group(1)) for m in _SCORE_LINE.finditer(text)]
    candidates += [float(m.group(1)) for m in _OUT_OF.finditer(text) if float(m.group(2)) == high]
    for score in reversed(candidates):
        if low <= score <= high:
            return score, reason or _reason_of(text)
    return None


def parse_winner(text: str) -> tuple[str, str] | None:
    """``"A"``, ``"B"`` or ``"tie"`` and the reason from a pairwise answer, or None when it names none:
    a JSON object with "winner", a ``Winner: A`` line, or ``[[A]]`` (``[[C]]`` is a tie)."""
    reason = ""
    for obj in reversed(_json_objects(text)):
        value = str(obj.get("winner", obj.get("better", ""))).strip().strip("[]\"' ").upper()
        reason = str(obj.get("reason", obj.get("explanation", ""))) or reason
        if value in ("A", "B"):
            return value, reason
        if value in ("TIE", "C", "NONE", "EQUAL"):
            return "tie", reason
    matches = list(_WINNER_LINE.finditer(text)) or list(_BRACKETED.finditer(text))
    if matches:
        value = matches[-1].group(1).upper()
        return ("tie" if value in ("TIE", "C") else value), reason or _reason_of(text)
    return None


def _reason_of(text: str) -> str:
    """The answer without its verdict lines: what the judge said to justify it."""
    lines = [ln for ln in text.strip().splitlines() if not re.match(r"\s*(score|rating|winner)\s*[:=]", ln, re.I)]
    return " ".join(" ".join(lines).split())[:500]
