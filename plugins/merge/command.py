"""`llmforge merge` and `llmforge merge-lora`: thin commands over the merge engine.

They build a recipe (`MergeOptions`) from the flags, or from a merge.toml given with -c (flags then
override it), and call `engine.merge_to`, which checks everything before writing anything and builds
the output in a temporary folder renamed into place. User errors are ForgeErrors: one message, exit 2.
"""

# No `from __future__ import annotations`: Typer reads these commands' Annotated parameters at every start,
# and string annotations would be compiled and evaluated there (twice per command, ~15 ms in all).

import re
from pathlib import Path
from typing import Annotated

import typer

from llmforge.errors import ConfigError, Problem, UsageError

_PATH_KEYS = ("model", "lora_base")


def _resolve_paths(raw: dict, base_dir: Path, source: str) -> None:
    """Paths in a recipe file are relative to the file; `@stage` references only mean something in forge.toml."""
    problems = []

    def fix(container, key, where):
        value = container.get(key)
        if not isinstance(value, str):
            return
        if value.startswith("@"):
            problems.append(
                Problem(
                    where, f"'{value}': references to stages work in forge.toml (the merge stage); here, give a path"
                )
            )
            return
        p = Path(value).expanduser()
        container[key] = str(p if p.is_absolute() else base_dir / p)

    for key in ("base", "config_from"):
        fix(raw, key, key)
    for i, m in enumerate(raw.get("models") or []):
        if isinstance(m, dict):
            for key in _PATH_KEYS:
                fix(m, key, f"models[{i}].{key}")
    for i, sl in enumerate(raw.get("slices") or []):
        if isinstance(sl, dict):
            for j, src in enumerate(sl.get("sources") or []):
                if isinstance(src, dict):
                    fix(src, "model", f"slices[{i}].sources[{j}].model")
    if problems:
        raise ConfigError(problems, source=source)


_FLAG_FOR = [
    (re.compile(r"^parameters\.([^.\[]+)(.*)$"), lambda m: f"--set {m.group(1)}{m.group(2)}"),
    (re.compile(r"^models\[(\d+)\]\.parameters\.weight$"), lambda m: f"--weight (for --model {int(m.group(1)) + 1})"),
    (
        re.compile(r"^models\[(\d+)\]\.parameters\.([^.\[]+)(.*)$"),
        lambda m: f"--model {int(m.group(1)) + 1}: {m.group(2)}{m.group(3)}",
    ),
    (re.compile(r"^models$"), lambda m: "--model"),
    (
        re.compile(r"^(method|base|seed|dtype|compute_dtype|config_from|max_shard_size)$"),
        lambda m: "--" + m.group(1).replace("_", "-"),
    ),
]


def _as_flags(exc: ConfigError) -> ConfigError:
    """Problems located by recipe key paths, renamed after the flags they came from."""
    problems = []
    for p in exc.problems:
        where = p.where
        for pattern, name in _FLAG_FOR:
            m = pattern.match(where)
            if m:
                where = name(m)
                break
        problems.append(Problem(where, p.message))
    return ConfigError(problems, hint=exc.hint)


def _printer():
    from llmforge.cli.render import EventPrinter
    from llmforge_plugins.merge.engine import Reporter

    printer = EventPrinter()

    def log(message, level="info"):
        printer({"type": "log", "stage": "merge", "level": level, "message": message})

    def progress(done, total=None, unit="tensor", **extra):
        printer({"type": "progress", "stage": "merge", "done": done, "total": total, "unit": unit, **extra})

    return printer, Reporter(log=log, progress=progress)


def _list_methods() -> None:
    from llmforge.cli.common import console, registry
    from llmforge_plugins.merge.api import MERGE_METHODS

    out = console()
    reg = registry()
    for name, m in sorted(reg.table(MERGE_METHODS).items()):
        owner = reg.owner(MERGE_METHODS, name) or "?"
        out.print(f"[bold]{name}[/] [dim]({owner}; base {m.base})[/]: {m.summary}", highlight=False)
        for p in m.params:
            default = "required" if p.default is None else f"default {str(p.default).lower()}"
            extra = ", per model" if p.per_model else ""
            rng = f", {p.describe_range()}" if p.describe_range() else ""
            out.print(f"    {p.name}: {p.description} ({default}{extra}{rng})", highlight=False)


def merge(
    out: Annotated[
        Path | None, typer.Argument(help="Output model directory (new, or empty; --force replaces it).")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="A merge recipe (merge.toml): slices, per-layer lists, filters."),
    ] = None,
    method: Annotated[
        str | None, typer.Option("--method", "-m", help="Merge method (--list-methods shows them).")
    ] = None,
    model: Annotated[
        list[str] | None, typer.Option("--model", help="An input model directory or LoRA adapter (repeat for each).")
    ] = None,
    weight: Annotated[
        list[float] | None, typer.Option("--weight", "-w", help="Weight of each --model, in order (repeat).")
    ] = None,
    base: Annotated[str | None, typer.Option("--base", help="Base model: task vectors are taken against it.")] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option("--set", help="A method parameter, NAME=VALUE: t=0.5, density=0.5, lambda=1.0, t=[0,0.5,1]."),
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the random drops (dare_*); default 0.")] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="Output dtype: auto, float32, float16, bfloat16.")
    ] = None,
    compute_dtype: Annotated[
        str | None, typer.Option("--compute-dtype", help="Arithmetic dtype (default float32).")
    ] = None,
    config_from: Annotated[
        str | None,
        typer.Option(
            "--config-from",
            help="Model whose config, tokenizer and chat template the output gets (default: the base, else the first "
            "model).",
        ),
    ] = None,
    max_shard_size: Annotated[
        str | None, typer.Option("--max-shard-size", help="Largest output file (default 2GB).")
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace OUT when it holds an earlier merge's output (and none of the inputs)."),
    ] = False,
    replace: Annotated[
        Path | None,
        typer.Option("--replace", metavar="OUT", help="Replace OUT whatever it holds: name the same folder again."),
    ] = None,
    list_methods: Annotated[
        bool, typer.Option("--list-methods", help="List the merge methods and their parameters.")
    ] = False,
) -> None:
    """Merge models into OUT, tensor by tensor: --method M --model A --model B [--weight 0.7 --weight 0.3]
    [--base BASE] [--set t=0.5], or -c merge.toml. Everything is checked before anything is written.
    Exit code: 0 done, 2 bad input."""
    if list_methods:
        _list_methods()
        return
    from llmforge.cli.common import registry
    from llmforge.config import parse_value, read_toml
    from llmforge.schema import validate_model
    from llmforge_plugins.merge.api import MERGE_METHODS
    from llmforge_plugins.merge.engine import merge_to
    from llmforge_plugins.merge.options import MergeOptions

    if out is None:
        raise UsageError(
            "missing OUT: the folder to write the merged model to",
            hint="llmforge merge OUT --method linear --model A --model B",
        )
    model, weight, sets = list(model or []), list(weight or []), list(sets or [])
    raw: dict = {}
    source = "merge options"
    if config is not None:
        raw = read_toml(config)
        source = str(config)
        _resolve_paths(raw, config.resolve().parent, source)
        if model and (raw.get("models") or raw.get("slices")):
            raise UsageError(f"{config} lists its models already; --model adds none to a recipe")
    for key, value in (
        ("method", method),
        ("base", base),
        ("seed", seed),
        ("dtype", dtype),
        ("compute_dtype", compute_dtype),
        ("config_from", config_from),
        ("max_shard_size", max_shard_size),
    ):
        if value is not None:
            raw[key] = value
    if weight and len(weight) != len(model):
        raise UsageError(
            f"{len(weight)} --weight for {len(model)} --model: give one weight per model, in order, or none"
        )
    if model:
        raw["models"] = (
            [{"model": m, "parameters": {"weight": w}} for m, w in zip(model, weight)]
            if weight
            else [{"model": m} for m in model]
        )
    for item in sets:
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise UsageError(f"--set {item}: expected NAME=VALUE (e.g. --set t=0.5)")
        raw.setdefault("parameters", {})[name.strip()] = parse_value(value.strip())
    options, problems = validate_model(MergeOptions, raw, "")
    # A misspelt key comes first: `methd = "linear"` is better reported as itself (with the suggestion)
    # than as the missing `method` it causes.
    problems.sort(key=lambda p: not p.message.startswith("unknown key"))
    if "method" not in raw and all(p.where == "method" for p in problems):
        raise UsageError(
            "no merge method: give --method (or method = ... in the recipe)",
            hint="llmforge merge --list-methods lists them",
        )
    try:
        if problems:
            raise ConfigError(
                problems,
                source=source if config else None,
                hint="llmforge merge --list-methods lists the methods" if "method" not in raw else None,
            )
        printer, report = _printer()
        summary = merge_to(
            options,
            out,
            registry().table(MERGE_METHODS),
            force=force,
            report=report,
            seed=0 if seed is None else seed,
            replace=replace,
        )
    except ConfigError as exc:
        raise (exc if config is not None else _as_flags(exc)) from None
    assert summary is not None  # None means stopped, and this report never asks to stop (Ctrl-C raises)
    printer({"type": "stage_end", "stage": "merge", "status": "done", "duration": summary["seconds"]})
    typer.echo(f"merged model written to {out}")


def merge_lora(
    adapter: Annotated[
        Path, typer.Argument(help="A LoRA adapter directory (adapter_config.json, adapter_model.safetensors).")
    ],
    out: Annotated[Path, typer.Argument(help="Output model directory.")],
    base: Annotated[
        Path | None,
        typer.Option("--base", help="The adapter's base model (default: the one named in adapter_config.json)."),
    ] = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="Output dtype: auto (the base's), float32, float16, bfloat16.")
    ] = "auto",
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace OUT when it holds an earlier merge's output (and not the adapter or its base).",
        ),
    ] = False,
    replace: Annotated[
        Path | None,
        typer.Option("--replace", metavar="OUT", help="Replace OUT whatever it holds: name the same folder again."),
    ] = None,
) -> None:
    """Merge a LoRA adapter into its base: every adapted weight becomes W + scale·B·A. Writes a complete
    model directory (config, tokenizer and chat template, generation config, model card)."""
    from llmforge_plugins.merge.engine import merge_lora as run

    if dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise UsageError(f"--dtype {dtype}: expected auto, float32, float16 or bfloat16")
    printer, report = _printer()
    summary = run(adapter, out, base=base, dtype=dtype, force=force, report=report, replace=replace)
    assert summary is not None  # None means stopped, and this report never asks to stop (Ctrl-C raises)
    printer({"type": "stage_end", "stage": "merge", "status": "done", "duration": summary["seconds"]})
    typer.echo(f"merged model written to {out}")


def register(cli) -> None:
    cli.command("merge")(merge)
    cli.command("merge-lora")(merge_lora)
