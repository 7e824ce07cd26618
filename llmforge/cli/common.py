"""Small helpers shared by the command modules."""

# No `from __future__ import annotations`: Typer reads these commands' Annotated parameters at every start,
# and string annotations would be compiled and evaluated there (twice per command, ~15 ms in all).

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from llmforge.formatting import STATUS_MARK, STATUS_STYLE, fmt_duration  # noqa: F401 - the CLI modules import them from here

if TYPE_CHECKING:
    from llmforge.plugins import Registry

# Options several commands share, as Annotated types; each command gives the default:
# `config: ConfigOption = Path("forge.toml")`.
ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="Path to forge.toml.")]
SetOption = Annotated[
    list[str] | None, typer.Option("--set", help="Override a value: stage.option=VALUE or section.key=VALUE.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
RunsDirOption = Annotated[
    Path | None, typer.Option("--runs-dir", help="Runs folder (default: from ./forge.toml, else ./runs).")
]


_REGISTRY: "Registry | None" = None


def registry() -> "Registry":
    """The plugin registry of this command-line process, built on first use (the CLI is an edge: the
    registry is built here and passed down to the core, which never looks it up by itself)."""
    global _REGISTRY
    if _REGISTRY is None:
        from llmforge.plugins import load_registry

        _REGISTRY = load_registry()
    return _REGISTRY


def sub_app(help: str) -> typer.Typer:
    """A command group with the root app's settings (plain help: see app.py)."""
    return typer.Typer(
        help=help,
        no_args_is_help=True,
        rich_markup_mode=None,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def console(stderr: bool = False):
    """A rich console. Into a pipe or a file it never wraps: `llmforge logs | grep` must see whole lines."""
    from rich.console import Console

    out = Console(stderr=stderr, highlight=False)
    if not out.is_terminal:
        out.soft_wrap = True
    return out


def print_table(
    columns: list[str], rows: list[list[Any]], title: str | None = None, styles: dict[int, Any] | None = None
) -> None:
    """A listing: a rich table on a terminal; elsewhere (a pipe, a file) plain text, one record per line.

    Cells are plain text, never markup (a stage name or a message with [brackets] stays as it is).
    `styles` maps a column index to a function value -> rich style, used on a terminal only.
    Piped output is what people copy and grep, so nothing is truncated or wrapped: a header line, then
    one line per row, columns aligned with two spaces; an empty cell is "-" so columns stay countable.
    `--json` remains the format for programs.
    """
    cells = [["-" if v is None or str(v) == "" else str(v) for v in row] for row in rows]
    out = console()
    if out.is_terminal:
        from rich.table import Table
        from rich.text import Text

        table = Table(title=title, title_justify="left")
        for i, col in enumerate(columns):
            if i == 0:  # the key users copy (a run id, a stage name): whole, on one line; the rest folds
                table.add_column(col, no_wrap=True, min_width=max([len(col)] + [len(r[0]) for r in cells]))
            else:
                table.add_column(col, overflow="fold")
        for row in cells:
            table.add_row(*(Text(v, style=(styles or {}).get(i, lambda _v: "")(v) or "") for i, v in enumerate(row)))
        out.print(table)
        return
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = [title] if title else []
    for row in [list(columns), *cells]:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row[:-1], widths)) + ("  " if len(row) > 1 else "") + row[-1])
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


def runs_dir(explicit: Path | None, config: Path | None = None) -> Path:
    """Where runs live: --runs-dir, else [project].runs_dir of forge.toml (or of ./forge.toml), else ./runs."""
    from llmforge.runs import resolve_runs_dir

    return resolve_runs_dir(explicit, Path(config or "forge.toml"))


def styled(status: str) -> str:
    return f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]"


def status_style(status: str) -> str:
    return STATUS_STYLE.get(status, "white")


#: the mark before a finished stage: a stop asked for by the user is not a failure
def status_mark(status: str) -> str:
    """The mark of an ended stage's line (formatting.STATUS_MARK); an end this version does not know is a failure."""
    return STATUS_MARK.get(status, "✗")
