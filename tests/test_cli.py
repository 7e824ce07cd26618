"""The command line as a user meets it: init, help, version, completion, run listings, errors."""

from __future__ import annotations

import json

from llmforge import __version__


def test_version_and_help(cli):
    res = cli("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"llmforge {__version__}"
    res = cli("--help")
    assert res.returncode == 0
    for command in ("init", "validate", "run", "status", "logs", "stop", "checkpoint", "runs", "plugins", "stages"):
        assert f"  {command}" in res.stdout


def test_init_writes_a_project_that_validates_and_runs(project):
    res = project.run("init", "demo")
    assert res.returncode == 0, res.stderr
    demo = project.root / "demo"
    assert (demo / "forge.toml").is_file() and (demo / "data" / "notes.txt").is_file()
    assert project.run("validate", "-c", "demo/forge.toml").returncode == 0
    run = project.run("run", "-c", "demo/forge.toml")
    assert run.returncode == 0, run.stdout + run.stderr
    status = json.loads(project.run("status", "--json", "--runs-dir", "demo/runs").stdout)
    assert status["status"] == "done"
    bundle = status["stages"]["bundle"]["artifacts"]["files"]["path"]
    words = demo / "runs" / status["id"] / "stages" / "prepare" / "artifacts" / "files" / "word-count.txt"
    assert int(words.read_text()) == len((demo / "data" / "notes.txt").read_text().split())
    assert bundle.endswith("stages/bundle/artifacts/files")

    again = project.run("init", "demo")
    assert again.returncode == 2
    assert "already exists" in again.stderr and "--force" in again.stderr


def test_shell_completion_of_commands_and_stage_kinds(cli):
    env = {"_LLMFORGE_COMPLETE": "complete_bash", "COMP_WORDS": "llmforge sta", "COMP_CWORD": "1"}
    res = cli(env=env)
    assert set(res.stdout.split()) == {"status", "stages"}
    env = {"_LLMFORGE_COMPLETE": "complete_bash", "COMP_WORDS": "llmforge stages show sh", "COMP_CWORD": "3"}
    assert cli(env=env).stdout.split() == ["shell"]


def test_listing_commands_with_no_runs(project):
    res = project.run("runs", "list", "--json")
    assert res.returncode == 0 and json.loads(res.stdout) == []
    res = project.run("status")
    assert res.returncode == 2
    assert "no runs in" in res.stderr and "Traceback" not in res.stderr
    res = project.run("stop", "nope")
    assert res.returncode == 2


def test_stages_show_json_describes_options(cli):
    res = cli("stages", "show", "shell", "--json")
    data = json.loads(res.stdout)
    opts = {o["name"]: o for o in data["options"]}
    assert data["produces"] == ["files"]
    assert opts["command"]["required"] is True
    assert opts["inputs"]["input"] is True
    assert opts["timeout"]["constraints"] == "> 0"
    res = cli("stages", "show", "shel")
    assert res.returncode == 2 and "did you mean 'shell'" in res.stderr


def test_status_of_a_run_and_checkpoint_request_needs_a_live_run(project):
    project.write("""
        [[stages]]
        name = "hello"
        uses = "shell"
        command = "echo hi"
    """)
    assert project.run("run").returncode == 0
    runs = json.loads(project.run("runs", "list", "--json").stdout)
    assert len(runs) == 1 and runs[0]["status"] == "done"
    text = project.run("status", runs[0]["id"][:12]).stdout  # a unique prefix is enough
    assert "hello" in text and "done" in text
    res = project.run("checkpoint")
    assert res.returncode == 2 and "is not running" in res.stderr
