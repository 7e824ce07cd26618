"""`demo_world`: the demo's rule-based judge, a verifier (registered through `register_verifiers`).

It scores an answer to a question about the demo world with the evaluation's own rules (tasks.score): half
for naming the right value, half for the direct style (one sentence naming a value, no hedging): 1.0 direct
and correct, 0.5 correct but hedging (or direct but wrong), 0 otherwise. The demo's RLAIF step samples the
SFT model's answers to training questions, and the synth stage's `preferences` generator pairs the best
scored against the worst: preference data made from the model's own samples, no answer written by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import Field

from llmforge_plugins.synth.api import Verdict, Verifier, VerifierOptions


class DemoWorldOptions(VerifierOptions):
    answer_column: str = Field("answer", description="The row column holding the expected value.")
    kind_column: str = Field("kind", description="The row column holding the kind of fact (capital, sum, ...).")
    values_column: str = Field(
        "values", description="The row column listing every value of that kind (what counts as naming a value)."
    )


class DemoWorldVerifier(Verifier):
    name = "demo_world"
    summary = "The demo world's rule judge: half for the right value, half for a direct answer."
    Options = DemoWorldOptions

    def verify(self, options: Any, rows: Sequence[dict[str, Any]], answers: Sequence[str]) -> list[Verdict]:
        from llmforge.errors import DataError
        from llmforge_plugins.demo.tasks import score

        out = []
        for row, answer in zip(rows, answers, strict=True):
            if options.answer_column not in row:
                raise DataError(f"demo_world: the row has no '{options.answer_column}' column (answer_column)")
            expected = str(row[options.answer_column])
            kind = str(row.get(options.kind_column, ""))
            values = [str(v) for v in row.get(options.values_column) or [expected]]
            msgs = row.get("messages") or []
            question = next((m["content"] for m in reversed(msgs) if m.get("role") == "user"), "")
            s = score({"answer": expected, "kind": kind, "question": question}, answer, {kind: values})
            # Half for the right value, half for the direct style: a pair's chosen side is then never worse on
            # one count and better on none (a right answer that hedges and a direct one that is wrong tie).
            value = 0.5 * s["correct"] + 0.5 * s["direct"]
            why = [w for w, ok in (("not the right value", s["correct"]), ("not direct", s["direct"])) if not ok]
            reason = ", ".join(why)
            out.append(Verdict(passed=value == 1.0, score=value, reason=reason))
        return out
