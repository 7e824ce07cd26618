"""Assembles the Typer application: the built-in command groups, then commands added by plugins."""

# No `from __future__ import annotations`: Typer reads these commands' Annotated parameters at every start,
# and string annotations would be compiled and evaluated there (twice per command, ~15 ms in all).

import sys
from typing import Annotated

import typer

from llmforge import __version__


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmforge {__version__}")
        raise typer.Exit()


def _interactive() -> bool:
    try:
        return sys.stdin.isatty() and sys.stdout.isatty()
    except (AttributeError, ValueError):  # no stdin (pythonw), or a closed one
        return False


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="llmforge",
        help="Train language models on your own hardware: one forge.toml from pretraining to GGUF.",
        # `llmforge` alone opens the TUI in a terminal (see root() below), and prints help anywhere else.
        no_args_is_help=not _interactive(),
        pretty_exceptions_enable=False,
        # Plain help: rendering it through rich costs ~80 ms of imports at every `--help`.
        rich_markup_mode=None,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback(invoke_without_command=True)
    def root(
        ctx: typer.Context,
        version: Annotated[
            bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
        ] = False,
        debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
    ) -> None:
        """llmforge: a local-first workbench for training language models."""
        if ctx.invoked_subcommand is None:  # no arguments, in a terminal
            from llmforge.cli.tui_cmd import open_tui

            open_tui()

    from llmforge.cli import data_cmd, plugins_cmd, project_cmd, run_cmd, runs_cmd, scale_cmd, tui_cmd

    project_cmd.register(app)
    run_cmd.register(app)
    runs_cmd.register(app)
    plugins_cmd.register(app)
    data_cmd.register(app)
    scale_cmd.register(app)
    tui_cmd.register(app)

    from llmforge.cli.common import registry

    # Only the commands: the raw manager, so that the extension points (pydantic models) are not
    # declared for the help screen. A plugin refused later for an unknown hook may have added a command.
    reg = registry()
    for impl in reg.pm.hook.register_commands.get_hookimpls():
        try:
            impl.function(cli=app) if "cli" in impl.argnames else impl.function()
        except Exception as exc:  # noqa: BLE001 - a bad plugin must not brick the CLI
            from llmforge.plugins import LoadError

            dist = next((p.dist for p in reg.plugins if p.name == impl.plugin_name), impl.plugin_name)
            reg.errors.append(
                LoadError(impl.plugin_name, dist, f"register_commands failed: {type(exc).__name__}: {exc}", "")
            )
    return app
