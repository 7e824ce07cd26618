"""Small text helpers the TUI's widgets share: durations, status colours, numbers."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from llmforge.formatting import STATUS_MARK, STATUS_STYLE, fmt_duration  # noqa: F401 - the screens import them from here

if TYPE_CHECKING:  # rich is imported where it is used: the TUI's start-up does not need it yet
    from rich.text import Text


def marked(status: str) -> str:
    """The status with its mark (formatting.STATUS_MARK, the CLI's too), as plain text: "■ stopped", "✗ failed",
    "running" (a status still going or never started has none)."""
    mark = STATUS_MARK.get(status)
    return f"{mark} {status}" if mark else status


def styled(status: str) -> str:
    return f"[{STATUS_STYLE.get(status, 'default')}]{marked(status)}[/]"


def fmt_number(v: float | None) -> str:
    """Compact: 0.000123 -> 1.23e-04, 1234.5 -> 1234.5, 2.5 -> 2.5."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    a = abs(v)
    if a != 0 and (a < 1e-3 or a >= 1e6):
        return f"{v:.2e}"
    return f"{v:.4g}"


# Shown in place of what cannot be drawn safely: an undecodable byte (U+FFFD), a control character.
UNSAFE_STYLE = "reverse dim"


def _zero_width(ch: str, cat: str) -> bool:
    o = ord(ch)
    return (
        cat in ("Cf", "Me")
        or 0xFE00 <= o <= 0xFE0F
        or 0xE0100 <= o <= 0xE01EF  # format, variation selectors
        or 0x1F3FB <= o <= 0x1F3FF
    )  # emoji skin tones: Rich counts them as two more cells, terminals as none


def terminal_safe(text: str, style: str = "") -> Text:
    """`text` (what a model wrote, say) as Rich Text that every terminal draws in the cells Rich measures,
    so that the borders around it stay where they are drawn.

    Terminals and Rich disagree on some characters: control characters move the cursor or switch colours
    (ESC, CR, BS), zero-width ones (joiners, variation selectors, skin tones, a combining mark with no
    letter before it) take one cell or none or join with the next, and U+FFFD (a byte that was not UTF-8:
    a small model's partial character) is of ambiguous width, two cells in East Asian set-ups. Those are
    dropped, or shown as a marked `?` (U+FFFD, unassigned or private characters) or `^X` (control
    characters); tabs become spaces. Wide characters (CJK, emoji) stay: both count them as two cells."""
    import unicodedata

    from rich.text import Text

    out = Text(style=style)
    plain: list[str] = []
    last_cat = "Zs"

    def mark(s: str) -> None:
        out.append("".join(plain))
        plain.clear()
        out.append(s, style=UNSAFE_STYLE)

    for ch in unicodedata.normalize("NFC", text):
        cat = unicodedata.category(ch)
        if ch == "\n":
            plain.append(ch)
        elif ch == "\t":
            plain.append("    ")
        elif ch == "\r":
            continue  # CRLF line ends: the LF makes the line
        elif cat == "Cc":
            o = ord(ch)
            mark(f"^{chr(o + 64)}" if o < 32 else "^?" if o == 127 else "?")
        elif ch == "\ufffd" or cat in ("Cs", "Co", "Cn"):
            mark("?")
        elif _zero_width(ch, cat) or (cat == "Mn" and not last_cat.startswith(("L", "M"))):
            continue
        else:
            plain.append(ch)
        last_cat = cat
    out.append("".join(plain))
    return out
