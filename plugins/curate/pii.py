"""`pii`: personal data and secrets replaced by placeholders (or the rows dropped).

What it finds, in this order (so that an address inside a URL is not also read as a phone number):

* ``key``: common API-key and token shapes: private-key blocks, AWS access key ids, GitHub, GitLab,
  Slack, Stripe, Google, Hugging Face, OpenAI/Anthropic-style ``sk-`` keys, JSON Web Tokens;
* ``email``: ``name@domain.tld``;
* ``ip``: IPv4 (each part 0-255) and IPv6 (checked with the ``ipaddress`` module, so times such as
  ``12:30:45`` are left alone);
* ``phone``: 9 to 15 digits with the usual separators, an optional ``+country`` prefix and area code
  in parentheses; runs that read as thousands (``1,000,000``), dates, plain long numbers without any
  separator, and space-separated numbers not in a national style (``2023 2024 2025``) are left alone.

Patterns, not understanding: names and street addresses are not found, and an unusual phone format
may be missed. The report counts each kind replaced.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from typing import Literal

from pydantic import Field

from llmforge_plugins.curate.api import CurationStep, Drop, StepOptions, map_text

PiiKind = Literal["email", "phone", "ip", "key"]
ALL_KINDS: tuple[PiiKind, ...] = ("email", "phone", "ip", "key")

_KEY = re.compile(
    "|".join(
        [
            r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
            r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",  # AWS access key id
            r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b",  # GitHub tokens
            r"\bgithub_pat_[A-Za-z0-9_]{22,255}\b",
            r"\bglpat-[A-Za-z0-9_-]{20,}\b",  # GitLab
            r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b",  # Slack
            r"\b(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{16,}\b",  # Stripe
            r"\bAIza[0-9A-Za-z_-]{35}\b",  # Google API key
            r"\bhf_[A-Za-z0-9]{30,}\b",  # Hugging Face
            r"\bsk-(?:[A-Za-z0-9]+-)*[A-Za-z0-9_-]{20,}\b",  # OpenAI, Anthropic and similar
            r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\b",  # JSON Web Token
        ]
    )
)
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
_IPV4 = re.compile(
    r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
    r"(?![\w]|\.\d)"
)
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{0,4}|(?:\d{1,3}\.){3}\d{1,3})(?![\w:]|\.\w)")
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,5}){1,4}(?![\w-]|\.\d)"
    r"|(?<![\w+])\+\d{9,15}(?!\w)"
)
_THOUSANDS = re.compile(r"\d{1,3}(?:([ .,])\d{3})(?:\1\d{3})*")
_DATE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}")

PLACEHOLDERS: dict[PiiKind, str] = {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP_ADDRESS>", "key": "<API_KEY>"}


def _is_ipv6(text: str) -> bool:
    if sum(1 for part in text.split(":") if part) < 2:
        return False  # "::", "::1", "x :: Int" (type signatures) are not worth a placeholder
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _is_phone(text: str) -> bool:
    digits = sum(c.isdigit() for c in text)
    if not 9 <= digits <= 15:
        return False
    core = text.lstrip("+")
    if _THOUSANDS.fullmatch(core) or _DATE.fullmatch(core):
        return False
    if not text.startswith(("+", "(")) and not re.search(r"[-.)]", text):
        # space-separated groups only: read as a phone number in the national style (0 6 12 34 56 78),
        # not as a list of numbers (2023 2024 2025)
        return core.startswith("0")
    return True


class PiiOptions(StepOptions):
    kinds: list[PiiKind] = Field(
        default_factory=lambda: list(ALL_KINDS), description="What to look for: email, phone, ip, key."
    )
    placeholders: dict[PiiKind, str] = Field(
        default_factory=dict,
        description="Replacement text per kind (default: <EMAIL>, <PHONE>, <IP_ADDRESS>, <API_KEY>).",
    )
    drop: bool = Field(False, description="Drop rows that contain any of them instead of replacing.")


class PiiScrub(CurationStep[PiiOptions]):
    """Replaces e-mail addresses, phone numbers, IP addresses and API keys with placeholders in every
    text of a row; with ``drop = true``, drops the rows that contain any instead."""

    name = "pii"
    summary = "Replace e-mail addresses, phone numbers, IP addresses and API-key shapes with placeholders."
    action = "rewrite"
    Options = PiiOptions

    def __init__(self, options: PiiOptions, env):
        super().__init__(options, env)
        self.found: Counter = Counter()
        self.placeholders = {**PLACEHOLDERS, **options.placeholders}

    def scrub(self, text: str, counts: Counter) -> str:
        kinds = self.options.kinds

        def sub(pattern: re.Pattern, kind: PiiKind, check=None) -> None:
            nonlocal text

            def repl(m: re.Match) -> str:
                if check is not None and not check(m.group(0)):
                    return m.group(0)
                counts[kind] += 1
                return self.placeholders[kind]

            text = pattern.sub(repl, text)

        if "key" in kinds:
            sub(_KEY, "key")
        if "email" in kinds:
            sub(_EMAIL, "email")
        if "ip" in kinds:
            sub(_IPV4, "ip")
            sub(_IPV6, "ip", _is_ipv6)
        if "phone" in kinds:
            sub(_PHONE, "phone", _is_phone)
        return text

    def process(self, row: dict):
        counts: Counter = Counter()
        out = map_text(row, lambda t: self.scrub(t, counts))
        self.found.update(counts)
        if counts and self.options.drop:
            what = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
            return Drop(f"contains personal data or secrets ({what})", code=sorted(counts)[0])
        return out

    def finish(self) -> dict:
        return {"found": dict(sorted(self.found.items()))}
