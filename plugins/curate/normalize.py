"""`normalize`: Unicode normal form, whitespace and control characters, in every text of a row.

Lower-casing is not offered here on purpose: it would change what the model learns. The dedup steps
lower-case their comparison keys instead (their ``lowercase`` option).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

from pydantic import Field

from llmforge_plugins.curate.api import CurationStep, Drop, StepOptions, map_text

# C0 and C1 control characters except tab and line feed, and invisible characters that only get in the
# way (zero-width space, byte-order mark / zero-width no-break space, soft hyphen, word joiner).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u2060\ufeff\u00ad]")
# Spaces other than the plain one (no-break, en/em/thin spaces, ...); tab is kept (code indentation).
_ODD_SPACE = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING = re.compile(r"[ \t]+(?=\n)|[ \t]+\Z")
_BLANK_RUN = re.compile(r"\n{3,}")
_INNER_RUN = re.compile(r"(?<=\S)[ \t]{2,}(?=\S)")


class NormalizeOptions(StepOptions):
    form: Literal["NFC", "NFKC", "none"] = Field(
        "NFC",
        description="Unicode normal form (NFKC also folds compatibility characters: ligatures, full-width letters).",
    )
    whitespace: bool = Field(
        True,
        description="Line endings to \\n, odd spaces to plain ones, no trailing spaces, "
        "at most one blank line in a row, no blank lines around the text.",
    )
    collapse_spaces: bool = Field(False, description="Also fold runs of spaces inside a line (indentation is kept).")
    control_chars: bool = Field(True, description="Remove control and zero-width characters (tab and newline stay).")
    drop_empty: bool = Field(
        True,
        description="Drop rows left with nothing to train on (an empty text, no "
        "assistant content, chosen equal to rejected).",
    )


class Normalize(CurationStep[NormalizeOptions]):
    """Rewrites every text of a row (a text row's text, each turn's content) to one Unicode normal
    form, with tidy whitespace and no control characters, and drops rows left empty."""

    name = "normalize"
    summary = "Unicode NFC/NFKC, whitespace and control characters in every text; drops rows left empty."
    action = "rewrite"
    Options = NormalizeOptions

    def clean(self, text: str) -> str:
        options = self.options
        if options.control_chars:
            text = _CONTROL.sub("", text)
        if options.form != "none":
            text = unicodedata.normalize(options.form, text)
        if options.whitespace:
            text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n\n")
            text = _ODD_SPACE.sub(" ", text)
            text = _TRAILING.sub("", text)
            text = _BLANK_RUN.sub("\n\n", text)
            text = text.strip("\n")
            if options.collapse_spaces:
                text = _INNER_RUN.sub(" ", text)
        return text

    def process(self, row: dict):
        out = map_text(row, self.clean)
        if self.options.drop_empty:
            reason = _empty(out)
            if reason:
                return Drop(reason, code="empty")
        return out


def _empty(row: dict) -> str | None:
    if "messages" in row:
        if not any(m["role"] == "assistant" and m["content"].strip() for m in row["messages"]):
            return "no assistant content left after normalisation"
    elif "chosen" in row:
        if row["chosen"] == row["rejected"]:
            return "chosen and rejected are the same after normalisation"
        for side in ("chosen", "rejected"):
            if not any(m["content"].strip() for m in row[side]):
                return f"{side} is empty after normalisation"
    elif not row["text"].strip():
        return "empty text after normalisation"
    return None
