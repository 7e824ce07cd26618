"""Counting tokens: with a tokenizer folder when one is given, else words (what the length filters
and token budgets fall back to, and say so)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

_WORD = re.compile(r"\w+")


def count_words(text: str) -> int:
    return len(_WORD.findall(text))


def token_counter(path: Path) -> Callable[[str], int]:
    """A function text -> number of tokens, from a tokenizer or model folder (or a tokenizer.json).
    The `tokenizers` library is used directly when the folder has a tokenizer.json (fast, and no
    transformers import); anything else goes through transformers' AutoTokenizer."""
    from llmforge.errors import UsageError

    path = Path(path)
    file = path if path.is_file() else path / "tokenizer.json"
    if file.is_file() and file.suffix == ".json":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(file))
        return lambda text: len(tok.encode(text, add_special_tokens=False).ids)
    if not path.exists():
        raise UsageError(f"tokenizer not found: {path}")
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - many ways for a folder not to hold a tokenizer
        raise UsageError(f"{path}: cannot load a tokenizer: {exc}") from None
    return lambda text: len(hf(text, add_special_tokens=False)["input_ids"])
