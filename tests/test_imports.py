"""Start-up stays light and the core stays UI-free (design principles 1 and 6)."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import llmforge

HEAVY = ("torch", "transformers", "llama_cpp", "peft", "trl", "accelerate", "deepspeed")
UI = ("typer", "textual", "rich", "click")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return {m.split(".")[0] for m in json.loads(out.stdout.strip().splitlines()[-1])}


def core_modules() -> list[str]:
    """Every module of the core: the llmforge package minus its front ends (cli, tui)."""
    names = []
    for info in pkgutil.walk_packages(llmforge.__path__, "llmforge."):
        if info.name.split(".")[1] in ("cli", "tui") or info.name == "llmforge.__main__":
            continue
        names.append(info.name)
    return names


def test_core_imports_no_ui_library():
    mods = core_modules()
    assert "llmforge.runner" in mods and "llmforge.pipeline" in mods
    loaded = _modules_after("\n".join(f"import {m}" for m in mods))
    assert not loaded & set(UI), f"the core imported UI modules: {loaded & set(UI)}"


def test_core_and_cli_import_no_torch():
    loaded = _modules_after(
        "import llmforge.cli, llmforge.cli.app\n" + "\n".join(f"import {m}" for m in core_modules())
    )
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_help_with_all_plugins_loaded_imports_no_torch():
    # -X importtime lists every module the real `llmforge --help` imports, plugins included.
    res = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "llmforge", "--help"], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-2000:]
    imported = {
        line.split("|")[-1].strip().split(".")[0] for line in res.stderr.splitlines() if line.startswith("import time:")
    }
    assert "typer" in imported  # the measurement works
    assert not imported & set(HEAVY), imported & set(HEAVY)
    # pydantic alone costs ~0.1 s: the built-in entry modules (plugins/hooks/) leave it to the first
    # use of a registry table, which --help never makes
    assert "pydantic" not in imported


def test_plugins_list_imports_no_torch():
    loaded = _modules_after("from llmforge.plugins import load_registry\nload_registry().collect()")
    assert "pluggy" in loaded
    assert not loaded & set(HEAVY)
