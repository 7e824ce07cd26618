"""The example third-party plugin (examples/llmforge-hello), installed for real with pip.

docs/plugins.md walks through this package, so it must keep working: it is pip-installed into a
folder of its own, found through its `llmforge` entry point, and used through the real CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import EXAMPLE_PLUGIN, _env, run_cli

PIPELINE = """
[project]
name = "greetings"

[[stages]]
name = "people"
uses = "shell"
command = '''printf 'Ada\\nGrace\\n' > "$LLMFORGE_OUT/names.txt"'''

[[stages]]
name = "greet"
uses = "hello"
greeting = "Hi"
names = "@people"
times = {times}
"""


@pytest.fixture(scope="module")
def hello(plugin_site):
    return plugin_site(EXAMPLE_PLUGIN)


def _parallel(*calls):
    with ThreadPoolExecutor(2) as ex:
        return list(ex.map(lambda c: c(), calls))


def test_listed_as_a_third_party_plugin(hello):
    listing, stages, table = _parallel(
        lambda: run_cli("plugins", "list", "--json", plugins=[hello]),
        lambda: run_cli("stages", "list", "--json", plugins=[hello]),
        lambda: run_cli("plugins", "list", plugins=[hello]),
    )
    for r in (listing, stages, table):
        assert r.returncode == 0, r.stderr
    data = json.loads(listing.stdout)
    assert data["errors"] == [] and data["conflicts"] == []
    (plugin,) = [p for p in data["plugins"] if p["dist"] == "llmforge-hello"]
    assert plugin["name"] == "hello" and plugin["module"] == "llmforge_hello"
    assert plugin["builtin"] is False and plugin["version"] == "0.1.0"
    assert plugin["stages"] == ["hello"]
    assert plugin["hooks"] == ["register_commands", "register_stages"]
    # the built-ins are still there, and load first
    builtin = [p["builtin"] for p in data["plugins"]]
    assert {"copy", "shell"} <= {p["name"] for p in data["plugins"] if p["builtin"]}
    assert builtin == sorted(builtin, reverse=True), "a third-party plugin loaded before a built-in"
    row = next(r for r in json.loads(stages.stdout) if r["kind"] == "hello")
    assert row == {**row, "plugin": "hello", "produces": ["files"]}
    assert "llmforge-hello" in table.stdout and "(built-in)" not in table.stdout.split("llmforge-hello")[1][:20]


def test_stages_show_describes_its_options(hello):
    human, as_json = _parallel(
        lambda: run_cli("stages", "show", "hello", plugins=[hello]),
        lambda: run_cli("stages", "show", "hello", "--json", plugins=[hello]),
    )
    assert human.returncode == 0 and as_json.returncode == 0, human.stderr + as_json.stderr
    for text in (
        "hello: Write greetings",
        "produces: files",
        "plugin: hello",
        "greeting",
        "names",
        "times",
        "delay",
        ">= 1, <= 1000",
        "[input: path or @stage (files)]",
    ):
        assert text in human.stdout, f"{text!r} not in:\n{human.stdout}"
    options = {o["name"]: o for o in json.loads(as_json.stdout)["options"]}
    assert list(options) == ["greeting", "name", "names", "times", "delay"]
    assert options["greeting"]["default"] == "Hello" and options["times"]["default"] == 1
    assert options["names"]["input"] is True and options["names"]["input_kinds"] == ["files"]
    assert options["times"]["constraints"] == ">= 1, <= 1000"
    assert not any(o["required"] for o in options.values())


def test_pipeline_greets_the_names_a_shell_stage_wrote(hello, project):
    project.write(PIPELINE.format(times=2))
    valid = project.run("validate", plugins=[hello])
    assert valid.returncode == 0, valid.stderr
    assert "  greet (hello)   <- people" in valid.stdout  # validate shows each stage with its inputs
    # `llmforge plan` shows a third-party stage's own estimate next to the built-ins ("no estimate" for shell)
    plan = project.run("plan", plugins=[hello])
    assert plan.returncode == 0, plan.stderr
    assert "greet (hello)" in plan.stdout and "disk: greetings.txt" in plan.stdout
    assert "names read at run time: counted as 1,000" in plan.stdout
    assert "people (shell): no estimate" in plan.stdout

    first = project.run("run", plugins=[hello])
    assert first.returncode == 0, first.stdout + first.stderr
    assert "greet | wrote 4 greetings for 2 names" in first.stdout
    (run_dir,) = project.runs.iterdir()
    out = run_dir / "stages" / "greet" / "artifacts" / "files"
    assert sorted(p.name for p in out.iterdir()) == ["greetings.txt"]
    assert (out / "greetings.txt").read_text() == "Hi, Ada!\nHi, Ada!\nHi, Grace!\nHi, Grace!\n"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["greet"]["uses"] == "hello" and manifest["stages"]["greet"]["status"] == "done"
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    progress = [e for e in events if e["type"] == "progress" and e["stage"] == "greet"]
    assert [(e["done"], e["total"]) for e in progress] == [(1, 4), (2, 4), (3, 4), (4, 4)]

    # unchanged: both stages come from the cache; a changed option re-runs only the hello stage
    again = project.run("run", plugins=[hello])
    assert again.returncode == 0, again.stderr
    assert "↺ people cached" in again.stdout and "↺ greet cached" in again.stdout
    changed = project.run("run", "--set", "greet.times=1", plugins=[hello])
    assert changed.returncode == 0, changed.stderr
    assert "↺ people cached" in changed.stdout and "✓ greet done" in changed.stdout
    latest = json.loads(project.run("status", "--json").stdout)
    greeted = latest["stages"]["greet"]["artifacts"]["files"]["path"]
    assert (run_dir.parent / latest["id"]).is_dir()
    assert Path(greeted, "greetings.txt").read_text() == "Hi, Ada!\nHi, Grace!\n"


def test_help_with_it_installed_stays_light(hello):
    """The import-time rule of docs/plugins.md, as the built-ins keep it: an entry-point module imports only
    llmforge's hook marker, so `llmforge --help` loads neither pydantic nor anything heavy with it installed."""
    res = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "llmforge", "--help"],
        env=_env([hello]),
        capture_output=True,
        text=True,
        timeout=60,
    )
    # the plugin was loaded: its command is listed (entry points are imported through importlib, which
    # -X importtime does not time; the import statements inside them it does)
    assert res.returncode == 0 and "Print greetings" in res.stdout, res.stderr[-2000:]
    imported = {
        line.split("|")[-1].strip().split(".")[0] for line in res.stderr.splitlines() if line.startswith("import time:")
    }
    assert "typer" in imported  # the measurement works
    assert not imported & {
        "pydantic",
        "torch",
        "transformers",
        "llama_cpp",
        "peft",
        "trl",
        "accelerate",
        "deepspeed",
    }, imported


def test_hello_command(hello):
    cmd, bad, help_ = _parallel(
        lambda: run_cli("hello", "forge", "-g", "Hi", "--times", "2", plugins=[hello]),
        lambda: run_cli("hello", "--times", "0", plugins=[hello]),
        lambda: run_cli("--help", plugins=[hello]),
    )
    assert cmd.returncode == 0, cmd.stderr
    assert cmd.stdout == "Hi, forge!\nHi, forge!\n"
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--times" in bad.stderr
    assert help_.returncode == 0 and "hello" in help_.stdout
    assert run_cli("hello", plugins=[hello]).stdout == "Hello, world!\n"


@pytest.mark.parametrize("command", ["validate", "run"])
def test_bad_option_value_names_the_key(hello, project, command):
    project.write(PIPELINE.format(times=0))
    res = project.run(command, plugins=[hello])
    assert res.returncode == 2, res.stdout + res.stderr
    assert "stages[1].times: must be >= 1 (got 0)" in res.stderr
    assert "1 problem found" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert not project.runs.exists()


def test_load_plugins_env_var_can_leave_it_out(hello, project):
    project.write(PIPELINE.format(times=1))
    only_builtins, named = _parallel(
        lambda: project.run("validate", plugins=[hello], env={"LLMFORGE_LOAD_PLUGINS": ""}),
        lambda: project.run("validate", plugins=[hello], env={"LLMFORGE_LOAD_PLUGINS": "llmforge-hello"}),
    )
    assert only_builtins.returncode == 2
    assert "stages[1].uses: unknown stage kind 'hello'" in only_builtins.stderr
    assert named.returncode == 0, named.stderr


def _fixture_plugin_args() -> list[str]:
    """The example's tests use llmforge's fixtures, which llmforge's `pytest11` entry point brings. An
    editable install made before that entry point existed lacks it in its metadata: name the plugin then
    (harmless where the entry point is there, as it carries the module's name)."""
    from importlib import metadata

    if any(ep.name == "llmforge.testing" for ep in metadata.entry_points(group="pytest11")):
        return []
    return ["-p", "llmforge.testing"]


def test_the_example_plugins_own_tests_pass_against_the_installed_copy(hello, tmp_path):
    # Run from an empty folder so that `import llmforge_hello` finds the pip-installed copy, not the source.
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *_fixture_plugin_args(),
            str(EXAMPLE_PLUGIN / "tests"),
        ],
        cwd=tmp_path,
        env=_env([hello]),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "6 passed" in res.stdout
