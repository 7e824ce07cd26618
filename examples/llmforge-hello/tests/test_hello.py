"""Tests of the hello plugin, run in-process against llmforge's real pipeline and runner.

The plugin module is handed to llmforge directly (``load_registry(extra=...)``), so these tests
work from a source checkout whether or not the package is installed. ``env=""`` keeps other
installed third-party plugins out of the way. Whether the entry point itself works is a question for
an installed copy: ``llmforge plugins list`` shows it.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import llmforge_hello
from llmforge.errors import ConfigError
from llmforge.pipeline import load_pipeline
from llmforge.plugins import load_registry
from llmforge.runner import RunRequest, run_pipeline
from llmforge.runs import STOP_REQUEST, request


@pytest.fixture
def registry():
    reg = load_registry(env="", extra=[("hello", llmforge_hello)])
    assert not reg.errors, reg.errors
    return reg


def write_project(root: Path, text: str) -> Path:
    path = root / "forge.toml"
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def output_of(result, stage: str) -> str:
    art = Path(result.stages[stage]["artifacts"]["files"]["path"])
    return (art / "greetings.txt").read_text(encoding="utf-8")


def test_greetings_repeat_each_name():
    assert llmforge_hello.greetings("Hi", ["Ada", "Grace"], 2) == ["Hi, Ada!", "Hi, Ada!", "Hi, Grace!", "Hi, Grace!"]


def test_stage_reads_names_from_another_stage(tmp_path, registry):
    config = write_project(tmp_path, """
        [[stages]]
        name = "people"
        uses = "shell"
        command = '''printf 'Ada\\n# not a name\\n\\nGrace\\n' > "$LLMFORGE_OUT/names.txt"'''

        [[stages]]
        name = "greet"
        uses = "hello"
        greeting = "Hi"
        names = "@people"
    """)
    result = run_pipeline(load_pipeline(config, registry=registry), RunRequest(), registry=registry)
    assert result.exit_code == 0, result.stages
    assert output_of(result, "greet") == "Hi, Ada!\nHi, Grace!\n"


def test_bad_option_names_its_key(tmp_path, registry):
    config = write_project(tmp_path, """
        [[stages]]
        name = "greet"
        uses = "hello"
        times = 0
        greting = "Hi"
    """)
    with pytest.raises(ConfigError) as info:
        load_pipeline(config, registry=registry)
    problems = {p.where: p.message for p in info.value.problems}
    assert problems["stages[0].times"] == "must be >= 1 (got 0)"
    assert "did you mean 'greeting'" in problems["stages[0].greting"]


def test_empty_names_file_fails_validation(tmp_path, registry):
    (tmp_path / "names.txt").write_text("# nobody yet\n", encoding="utf-8")
    config = write_project(tmp_path, """
        [[stages]]
        name = "greet"
        uses = "hello"
        names = "names.txt"
    """)
    with pytest.raises(ConfigError) as info:
        load_pipeline(config, registry=registry)
    (problem,) = info.value.problems
    assert problem.where == "stages[0].names" and "no names found" in problem.message


def test_stop_then_resume_continues_from_the_checkpoint(tmp_path, registry):
    config = write_project(tmp_path, """
        [[stages]]
        name = "greet"
        uses = "hello"
        times = 100
        delay = 0.01
    """)
    pipe = load_pipeline(config, registry=registry)

    def stop_early(event):
        # Ask for a stop the way `llmforge stop` does, a few greetings in.
        if event["type"] == "progress" and event["done"] == 5:
            request(pipe.config.runs_dir / event["run"], STOP_REQUEST)

    stopped = run_pipeline(pipe, RunRequest(listeners=[stop_early]), registry=registry)
    assert stopped.exit_code == 130 and stopped.stages["greet"]["status"] == "stopped"
    assert not (stopped.run_dir / "stages" / "greet" / "artifacts" / "files").exists()
    saved = (stopped.run_dir / "stages" / "greet" / "work" / "greetings.partial").read_text().splitlines()
    assert 5 <= len(saved) < 100

    messages = []
    resumed = run_pipeline(pipe, RunRequest(resume=True, listeners=[lambda e: messages.append(e.get("message"))]),
                           registry=registry)
    assert resumed.run_id == stopped.run_id and resumed.exit_code == 0
    assert f"resuming after {len(saved)} of 100 greetings" in messages
    assert output_of(resumed, "greet") == "Hello, world!\n" * 100
