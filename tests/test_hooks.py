"""Every hook is documented and tested: a meta-test over llmforge.hookspecs, then each hook end to end.

The probe plugin (tests/fixtures/plugins/probe-plugin) implements every hookspec, each leaving a
trace (see its module docstring). It is pip-installed and used through the real `llmforge` CLI.
When a hookspec is added, the meta-tests below fail until the probe plugin implements it,
docs/plugins.md describes it and HOOK_TESTS names a test that exercises it.
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import ROOT, Project, run_cli
from llmforge import hookimpl, hookspecs

DOC = ROOT / "docs" / "plugins.md"
EVENT_TYPES = {"run_start", "stage_start", "log", "artifact", "stage_end", "run_end", "progress", "metric"}


def all_hookspecs() -> dict[str, str]:
    """name -> documentation of every hook a plugin may implement: the functions of llmforge.hookspecs
    marked as hookspecs, and the registration hooks of the extension points that the core and the
    built-in plugins declare (``register_stages`` next to ``Stage``, ``register_merge_methods`` in the
    merge plugin, ...)."""
    from llmforge.plugins import load_registry

    specs = {
        name: inspect.getdoc(fn) or ""
        for name, fn in vars(hookspecs).items()
        if inspect.isfunction(fn) and hasattr(fn, "llmforge_spec")
    }
    specs.update({p.hook: inspect.cleandoc(p.doc) for p in load_registry(env="").points().values()})
    return specs


SPECS = all_hookspecs()

# Which test(s) of this module exercise each hook. The meta-test checks this covers every hookspec.
HOOK_TESTS = {
    "register_stages": ["test_register_stages_probe_stage_runs"],
    "register_commands": ["test_register_commands_adds_a_cli_command"],
    "configure": ["test_configure_receives_the_validated_config"],
    "validate_pipeline": ["test_validate_pipeline_problems_make_validate_fail"],
    "execute_stage": [
        "test_execute_stage_wrapper_wraps_every_stage",
        "test_execute_stage_firstresult_can_take_a_stage_over",
    ],
    "on_event": ["test_on_event_observes_every_event"],
    "register_readers": ["test_register_readers_and_row_formats_read_probe_files"],
    "register_row_formats": ["test_register_readers_and_row_formats_read_probe_files"],
    "register_chat_templates": ["test_register_chat_templates_makes_the_template_resolvable"],
    "register_trackers": ["test_register_trackers_tracker_sees_the_run"],
    "register_merge_methods": ["test_register_merge_methods_adds_a_merge_method"],
    "register_backends": ["test_register_backends_backend_launches_its_stages"],
    "register_curation_steps": ["test_register_curation_steps_adds_a_step"],
    "register_chat_engines": ["test_register_chat_engines_adds_an_engine_to_llmforge_chat"],
    "extension_points": ["test_extension_points_adds_a_table_that_plugins_fill"],
    "register_eval_models": ["test_register_eval_models_and_tasks_run_in_llmforge_eval"],
    "register_eval_tasks": ["test_register_eval_models_and_tasks_run_in_llmforge_eval"],
    "register_judge_backends": ["test_register_judge_backends_judges_an_eval_stage"],
    "register_generators": ["test_register_generators_and_verifiers_make_a_synth_dataset"],
    "register_verifiers": ["test_register_generators_and_verifiers_make_a_synth_dataset"],
}


# ------------------------------------------------------------------------------------------------
# meta-tests


def test_hookspecs_are_found():
    # guard against a vacuous pass (e.g. the marker attribute renamed)
    assert {"register_stages", "execute_stage", "on_event", "extension_points"} <= set(SPECS), sorted(SPECS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hookspec_has_a_docstring(name):
    doc = SPECS[name]
    assert len(doc.split()) >= 5, f"hookspec {name} needs a docstring (it is the plugin API reference)"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hookspec_is_implemented_by_the_probe_plugin(name, probe_registry):
    info = next(p for p in probe_registry.plugins if p.name == "probe")
    assert name in info.hooks, f"tests/fixtures/plugins/probe-plugin does not implement {name}"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hookspec_is_documented(name):
    assert DOC.exists(), f"{DOC.relative_to(ROOT)} is missing: the plugin author guide must document every hook"
    text = DOC.read_text(encoding="utf-8")
    assert re.search(rf"\b{name}\b", text), f"{name} is not mentioned in {DOC.relative_to(ROOT)}"


def test_every_hookspec_has_an_end_to_end_test():
    assert set(HOOK_TESTS) == set(SPECS), "update HOOK_TESTS (and add a test) for new or renamed hooks"
    module = sys.modules[__name__]
    for hook, tests in HOOK_TESTS.items():
        for test in tests:
            assert callable(getattr(module, test, None)), f"HOOK_TESTS[{hook!r}] names a missing test {test}"


# ------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def probe(plugin_site) -> Path:
    return plugin_site("probe-plugin")


@pytest.fixture
def probe_registry(probe, monkeypatch):
    """An in-process registry with the probe plugin (fast; for tests that need no subprocess)."""
    from llmforge.plugins import load_registry

    monkeypatch.syspath_prepend(str(probe))
    reg = load_registry(env="probe-plugin")
    assert not reg.errors, reg.errors
    return reg


PROBE_PROJECT = """
[project]
name = "probe-project"

[[stages]]
name = "probe1"
uses = "probe"
message = "hello"
count = 2

[[stages]]
name = "after"
uses = "shell"
command = "ls \\"$LLMFORGE_INPUT_SRC\\""
inputs = {src = "@probe1"}
"""


class ProbeRun:
    def __init__(self, project: Project, result, observed: list[str]):
        self.project = project
        self.result = result
        self.observed = observed
        (self.run_dir,) = project.runs.iterdir()
        lines = (self.run_dir / "events.jsonl").read_text(encoding="utf-8").splitlines()
        self.events = [json.loads(line) for line in lines]

    def of(self, stage: str) -> list[dict]:
        """The events of one stage, from its stage_start to its stage_end."""
        out, inside = [], False
        for ev in self.events:
            if ev["type"] == "stage_start" and ev.get("stage") == stage:
                inside = True
            if inside:
                out.append(ev)
            if ev["type"] == "stage_end" and ev.get("stage") == stage:
                break
        return out


@pytest.fixture(scope="module")
def probe_run(probe, tmp_path_factory) -> ProbeRun:
    """One real `llmforge run` of a probe stage and a shell stage reading its artifact, shared by the
    end-to-end tests below (one subprocess instead of one per test)."""
    project = Project(tmp_path_factory.mktemp("probe-run"))
    project.write(PROBE_PROJECT)
    events_file = project.root / "observed-events.txt"
    result = project.run("run", plugins=[probe], env={"PROBE_EVENTS_FILE": str(events_file)})
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return ProbeRun(project, result, events_file.read_text(encoding="utf-8").split())


# ------------------------------------------------------------------------------------------------
# each hook, end to end


def test_register_stages_probe_stage_runs(probe_run):
    (art,) = probe_run.run_dir.glob("stages/probe1/artifacts/files")
    assert sorted(p.name for p in art.iterdir()) == ["probe-0.txt", "probe-1.txt"]
    assert (art / "probe-0.txt").read_text() == "hello"
    # the next stage got the probe's artifact as its input
    listed = [e["message"] for e in probe_run.of("after") if e["type"] == "log"]
    assert "probe-0.txt" in listed and "probe-1.txt" in listed
    manifest = json.loads((probe_run.run_dir / "manifest.json").read_text())
    assert manifest["stages"]["probe1"]["uses"] == "probe"
    assert manifest["stages"]["probe1"]["status"] == "done"


def test_register_stages_shows_in_listings(probe):
    with ThreadPoolExecutor(2) as ex:
        stages, show = ex.map(
            lambda args: run_cli(*args, plugins=[probe]),
            [("stages", "list", "--json"), ("stages", "show", "probe", "--json")],
        )
    assert stages.returncode == 0 and show.returncode == 0, stages.stderr + show.stderr
    row = next(r for r in json.loads(stages.stdout) if r["kind"] == "probe")
    assert row["plugin"] == "probe" and row["produces"] == ["files"]
    options = {o["name"]: o for o in json.loads(show.stdout)["options"]}
    assert {"message", "count", "fail_validation", "limits.max_files"} <= set(options)
    assert options["count"]["default"] == 1 and options["limits.max_files"]["default"] == 10


def test_on_event_observes_every_event(probe_run):
    written = [e["type"] for e in probe_run.events]
    # the observer saw exactly what was written to events.jsonl, in the same order
    assert probe_run.observed == written
    assert set(probe_run.observed) >= EVENT_TYPES, sorted(EVENT_TYPES - set(probe_run.observed))
    assert probe_run.observed[0] == "run_start" and probe_run.observed[-1] == "run_end"


def test_execute_stage_wrapper_wraps_every_stage(probe_run):
    for stage in ("probe1", "after"):  # a plugin's own stage and a built-in one
        events = probe_run.of(stage)
        assert events[0]["type"] == "stage_start" and events[-1]["type"] == "stage_end"
        inner = events[1:-1]
        assert inner[0] == {**inner[0], "type": "log", "stage": stage, "message": f"probe-wrapper: {stage}"}
        assert inner[-1] == {**inner[-1], "type": "log", "stage": stage, "message": f"probe-wrapper: {stage} done"}
        # the stage's own work happened inside the wrapper
        assert "artifact" in [e["type"] for e in inner[1:-1]]
    assert "probe1 | probe-wrapper: probe1" in probe_run.result.stdout


def test_configure_receives_the_validated_config(probe_run):
    messages = [e["message"] for e in probe_run.of("probe1") if e["type"] == "log"]
    assert "probe: configure saw project 'probe-project' (stages: probe1, after)" in messages


def test_validate_pipeline_problems_make_validate_fail(probe, project):
    project.write(PROBE_PROJECT.replace("count = 2", "count = 2\nfail_validation = true"))
    with ThreadPoolExecutor(2) as ex:
        validate, run = ex.map(lambda cmd: project.run(cmd, plugins=[probe]), ["validate", "run"])
    for r in (validate, run):
        assert r.returncode == 2, r.stdout + r.stderr
        assert "Traceback" not in r.stderr
        assert "stages[0].fail_validation: probe-plugin rejects stage 'probe1' (fail_validation = true)" in r.stderr
        assert "probe-plugin: plain-string problem about 'probe1'" in r.stderr  # a str answer is a problem too
        assert "2 problems found" in r.stderr
    assert not project.runs.exists()
    # the same pipeline without the flag is valid (the hook answers [] then)
    good = project.run("validate", "--set", "probe1.fail_validation=false", plugins=[probe])
    assert good.returncode == 0, good.stderr
    assert "  after (shell)   <- probe1" in good.stdout  # validate shows each stage with its inputs


def test_register_commands_adds_a_cli_command(probe):
    with ThreadPoolExecutor(2) as ex:
        cmd, help_ = ex.map(
            lambda args: run_cli(*args, plugins=[probe]), [("probe-cmd", "--name", "forge"), ("--help",)]
        )
    assert cmd.returncode == 0, cmd.stderr
    assert cmd.stdout.strip() == "probe-cmd: hello forge"
    assert help_.returncode == 0 and "probe-cmd" in help_.stdout
    # without the plugin, the command does not exist
    missing = run_cli("probe-cmd")
    assert missing.returncode == 2 and "probe-cmd" in missing.stderr


# ------------------------------------------------------------------------------------------------
# in-process: hook roles that need a second plugin (registered through load_registry(extra=...))


def _run_in_process(project: Project, registry):
    from llmforge.pipeline import load_pipeline
    from llmforge.runner import RunRequest, run_pipeline

    pipe = load_pipeline(project.config, registry=registry)
    return run_pipeline(pipe, RunRequest(), registry=registry)


SHELL_ONLY = """
[[stages]]
name = "a"
uses = "shell"
command = "echo the-command-ran > \\"$LLMFORGE_OUT/ran.txt\\""
"""


def test_execute_stage_firstresult_can_take_a_stage_over(project):
    """execute_stage is firstresult: a plugin returning non-None handles the stage; stage.run() is skipped."""
    from llmforge.plugins import load_registry

    class TakeOver:
        @hookimpl
        def execute_stage(self, stage, options, ctx):
            if stage.kind != "shell":
                return None
            with ctx.artifact("files") as out:
                (out / "taken.txt").write_text(options.command)
            return "handled elsewhere"

    project.write(SHELL_ONLY)
    result = _run_in_process(project, load_registry(env="", extra=[("takeover", TakeOver())]))
    assert result.status == "done", result.stages
    files = result.run_dir / "stages" / "a" / "artifacts" / "files"
    assert sorted(p.name for p in files.iterdir()) == ["taken.txt"]  # the command itself never ran
    assert "the-command-ran" in (files / "taken.txt").read_text()


def test_on_event_observer_exception_does_not_stop_the_run(project):
    from llmforge.plugins import load_registry

    class Failing:
        @hookimpl
        def on_event(self, event):
            raise RuntimeError("observer exploded")

    project.write(SHELL_ONLY)
    result = _run_in_process(project, load_registry(env="", extra=[("failing", Failing())]))
    assert result.status == "done" and result.exit_code == 0
    events = [json.loads(line) for line in (result.run_dir / "events.jsonl").read_text().splitlines()]
    warnings = [e for e in events if e["type"] == "log" and "observer exploded" in e.get("message", "")]
    assert len(warnings) == 1, "a failing observer is reported once"
    assert (result.run_dir / "stages" / "a" / "artifacts" / "files" / "ran.txt").exists()


def test_a_failing_observer_does_not_silence_the_others(project):
    from llmforge.plugins import load_registry

    seen: list[str] = []

    class Failing:
        @hookimpl
        def on_event(self, event):
            raise RuntimeError("observer exploded")

    class Recorder:
        @hookimpl
        def on_event(self, event):
            seen.append(event["type"])

    project.write(SHELL_ONLY)
    # registered in both orders so the result does not hang on pluggy's call order
    for extra in (
        [("failing", Failing()), ("recorder", Recorder())],
        [("recorder", Recorder()), ("failing", Failing())],
    ):
        seen.clear()
        shutil.rmtree(project.runs, ignore_errors=True)  # no cache: the stage really runs each time
        result = _run_in_process(project, load_registry(env="", extra=extra))
        assert result.status == "done"
        assert {"run_start", "stage_start", "artifact", "stage_end", "run_end"} <= set(seen), seen


def test_a_crashing_validate_pipeline_is_reported_as_a_problem(project):
    from llmforge.errors import ForgeError
    from llmforge.pipeline import load_pipeline
    from llmforge.plugins import load_registry

    class Crashing:
        @hookimpl
        def validate_pipeline(self, pipeline):
            raise RuntimeError("validator exploded")

    project.write(SHELL_ONLY)
    with pytest.raises(ForgeError) as info:
        load_pipeline(project.config, registry=load_registry(env="", extra=[("crashing", Crashing())]))
    assert "crashing" in str(info.value) and "validator exploded" in str(info.value)


def test_extension_points_adds_a_table_that_plugins_fill(probe_registry, probe):
    # In process: the probe's own point is declared, its hook known, its table filled on first read.
    assert "probe_gadgets" in probe_registry.points()
    gadgets = probe_registry.table("probe_gadgets")
    assert list(gadgets) == ["spring"] and probe_registry.owner("probe_gadgets", "spring") == "probe"
    # Through the real CLI: `plugins list` fills every table, the probe's included.
    res = run_cli("plugins", "list", "--json", plugins=[probe])
    assert res.returncode == 0, res.stderr
    info = next(p for p in json.loads(res.stdout)["plugins"] if p["name"] == "probe")
    assert info["provides"]["probe_gadgets"] == ["spring"]
    assert "extension_points" in info["hooks"] and "register_probe_gadgets" in info["hooks"]


def test_register_readers_and_row_formats_read_probe_files(probe_registry, tmp_path):
    from llmforge.data import DataOptions, load_data

    (tmp_path / "a.probe").write_text("hello\n\nworld\n")
    ds = load_data(
        DataOptions(path=str(tmp_path / "a.probe")),
        probe_registry.readers,
        probe_registry.row_formats,
        expect=("text",),
    )
    assert ds.format == "probe" and ds.kind == "text"
    assert ds.rows == [{"text": "HELLO"}, {"text": "WORLD"}]
    assert ds.wheres == [f"{tmp_path / 'a.probe'}:1", f"{tmp_path / 'a.probe'}:3"]


def test_register_chat_templates_makes_the_template_resolvable(probe_registry):
    from llmforge.chat import render, resolve_template

    template = resolve_template("probe", probe_registry.chat_templates)
    assert template.name == "probe" and template.eos == "<|probe_end|>"
    text = render(template, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == "[user] hi<|probe_end|>\n[assistant] "


def test_register_trackers_tracker_sees_the_run(probe, project):
    project.write(PROBE_PROJECT + '\n[trackers.probe]\npath = "tracked.txt"\n')
    # [trackers] must come before [[stages]] in TOML; rewrite the file in that order
    text = project.config.read_text()
    body, _, tracker = text.partition("[trackers.probe]")
    project.write("[trackers.probe]" + tracker + "\n" + body)
    res = project.run("run", plugins=[probe], env={"LLMFORGE_LOAD_PLUGINS": "probe-plugin"})
    assert res.returncode == 0, res.stderr
    lines = (project.root / "tracked.txt").read_text().split()
    assert lines[0] == "run_start" and lines[-2:] == ["run_end", "closed"]
    assert {"stage_start", "stage_end", "artifact"} <= set(lines)


def _tiny_model(path: Path, seed: int) -> dict:
    """A minimal model folder for the merge engine: config.json and model.safetensors (no transformers)."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "model.embed_tokens.weight": torch.randn(8, 4, generator=gen),
        "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=gen),
        "model.norm.weight": torch.randn(4, generator=gen),
    }
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "num_hidden_layers": 1,
                "vocab_size": 8,
                "tie_word_embeddings": True,
            }
        )
    )
    return tensors


def test_register_merge_methods_adds_a_merge_method(probe, tmp_path):
    from safetensors.torch import load_file

    a, b = _tiny_model(tmp_path / "a", 1), _tiny_model(tmp_path / "b", 2)
    out = tmp_path / "out"
    with ThreadPoolExecutor(2) as ex:
        merged, listed = ex.map(
            lambda args: run_cli(*args, plugins=[probe]),
            [
                (
                    "merge",
                    str(out),
                    "--method",
                    "probe_max",
                    "--model",
                    str(tmp_path / "a"),
                    "--model",
                    str(tmp_path / "b"),
                    "--set",
                    "scale=2",
                ),
                ("merge", "--list-methods"),
            ],
        )
    assert merged.returncode == 0, merged.stderr
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(a)
    for name in a:
        assert (got[name] == 2 * a[name].maximum(b[name])).all(), name
    assert "probe_max" in (out / "README.md").read_text()
    assert listed.returncode == 0 and "probe_max (probe; base none)" in listed.stdout
    assert "ties (merge; base required)" in listed.stdout  # the built-in methods come through the same hook
    # its parameters are checked like the built-in ones', before any work
    bad = run_cli(
        "merge",
        str(tmp_path / "bad"),
        "--method",
        "probe_max",
        "--model",
        str(tmp_path / "a"),
        "--model",
        str(tmp_path / "b"),
        "--set",
        "scale=0",
        plugins=[probe],
    )
    assert bad.returncode == 2 and "--set scale: must be > 0 (got 0)" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()
    # without the plugin, the method does not exist
    missing = run_cli("merge", str(tmp_path / "none"), "--method", "probe_max", "--model", str(tmp_path / "a"))
    assert missing.returncode == 2 and "unknown merge method 'probe_max'" in missing.stderr


def test_register_chat_engines_adds_an_engine_to_llmforge_chat(probe, tmp_path):
    model = tmp_path / "m.probe"
    model.write_text("probe model")
    said = run_cli("chat", str(model), "-p", "hello there", plugins=[probe])
    assert said.returncode == 0, said.stderr
    assert said.stdout.strip() == "echo: hello there"  # the core's loop ran the plugin's engine to its stop token
    # without the plugin, no engine opens the file; the installed ones say what they open
    missing = run_cli("chat", str(model), "-p", "hello")
    assert missing.returncode == 2 and "m.probe: not a model directory; not a GGUF file" in missing.stderr
    assert "give an HF model or adapter directory or a .gguf file" in missing.stderr, missing.stderr


def test_register_backends_backend_launches_its_stages(probe, project):
    project.write('[backend]\ntype = "probe"\n\n[backend.probe]\nmarker = "m1"\n' + PROBE_PROJECT)
    res = project.run("run", plugins=[probe])
    assert res.returncode == 0, res.stdout + res.stderr
    (run_dir,) = project.runs.iterdir()
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text(encoding="utf-8").splitlines()]
    launched = [
        (e["stage"], e["message"]) for e in events if e["type"] == "log" and e["message"].startswith("probe-backend:")
    ]
    # it took over the probe stage (which then ran and published), and left the shell stage to the core
    assert launched == [("probe1", "probe-backend: launching probe1 (marker m1)")]
    assert (run_dir / "stages" / "probe1" / "artifacts" / "files" / "probe-0.txt").read_text() == "hello"
    # [backend] is validated against the selected backend's Options, and its check() runs
    with ThreadPoolExecutor(2) as ex:
        bad, typo, local, missing = ex.map(
            lambda args: run_cli(*args[0], cwd=project.root, plugins=args[1]),
            [
                (("validate", "--set", "backend.probe.marker=bad"), [probe]),
                (("validate", "--set", "backend.probe.markr=x"), [probe]),
                (("validate", "--set", "backend.type=local"), [probe]),
                (("validate",), []),
            ],
        )
    assert (
        bad.returncode == 2
        and "backend.probe.marker (from --set backend.probe.marker): the probe backend rejects marker 'bad'"
        in bad.stderr
    )
    assert typo.returncode == 2 and "backend.probe.markr" in typo.stderr, typo.stderr
    # switching type keeps the file valid: [backend.probe] belongs to an installed backend
    assert local.returncode == 0, local.stderr
    # without the plugin the type is unknown, and the installed ones are named
    assert missing.returncode == 2
    assert "backend.type: unknown backend 'probe'" in missing.stderr
    assert "(installed: accelerate, deepspeed, local)" in missing.stderr


def test_register_curation_steps_adds_a_step(probe, project):
    rows = [{"text": "keep this one"}, {"text": "a secret row"}, {"text": "and this"}]
    project.write("".join(json.dumps(r) + "\n" for r in rows), name="in.jsonl")
    with ThreadPoolExecutor(2) as ex:
        filtered, listed = ex.map(
            lambda args: project.run(*args, plugins=[probe]),
            [
                (
                    "data",
                    "filter",
                    "in.jsonl",
                    "out.jsonl",
                    "--step",
                    "probe_no_word",
                    "--set",
                    "word=secret",
                    "--reasons",
                    "why.jsonl",
                ),
                ("data", "steps", "--json"),
            ],
        )
    assert filtered.returncode == 0, filtered.stderr
    out = [json.loads(x) for x in (project.root / "out.jsonl").read_text().splitlines()]
    assert out == [{"text": "KEEP THIS ONE"}, {"text": "AND THIS"}]
    (why,) = [json.loads(x) for x in (project.root / "why.jsonl").read_text().splitlines()]
    assert why == {
        "source": "in.jsonl:2",
        "step": "probe_no_word",
        "code": "probe_word",
        "reason": "probe: mentions secret",
    }
    steps = {r["step"]: r for r in json.loads(listed.stdout)}
    assert steps["probe_no_word"]["plugin"] == "probe" and steps["probe_no_word"]["action"] == "filter"
    assert steps["near_dedup"]["plugin"] == "curate"  # the built-in steps come through the same hook
    # the curate stage runs it too
    project.write(
        '[[stages]]\nname = "c"\nuses = "curate"\ndata = { path = "in.jsonl" }\n'
        'steps = [{ step = "probe_no_word", word = "secret" }]\n'
    )
    res = project.run("run", plugins=[probe])
    assert res.returncode == 0, res.stdout + res.stderr
    (data,) = project.runs.glob("*/stages/c/artifacts/dataset/data.jsonl")
    assert [json.loads(x)["text"] for x in data.read_text().splitlines()] == ["KEEP THIS ONE", "AND THIS"]
    # without the plugin, the step does not exist
    missing = project.run("data", "filter", "in.jsonl", "x.jsonl", "--step", "probe_no_word")
    assert missing.returncode == 2 and "unknown curation step 'probe_no_word'" in missing.stderr


def test_register_eval_models_and_tasks_run_in_llmforge_eval(probe, tmp_path):
    model = tmp_path / "m.probe"
    model.write_text("probe model")
    (tmp_path / "echo.toml").write_text('name = "echo"\nkind = "probe_echoes"\nword = "hey"\n')
    res = run_cli("eval", str(model), "--task", str(tmp_path / "echo.toml"), "--json", plugins=[probe])
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    (result,) = report["results"]
    assert result["task"] == "echo" and result["metrics"]["echoed"]["value"] == 1.0
    assert report["models"][0]["engine"] == "probe_echo"
    # without the plugin neither the kind nor the model is known: exit 2, the installed kinds named
    missing = run_cli("eval", str(model), "--task", str(tmp_path / "echo.toml"))
    assert missing.returncode == 2 and "probe_echoes" in missing.stderr, missing.stderr


def test_register_judge_backends_judges_an_eval_stage(probe, project):
    (project.root / "m.probe").write_text("probe model")
    (project.root / "items.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    project.write(
        '[project]\nname = "judged"\n\n[judges.rules]\nbackend = "probe_rules"\nscore = 8\ncount_file = "count.txt"\n\n'
        '[[stages]]\nname = "eval"\nuses = "eval"\nmodels = ["m.probe"]\n'
        'tasks = [{ name = "j", kind = "judge", judge = "rules", data = "items.jsonl" }]\n'
    )
    res = project.run("run", plugins=[probe])
    assert res.returncode == 0, res.stdout + res.stderr
    (run_dir,) = project.runs.iterdir()
    report = json.loads((run_dir / "stages" / "eval" / "artifacts" / "report" / "report.json").read_text())
    assert report["results"][0]["metrics"]["score"]["value"] == 8.0
    assert (project.root / "count.txt").read_text().count("request") == 2

    # the judge is part of the eval stage's cache key: another score judges again, another concurrency does not
    def statuses():
        return [
            json.loads((d / "manifest.json").read_text())["stages"]["eval"]["status"]
            for d in sorted(project.runs.iterdir(), key=lambda d: d.stat().st_mtime)
        ]

    assert project.run("run", "--set", "judges.rules.concurrency=2", plugins=[probe]).returncode == 0
    assert statuses()[-1] == "cached", statuses()
    assert project.run("run", "--set", "judges.rules.score=9", plugins=[probe]).returncode == 0
    assert statuses()[-1] == "done" and (project.root / "count.txt").read_text().count("request") == 4
    # llmforge eval outside the pipeline takes the judges of ./forge.toml
    (project.root / "j.toml").write_text('name = "j"\nkind = "judge"\njudge = "rules"\ndata = "items.jsonl"\n')
    res = run_cli("eval", "m.probe", "--task", "j.toml", "--json", cwd=project.root, plugins=[probe])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["results"][0]["metrics"]["score"]["value"] == 8.0
    # [judges] is validated against the backend's Options, the key path named
    bad = run_cli("validate", "--set", "judges.rules.scor=9", cwd=project.root, plugins=[probe])
    assert bad.returncode == 2 and "judges.rules.scor" in bad.stderr, bad.stderr


def test_register_generators_and_verifiers_make_a_synth_dataset(probe, project):
    project.write(
        '[project]\nname = "made"\n\n[judges.t]\nbackend = "probe_rules"\nscore = 5\n\n'
        '[[stages]]\nname = "synth"\nuses = "synth"\nteacher = "t"\n'
        'generator = { kind = "probe_lines", n = 4, word = "hey" }\nverify = { verifier = "probe_even" }\n'
    )
    res = project.run("run", plugins=[probe])
    assert res.returncode == 0, res.stdout + res.stderr
    (run_dir,) = project.runs.iterdir()
    artifacts = run_dir / "stages" / "synth" / "artifacts"
    rows = [json.loads(x) for x in (artifacts / "dataset" / "data.jsonl").read_text().splitlines()]
    # the teacher (the probe's judge backend) answered every line; the probe verifier kept the even ones
    assert [r["i"] for r in rows] == [0, 2]
    assert rows[0]["messages"] == [
        {"role": "user", "content": "line 0 hey"},
        {"role": "assistant", "content": "Score: 5"},
    ]
    assert rows[0]["provenance"]["generator"] == "probe_lines"
    report = json.loads((artifacts / "report" / "report.json").read_text())
    assert report["rows"] == 2 and report["rejected"] == {"verify": 2}, report
    # without the plugin neither the generator nor the verifier is known: exit 2, the key named
    project.write(
        '[project]\nname = "made"\n\n[[stages]]\nname = "synth"\nuses = "synth"\nteacher = "t"\n'
        'generator = { kind = "probe_lines", n = 4 }\nverify = { verifier = "probe_even" }\n'
    )
    missing = project.run("validate")
    assert missing.returncode == 2 and "generator" in missing.stderr and "probe_lines" in missing.stderr, missing.stderr
