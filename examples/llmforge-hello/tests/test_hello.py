"""Tests of the hello plugin, run in-process against llmforge's real pipeline and runner.

They use the fixtures llmforge ships for plugin authors (llmforge/testing.py, a pytest plugin that
installing llmforge makes available; no conftest.py needed):

* ``llmforge_registry(plugin, ...)``: the built-in plugins plus this one, registered from the module
  itself, so the tests work from a source checkout whether or not the package is installed. Other
  installed third-party plugins stay out, and a load error (a misspelt hook, say) fails the test.
* ``llmforge_project``: a temporary project; ``write()`` a forge.toml, ``problems()`` validates it,
  ``run()`` runs it with the real runner and returns the run folder, the manifest and the events.

Whether the entry point itself works is a question for an installed copy: ``llmforge plugins list``
shows it.
"""

from __future__ import annotations

import pytest

import llmforge_hello
from llmforge_hello.stage import greetings


@pytest.fixture
def registry(llmforge_registry):
    return llmforge_registry(llmforge_hello)


def greetings_of(run, stage: str) -> str:
    return (run.artifact(stage, "files") / "greetings.txt").read_text(encoding="utf-8")


def test_greetings_repeat_each_name():
    assert greetings("Hi", ["Ada", "Grace"], 2) == ["Hi, Ada!", "Hi, Ada!", "Hi, Grace!", "Hi, Grace!"]


def test_stage_reads_names_from_another_stage(llmforge_project, registry):
    llmforge_project.write("""
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
    run = llmforge_project.run(registry)
    assert run.exit_code == 0, run.failure()
    assert greetings_of(run, "greet") == "Hi, Ada!\nHi, Grace!\n"
    assert "wrote 2 greetings for 2 names" in run.messages("greet")
    assert run.metrics("greet") == [{"step": 2, "greetings": 2.0, "names": 2.0}]


def test_bad_option_names_its_key(llmforge_project, registry):
    llmforge_project.write("""
        [[stages]]
        name = "greet"
        uses = "hello"
        times = 0
        greting = "Hi"
    """)
    problems = llmforge_project.problems(registry)
    assert problems["stages[0].times"] == "must be >= 1 (got 0)"
    assert "did you mean 'greeting'" in problems["stages[0].greting"]


def test_plan_shows_what_the_stage_needs(llmforge_project, registry):
    # `llmforge plan` asks each stage for its estimate; llmforge.planning.plan is what it calls.
    from llmforge.planning import plan

    llmforge_project.write("""
        [[stages]]
        name = "greet"
        uses = "hello"
        greeting = "Hi"
        times = 3
    """)
    (stage,) = plan(llmforge_project.pipeline(registry)).stages
    assert stage.verdict == "fits" and stage.estimate.device == "cpu"
    assert stage.estimate.disk_parts == {"greetings.txt": 3 * (len("Hi") + 32 + 4)}  # one name, 3 lines
    assert 0 < stage.estimate.peak < 2**20


def test_empty_names_file_fails_validation(llmforge_project, registry):
    llmforge_project.write("# nobody yet\n", name="names.txt")
    llmforge_project.write("""
        [[stages]]
        name = "greet"
        uses = "hello"
        names = "names.txt"
    """)
    problems = llmforge_project.problems(registry)
    assert list(problems) == ["stages[0].names"] and "no names found" in problems["stages[0].names"]


def test_stop_then_resume_continues_from_the_checkpoint(llmforge_project, registry):
    llmforge_project.write("""
        [[stages]]
        name = "greet"
        uses = "hello"
        times = 100
        delay = 0.01
    """)
    # Ask for a stop the way `llmforge stop` does, five greetings in.
    stopped = llmforge_project.run(registry, stop_when=lambda e: e["type"] == "progress" and e["done"] == 5)
    assert stopped.exit_code == 130 and stopped.stages["greet"]["status"] == "stopped"
    assert not (stopped.run_dir / "stages" / "greet" / "artifacts" / "files").exists()
    saved = (stopped.run_dir / "stages" / "greet" / "work" / "greetings.partial").read_text().splitlines()
    assert 5 <= len(saved) < 100

    resumed = llmforge_project.run(registry, resume=True)
    assert resumed.run_id == stopped.run_id and resumed.exit_code == 0
    assert f"resuming after {len(saved)} of 100 greetings" in resumed.messages("greet")
    assert greetings_of(resumed, "greet") == "Hello, world!\n" * 100
