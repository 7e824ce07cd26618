"""Small helpers shared by the command modules."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from llmforge.formatting import fmt_duration  # noqa: F401 - the CLI modules import it from here

CONFIG_OPTION = typer.Option("forge.toml", "--config", "-c", help="Path to forge.toml.")
SET_OPTION = typer.Option(None, "--set", help="Override a value: stage.option=VALUE or section.key=VALUE.")
JSON_OPTION = typer.Option(False, "--json", help="Print machine-readable JSON.")
RUNS_DIR_OPTION = typer.Option(None, "--runs-dir", help="Runs folder (default: from ./forge.toml, else ./runs).")


def sub_app(help: str) -> typer.Typer:
    """A command group with the root app's settings (plain help: see app.py)."""
    return typer.Typer(help=help, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
                       context_settings={"help_option_names": ["-h", "--help"]})


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def runs_dir(explicit: Path | None, config: Path | None = None) -> Path:
    """Where runs live: --runs-dir, else [project].runs_dir of forge.toml (read, not validated), else ./runs."""
    if explicit is not None:
        return explicit
    cfg = Path(config or "forge.toml")
    if cfg.is_file():
        from llmforge.config import read_toml

        try:
            raw = read_toml(cfg)
            sub = raw.get("project", {}).get("runs_dir", "runs")
            return (cfg.parent / str(sub)).resolve()
        except Exception:  # noqa: BLE001 - a broken forge.toml still lets you look at runs
            pass
    return Path("runs").resolve()


STATUS_STYLE = {
    "done": "green", "cached": "cyan", "running": "yellow", "failed": "red", "stopped": "magenta",
    "killed": "red", "blocked": "dim", "skipped": "dim", "pending": "dim",
}


def styled(status: str) -> str:
    return f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]"
