"""The pytest fixtures llmforge ships to plugin authors (llmforge/testing.py, the `pytest11` entry point).

A plugin author's test suite is run as the author runs it: `python -m pytest` in a subprocess on a test
file of its own, with the fixtures coming from llmforge (no conftest.py). The tiny-model fixtures are
exercised in this session, with a real SFT run on the tiny model.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

from conftest import ROOT, _env
from llmforge.testing import (  # noqa: F401 - fixtures, used by name below
    llmforge_project,
    llmforge_registry,
    llmforge_tiny_model_dir,
    llmforge_tokenizer_dir,
)


def _plugin_args() -> list[str]:
    # An editable install made before the entry point existed lacks it in its metadata; name the plugin then
    # (the entry point carries the module's name, so this never registers it twice).
    if any(ep.name == "llmforge.testing" for ep in metadata.entry_points(group="pytest11")):
        return []
    return ["-p", "llmforge.testing"]


def run_author_tests(folder: Path, text: str) -> subprocess.CompletedProcess:
    (folder / "test_author.py").write_text(textwrap.dedent(text), encoding="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *_plugin_args(), "test_author.py"],
        cwd=folder,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


AUTHOR_TESTS = '''
import json
import sys
import time

from pydantic import Field

from llmforge import hookimpl
from llmforge.stage import Stage, StageOptions


class CountOptions(StageOptions):
    n: int = Field(3, ge=1, description="How far to count.")
    pause: float = Field(0.01, ge=0, description="Seconds after each step.")


class Count(Stage):
    name = "count"
    summary = "Count, one step at a time."
    Options = CountOptions
    produces = ("files",)

    def run(self, options, ctx):
        for i in range(options.n):
            if ctx.should_stop():
                ctx.log(f"stopped at {i}")
                return
            ctx.progress(i + 1, options.n)
            time.sleep(options.pause)
        with ctx.artifact("files") as out:
            (out / "n.txt").write_text(str(options.n))
        ctx.metric(step=options.n, n=float(options.n))
        ctx.log("counted")


class CountPlugin:
    @hookimpl
    def register_stages(self, register):
        register(Count)


class Misspelt:
    @hookimpl
    def on_evnt(self, event):
        pass


PROJECT = """
[[stages]]
name = "c"
uses = "count"
n = {n}
"""


def test_run(llmforge_registry, llmforge_project):
    registry = llmforge_registry(CountPlugin())
    llmforge_project.write(PROJECT.format(n=4))
    run = llmforge_project.run(registry)
    assert run.exit_code == 0 and run.status == "done", run.failure()
    assert (run.artifact("c", "files") / "n.txt").read_text() == "4"
    assert run.run_dir.parent == llmforge_project.runs_dir
    assert run.messages("c") == ["counted"] and run.metrics("c") == [{"step": 4, "n": 4.0}]
    assert [e["done"] for e in run.of_type("progress", "c")] == [1, 2, 3, 4]
    assert run.events[0]["type"] == "run_start" and run.events[-1]["type"] == "run_end"
    assert "llmforge_plugins" in sys.modules  # the built-ins are loaded too


def test_problems(llmforge_registry, llmforge_project):
    registry = llmforge_registry(CountPlugin())
    llmforge_project.write(PROJECT.format(n=0))
    assert llmforge_project.problems(registry) == {"stages[0].n": "must be >= 1 (got 0)"}
    llmforge_project.write(PROJECT.format(n=2))
    assert llmforge_project.problems(registry) == {}


def test_stop_and_resume(llmforge_registry, llmforge_project):
    registry = llmforge_registry(CountPlugin())
    llmforge_project.write(PROJECT.format(n=400))
    stopped = llmforge_project.run(registry, stop_when=lambda e: e["type"] == "progress" and e["done"] == 3)
    assert stopped.exit_code == 130 and stopped.stages["c"]["status"] == "stopped", stopped.failure()
    resumed = llmforge_project.run(registry, resume=True)
    assert resumed.run_id == stopped.run_id and resumed.exit_code == 0


def test_stop_is_seen_at_the_next_poll(llmforge_registry, llmforge_project):
    # No pause between steps: the stage asks should_stop() right after the event that asked for the stop,
    # far sooner than the stop file is polled; a stop made in the run's own process must still be seen.
    registry = llmforge_registry(CountPlugin())
    llmforge_project.write(PROJECT.format(n=50) + "pause = 0\\n")
    run = llmforge_project.run(registry, stop_when=lambda e: e["type"] == "progress" and e["done"] == 1)
    assert run.stages["c"]["status"] == "stopped" and run.exit_code == 130, run.failure()
    assert run.messages("c") == ["stopped at 1"]


def test_rows(llmforge_project):
    path = llmforge_project.write_rows("data/train.jsonl", [{"text": "a"}, {"text": "b"}])
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"text": "a"}, {"text": "b"}]


def test_check_false_returns_the_errors(llmforge_registry):
    registry = llmforge_registry(Misspelt(), check=False)
    assert [e.plugin for e in registry.errors] == ["Misspelt"]


def test_misspelt_hook_fails_the_test(llmforge_registry):
    llmforge_registry(CountPlugin(), Misspelt())
'''


def test_a_plugin_authors_tests_use_the_fixtures(tmp_path):
    res = run_author_tests(tmp_path, AUTHOR_TESTS)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out[-4000:]
    assert "1 failed, 6 passed" in out, out[-4000:]
    # the one failure is the misspelt hook, named with the plugin and a suggestion, without a traceback
    assert "FAILED test_author.py::test_misspelt_hook_fails_the_test" in out
    assert (
        "llmforge could not load the plugins under test:\n"
        "  Misspelt: ValueError: implements unknown hook 'on_evnt'; did you mean 'on_event'?"
    ) in out
    assert "Traceback" not in out


def test_the_fixtures_plugin_loads_nothing_heavy_at_pytest_start(tmp_path):
    (tmp_path / "test_author.py").write_text(
        textwrap.dedent("""
        import json, sys
        import pytest

        def test_modules(request):
            print("MODULES", json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
            try:
                request.getfixturevalue("llmforge_registry")  # the factory: loads nothing by itself
                print("FIXTURE True")
            except pytest.FixtureLookupError:
                print("FIXTURE False")
    """),
        encoding="utf-8",
    )

    def modules(*plugin_args: str) -> tuple[set[str], bool]:
        res = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *plugin_args, "test_author.py"],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
        lines = dict(x.split(" ", 1) for x in res.stdout.splitlines() if x.startswith(("MODULES ", "FIXTURE ")))
        return set(json.loads(lines["MODULES"])), lines["FIXTURE"].strip() == "True"

    # Against the same session without the plugin: other pytest plugins installed here load what they load.
    with_plugin, found = modules(*_plugin_args())
    without, not_found = modules("-p", "no:llmforge.testing")
    assert found and not not_found  # the plugin is what provides the fixture
    added = with_plugin - without
    assert "llmforge" in added
    heavy = {"torch", "transformers", "tokenizers", "llama_cpp", "pydantic", "typer", "click", "rich", "textual"}
    assert not added & heavy, added & heavy


def test_fixture_names_do_not_shadow_the_projects_own():
    def fixtures(path: Path) -> set[str]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        return {
            node.name
            for node in tree.body
            if isinstance(node, ast.FunctionDef) and any("fixture" in ast.unparse(d) for d in node.decorator_list)
        }

    shipped = fixtures(ROOT / "llmforge" / "testing.py")
    assert {"llmforge_registry", "llmforge_project", "llmforge_tokenizer_dir", "llmforge_tiny_model_dir"} <= shipped
    assert all(name.startswith("llmforge_") for name in shipped), shipped
    assert not shipped & fixtures(ROOT / "tests" / "conftest.py")


@pytest.mark.slow
def test_tiny_model_trains_in_a_real_sft_stage(llmforge_project, llmforge_tiny_model_dir):  # noqa: F811 - fixtures
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llmforge_tiny_model_dir)
    assert (
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        == "<|im_start|>user\nhi<|im_end|>\n"
    )
    before = AutoModelForCausalLM.from_pretrained(llmforge_tiny_model_dir)
    assert before.num_parameters() < 50_000

    llmforge_project.write_rows(
        "data/chat.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": f"What is the capital of Land{i}?"},
                    {"role": "assistant", "content": f"The capital of Land{i} is Town{i}."},
                ]
            }
            for i in range(16)
        ],
    )
    llmforge_project.write(f"""
        [[stages]]
        name = "sft"
        uses = "sft"
        model = "{llmforge_tiny_model_dir}"
        data.path = "data/chat.jsonl"
        max_steps = 2
        max_length = 64
        precision = "fp32"
    """)
    run = llmforge_project.run()
    assert run.exit_code == 0, run.failure()
    after = AutoModelForCausalLM.from_pretrained(run.artifact("sft", "model"))
    changed = [n for n, p in after.state_dict().items() if not p.equal(before.state_dict()[n])]
    assert changed, "two SFT steps left every weight as it was"
