"""`llmforge data stats`: counts, length histograms, duplicate rates and languages of a data file, in one
streaming pass (lengths are kept as 4-byte integers for the percentiles; the dedup indexes hold
hashes)."""

from __future__ import annotations

from array import array
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from llmforge.data import DataOptions, ReadState
from llmforge_plugins.curate.api import StepEnv, row_text
from llmforge_plugins.curate.dedup import (
    ExactDedup,
    ExactDedupOptions,
    NearDedup,
    NearDedupOptions,
)
from llmforge_plugins.curate.language import guess
from llmforge_plugins.curate.source import batched, records
from llmforge_plugins.curate.tokens import count_words


def histogram(values: np.ndarray) -> list[dict]:
    """Power-of-two bins (0, 1, 2-3, 4-7, ...) from the first to the last that holds a value."""
    if not values.size:
        return []
    top = int(values.max())
    edges = [0, 1]
    while edges[-1] <= top:
        edges.append(edges[-1] * 2)
    counts, _ = np.histogram(values, bins=edges)
    bins = [{"from": lo, "to": hi - 1, "rows": int(n)} for lo, hi, n in zip(edges, edges[1:], counts)]
    while bins and not bins[0]["rows"]:
        bins.pop(0)
    while bins and not bins[-1]["rows"]:
        bins.pop()
    return bins


def summary(values: np.ndarray) -> dict:
    if not values.size:
        return {}
    p = np.percentile(values, [10, 50, 90])
    return {
        "min": int(values.min()),
        "p10": float(p[0]),
        "median": float(p[1]),
        "mean": float(values.mean()),
        "p90": float(p[2]),
        "max": int(values.max()),
        "total": int(values.sum()),
        "histogram": histogram(values),
    }


def compute(
    src: Path,
    registry: Any,
    fmt: str = "auto",
    skip_bad: bool = False,
    tokenizer: Path | None = None,
    near: bool = True,
    threshold: float = 0.8,
    base: Path | None = None,
) -> dict:
    """The figures of `llmforge data stats` for one file or folder, read with ``registry``'s readers and
    row formats."""
    base = base or Path.cwd()
    state = ReadState()
    options = DataOptions(path=str(src), format=fmt, on_bad_row="skip" if skip_bad else "error")
    env = StepEnv(base_dir=base, registry=registry)
    exact = ExactDedup(ExactDedupOptions(), env)
    near_step = NearDedup(NearDedupOptions(threshold=threshold), env) if near else None
    count_tokens = None
    if tokenizer is not None:
        from llmforge_plugins.curate.tokens import token_counter

        count_tokens = token_counter(tokenizer)
    chars, words, tokens = array("I"), array("I"), array("I")
    turns: Counter[int] = Counter()  # conversations by number of turns
    languages: Counter = Counter()
    exact_dups = near_dups = 0
    for wheres, rows in batched(((src.where, src.row) for src in records(options, base, registry, state=state)), 512):
        for row in rows:
            text = row_text(row)
            chars.append(len(text))
            words.append(count_words(text))
            if count_tokens is not None:
                tokens.append(count_tokens(text))
            if "messages" in row:
                turns[len(row["messages"])] += 1
            elif "chosen" in row:
                turns[len(row["prompt"])] += 1
            languages[guess(text, min_score=0.1)[0]] += 1
        answers = exact.process_batch(rows, wheres)
        kept = [(w, r) for w, r, a in zip(wheres, rows, answers) if isinstance(a, dict)]
        exact_dups += len(rows) - len(kept)
        if near_step is not None and kept:
            answers = near_step.process_batch([r for _, r in kept], [w for w, _ in kept])
            near_dups += sum(1 for a in answers if not isinstance(a, dict))
    n = state.rows
    out = {
        "file": str(src),
        **state.to_json(),
        "characters": summary(np.frombuffer(chars, dtype=np.uint32)),
        "words": summary(np.frombuffer(words, dtype=np.uint32)),
        "duplicates": {"exact": exact_dups, "exact_rate": exact_dups / n if n else 0.0},
    }
    if near:
        out["duplicates"].update(
            {"near": near_dups, "near_rate": near_dups / n if n else 0.0, "near_threshold": threshold}
        )
    if count_tokens is not None:
        out["tokens"] = summary(np.frombuffer(tokens, dtype=np.uint32))
    if turns:
        label = "turns" if state.kind == "chat" else "prompt_turns"
        out[label] = {str(k): v for k, v in sorted(turns.items())}
    out["languages"] = {k: v for k, v in languages.most_common()}
    return out
