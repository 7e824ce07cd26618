"""Runs rows through curation steps, batch by batch, and keeps the books: per step how many rows it
saw, kept, removed (by reason code) and rewrote, a few examples of removed rows, and one line per
removed row in the reasons file (``{"source", "step", "code", "reason"}``).

The rows themselves are never held beyond one batch: memory stays flat however large the input,
apart from what a step keeps by design (a dedup index of hashes).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llmforge.data import SourceRow, restore_row
from llmforge_plugins.curate.api import CurationStep, Drop, row_kind, row_text, snippet
from llmforge_plugins.curate.report import step_action_of
from llmforge_plugins.curate.source import JsonlWriter, batched

BATCH = 1024  # rows per batch: large enough for numpy to pay off, small enough to stay flat


@dataclass
class StepBook:
    name: str
    action: str
    options: dict
    seen: int = 0
    kept: int = 0
    removed: int = 0
    changed: int = 0
    skipped: int = 0  # rows of a kind the step does not handle (passed through)
    by_code: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)
    facts: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "step": self.name,
            "action": self.action,
            "options": self.options,
            "seen": self.seen,
            "kept": self.kept,
            "removed": self.removed,
            "changed": self.changed,
            "passed_through": self.skipped,
            "removed_by": dict(self.by_code.most_common()),
            "examples": self.examples,
            **self.facts,
        }


class ReasonsFile:
    """The per-row reasons file: one JSON line per removed (or unreadable) row."""

    def __init__(self, path: Path):
        self.writer = JsonlWriter(path)
        self.count = 0

    def add(self, source: str, step: str, code: str, reason: str) -> None:
        self.writer.write({"source": source, "step": step, "code": code, "reason": reason})
        self.count += 1

    def commit(self) -> None:
        self.writer.commit()

    def discard(self) -> None:
        self.writer.discard()


class Curator:
    def __init__(
        self, steps: list[CurationStep], reasons: ReasonsFile | None = None, examples: int = 5, batch_size: int = BATCH
    ):
        self.steps = steps
        self.reasons = reasons
        self.max_examples = examples
        self.batch_size = batch_size
        self.books = [StepBook(s.name, s.action, s.options.model_dump(mode="json")) for s in steps]
        self.rows_in = 0
        self.rows_out = 0

    def feed(self, wheres: list[str], rows: list[dict]) -> tuple[list[str], list[dict]]:
        """One batch through every step; returns the kept rows with their sources."""
        kept_w, kept_r, _ = self._feed(wheres, rows, list(range(len(rows))))
        return kept_w, kept_r

    def _feed(self, wheres: list[str], rows: list[dict], order: list) -> tuple[list[str], list[dict], list]:
        """``feed``, with ``order`` carried along: each row's place in the batch (reasons are written in
        input order), which also finds the kept row's source record."""
        self.rows_in += len(rows)
        removed: list[tuple[int, str, str, str, str]] = []
        for step, book in zip(self.steps, self.books):
            if not rows:
                break
            kind = row_kind(rows[0])  # one dataset, one kind
            if kind not in step.row_kinds:
                book.skipped += len(rows)
                continue
            answers = step.process_batch(rows, wheres)
            if len(answers) != len(rows):
                raise RuntimeError(f"curation step '{step.name}' answered {len(answers)} times for {len(rows)} rows")
            kept_w, kept_r, kept_o = [], [], []
            for where, row, answer, place in zip(wheres, rows, answers, order):
                if isinstance(answer, Drop):
                    code = answer.code or step.name
                    book.removed += 1
                    book.by_code[code] += 1
                    if len(book.examples) < self.max_examples:
                        book.examples.append(
                            {"source": where, "code": code, "reason": answer.reason, "text": snippet(row_text(row))}
                        )
                    removed.append((place, where, step.name, code, answer.reason))
                    continue
                if not isinstance(answer, dict):
                    raise RuntimeError(
                        f"curation step '{step.name}' answered {type(answer).__name__}; expected "
                        f"the row (a dict) or Drop(reason)"
                    )
                if answer is not row:
                    book.changed += 1
                kept_w.append(where)
                kept_r.append(answer)
                kept_o.append(place)
            book.seen += len(rows)
            book.kept += len(kept_r)
            wheres, rows, order = kept_w, kept_r, kept_o
        if self.reasons is not None:
            for _, where, step_name, code, reason in sorted(removed, key=lambda r: r[0]):
                self.reasons.add(where, step_name, code, reason)
        self.rows_out += len(rows)
        return wheres, rows, order

    def run(
        self,
        rows: Iterator[tuple[str, dict]],
        should_stop: Callable[[], bool] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Iterator[tuple[str, dict]]:
        """Every kept row, in input order. Stops early (without an error) when ``should_stop()`` says so."""
        for wheres, batch in batched(rows, self.batch_size):
            if should_stop is not None and should_stop():
                return
            kept_w, kept_r = self.feed(wheres, batch)
            yield from zip(kept_w, kept_r)
            if progress is not None:
                progress(self.rows_in, self.rows_out)

    def run_records(
        self,
        records: Iterator[SourceRow],
        should_stop: Callable[[], bool] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Iterator[SourceRow]:
        """``run`` over ``llmforge.data.iter_records``: every kept row, as a SourceRow whose ``row`` is
        what the steps made of it and whose ``raw`` is what to write: the row as it came in (every
        column, in its order), with only the texts a rewrite step changed replaced
        (``llmforge.data.restore_row``). Steps see the normalised rows, as in ``run``."""
        batch: list[SourceRow] = []

        def flush() -> Iterator[SourceRow]:
            _, kept, places = self._feed([r.where for r in batch], [r.row for r in batch], list(range(len(batch))))
            for row, place in zip(kept, places):
                src = batch[place]
                yield SourceRow(src.where, row, restore_row(src, row), src.fmt, src.columns)

        for rec in records:
            batch.append(rec)
            if len(batch) >= self.batch_size:
                if should_stop is not None and should_stop():
                    return
                yield from flush()
                batch = []
                if progress is not None:
                    progress(self.rows_in, self.rows_out)
        if batch and not (should_stop is not None and should_stop()):
            yield from flush()
            if progress is not None:
                progress(self.rows_in, self.rows_out)

    def finish(self) -> None:
        for step, book in zip(self.steps, self.books):
            book.facts = step.finish() or {}

    def report(self) -> dict:
        return {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "removed": self.rows_in - self.rows_out,
            "steps": [b.to_json() for b in self.books],
        }


def summary_lines(report: dict) -> list[str]:
    """The report as a few lines of text: what each step kept and removed, and why."""
    lines = [f"kept {report['rows_out']} of {report['rows_in']} rows (removed {report['removed']})"]
    for st in report["steps"]:
        why = ", ".join(f"{code} {n}" for code, n in st["removed_by"].items())
        what = f"removed {st['removed']}" + (f" ({why})" if why else "")
        if step_action_of(st) == "rewrite":
            what += f", rewrote {st['changed']}"
        if st["passed_through"]:
            what += f", passed {st['passed_through']} through (not for this kind of row)"
        lines.append(f"  {st['step']:<14} {what}")
    return lines


def write_json(path: Path, data: dict) -> None:
    from llmforge.runs import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
