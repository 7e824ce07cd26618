"""The prompt templates of the built-in generators, and the lenient parsing of what the teacher answers.

Every template is a plain ``str.format`` string; its :func:`~llmforge_plugins.synth.api.text_hash` is what a
row's ``provenance.template`` records, so an edited template is visible in the data it made. Small teachers
rarely follow a format exactly: the parsers accept numbered or bulleted lists, ``Q:``/``Question 1:``
labels, stray quotes and preambles, and return what they could find (an empty list when nothing), never raise.
"""

from __future__ import annotations

import re

from llmforge_plugins.synth.api import text_hash

# ------------------------------------------------------------------------------------------------
# answer

#: appended to the prompt when ``reasoning = "keep"`` or ``"strip"``; the marker is the option ``marker``
REASONING = (
    "{prompt}\n\nWork through this step by step, showing your reasoning. "
    "Then write one last line that starts with '{marker}' followed by your final answer."
)

# ------------------------------------------------------------------------------------------------
# self_instruct

SELF_INSTRUCT = (
    "You are helping to build a varied set of tasks for training an AI assistant.\n"
    "Here are some example tasks:\n\n{examples}\n\n"
    "{steer}"
    "Write {n} new tasks. Each must be different from the examples and from the others, self-contained, "
    "and answerable by a text reply. Write them as a numbered list (1., 2., ...), one task per item, "
    "without answers."
)
TOPIC = "The new tasks should be about: {topic}.\n"
PERSONA = "Write them as this person would ask them: {persona}.\n"

# ------------------------------------------------------------------------------------------------
# from_documents

DOCUMENT_QA = (
    "Read the passage below. Write {n} questions that the passage answers, each followed by its answer. "
    "Answer only with facts stated in the passage.\n"
    "Use this format:\nQ1: <question>\nA1: <answer>\nQ2: <question>\nA2: <answer>\n\n"
    'Passage:\n"""\n{passage}\n"""'
)
DOCUMENT_FOLLOWUP = (
    'Passage:\n"""\n{passage}\n"""\n\n'
    "A conversation about the passage so far:\n\n{conversation}\n\n"
    "Write the next question the user would ask, following on from the conversation, that the passage "
    "answers, then its answer using only facts from the passage.\nUse this format:\nQ: <question>\nA: <answer>"
)
#: the first user turn when ``include_passage = true``: the passage travels with the question
WITH_PASSAGE = "{passage}\n\n{question}"

# ------------------------------------------------------------------------------------------------
# evolve

EVOLVE = (
    "Rewrite the instruction below into a new instruction. {how}\n"
    "The new instruction must make sense on its own, must be answerable by a text reply, and must not say "
    "that it was rewritten. Reply with the new instruction only.\n\n"
    "Instruction:\n{instruction}"
)
#: the ways an instruction evolves (our own wording of Evol-Instruct's in-depth and in-breadth operations)
EVOLUTIONS = {
    "deeper": "Make it ask for a deeper treatment of the same subject: more depth, more detail, more insight.",
    "broader": "Write a new instruction on a related but different subject of the same kind and difficulty.",
    "concretize": "Replace general ideas in it with specific, concrete ones (names, numbers, situations).",
    "constraints": "Add one or two extra requirements or constraints the answer must satisfy.",
    "reasoning": "Change it so that answering needs several explicit steps of reasoning.",
}


def template_hash(*templates: str) -> str:
    """The provenance ``template`` of a row made with several templates: their hashes joined by ``+``."""
    return "+".join(text_hash(t) for t in templates)


# ------------------------------------------------------------------------------------------------
# parsing

_ITEM = re.compile(r"^\s*(?:\(?\d{1,3}[.):\]]|[-*\u2022])(?:\s+(.*\S))?\s*$")
_LABEL = re.compile(r"^(?:new\s+)?(?:task|instruction|question|prompt)\s*\d*\s*[:.-]\s*", re.IGNORECASE)
_PREAMBLE = re.compile(r"^(?:here (?:are|is)|sure|certainly|okay|ok|of course)\b.*[:!.]\s*$", re.IGNORECASE)


def _clean(text: str) -> str:
    text = _LABEL.sub("", text.strip())
    text = re.sub(r"^\*\*(.*?)\*\*:?\s*", r"\1 ", text).strip()  # a bold heading kept as words
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


def numbered_items(text: str) -> list[str]:
    """The items of a numbered (or bulleted) list anywhere in ``text``; lines after an item that are not items
    themselves continue it. Without any list marker, each non-empty line that is not a preamble is an item."""
    items: list[list[str]] = []
    in_list = False
    for line in text.replace("\r\n", "\n").split("\n"):
        m = _ITEM.match(line)
        if m:
            items.append([m.group(1) or ""])
            in_list = True
        elif in_list and line.strip():
            items[-1].append(line.strip())
        elif in_list and not line.strip():
            in_list = bool(items[-1] == [""])  # a blank line ends an item (unless the marker stood alone)
    if not items:
        items = [[line] for line in text.split("\n") if line.strip() and not _PREAMBLE.match(line.strip())]
    out = [_clean(" ".join(part for part in item if part)) for item in items]
    return [t for t in out if t]


_Q = re.compile(r"^\s*(?:\*\*)?(?:q|question)\s*\d*\s*(?:\*\*)?\s*[:.)-]\s*(?:\*\*)?\s*", re.IGNORECASE)
_A = re.compile(r"^\s*(?:\*\*)?(?:a|answer)\s*\d*\s*(?:\*\*)?\s*[:.)-]\s*(?:\*\*)?\s*", re.IGNORECASE)


def qa_pairs(text: str) -> list[tuple[str, str]]:
    """Question/answer pairs labelled ``Q1:``/``A1:`` (or ``Question:``/``Answer:``, any numbering). Without
    labels: a line ending in ``?`` is a question and the lines up to the next such line its answer. A question
    without an answer is dropped."""
    pairs: list[tuple[str, list[str]]] = []
    state = None  # "q" while reading a question, "a" while reading an answer
    labelled = any(_Q.match(line) for line in text.split("\n"))
    for raw in text.replace("\r\n", "\n").split("\n"):
        line = raw.strip()
        if not line:
            continue
        line_q = _Q.match(line) if labelled else None
        line_a = _A.match(line) if labelled else None
        if line_q:
            pairs.append((line[line_q.end() :].strip(), []))
            state = "q"
        elif line_a and pairs:
            pairs[-1][1].append(line[line_a.end() :].strip())
            state = "a"
        elif not labelled and line.endswith("?"):
            pairs.append((re.sub(r"^\d{1,3}[.)]\s*", "", line), []))
            state = "a"
        elif state == "q" and pairs and not pairs[-1][1]:
            pairs[-1] = (pairs[-1][0] + " " + line, [])
        elif state == "a" and pairs:
            pairs[-1][1].append(line)
    out = []
    for q, a in pairs:
        q, ans = _clean(q), " ".join(x for x in a if x).strip()
        if q and ans:
            out.append((q, ans))
    return out


_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.IGNORECASE | re.DOTALL)
_REWRITE_LABEL = re.compile(
    r"^\s*(?:\*\*)?(?:new|rewritten|evolved|revised)?\s*(?:instruction|prompt|task|version)\s*(?:\*\*)?\s*:\s*(?:\*\*)?",
    re.IGNORECASE,
)


def strip_think(text: str) -> str:
    """``text`` without ``<think>...</think>`` blocks (an unclosed one runs to the end)."""
    return _THINK.sub("", text).strip()


def final_answer(text: str, marker: str) -> tuple[str, str]:
    """(reasoning, final answer) of a step-by-step answer: the answer is what follows the last ``marker`` (case
    and a bold ``**`` ignored), else the last paragraph of what is left once the think blocks are gone. An
    empty answer means the teacher gave none."""
    body = strip_think(text)
    pattern = re.compile(r"\**\s*" + re.escape(marker.rstrip(": ").strip()) + r"\s*\**\s*:?\s*\**", re.IGNORECASE)
    found = list(pattern.finditer(body))
    if found:
        m = found[-1]
        return body[: m.start()].strip(), body[m.end() :].strip().strip("*").strip()
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", body) if p.strip()]
    if len(paragraphs) > 1:
        return "\n\n".join(paragraphs[:-1]), paragraphs[-1]
    return "", body


def rewritten_instruction(text: str) -> str:
    """The new instruction in a rewrite answer: think blocks, a ``New instruction:`` label, a preamble line
    and wrapping quotes removed."""
    body = strip_think(text)
    lines = [line for line in body.split("\n")]
    while lines and (not lines[0].strip() or _PREAMBLE.match(lines[0].strip())):
        lines.pop(0)
    body = "\n".join(lines).strip()
    body = _REWRITE_LABEL.sub("", body, count=1).strip()
    if len(body) >= 2 and body[0] == body[-1] and body[0] in "\"'`":
        body = body[1:-1].strip()
    return body
