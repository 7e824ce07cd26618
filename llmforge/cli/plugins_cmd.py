"""`plugins list`, `stages list`, `stages show`: what is installed."""

from __future__ import annotations

import typer

from llmforge.cli.common import JSON_OPTION, sub_app, console, print_json
from llmforge.errors import UsageError


def _registry():
    from llmforge.plugins import get_registry

    return get_registry()


def plugins_list(
    as_json: bool = JSON_OPTION,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show load errors' tracebacks."),
) -> None:
    """Installed plugins with their hooks and stages, load errors and name clashes."""
    reg = _registry()
    if as_json:
        print_json({"plugins": [p.to_json() for p in reg.plugins], "errors": [e.to_json() for e in reg.errors],
                    "conflicts": [c.to_json() for c in reg.conflicts]})
        return
    from rich.table import Table

    out = console()
    table = Table(title="plugins", title_justify="left")
    for col in ("name", "distribution", "version", "stages", "hooks"):
        table.add_column(col)
    for p in reg.plugins:
        dist = f"{p.dist} [dim](built-in)[/]" if p.builtin else p.dist
        table.add_row(p.name, dist, p.version, ", ".join(p.stages), ", ".join(p.hooks))
    out.print(table)
    loaded = {p.name for p in reg.plugins}
    for e in reg.errors:
        if e.plugin in loaded:  # it imported, but one of its hooks failed: say what is missing
            out.print(f"[red]plugin error[/] {e.plugin} ({e.dist}): {e.error}; what that hook adds is unavailable",
                      highlight=False)
        else:
            out.print(f"[red]failed to load[/] {e.plugin} ({e.dist}): {e.error}", highlight=False)
        if verbose and e.details:
            out.print(e.details, markup=False, highlight=False)
    for c in reg.conflicts:
        out.print(f"[yellow]conflict[/]: {c}", highlight=False)


def _complete_kind(incomplete: str) -> list[str]:
    return [k for k in sorted(_registry().stages) if k.startswith(incomplete)]


def stages_list(as_json: bool = JSON_OPTION) -> None:
    """Stage kinds you can `uses =` in forge.toml."""
    reg = _registry()
    rows = [{"kind": name, "summary": e.cls.summary, "plugin": e.plugin, "produces": list(e.cls.produces)}
            for name, e in sorted(reg.stages.items())]
    if as_json:
        print_json(rows)
        return
    from rich.table import Table

    table = Table()
    for col in ("kind", "produces", "plugin", "summary"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["kind"], ", ".join(r["produces"]), r["plugin"], r["summary"])
    console().print(table)


def stages_show(
    kind: str = typer.Argument(..., help="A stage kind.", autocompletion=_complete_kind),
    as_json: bool = JSON_OPTION,
) -> None:
    """A stage kind's options: types, defaults, constraints and which are inputs."""
    from llmforge.schema import describe_options, did_you_mean

    reg = _registry()
    entry = reg.stages.get(kind)
    if entry is None:
        raise UsageError(f"unknown stage kind '{kind}'{did_you_mean(kind, reg.stages)}",
                         hint=f"installed: {', '.join(sorted(reg.stages)) or 'none'}")
    cls = entry.cls
    rows = describe_options(cls.Options)
    if as_json:
        print_json({"kind": kind, "summary": cls.summary, "plugin": entry.plugin, "produces": list(cls.produces),
                    "doc": _doc(cls), "options": [r.to_json() for r in rows]})
        return
    from rich.markup import escape
    from rich.table import Table

    out = console()
    out.print(f"[bold]{kind}[/]: {escape(cls.summary)}")
    out.print(f"produces: {', '.join(cls.produces) or 'nothing'}   plugin: {entry.plugin}")
    table = Table()
    for col in ("option", "type", "default", "description"):
        table.add_column(col)
    for r in rows:
        desc = escape(r.description)
        if r.constraints:
            desc += f" [dim]({escape(r.constraints)})[/]"
        if r.is_input:
            kinds = f" ({'/'.join(r.input_kinds)})" if r.input_kinds else ""
            desc += f" [cyan]{escape(f'[input: path or @stage{kinds}]')}[/]"
        default = "[red]required[/]" if r.required else escape(repr(r.default))
        table.add_row(escape(r.name), escape(r.type), default, desc)
    out.print(table)


def _doc(cls) -> str:
    """A stage's own docstring, else its module's (first-party stages document themselves there)."""
    import sys

    own = cls.__dict__.get("__doc__")
    return (own or getattr(sys.modules.get(cls.__module__), "__doc__", None) or "").strip()


def register(app: typer.Typer) -> None:
    plugins_app = sub_app("Installed plugins.")
    plugins_app.command("list")(plugins_list)
    app.add_typer(plugins_app, name="plugins")
    stages_app = sub_app("Stage kinds and their options.")
    stages_app.command("list")(stages_list)
    stages_app.command("show")(stages_show)
    app.add_typer(stages_app, name="stages")
