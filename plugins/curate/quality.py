"""`quality`: heuristic filters on a row's text: length, repetition, symbols, digits, word length.

The defaults remove garbage (pages of repeated lines, tables of numbers, base64 blobs, symbol soup)
rather than filter web text hard: every threshold can be tightened, or switched off (a ratio set to 1,
an n-gram table set to ``{}``; the length bounds are off unless set).
The repetition measures follow the ones used for large web corpora (Rae et al., 2021, "Gopher"):

* duplicate lines: the share of a text's non-empty lines that repeat an earlier line, and the share
  of its characters in such lines;
* top n-gram: for n = 2, 3, 4, the share of the words' characters covered by the most frequent n-gram
  (when it occurs more than once);
* duplicate n-grams: for n = 5 to 10, the share of characters covered by n-grams that occur more than
  once.

Ratios are noisy on short texts, so they apply only from ``stats_min_words`` words up (50, as for
Gopher's documents: in a 27-word text a name said three times is a "repeated 2-gram"). Chat and
preference rows are measured on their concatenated turns. Each reason has its own code in the report
(``min_chars``, ``duplicate_lines``, ``top_2gram``, ``symbol_ratio``, ...).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Annotated

from pydantic import Field

from llmforge.stage import Input
from llmforge_plugins.curate.api import CurationStep, Drop, StepOptions, row_text

_WORD = re.compile(r"\w+")
_PUNCT = set(".,;:!?'\"()[]-–—/%&…‘’“”«»¿¡")


class QualityOptions(StepOptions):
    min_chars: int | None = Field(None, ge=0, description="Drop texts shorter than this many characters.")
    max_chars: int | None = Field(None, ge=1, description="Drop texts longer than this many characters.")
    min_words: int | None = Field(None, ge=0, description="Drop texts with fewer words.")
    max_words: int | None = Field(None, ge=1, description="Drop texts with more words.")
    min_tokens: int | None = Field(None, ge=0, description="Drop texts with fewer tokens (needs tokenizer).")
    max_tokens: int | None = Field(None, ge=1, description="Drop texts with more tokens (needs tokenizer).")
    tokenizer: Annotated[str | None, Input("model", "tokenizer")] = Field(
        None, description="Tokenizer (or model) folder that counts tokens for min_tokens / max_tokens."
    )
    max_duplicate_lines: float | None = Field(
        0.3, ge=0, le=1, description="Largest share of non-empty lines that repeat an earlier line."
    )
    max_duplicate_line_chars: float | None = Field(
        0.2, ge=0, le=1, description="Largest share of characters in repeated lines."
    )
    max_top_ngram: dict[int, float] = Field(
        default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16},
        description="n -> largest share of characters covered by the most frequent n-gram of words (n from 2 to 4).",
    )
    max_duplicate_ngrams: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> largest share of characters covered by repeated n-grams of words (n from 5 to 10).",
    )
    max_symbol_ratio: float | None = Field(
        0.3,
        ge=0,
        le=1,
        description="Largest share of non-space characters that are neither letters, digits nor common punctuation.",
    )
    max_digit_ratio: float | None = Field(
        0.4, ge=0, le=1, description="Largest share of non-space characters that are digits."
    )
    min_mean_word_length: float | None = Field(2.0, ge=0, description="Smallest mean word length (characters).")
    max_mean_word_length: float | None = Field(
        15.0, gt=0, description="Largest mean word length (base64, URLs and hashes are long 'words')."
    )
    stats_min_words: int = Field(
        50,
        ge=0,
        description="Ratios (repetition, symbols, digits, word length) apply "
        "only to texts with at least this many words.",
    )


def _ngram_checks(words: list[str], options: QualityOptions) -> Drop | None:
    total = sum(len(w) for w in words)
    if not total:
        return None
    for n, limit in sorted(options.max_top_ngram.items()):
        if len(words) < n:
            continue
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        gram, count = counts.most_common(1)[0]
        if count > 1:
            # characters covered by its occurrences, each word once (occurrences of "ok ok" overlap)
            covered = [False] * len(words)
            for i in range(len(words) - n + 1):
                if tuple(words[i : i + n]) == gram:
                    covered[i : i + n] = [True] * n
            share = sum(len(w) for w, c in zip(words, covered) if c) / total
            if share > limit:
                return Drop(
                    f'the {n}-gram "{" ".join(gram)}" covers {share:.0%} of the text (max_top_ngram {n} = {limit})',
                    code=f"top_{n}gram",
                )
    for n, limit in sorted(options.max_duplicate_ngrams.items()):
        if len(words) < n:
            continue
        seen: dict[tuple, int] = {}
        covered = [False] * len(words)
        for i in range(len(words) - n + 1):
            gram = tuple(words[i : i + n])
            if gram in seen:
                for j in (seen[gram], i):
                    for k in range(j, j + n):
                        covered[k] = True
            else:
                seen[gram] = i
        share = sum(len(w) for w, c in zip(words, covered) if c) / total
        if share > limit:
            return Drop(
                f"repeated {n}-grams cover {share:.0%} of the text (max_duplicate_ngrams {n} = {limit})",
                code=f"duplicate_{n}grams",
            )
    return None


class QualityFilter(CurationStep[QualityOptions]):
    """Drops rows whose text is too short or too long, repeats itself, or is mostly symbols, digits,
    or implausibly short or long words. Every threshold is optional."""

    name = "quality"
    summary = "Heuristic quality filters: length (chars, words, tokens), repetition, symbol/digit ratios, word length."
    action = "filter"
    Options = QualityOptions

    def __init__(self, options: QualityOptions, env):
        super().__init__(options, env)
        self.count_tokens = None
        if options.tokenizer:
            from llmforge_plugins.curate.tokens import token_counter

            self.count_tokens = token_counter(env.path(options.tokenizer))

    @classmethod
    def check(cls, options: QualityOptions, env) -> list[str]:
        problems = []
        if (options.min_tokens is not None or options.max_tokens is not None) and not options.tokenizer:
            problems.append("min_tokens / max_tokens need `tokenizer` (a tokenizer or model folder)")
        if options.tokenizer and not env.path(options.tokenizer).exists():
            problems.append(f"tokenizer: not found: {options.tokenizer}")
        for name, lo, hi in (("max_top_ngram", 2, 4), ("max_duplicate_ngrams", 5, 10)):
            bad = [n for n in getattr(options, name) if not lo <= n <= hi]
            if bad:
                problems.append(f"{name}: n must be from {lo} to {hi}, got {bad[0]}")
        return problems

    def process(self, row: dict):
        options = self.options
        text = row_text(row)
        chars = len(text)
        if options.min_chars is not None and chars < options.min_chars:
            return Drop(f"too short: {chars} characters < min_chars {options.min_chars}", code="min_chars")
        if options.max_chars is not None and chars > options.max_chars:
            return Drop(f"too long: {chars} characters > max_chars {options.max_chars}", code="max_chars")
        words = _WORD.findall(text)
        if options.min_words is not None and len(words) < options.min_words:
            return Drop(f"too short: {len(words)} words < min_words {options.min_words}", code="min_words")
        if options.max_words is not None and len(words) > options.max_words:
            return Drop(f"too long: {len(words)} words > max_words {options.max_words}", code="max_words")
        if self.count_tokens is not None:
            tokens = self.count_tokens(text)
            if options.min_tokens is not None and tokens < options.min_tokens:
                return Drop(f"too short: {tokens} tokens < min_tokens {options.min_tokens}", code="min_tokens")
            if options.max_tokens is not None and tokens > options.max_tokens:
                return Drop(f"too long: {tokens} tokens > max_tokens {options.max_tokens}", code="max_tokens")
        if len(words) < options.stats_min_words:
            return row
        drop = self._lines(text) or self._characters(text, words)
        if drop is None and (options.max_top_ngram or options.max_duplicate_ngrams):
            drop = _ngram_checks([w.lower() for w in words], options)
        return drop or row

    def _lines(self, text: str) -> Drop | None:
        options = self.options
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        if len(lines) < 2:
            return None
        seen: set[str] = set()
        dup_lines = dup_chars = 0
        for line in lines:
            if line in seen:
                dup_lines += 1
                dup_chars += len(line)
            seen.add(line)
        share = dup_lines / len(lines)
        if options.max_duplicate_lines is not None and share > options.max_duplicate_lines:
            return Drop(
                f"{dup_lines} of {len(lines)} lines repeat an earlier line ({share:.0%} > "
                f"max_duplicate_lines {options.max_duplicate_lines})",
                code="duplicate_lines",
            )
        char_share = dup_chars / max(sum(len(line) for line in lines), 1)
        if options.max_duplicate_line_chars is not None and char_share > options.max_duplicate_line_chars:
            return Drop(
                f"repeated lines hold {char_share:.0%} of the characters (> max_duplicate_line_chars "
                f"{options.max_duplicate_line_chars})",
                code="duplicate_line_chars",
            )
        return None

    def _characters(self, text: str, words: list[str]) -> Drop | None:
        options = self.options
        visible = [c for c in text if not c.isspace()]
        if not visible:
            return None
        digits = sum(c.isdigit() for c in visible)
        symbols = sum(1 for c in visible if not (c.isalnum() or c in _PUNCT))
        if options.max_symbol_ratio is not None and symbols / len(visible) > options.max_symbol_ratio:
            return Drop(
                f"{symbols / len(visible):.0%} of the characters are symbols "
                f"(> max_symbol_ratio {options.max_symbol_ratio})",
                code="symbol_ratio",
            )
        if options.max_digit_ratio is not None and digits / len(visible) > options.max_digit_ratio:
            return Drop(
                f"{digits / len(visible):.0%} of the characters are digits "
                f"(> max_digit_ratio {options.max_digit_ratio})",
                code="digit_ratio",
            )
        mean = sum(len(w) for w in words) / len(words)
        if options.min_mean_word_length is not None and mean < options.min_mean_word_length:
            return Drop(
                f"mean word length {mean:.1f} < min_mean_word_length {options.min_mean_word_length}",
                code="mean_word_length",
            )
        if options.max_mean_word_length is not None and mean > options.max_mean_word_length:
            return Drop(
                f"mean word length {mean:.1f} > max_mean_word_length {options.max_mean_word_length}",
                code="mean_word_length",
            )
        return None
