"""`plugins list`, `stages list`, `stages show`: what is installed."""

# No `from __future__ import annotations`: Typer reads these commands' Annotated parameters at every start,
# and string annotations would be compiled and evaluated there (twice per command, ~15 ms in all).

from typing import Annotated

import typer

from llmforge.cli.common import JsonOption, console, print_json, print_table, sub_app
from llmforge.errors import UsageError


def _registry():
    from llmforge.cli.common import registry

    return registry()


def plugins_list(
    as_json: JsonOption = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show load errors' tracebacks.")] = False,
) -> None:
    """Installed plugins with their hooks and stages, load errors and name clashes."""
    reg = _registry().collect()  # every table: what each plugin provides, and every clash
    if as_json:
        print_json(
            {
                "plugins": [p.to_json() for p in reg.plugins],
                "errors": [e.to_json() for e in reg.errors],
                "conflicts": [c.to_json() for c in reg.conflicts],
            }
        )
        return
    from rich.markup import escape

    rows = [
        [p.name, f"{p.dist} (built-in)" if p.builtin else p.dist, p.version, ", ".join(p.stages), ", ".join(p.hooks)]
        for p in reg.plugins
    ]
    print_table(["name", "distribution", "version", "stages", "hooks"], rows, title="plugins")
    out = console()
    loaded = {p.name for p in reg.plugins}
    for e in reg.errors:
        what = f"{escape(str(e.plugin))} ({escape(str(e.dist))}): {escape(str(e.error))}"
        if e.plugin in loaded:  # it imported, but one of its hooks failed: say what is missing
            out.print(f"[red]plugin error[/] {what}; what that hook adds is unavailable")
        else:
            out.print(f"[red]failed to load[/] {what}")
        if verbose and e.details:
            out.print(e.details, markup=False, highlight=False)
    for c in reg.conflicts:
        out.print(f"[yellow]conflict[/]: {escape(str(c))}")


def _complete_kind(incomplete: str) -> list[str]:
    return [k for k in sorted(_registry().stages) if k.startswith(incomplete)]


def stages_list(as_json: JsonOption = False) -> None:
    """Stage kinds you can `uses =` in forge.toml."""
    reg = _registry()
    rows = [
        {"kind": name, "summary": cls.summary, "plugin": reg.owner("stages", name), "produces": list(cls.produces)}
        for name, cls in sorted(reg.stages.items())
    ]
    if as_json:
        print_json(rows)
        return
    print_table(
        ["kind", "produces", "plugin", "summary"],
        [[r["kind"], ", ".join(r["produces"]), r["plugin"], r["summary"]] for r in rows],
    )


def stages_show(
    kind: Annotated[str, typer.Argument(help="A stage kind.", autocompletion=_complete_kind)],
    as_json: JsonOption = False,
) -> None:
    """A stage kind's options: types, defaults, constraints and which are inputs."""
    from llmforge.schema import describe_options, did_you_mean

    reg = _registry()
    cls = reg.stages.get(kind)
    if cls is None:
        raise UsageError(
            f"unknown stage kind '{kind}'{did_you_mean(kind, reg.stages)}",
            hint=f"installed: {', '.join(sorted(reg.stages)) or 'none'}",
        )
    plugin = reg.owner("stages", kind) or "?"
    rows = describe_options(cls.Options)
    if as_json:
        print_json(
            {
                "kind": kind,
                "summary": cls.summary,
                "plugin": plugin,
                "produces": list(cls.produces),
                "doc": _doc(cls),
                "options": [r.to_json() for r in rows],
            }
        )
        return
    from rich.markup import escape

    out = console()
    out.print(f"[bold]{escape(kind)}[/]: {escape(cls.summary)}")
    out.print(f"produces: {escape(', '.join(cls.produces) or 'nothing')}   plugin: {escape(plugin)}")
    table = []
    for r in rows:
        desc = r.description
        if r.constraints:
            desc += f" ({r.constraints})"
        if r.is_input:
            kinds = f" ({'/'.join(r.input_kinds)})" if r.input_kinds else ""
            desc += f" [input: path or @stage{kinds}]"
        table.append([r.name, r.type, "required" if r.required else repr(r.default), desc])
    print_table(
        ["option", "type", "default", "description"], table, styles={2: lambda v: "red" if v == "required" else ""}
    )


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
