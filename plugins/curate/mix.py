"""Mixing several sources into one dataset: shares by rows or by tokens, budgets, epochs and
up-sampling, deterministic by seed, in two streaming passes (count, then take).

Each source gets an amount, in the mix's unit (rows, or tokens):

* ``epochs = e``: e times the source (2 = every row twice, 0.5 = half of it);
* ``budget = b``: b units (more than the source holds repeats it);
* ``ratio = r``: a share r of the total. The total is ``total`` when given; else, next to sources with
  epochs or budgets, what makes the ratios come out (their amounts / (1 - sum of ratios)); else, with
  ratios only (which must add up to 1), the largest total that no source has to repeat more than its
  ``max_epochs`` times (1 by default: the scarcest source is used once, whole).

A source whose share needs more than ``max_epochs`` passes is an error, not a silent shortfall.

Taking an amount: whole passes over the source, then a fraction of one more, chosen row by row with
selection sampling (each row is taken with probability remaining-to-take / remaining-to-see, weighted
by its tokens in token mode): exact in rows, within one row in tokens, the rows in source order, and
the same rows for the same seed. The sources are then interleaved so that every stretch of the
output holds them in their shares.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, model_validator

from llmforge.data import DataOptions, SourceRow
from llmforge.errors import ConfigError, DataError, Problem
from llmforge.stage import Input, StageOptions

if TYPE_CHECKING:
    from llmforge.plugins import Registry

_DATA_KEYS = ("path", "format", "columns", "on_bad_row", "text_split", "limit")


class MixSource(StageOptions):
    name: str | None = Field(None, description="Name in the report (default: the file name).")
    data: DataOptions = Field(
        description="Where the rows come from (as a training stage's `data`); `path = ...` "
        "beside the other keys works too."
    )
    ratio: float | None = Field(None, gt=0, le=1, description="Share of the output (rows or tokens, see `by`).")
    budget: float | None = Field(None, gt=0, description="Amount to take, in rows or tokens.")
    epochs: float | None = Field(None, gt=0, description="Passes over the source (2 = up-sample twice, 0.5 = half).")
    max_epochs: float = Field(1.0, gt=0, description="For a ratio: the most passes the share may need.")

    @model_validator(mode="before")
    @classmethod
    def _path_shorthand(cls, value: Any) -> Any:
        if isinstance(value, dict) and "data" not in value and "path" in value:
            value = dict(value)
            value["data"] = {k: value.pop(k) for k in _DATA_KEYS if k in value}
        return value

    @model_validator(mode="after")
    def _one_amount(self) -> MixSource:
        given = [k for k in ("ratio", "budget", "epochs") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of ratio, budget or epochs" + (f" (got {', '.join(given)})" if given else "")
            )
        return self

    def label(self, i: int) -> str:
        if self.name:
            return self.name
        path = self.data.path if isinstance(self.data.path, str) else self.data.path[0]
        return Path(path).name or f"source {i}"


class MixOptions(StageOptions):
    sources: list[MixSource] = Field(min_length=1, description="The sources and how much of each.")
    by: Literal["rows", "tokens"] = Field("rows", description="Shares, budgets and totals in rows or in tokens.")
    total: float | None = Field(None, gt=0, description="Size of the output in rows or tokens (for ratios).")
    seed: int | None = Field(None, description="Seed of the sampling (default: the project's seed, else 0).")
    tokenizer: Annotated[str | None, Input("model", "tokenizer")] = Field(
        None, description="Tokenizer folder that counts tokens (default: words count as tokens)."
    )

    @model_validator(mode="after")
    def _ratios(self) -> MixOptions:
        ratios = [s.ratio for s in self.sources if s.ratio is not None]
        fixed = len(ratios) < len(self.sources)
        total = sum(ratios)
        if ratios and not fixed and self.total is None and abs(total - 1) > 1e-6:
            raise ValueError(f"the ratios add up to {total:g}, not 1")
        if ratios and fixed and self.total is None and total >= 1:
            raise ValueError(
                f"the ratios add up to {total:g}; next to sources with budget or epochs they must "
                f"leave room for them (< 1), or set total"
            )
        names = [s.label(i) for i, s in enumerate(self.sources)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"two sources are named {dupes[0]!r}: give them distinct `name`s")
        return self


# ------------------------------------------------------------------------------------------------
# planning


@dataclass
class SourceSize:
    rows: int
    units: float  # rows, or tokens
    kind: str | None


@dataclass
class Plan:
    name: str
    size: SourceSize
    amount: float  # units to take
    target_share: float | None

    @property
    def epochs(self) -> float:
        return self.amount / self.size.units if self.size.units else 0.0


def plan(options: MixOptions, sizes: list[SourceSize]) -> list[Plan]:
    """How much of each source to take; a ConfigError when a ratio cannot be met."""
    problems = []
    fixed: list[float | None] = []  # the amounts that epochs and budgets set; None for a ratio
    for s, size in zip(options.sources, sizes):
        if s.epochs is not None:
            fixed.append(s.epochs * size.units)
        elif s.budget is not None:
            fixed.append(float(s.budget))
        else:
            fixed.append(None)
    ratios = {i: s.ratio for i, s in enumerate(options.sources) if s.ratio is not None}
    total = 0.0
    if ratios:
        if options.total is not None:
            total = options.total
        elif len(ratios) < len(options.sources):
            total = sum(a for a in fixed if a is not None) / (1 - sum(ratios.values()))
        else:
            total = min(options.sources[i].max_epochs * sizes[i].units / r for i, r in ratios.items())
        for i, r in ratios.items():
            s = options.sources[i]
            need = r * total
            if sizes[i].units and need > s.max_epochs * sizes[i].units * (1 + 1e-9):
                problems.append(
                    Problem(
                        f"sources[{i}]",
                        f"{s.label(i)}: its share ({r:g} of {total:g} "
                        f"{options.by} = {need:g}) needs {need / sizes[i].units:.2f} "
                        f"passes over its {sizes[i].units:g} {options.by}; "
                        f"max_epochs is {s.max_epochs:g}",
                    )
                )
    if problems:
        raise ConfigError(problems, hint="lower the total or the ratio, or raise max_epochs to up-sample")
    # a source without a fixed amount has a ratio (MixSource: exactly one of ratio, budget, epochs)
    amounts = [a if a is not None else ratios[i] * total for i, a in enumerate(fixed)]
    grand = sum(amounts) or 1.0
    out = []
    for i, (s, size, amount) in enumerate(zip(options.sources, sizes, amounts)):
        target = s.ratio if s.ratio is not None else amount / grand
        if options.by == "rows":
            amount = float(round(amount))
        out.append(Plan(s.label(i), size, amount, target))
    return out


# ------------------------------------------------------------------------------------------------
# taking


def take(
    rows: Callable[[], Iterator[SourceRow]],
    amount: float,
    size: SourceSize,
    weight: Callable[[dict], float],
    rng: random.Random,
) -> Iterator[SourceRow]:
    """``amount`` units of a source: whole passes, then selection sampling over one more pass."""
    if size.units <= 0 or amount <= 0:
        return
    passes = int(math.floor(amount / size.units + 1e-12))
    rest = amount - passes * size.units
    for _ in range(passes):
        yield from rows()
    if rest <= 0:
        return
    remaining_seen = size.units
    remaining_take = rest
    for src in rows():
        w = weight(src.row)
        if remaining_take > 0 and rng.random() * remaining_seen < remaining_take:
            remaining_take -= w
            yield src
        remaining_seen -= w


def interleave(streams: list[Iterator[SourceRow]], expected: list[float]) -> Iterator[tuple[int, SourceRow]]:
    """Merge streams so that each appears at its expected pace: always the one furthest behind."""
    heap = [(0.0, i) for i, n in enumerate(expected) if n > 0]
    heapq.heapify(heap)
    done = [0] * len(streams)
    while heap:
        _, i = heapq.heappop(heap)
        item = next(streams[i], None)
        if item is None:
            continue
        done[i] += 1
        yield i, item
        heapq.heappush(heap, ((done[i] + 0.5) / expected[i], i))


def weight_fn(options: MixOptions, base: Path | None) -> tuple[Callable[[dict], float], str]:
    from llmforge_plugins.curate.api import row_text
    from llmforge_plugins.curate.tokens import count_words, token_counter

    if options.by == "rows":
        return (lambda row: 1.0), "rows"
    if options.tokenizer:
        path = Path(options.tokenizer)
        count = token_counter(path if path.is_absolute() or base is None else base / path)
        return (lambda row: float(count(row_text(row)))), "tokens"
    return (lambda row: float(count_words(row_text(row)))), "words (no tokenizer given)"


def mix(
    options: MixOptions,
    write: Callable[[dict], None],
    registry: Registry,
    base: Path | None = None,
    seed: int = 0,
    readers: Sequence[Callable[[], Iterator[SourceRow]]] | None = None,
) -> dict[str, Any]:
    """Mix the sources into ``write(row)``; return the report. ``readers`` replaces reading each
    source's ``data`` (the curate stage mixes its curated sources).

    Rows are written as they came in, every column kept (``SourceRow.raw``). When the sources are in
    different row formats (an alpaca file and a sharegpt file), one file could not be read back with
    one format: then every row is written in its normalised shape, followed by its other columns
    (``llmforge.data.normalised_with_extras``)."""
    from llmforge.data import normalised_with_extras
    from llmforge_plugins.curate.api import row_kind
    from llmforge_plugins.curate.source import records

    weight, unit_name = weight_fn(options, base)
    if readers is None:
        readers = [partial(records, s.data, base, registry) for s in options.sources]
    sizes = []
    layouts = set()
    for read in readers:
        rows = 0
        units: float = 0
        kind = None
        for src in read():
            rows += 1
            units += weight(src.row)
            if kind is None:
                kind = row_kind(src.row)
                layouts.add((src.fmt.name if src.fmt is not None else None, tuple(sorted(src.columns.items()))))
        sizes.append(SourceSize(rows, units, kind))
    kinds = {s.kind for s in sizes if s.kind}
    if len(kinds) > 1:
        found = ", ".join(f"{s.label(i)}: {sz.kind}" for i, (s, sz) in enumerate(zip(options.sources, sizes)))
        raise DataError(
            f"the sources hold different kinds of rows ({found}); one dataset has one kind",
            hint="mix text with text, chat with chat, preference pairs with preference pairs",
        )
    plans = plan(options, sizes)
    base_seed = options.seed if options.seed is not None else seed
    streams, expected = [], []
    for i, (p, read) in enumerate(zip(plans, readers)):
        rng = random.Random(f"llmforge-mix:{base_seed}:{i}:{p.name}")
        streams.append(take(read, p.amount, p.size, weight, rng))
        per_row = p.size.units / p.size.rows if p.size.rows else 1.0
        expected.append(p.amount / per_row if per_row else 0.0)
    taken_rows = [0] * len(plans)
    taken_units = [0.0] * len(plans)
    as_written = (lambda src: src.raw) if len(layouts) <= 1 else normalised_with_extras
    for i, src in interleave(streams, expected):
        taken_rows[i] += 1
        taken_units[i] += weight(src.row)
        write(as_written(src))
    total_units = sum(taken_units) or 1.0
    return {
        "by": options.by,
        "unit": unit_name,
        "seed": base_seed,
        "columns": "as read"
        if len(layouts) <= 1
        else "normalised (the sources are in different row formats), other columns kept",
        "rows": sum(taken_rows),
        "units": sum(taken_units),
        "sources": [
            {
                "name": p.name,
                "available_rows": p.size.rows,
                "available_units": p.size.units,
                "planned_units": p.amount,
                "rows": taken_rows[i],
                "units": taken_units[i],
                "epochs": round(taken_units[i] / p.size.units, 4) if p.size.units else 0.0,
                "target_share": round(p.target_share, 6) if p.target_share is not None else None,
                "share": round(taken_units[i] / total_units, 6),
            }
            for i, p in enumerate(plans)
        ],
    }


def read_recipe(path: Path) -> MixOptions:
    """A mix.toml: the keys of MixOptions at the top level; paths relative to the file."""
    from llmforge.config import read_toml
    from llmforge.schema import validate_model

    raw = read_toml(path)
    options, problems = validate_model(MixOptions, raw, "")
    if options is None:  # not valid: the problems say why
        raise ConfigError(problems, source=str(path))
    refs = [
        Problem(
            f"sources[{i}].data.path", f"'{p}': references to stages only work in forge.toml (the curate stage's mix)"
        )
        for i, s in enumerate(options.sources)
        for p in ([s.data.path] if isinstance(s.data.path, str) else s.data.path)
        if p.startswith("@")
    ]
    if refs:
        raise ConfigError(refs, source=str(path))
    return options
