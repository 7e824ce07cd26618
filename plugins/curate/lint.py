"""Lint for chat and preference data: what makes a row a poor training example, short of a broken
file. Used by ``llmforge data lint`` (every finding, with a tokenizer also truncation and the chat
template's round trip) and by the ``lint`` step (drops rows with errors).

Checks on each row (level, code):

* error ``empty_turn``: a turn whose content is empty or only whitespace;
* error ``system_not_first``: a system turn after the first turn;
* error ``role_order``: two user turns or two assistant turns in a row, or a tool result that does not
  follow an assistant turn (or another tool result);
* warning ``first_turn``: the conversation starts (after the system prompt) with an assistant turn;
* warning ``last_turn``: a chat row ends with a user, tool or system turn (no answer to train on at
  the end);
* error ``no_assistant``, ``identical_pair`` and other ``format`` errors: rows the row format rejects
  (no assistant turn, chosen equal to rejected, a prompt that does not end with a user turn, ...);
* warning ``near_identical_pair``: chosen and rejected differ only in case or whitespace;
* with a tokenizer: warning ``truncated`` (longer than max_length tokens; the rate is reported),
  warning ``answer_truncated`` (nothing of the answer survives the cut), error ``template_drops_turn``
  (a turn's content does not appear in the rendered conversation), error ``template_roundtrip`` (the
  rendered text does not come back unchanged from tokenizing and decoding it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from llmforge_plugins.curate.api import CurationStep, Drop, StepOptions

_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Finding:
    level: str  # "error" or "warning"
    code: str
    field: str
    message: str


def _turns(messages: list[dict], field: str, chat_row: bool) -> list[Finding]:
    out = []
    prev = None
    for i, m in enumerate(messages):
        here = f"{field}[{i}]"
        role = m["role"]
        if not m["content"].strip():
            out.append(Finding("error", "empty_turn", f"{here}.content", f"empty {role} turn"))
        if role == "system" and i > 0:
            out.append(
                Finding(
                    "error",
                    "system_not_first",
                    f"{here}.role",
                    "a system turn after the first turn (only the first turn may set the system prompt)",
                )
            )
        elif role in ("user", "assistant") and prev == role:
            out.append(Finding("error", "role_order", f"{here}.role", f"two {role} turns in a row"))
        elif role == "tool" and prev not in ("assistant", "tool"):
            out.append(
                Finding(
                    "error",
                    "role_order",
                    f"{here}.role",
                    f"a tool result after a {prev or 'nothing'} turn (tool results follow an assistant turn)",
                )
            )
        prev = role
    first = next((m["role"] for m in messages if m["role"] != "system"), None)
    if first == "assistant":
        out.append(Finding("warning", "first_turn", field, "the conversation starts with an assistant turn"))
    if chat_row and messages and messages[-1]["role"] != "assistant":
        out.append(
            Finding(
                "warning",
                "last_turn",
                f"{field}[{len(messages) - 1}].role",
                f"ends with a {messages[-1]['role']} turn: nothing after it is trained",
            )
        )
    return out


def _fold(messages: list[dict]) -> list[tuple[str, str]]:
    return [(m["role"], _SPACES.sub(" ", m["content"]).strip().lower()) for m in messages]


def lint_row(row: dict) -> list[Finding]:
    """Findings for one normalised row (see the module docstring)."""
    if "messages" in row:
        return _turns(row["messages"], "messages", chat_row=True)
    if "chosen" in row:
        out = _turns(row["prompt"], "prompt", chat_row=False)
        for side in ("chosen", "rejected"):
            out += [f for f in _turns(row[side], side, chat_row=False) if f.code != "first_turn"]
        if _fold(row["chosen"]) == _fold(row["rejected"]):
            out.append(
                Finding(
                    "warning",
                    "near_identical_pair",
                    "rejected",
                    "chosen and rejected differ only in case or whitespace",
                )
            )
        return out
    if not row["text"].strip():
        return [Finding("error", "empty_text", "text", "empty text")]
    return []


def format_finding(reason: str) -> Finding:
    """A row-format error (RowError text `field: message`) as a finding."""
    field, _, message = reason.partition(": ")
    if not message:
        field, message = "", reason
    code = "format"
    if "no assistant turn" in message:
        code = "no_assistant"
    elif "same as chosen" in message:
        code = "identical_pair"
    return Finding("error", code, field, message)


class LintOptions(StepOptions):
    drop: Literal["errors", "warnings"] = Field(
        "errors", description="Drop rows with errors, or with errors and warnings."
    )


class LintStep(CurationStep[LintOptions]):
    """Drops chat and preference rows that `llmforge data lint` reports errors for (empty turns, role
    order, a system turn that is not first); with ``drop = "warnings"`` also rows with warnings."""

    name = "lint"
    summary = "Drop chat/preference rows with lint errors: empty turns, bad role order, misplaced system turns."
    action = "filter"
    Options = LintOptions
    row_kinds = ("chat", "preference")

    def process(self, row: dict):
        findings = [f for f in lint_row(row) if f.level == "error" or self.options.drop == "warnings"]
        if findings:
            f = findings[0]
            more = f" (+{len(findings) - 1} more)" if len(findings) > 1 else ""
            return Drop(f"{f.field}: {f.message}{more}", code=f.code)
        return row


# ------------------------------------------------------------------------------------------------
# a whole file, for `llmforge data lint`


class _Tally:
    def __init__(self, examples: int):
        self.max_examples = examples
        self.codes: dict[str, dict] = {}
        self.rows_with: dict[str, set[int]] = {"error": set(), "warning": set()}

    def add(self, row_no: int, where: str, f: Finding) -> None:
        entry = self.codes.setdefault(f.code, {"level": f.level, "rows": 0, "examples": []})
        entry["rows"] += 1
        self.rows_with[f.level].add(row_no)
        if len(entry["examples"]) < self.max_examples:
            text = f"{f.field}: {f.message}" if f.field else f.message
            entry["examples"].append(f"{where}: {text}")


def _token_checks(tok, template, row: dict, max_length: int) -> tuple[list[Finding], bool]:
    """Truncation and the template's round trip for one row; (findings, truncated)."""
    from llmforge.chat import encode_chat

    findings: list[Finding] = []
    if "text" in row and "messages" not in row and "chosen" not in row:
        n = len(tok(row["text"], add_special_tokens=False)["input_ids"])
        return [], n > max_length
    conversations = (
        [row["messages"]] if "messages" in row else [row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]]
    )
    truncated = False
    for messages in conversations:
        enc = encode_chat(tok, template, messages, max_length=max_length)
        if enc.truncated:
            truncated = True
            if enc.n_trained == 0:
                findings.append(
                    Finding(
                        "warning",
                        "answer_truncated",
                        "",
                        f"nothing of the answer is left after cutting to {max_length} tokens",
                    )
                )
        pos = 0
        for i, m in enumerate(messages):
            content = m["content"].strip()
            at = enc.text.find(content, pos) if content else pos
            if at < 0:
                findings.append(
                    Finding(
                        "error",
                        "template_drops_turn",
                        f"turn {i} ({m['role']})",
                        f"the chat template {template.name} does not render this turn's content",
                    )
                )
                break
            pos = at + len(content)
        ids = tok(enc.text, add_special_tokens=False)["input_ids"]
        back = tok.decode(ids)
        if back != enc.text:
            k = next((j for j, (a, b) in enumerate(zip(back, enc.text)) if a != b), min(len(back), len(enc.text)))
            findings.append(
                Finding(
                    "error",
                    "template_roundtrip",
                    "",
                    f"the rendered conversation does not survive tokenizing and decoding (first "
                    f"difference at character {k}: {enc.text[k : k + 20]!r} came back as "
                    f"{back[k : k + 20]!r})",
                )
            )
    return findings, truncated


def lint_file(
    src,
    registry,
    fmt: str = "auto",
    skip_bad: bool = False,
    model=None,
    template: str | None = None,
    max_length: int = 2048,
    examples: int = 3,
    base=None,
) -> dict:
    """Every finding in a file, counted per code with a few examples; with ``model`` (a tokenizer or
    model folder) also the truncation rate at ``max_length`` and the template checks. Rows are read
    with ``registry``'s readers and row formats."""
    from pathlib import Path

    from llmforge.data import DataOptions, ReadState
    from llmforge_plugins.curate.source import records

    base = Path(base or Path.cwd())
    state = ReadState()
    tally = _Tally(examples)
    row_no = [0]

    def rejected(where: str, reason: str) -> None:
        row_no[0] += 1
        tally.add(row_no[0], where, format_finding(reason))

    tok = tpl = None
    if model is not None:
        from llmforge.chat import load_chat_tokenizer

        tok, tpl = load_chat_tokenizer(model, template, base, registry.chat_templates)
    options = DataOptions(path=str(src), format=fmt, on_bad_row="skip" if skip_bad else "error")
    truncated = checked = 0
    for where, row in ((r.where, r.row) for r in records(options, base, registry, state=state, on_row_error=rejected)):
        row_no[0] += 1
        for f in lint_row(row):
            tally.add(row_no[0], where, f)
        if tok is not None:
            found, cut = _token_checks(tok, tpl, row, max_length)
            checked += 1
            truncated += cut
            for f in found:
                tally.add(row_no[0], where, f)
            if cut:
                tally.add(row_no[0], where, Finding("warning", "truncated", "", f"longer than {max_length} tokens"))
    if state.kind is None and not tally.codes:
        from llmforge.errors import DataError

        raise DataError(f"{src}: no usable rows")
    order = sorted(tally.codes.items(), key=lambda kv: (kv[1]["level"] != "error", -kv[1]["rows"], kv[0]))
    out = {
        "file": str(src),
        **state.to_json(),
        "rejected_rows": row_no[0] - state.rows,
        "rows_with_errors": len(tally.rows_with["error"]),
        "rows_with_warnings": len(tally.rows_with["warning"]),
        "findings": {code: entry for code, entry in order},
    }
    if tok is not None:
        assert tpl is not None  # load_chat_tokenizer's default kind ("chat") always resolves a template
        out.update(
            {
                "max_length": max_length,
                "template": tpl.name,
                "truncated": truncated,
                "truncation_rate": truncated / checked if checked else 0.0,
            }
        )
    return out
