"""`llmforge tui`: the terminal UI over the same core (and `llmforge` alone, in a terminal)."""

# No `from __future__ import annotations`: Typer reads these commands' Annotated parameters at every start,
# and string annotations would be compiled and evaluated there (twice per command, ~15 ms in all).

from pathlib import Path
from typing import Annotated

import typer

from llmforge.cli.common import RunsDirOption, runs_dir

AREAS = ("project", "monitor", "runs", "data", "models", "plugins", "config")


def tui(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Path to forge.toml (default: ./forge.toml when there is one)."),
    ] = None,
    dir_: RunsDirOption = None,
    screen: Annotated[str, typer.Option("--screen", help=f"Area to open first: {', '.join(AREAS)}.")] = "project",
) -> None:
    """Open the terminal UI: pipeline and hardware, live run monitor, runs, data, models, plugins, config.

    Runs started from it are detached: quitting the UI leaves them running, and reopening it reattaches."""
    from llmforge.errors import UsageError

    if config is not None and not config.is_file():
        raise UsageError(f"no such file: {config}", hint="create one with `llmforge init`")
    if screen not in AREAS:
        raise UsageError(f"no screen '{screen}'", hint=f"screens: {', '.join(AREAS)}")
    open_tui(config, dir_, screen)


def open_tui(config: Path | None = None, dir_: Path | None = None, screen: str = "project") -> None:
    # textual is imported only here: `llmforge --help` and every other command never pay for it.
    from llmforge.tui.app import run_app
    from llmforge.tui.state import AppState

    default = Path("forge.toml")
    cfg = config if config is not None else (default if default.is_file() else None)
    run_app(AppState.discover(cfg, runs_dir(dir_, cfg)), screen)


def register(app: typer.Typer) -> None:
    app.command()(tui)
