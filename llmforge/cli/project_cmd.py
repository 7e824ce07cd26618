"""`llmforge init` and `llmforge validate`."""

# No `from __future__ import annotations`: Typer reads these commands' Annotated parameters at every start,
# and string annotations would be compiled and evaluated there (twice per command, ~15 ms in all).

from importlib import resources
from pathlib import Path
from typing import Annotated

import typer

from llmforge.cli.common import ConfigOption, JsonOption, SetOption, console, print_json, registry
from llmforge.errors import ConfigError, UsageError


def recipe_names() -> list[str]:
    """The recipes `llmforge init --recipe` knows: llmforge/templates/recipes/<name>.toml (docs/recipes/ has
    the same files to browse)."""
    folder = resources.files("llmforge") / "templates" / "recipes"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def init(
    directory: Annotated[Path, typer.Argument(help="Folder for the new project (created if missing).")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing forge.toml.")] = False,
    recipe: Annotated[
        str | None,
        typer.Option(
            "--recipe",
            help="Start from a ready recipe for a real model and machine (docs/recipes/), e.g. "
            "qwen3-0.6b-lora-sft-8gb-gpu; `--recipe list` names them all.",
        ),
    ] = None,
) -> None:
    """Write a forge.toml and the sample data it uses; it validates and runs as is. With --recipe, the
    recipe's forge.toml and sample data in its format; put the model where the recipe's `model` says."""
    if recipe is not None:
        names = recipe_names()
        if recipe == "list":
            console().print("\n".join(names), markup=False, highlight=False)
            return
        if recipe not in names:
            raise UsageError(f"unknown recipe '{recipe}'; the recipes are: {', '.join(names)}")
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "forge.toml"
    if target.exists() and not force:
        raise UsageError(f"{target} already exists", hint="use --force to overwrite it")
    if recipe is not None:
        _init_recipe(directory, target, recipe)
        return
    templates = resources.files("llmforge") / "templates"
    name = directory.resolve().name
    text = (templates / "init-forge.toml").read_text(encoding="utf-8").format(name=name)
    data = directory / "data"
    data.mkdir(exist_ok=True)
    notes = data / "notes.txt"
    if not notes.exists():
        notes.write_text((templates / "notes.txt").read_text(encoding="utf-8"), encoding="utf-8")
    from llmforge.runs import atomic_write_text

    atomic_write_text(target, text)
    out = console()
    out.print(f"wrote {target} and {notes}", markup=False)
    where = "" if directory.resolve() == Path.cwd() else f" -c {target}"
    out.print(f"next: [bold]llmforge validate{where}[/] then [bold]llmforge run{where}[/]")


def _init_recipe(directory: Path, target: Path, name: str) -> None:
    """The recipe as forge.toml, and sample rows in the format of each data file it reads (kept if present),
    so that only the model is left to fetch."""
    import sys

    from llmforge.runs import atomic_write_text

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    templates = resources.files("llmforge") / "templates"
    text = (templates / "recipes" / f"{name}.toml").read_text(encoding="utf-8")
    stages = tomllib.loads(text).get("stages", [])
    samples = {"sft": "sample-chat.jsonl", "dpo": "sample-prefs.jsonl"}
    written = []
    for stage in stages:
        data = (stage.get("data") or {}).get("path")
        sample = samples.get(stage.get("uses", ""))
        if isinstance(data, str) and sample and not (directory / data).exists():
            (directory / data).parent.mkdir(parents=True, exist_ok=True)
            (directory / data).write_text((templates / sample).read_text(encoding="utf-8"), encoding="utf-8")
            written.append(data)
    atomic_write_text(target, text)
    out = console()
    out.print(f"wrote {target}" + "".join(f" and {directory / w}" for w in written) + f" (recipe {name})", markup=False)
    models = sorted({s["model"] for s in stages if isinstance(s.get("model"), str) and not s["model"].startswith("@")})
    for model in models:
        if not (directory / model / "config.json").is_file():
            out.print(f"next: put the model in {directory / model} (its header says where to get it)", markup=False)
    where = "" if directory.resolve() == Path.cwd() else f" -c {target}"
    out.print(f"then: [bold]llmforge plan{where}[/], [bold]llmforge validate{where}[/], [bold]llmforge run{where}[/]")


def validate(
    path: Annotated[Path | None, typer.Argument(help="The forge.toml to check (same as -c).")] = None,
    config: ConfigOption = Path("forge.toml"),
    overrides: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check forge.toml: keys, types, ranges, stage kinds, references, files, preflight checks."""
    from llmforge.pipeline import load_pipeline

    config = path or config
    try:
        pipe = load_pipeline(config, overrides or [], registry=registry())
    except ConfigError as exc:
        if as_json:
            print_json(
                {
                    "valid": False,
                    "config": str(config.absolute()),
                    "problems": [{"where": p.where, "message": p.message} for p in exc.problems],
                }
            )
            raise typer.Exit(exc.exit_code) from None
        raise
    # The pipeline is a graph, not a chain: each stage is shown with the stages it takes inputs from.
    needs = {s.name: sorted(pipe.deps.get(s.name, ()), key=pipe.names.index) for s in pipe.stages}
    if as_json:
        print_json({"valid": True, "config": str(pipe.config.path), "stages": pipe.names, "needs": needs})
        return
    from rich.markup import escape

    out = console()
    out.print(
        f"[green]valid[/]: {escape(str(pipe.config.path))} ({len(pipe.stages)} "
        f"stage{'s' if len(pipe.stages) != 1 else ''}, in run order; `<-` names a stage's inputs)"
    )
    width = max((len(f"{s.name} ({s.uses})") for s in pipe.stages), default=0)
    for s in pipe.stages:
        head = f"{s.name} ({s.uses})".ljust(width)
        tail = f"  <- {', '.join(needs[s.name])}" if needs[s.name] else ""
        out.print(escape(f"  {head}{tail}".rstrip()))


def register(app: typer.Typer) -> None:
    app.command()(init)
    app.command()(validate)
