"""Task specs and task data: what an `eval` stage's ``tasks = [...]`` and `llmforge eval --task` name.

A task spec is a table of a task kind's ``Options`` (name, kind, data, few-shot keys, the kind's own keys),
written inline in forge.toml or as a small ``.toml`` file with the same keys at its top level::

    tasks = [
      { name = "qa", kind = "multiple_choice", data = "data/qa.jsonl" },
      "tasks/arith.toml",
    ]

:func:`load_task_specs` validates every spec against its kind and reports each problem by key path
(``stages[3].tasks[0].data: ...``) or by file (``tasks/arith.toml: scorer: ...``), all at once, as the
config loader does. Relative paths in a spec are read from the folder of the file that declares it
(forge.toml, or the task's .toml file); the loaded options hold them resolved.

:func:`read_items` reads a task's items (``.jsonl``, ``.json``, ``.csv``/``.tsv``, ``.parquet``, or a ``.txt``
file for perplexity) with llmforge's own data readers, so that a bad row is named by file and line as in
training data; :func:`item_field` names the field too. :func:`fewshot` picks the examples shown before an
item: seeded, never the item asked.

No torch here: the stage's check and `llmforge eval` validate specs before any model is loaded.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from llmforge.errors import ConfigError, DataError, Problem
from llmforge.schema import did_you_mean, validate_model
from llmforge_plugins.eval.api import EvalTask, TaskOptions

#: Suffixes of the files a task reads its items from (compressed text files too: the readers open them).
ITEM_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".txt")


# ------------------------------------------------------------------------------------------------
# task specs


def load_task_specs(
    values: Sequence[Any] | Any,
    tasks_table: dict[str, EvalTask],
    base_dir: Path,
    where: str,
) -> tuple[list[tuple[EvalTask, TaskOptions]], list[Problem]]:
    """Validate task specs: each value an inline table (a dict) or the path of a ``.toml`` task spec file.

    ``tasks_table`` is the registry's table of task kinds (``registry.table(EVAL_TASKS)``), ``base_dir``
    the folder of the declaring file, ``where`` the key path of the list (``stages[3].tasks``; ``--task``
    for the command line). Returns the (task kind, its validated options) of every good spec, and every
    problem found in the others; the caller raises ``ConfigError(problems)`` when there are any (a stage's
    check, the command). Data files are checked to exist (a typo must not wait for a model to load);
    their rows are read at run time."""
    if isinstance(values, (str, dict)):
        values = [values]
    specs: list[tuple[EvalTask, TaskOptions]] = []
    problems: list[Problem] = []
    first_seen: dict[str, str] = {}
    for i, value in enumerate(values):
        here = f"{where}[{i}]"
        spec_dir = base_dir
        if isinstance(value, (str, os.PathLike)):
            loaded = _read_spec_file(Path(value), base_dir, here)
            if isinstance(loaded, Problem):
                problems.append(loaded)
                continue
            data, spec_dir = loaded
            # Problems inside a spec file name the file (as written) and the key: `tasks/qa.toml: choices: ...`
            prefix = f"{value}: "
        elif isinstance(value, dict):
            data = dict(value)
            prefix = f"{here}."
        else:
            problems.append(
                Problem(here, f"expected a table or the path of a .toml task spec, got {type(value).__name__}")
            )
            continue
        task, options, found = _validate(data, tasks_table, spec_dir, prefix)
        problems.extend(found)
        if task is None or options is None:
            continue
        name_where = _key(prefix, "name")
        if options.name in first_seen:
            problems.append(
                Problem(
                    name_where,
                    f"task name '{options.name}' is used twice (also at {first_seen[options.name]}); "
                    f"metrics are named <task>.<metric>, so each task needs its own name",
                )
            )
            continue
        first_seen[options.name] = name_where
        specs.append((task, options))
    return specs, problems


def load_task_spec(value: Any, tasks_table: dict[str, EvalTask], base_dir: Path, where: str) -> tuple[EvalTask, Any]:
    """One spec, or a ConfigError (exit 2) listing its problems: for callers that take a single task."""
    specs, problems = load_task_specs([value], tasks_table, base_dir, where)
    if problems:
        raise ConfigError(problems)
    return specs[0]


def _key(prefix: str, key: str) -> str:
    """`stages[0].tasks[1].` + `data`, or `tasks/qa.toml: ` + `data`."""
    return prefix + key


def _read_spec_file(path: Path, base_dir: Path, here: str) -> tuple[dict, Path] | Problem:
    from llmforge.config import read_toml

    shown = str(path)
    real = path.expanduser()
    if not real.is_absolute():
        real = base_dir / real
    if real.suffix.lower() != ".toml":
        return Problem(here, f"'{shown}': a task spec file must be a .toml file (or write the spec as an inline table)")
    if not real.is_file():
        return Problem(here, f"task spec file not found: {shown}")
    try:
        data = read_toml(real)
    except ConfigError as exc:
        problem = exc.problems[0]
        return Problem(problem.where.replace(str(real), shown, 1), problem.message)
    return data, real.parent


def _validate(
    data: dict, tasks_table: dict[str, EvalTask], spec_dir: Path, prefix: str
) -> tuple[EvalTask | None, TaskOptions | None, list[Problem]]:
    installed = ", ".join(sorted(tasks_table)) or "none"
    kind = data.get("kind")
    if kind is None:
        return (
            None,
            None,
            [Problem(_key(prefix, "kind"), f"required key is missing (installed task kinds: {installed})")],
        )
    if not isinstance(kind, str):
        return None, None, [Problem(_key(prefix, "kind"), f"expected a string, got {type(kind).__name__}")]
    task = tasks_table.get(kind)
    if task is None:
        return (
            None,
            None,
            [
                Problem(
                    _key(prefix, "kind"),
                    f"unknown task kind '{kind}'{did_you_mean(kind, tasks_table)} (installed: {installed})",
                )
            ],
        )
    # validate_model joins key paths with dots; a spec file's keys start after "file: ".
    base = prefix[:-1] if prefix.endswith(".") else ""
    options, problems = validate_model(task.Options, data, base)
    if not prefix.endswith("."):
        problems = [Problem(prefix + p.where, p.message) for p in problems]
    if options is None:
        return task, None, problems
    options = resolve_paths(options, spec_dir)
    for key in ("data", "fewshot_data"):
        value = getattr(options, key, None)
        if value is not None and not Path(value).exists():
            problems.append(Problem(_key(prefix, key), f"file not found: {data.get(key)}"))
        elif value is not None and not Path(value).name.lower().removesuffix(".gz").endswith(ITEM_SUFFIXES):
            problems.append(
                Problem(_key(prefix, key), f"cannot read {data.get(key)}: expected one of {', '.join(ITEM_SUFFIXES)}")
            )
    whole = prefix[:-1] if prefix.endswith(".") else prefix[:-2]  # the spec itself: `tasks[0]`, `qa.toml`
    problems += [Problem(_key(prefix, p.where) if p.where else whole, p.message) for p in _check(task, options)]
    return task, (None if problems else options), problems


def _check(task: EvalTask, options: TaskOptions) -> list[Problem]:
    """The kind's own check (a column its template needs, ...): strings are problems of the spec as a whole,
    Problems keep their key."""
    out = []
    for p in task.check(options):
        out.append(p if isinstance(p, Problem) else Problem("", str(p)))
    return out


def is_path_key(key: str) -> bool:
    """Whether a task spec's key names a file or folder (read relative to the spec, part of the cache key)."""
    return key == "data" or key.endswith("_data") or key.endswith("_path")


def resolve_paths(options: TaskOptions, base_dir: Path) -> TaskOptions:
    """``options`` with ``data`` and ``fewshot_data`` (and any other ``*_data`` or ``*_path`` key of a kind:
    lm_eval's ``include_path``) made absolute, read from ``base_dir`` (the declaring file's folder) when relative."""
    update = {}
    for key, value in options:
        if is_path_key(key) and isinstance(value, str):
            path = Path(value).expanduser()
            update[key] = str(path if path.is_absolute() else (base_dir / path).resolve())
    return options.model_copy(update=update) if update else options


# ------------------------------------------------------------------------------------------------
# items


class Items(list):
    """A task's items (dicts, as read), with where each came from (``qa.jsonl:7``, ``qa.parquet:row 3``)."""

    def __init__(self, rows: Iterable[dict] = (), wheres: Iterable[str] = ()):
        super().__init__(rows)
        self.wheres: list[str] = list(wheres)

    def where(self, index: int) -> str:
        return self.wheres[index] if index < len(self.wheres) else f"item {index}"


def shown_path(path: str | Path) -> str:
    """A path as messages show it: relative to the working folder when under it, else absolute."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def read_items(options: TaskOptions, base_dir: Path | None = None, *, path: str | None = None) -> Items:
    """The items of a task: the rows of ``options.data`` (or ``path``, e.g. ``fewshot_data``) as dicts, at most
    ``options.limit`` of them, each with where it came from. A ``.txt`` file gives one ``{"text": ...}``
    item per blank-line separated block (a document). A bad row is a DataError naming file and line;
    an empty file too."""
    from llmforge.data import DataOptions, Reader, iter_files
    from llmforge_plugins.data_formats import CsvReader, JsonlReader, JsonReader, ParquetReader, TextReader

    raw = path if path is not None else options.data
    if raw is None:
        raise DataError(f'task {options.name}: no data file (set `data = "items.jsonl"`)')
    real = Path(raw).expanduser()
    if not real.is_absolute():
        real = (base_dir or Path.cwd()) / real
    shown = shown_path(real) if Path(raw).is_absolute() else str(raw)
    readers: dict[str, Reader] = {
        r.name: r for r in (JsonlReader(), JsonReader(), CsvReader(), ParquetReader(), TextReader())
    }
    read_opts = DataOptions(path=str(real), text_split="blank_line")
    limit = options.limit if path is None else None
    rows: list[dict] = []
    wheres: list[str] = []
    try:
        for file, reader in iter_files([real], readers):
            for rec in reader.read(file, read_opts):
                where = rec.where.replace(str(file), shown if file == real else shown_path(file), 1)
                if rec.error is not None:
                    raise DataError(f"{where}: {rec.error}")
                rows.append(rec.data)
                wheres.append(where)
                if limit is not None and len(rows) >= limit:
                    return Items(rows, wheres)
    except DataError as exc:
        raise DataError(exc.message.replace(str(real), shown), exc.hint) from None
    except OSError as exc:
        raise DataError(f"{shown}: cannot read: {exc.strerror or exc}") from None
    if not rows:
        raise DataError(f"{shown}: no items (the file is empty)")
    return Items(rows, wheres)


def item_field(item: dict, where: str, name: str, *, kinds: tuple[type, ...] = (), what: str = "") -> Any:
    """``item[name]``, or a DataError naming file, line and field: missing (with the item's fields), or not
    of one of ``kinds`` (``what`` says what was expected, in words). ``where`` is the item's
    (:meth:`Items.where`)."""
    if name not in item:
        raise DataError(
            f"{where}: {name}: missing{did_you_mean(name, item)} (the item's fields: {', '.join(item) or 'none'})",
            hint='name the field in the task\'s spec (e.g. `question = "prompt"`)',
        )
    value = item[name]
    if kinds and not isinstance(value, kinds):
        from llmforge.data import describe

        raise DataError(
            f"{where}: {name}: expected {what or ' or '.join(k.__name__ for k in kinds)}, got {describe(value)}"
        )
    return value


def fewshot(
    options: TaskOptions,
    items: Sequence[dict],
    index: int,
    rng: random.Random | None = None,
    pool: Sequence[dict] | None = None,
) -> list[dict]:
    """The ``options.num_fewshot`` examples to show before ``items[index]``.

    They come from ``pool`` (the items of ``fewshot_data``, read once by the task with
    :func:`read_items`) or else from ``items`` themselves, never the item asked (neither its index nor an
    equal row). Without ``rng``, each item's sample is drawn from a generator seeded by ``fewshot_seed``
    and the item's index: the same examples on every run and for every model."""
    source = items if pool is None else pool
    return [source[i] for i in fewshot_indices(options, items, index, rng, pool)]


def fewshot_indices(
    options: TaskOptions,
    items: Sequence[dict],
    index: int,
    rng: random.Random | None = None,
    pool: Sequence[dict] | None = None,
) -> list[int]:
    """:func:`fewshot`'s examples as indices into ``pool`` (or ``items`` when there is none): a task that
    parsed its items once looks them up (and where each came from) by index."""
    k = options.num_fewshot
    if k <= 0:
        return []
    asked = items[index]
    source = items if pool is None else pool

    def usable(i: int) -> bool:
        # Not the item asked, nor a copy of it (a duplicated row, or the same row in fewshot_data).
        return (pool is not None or i != index) and source[i] != asked

    if rng is None:
        # A string seed is hashed deterministically (not with Python's per-process hash randomisation).
        rng = random.Random(f"{options.fewshot_seed}:{index}")
    # Draw a few more than needed and drop the unusable ones: sampling from a range costs O(k), not O(items),
    # which matters when every one of thousands of items draws its own sample.
    drawn = [i for i in rng.sample(range(len(source)), min(len(source), k + 2)) if usable(i)]
    if len(drawn) >= k:
        return drawn[:k]
    candidates = [i for i in range(len(source)) if usable(i)]
    if len(candidates) < k:
        what = "fewshot_data holds" if pool is not None else "the task's items hold"
        raise DataError(
            f"task {options.name}: num_fewshot = {k} but {what} only {len(candidates)} other example"
            f"{'s' if len(candidates) != 1 else ''}",
            hint="lower num_fewshot, or set fewshot_data to a file of examples",
        )
    return rng.sample(candidates, k)
