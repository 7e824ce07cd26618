"""`decontaminate`: drop training rows that share a long word n-gram with an evaluation set.

The evaluation sets are named files or folders (any file type a reader knows). Every string in their
rows (or only the columns named in ``fields``) is split into words, and every n-gram of ``ngram``
words (13 by default) is remembered; a text of the evaluation set shorter than that, but with at least
``min_words`` words, counts as one n-gram of its own length. A training row is dropped when any of
its texts contains one of them. N-grams never span two texts (two turns, two columns). Words are
compared lower-cased by default.

The index holds one 64-bit hash per distinct n-gram of the evaluation sets (they are small); the
training data streams past it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

import numpy as np
from pydantic import Field, field_validator

from llmforge.stage import Input
from llmforge_plugins.curate import minhash
from llmforge_plugins.curate.api import CurationStep, Drop, StepOptions, row_texts


class DecontaminateOptions(StepOptions):
    eval_sets: dict[str, Annotated[str | list[str], Input()]] = Field(
        description='Evaluation sets by name: {name = "path"} (a file, a folder, or a list of them).'
    )
    ngram: int = Field(13, ge=3, le=64, description="N-gram length in words.")
    min_words: int = Field(
        8,
        ge=1,
        description="Evaluation texts shorter than ngram count as a whole when they "
        "have at least this many words (shorter ones are ignored).",
    )
    fields: list[str] = Field(
        default_factory=list, description="Columns of the evaluation rows to read (default: every string in the row)."
    )
    lowercase: bool = Field(True, description="Compare words case-insensitively.")

    @field_validator("eval_sets")
    @classmethod
    def _some(cls, value: dict) -> dict:
        if not value:
            raise ValueError('name at least one evaluation set: {name = "path"}')
        return value


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        if value.strip():
            yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _paths(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


class Decontaminate(CurationStep[DecontaminateOptions]):
    """Drops training rows that contain any ``ngram``-word sequence of the named evaluation sets (and
    keeps every other row)."""

    name = "decontaminate"
    summary = "Drop rows sharing a word n-gram (13 by default) with named evaluation sets."
    action = "filter"
    Options = DecontaminateOptions
    _SEED = 7

    @classmethod
    def check(cls, options: DecontaminateOptions, env) -> list[str]:
        return [
            f"eval_sets.{name}: not found: {p}"
            for name, value in options.eval_sets.items()
            for p in _paths(value)
            if not env.path(p).exists()
        ]

    def __init__(self, options: DecontaminateOptions, env):
        super().__init__(options, env)
        self.items: list[tuple[str, str]] = []  # (eval set, where) of each evaluation text
        self.tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # n -> (sorted hashes, item of each)
        self.ngrams = 0
        self._load()

    def _eval_texts(self) -> Iterator[tuple[str, str, str]]:
        from llmforge.data import DataOptions, iter_files
        from llmforge.errors import DataError

        registry = self.env.registry
        if registry is None:  # a StepEnv built by hand (a unit test) without the registry it needs here
            raise ValueError(
                "decontaminate reads its evaluation sets with the registry's readers: give StepEnv(registry=...)"
            )
        for name, value in self.options.eval_sets.items():
            for shown in _paths(value):
                root = self.env.path(shown)
                for path, reader in iter_files([root], registry.readers):
                    opts = DataOptions(path=str(path))
                    for rec in reader.read(path, opts):
                        where = rec.where.replace(str(root), shown, 1)
                        if rec.error is not None:
                            raise DataError(f"{where}: {rec.error}", hint=f"evaluation set {name!r} of decontaminate")
                        fields = self.options.fields
                        data = {f: rec.data.get(f) for f in fields} if fields else rec.data
                        for text in _strings(data):
                            yield name, where, text

    def _load(self) -> None:
        options = self.options
        texts: list[str] = []
        owner: list[int] = []
        for name, where, text in self._eval_texts():
            if not self.items or self.items[-1] != (name, where):
                self.items.append((name, where))
            texts.append(text)
            owner.append(len(self.items) - 1)
        if not texts:
            self.env.log("decontaminate: the evaluation sets hold no text")
            return
        unit_hashes, counts = minhash.units(texts, "word", options.lowercase, self._SEED)
        owner_arr = np.asarray(owner, dtype=np.uint64)
        lengths = {options.ngram} | {int(c) for c in np.unique(counts) if options.min_words <= c < options.ngram}
        for n in sorted(lengths):
            hashes, offsets = minhash.grams(unit_hashes, counts, n, self._SEED)
            per_text = np.diff(offsets)
            # texts shorter than n gave one "whole text" hash of another kind: only exact-length ones count
            keep_text = counts >= n if n == options.ngram else counts == n
            mask = np.repeat(keep_text, per_text)
            h, who = hashes[mask], np.repeat(owner_arr, per_text)[mask]
            if not h.size:
                continue
            h, first = np.unique(h, return_index=True)
            self.tables[n] = (h, who[first])
            self.ngrams += h.size

    def process_batch(self, rows, wheres):
        options = self.options
        if not self.tables:
            return list(rows)
        pieces: list[str] = []
        row_of: list[int] = []
        for i, row in enumerate(rows):
            for text in row_texts(row):
                pieces.append(text)
                row_of.append(i)
        out: list = list(rows)
        if not pieces:
            return out
        unit_hashes, counts = minhash.units(pieces, "word", options.lowercase, self._SEED)
        for n, (table, who) in self.tables.items():
            hashes, offsets = minhash.grams(unit_hashes, counts, n, self._SEED)
            per_text = np.diff(offsets)
            at = np.minimum(np.searchsorted(table, hashes), table.size - 1)
            hit = (table[at] == hashes) & np.repeat(counts >= n, per_text)
            for pos in np.flatnonzero(hit):
                piece = int(np.searchsorted(offsets, pos, side="right") - 1)
                i = row_of[piece]
                if isinstance(out[i], Drop):
                    continue
                name, where = self.items[int(who[at[pos]])]
                words = minhash.split_words(pieces[piece])
                start = int(pos - offsets[piece])
                shown = " ".join(words[start : start + n])
                out[i] = Drop(f'shares the {n}-gram "{shown}" with eval set {name} ({where})', code=name)
        return out

    def finish(self) -> dict:
        return {"eval_texts": len(self.items), "eval_ngrams": self.ngrams}
