"""Plugin loading through the real `llmforge` CLI with real installed plugin packages.

The fixture packages in tests/fixtures/plugins/ are pip-installed (session-scoped, see conftest's
`plugin_site`) and put on PYTHONPATH, so discovery goes through `importlib.metadata` entry points
exactly as for a user's installed plugin:

* broken-plugin        its module fails at import (ModuleNotFoundError)
* bad-register-plugin  imports, but register_stages raises (register_commands too, on request)
* collide-a, collide-b both register a stage kind named `twin`

Load order (llmforge/plugins.py, `load_registry`): built-ins first, then third-party distributions
sorted by normalised distribution name, then entry-point name. So for `twin`, **collide-a wins**
and collide-b's registration is reported as a conflict, whatever the install or sys.path order.
The fixtures' entry-point names sort the other way round (collide-a's is `zeta`, collide-b's is
`alpha`), so these tests also tell "by distribution" from "by entry-point name".
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import run_cli
from llmforge import hookimpl

BUILTINS = {"shell", "copy"}
ENV_VAR = "LLMFORGE_LOAD_PLUGINS"

SHELL_PROJECT = """
[project]
name = "plugins-test"

[[stages]]
name = "hello"
uses = "shell"
command = "echo hello-from-shell > \\"$LLMFORGE_OUT/out.txt\\"; echo shell-ran"
"""


# ------------------------------------------------------------------------------------------------
# helpers


def flat(text: str) -> str:
    """Whitespace-normalised output: assertions must not depend on how rich wraps a line."""
    return " ".join(text.split())


def parallel(*calls):
    """Run independent CLI calls two at a time (each is a ~0.3 s subprocess; the machine has 2 cores)."""
    with ThreadPoolExecutor(max_workers=2) as ex:
        futures = [ex.submit(fn, *args, **kw) for fn, args, kw in calls]
        return [f.result() for f in futures]


def ok(result):
    """Exit 0 and no traceback on the terminal (JSON output may carry one as data: `details`)."""
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    if not result.stdout.lstrip().startswith(("{", "[")):
        assert "Traceback" not in result.stdout
    return result


def plugins_json(plugins=(), env=None) -> dict:
    r = ok(run_cli("plugins", "list", "--json", plugins=list(plugins), env=env))
    return json.loads(r.stdout)


def by_name(data: dict) -> dict:
    return {p["name"]: p for p in data["plugins"]}


@pytest.fixture(scope="module")
def broken(plugin_site):
    return plugin_site("broken-plugin")


@pytest.fixture(scope="module")
def bad_register(plugin_site):
    return plugin_site("bad-register-plugin")


@pytest.fixture(scope="module")
def collide(plugin_site):
    return [plugin_site("collide-a"), plugin_site("collide-b")]


# ------------------------------------------------------------------------------------------------
# built-ins


def test_builtins_load_through_the_entry_point_group():
    data = plugins_json()
    plugins = by_name(data)
    for name in BUILTINS:
        assert name in plugins, f"built-in plugin {name!r} missing from {sorted(plugins)}"
        info = plugins[name]
        assert info["builtin"] is True
        assert info["dist"] == "llmforge"
        assert info["module"] == f"llmforge_plugins.hooks.{name}"  # the light entry module
        assert info["stages"] == [name]
        assert "register_stages" in info["hooks"]
    assert not [e for e in data["errors"] if e["dist"] == "llmforge"], data["errors"]
    # Built-ins come first in the listing (they are loaded first).
    flags = [p["builtin"] for p in data["plugins"]]
    assert flags == sorted(flags, reverse=True)


# ------------------------------------------------------------------------------------------------
# a plugin that fails at import


def test_broken_plugin_is_listed_with_its_error(broken):
    text, js = parallel(
        (run_cli, ("plugins", "list"), {"plugins": [broken]}),
        (run_cli, ("plugins", "list", "--json"), {"plugins": [broken]}),
    )
    ok(text)
    out = flat(text.stdout)
    assert "failed to load broken (broken-plugin)" in out
    assert "ModuleNotFoundError: No module named 'lf_dependency_that_is_not_installed'" in out
    # the built-ins are still there
    assert "shell" in out and "copy" in out

    data = json.loads(ok(js).stdout)
    assert "broken" not in by_name(data)
    assert set(by_name(data)) >= BUILTINS
    errors = [e for e in data["errors"] if e["plugin"] == "broken"]
    assert len(errors) == 1, data["errors"]
    err = errors[0]
    assert err["dist"] == "broken-plugin"
    assert err["error"] == "ModuleNotFoundError: No module named 'lf_dependency_that_is_not_installed'"
    assert "\n" not in err["error"]  # one line for listings
    assert "Traceback" in err["details"] and "lf_broken_plugin" in err["details"]


def test_plugins_list_verbose_shows_the_traceback(broken):
    r = run_cli("plugins", "list", "--verbose", plugins=[broken])
    assert r.returncode == 0, r.stderr
    assert "lf_dependency_that_is_not_installed" in r.stdout
    assert "Traceback" in r.stdout
    assert "lf_broken_plugin.py" in r.stdout  # the traceback's frames, only with --verbose


# ------------------------------------------------------------------------------------------------
# a plugin whose registration hooks raise


def test_bad_register_plugin_is_listed_with_its_error(bad_register):
    text, js = parallel(
        (run_cli, ("plugins", "list"), {"plugins": [bad_register]}),
        (run_cli, ("plugins", "list", "--json"), {"plugins": [bad_register]}),
    )
    out = flat(ok(text).stdout)
    assert "bad_register (bad-register-plugin)" in out
    assert "register_stages failed: RuntimeError: bad-register-plugin cannot register its stages" in out

    data = json.loads(ok(js).stdout)
    plugins = by_name(data)
    # It imported fine, so it is loaded; it just contributes no stage.
    assert plugins["bad_register"]["stages"] == []
    assert plugins["bad_register"]["dist"] == "bad-register-plugin"
    errors = [e for e in data["errors"] if e["plugin"] == "bad_register"]
    assert len(errors) == 1, data["errors"]
    assert errors[0]["error"] == "register_stages failed: RuntimeError: bad-register-plugin cannot register its stages"
    assert "Traceback" in errors[0]["details"]
    # the other plugins' stages are all registered
    assert {"shell", "copy"} <= {s for p in data["plugins"] for s in p["stages"]}


def test_register_commands_failure_is_reported_not_raised(bad_register):
    env = {"BAD_REGISTER_COMMANDS": "1"}
    js, stages = parallel(
        (run_cli, ("plugins", "list", "--json"), {"plugins": [bad_register], "env": env}),
        (run_cli, ("stages", "list", "--json"), {"plugins": [bad_register], "env": env}),
    )
    errors = json.loads(ok(js).stdout)["errors"]
    assert any(
        e["plugin"] == "bad_register"
        and "register_commands failed" in e["error"]
        and "cannot register its commands" in e["error"]
        for e in errors
    ), errors
    assert {"shell", "copy"} <= {row["kind"] for row in json.loads(ok(stages).stdout)}


def test_other_commands_work_with_bad_plugins_installed(broken, bad_register, project):
    project.write(SHELL_PROJECT)
    plugins = [broken, bad_register]
    stages, validate = parallel(
        (project.run, ("stages", "list", "--json"), {"plugins": plugins}),
        (project.run, ("validate",), {"plugins": plugins}),
    )
    kinds = {row["kind"] for row in json.loads(ok(stages).stdout)}
    assert kinds >= BUILTINS
    assert "valid" in ok(validate).stdout

    run = ok(project.run("run", plugins=plugins))
    assert "shell-ran" in run.stdout
    out_files = list(project.runs.glob("*/stages/hello/artifacts/files/out.txt"))
    assert len(out_files) == 1 and out_files[0].read_text().strip() == "hello-from-shell"


# ------------------------------------------------------------------------------------------------
# two distributions registering the same stage kind


def test_colliding_stage_kinds_first_distribution_wins(collide, project):
    project.write("""
        [[stages]]
        name = "t"
        uses = "twin"
    """)
    js, text = parallel(
        (project.run, ("plugins", "list", "--json"), {"plugins": collide}),
        (project.run, ("plugins", "list"), {"plugins": collide}),
    )
    data = json.loads(ok(js).stdout)
    plugins = by_name(data)
    assert plugins["zeta"]["dist"] == "collide-a" and plugins["zeta"]["stages"] == ["twin"]
    assert plugins["alpha"]["dist"] == "collide-b" and plugins["alpha"]["stages"] == []
    assert len(data["conflicts"]) == 1, data["conflicts"]
    c = data["conflicts"][0]
    assert (c["label"], c["name"]) == ("stage", "twin")
    assert "collide-a" in c["winner"] and "collide-b" in c["loser"]
    assert "twin" in c["message"] and "collide-a" in c["message"] and "collide-b" in c["message"]
    assert data["errors"] == []
    out = flat(ok(text).stdout)
    assert (
        "conflict: stage 'twin' is registered by both zeta (collide-a) and alpha (collide-b); using zeta (collide-a)"
        in out
    )

    stages, run = parallel(
        (project.run, ("stages", "list", "--json"), {"plugins": collide}), (project.run, ("run",), {"plugins": collide})
    )
    twin = next(row for row in json.loads(ok(stages).stdout) if row["kind"] == "twin")
    assert twin["summary"] == "twin stage from collide-a"
    assert twin["plugin"] == "zeta"
    ok(run)
    (who,) = project.runs.glob("*/stages/t/artifacts/files/who.txt")
    assert who.read_text() == "collide-a"  # collide-a's class is the one that runs


@pytest.mark.parametrize("order", ["a-first", "b-first"])
def test_collision_winner_does_not_depend_on_path_order(collide, order, monkeypatch):
    """In-process (fast): whichever comes first on sys.path, collide-a's `twin` wins."""
    from llmforge.plugins import load_registry

    paths = collide if order == "a-first" else collide[::-1]
    for p in reversed(paths):  # syspath_prepend puts each in front: prepend in reverse order
        monkeypatch.syspath_prepend(str(p))
    reg = load_registry(env="collide-a,collide-b")
    assert reg.stages["twin"].summary == "twin stage from collide-a"
    assert reg.owner("stages", "twin") == "zeta"
    assert [str(c) for c in reg.conflicts] == [
        "stage 'twin' is registered by both zeta (collide-a) and alpha (collide-b); using zeta (collide-a)"
    ]
    assert [p.name for p in reg.plugins if not p.builtin] == ["zeta", "alpha"]


# ------------------------------------------------------------------------------------------------
# LLMFORGE_LOAD_PLUGINS


@pytest.fixture(scope="module")
def many(broken, collide):
    return [broken, *collide]


def test_load_plugins_empty_loads_only_builtins(many):
    data = plugins_json(many, env={ENV_VAR: ""})
    assert data["plugins"], "built-ins must still load"
    assert all(p["builtin"] for p in data["plugins"]), data["plugins"]
    assert set(by_name(data)) >= BUILTINS
    # nothing third-party was even imported: no load error from broken-plugin, no conflict
    assert data["errors"] == [] and data["conflicts"] == []


def test_load_plugins_names_one_distribution(many):
    data = plugins_json(many, env={ENV_VAR: "collide-b"})
    third_party = [p for p in data["plugins"] if not p["builtin"]]
    assert [(p["name"], p["dist"]) for p in third_party] == [("alpha", "collide-b")]
    assert third_party[0]["stages"] == ["twin"]  # no rival now: collide-b's twin is used
    assert set(by_name(data)) >= BUILTINS
    assert data["errors"] == [] and data["conflicts"] == []


def test_load_plugins_reports_a_name_that_is_not_installed(many):
    # Names are matched like distribution names: case and '-' vs '_' do not matter.
    env = {ENV_VAR: "Collide_B, not-installed-xyz"}
    js, text = parallel(
        (run_cli, ("plugins", "list", "--json"), {"plugins": many, "env": env}),
        (run_cli, ("plugins", "list"), {"plugins": many, "env": env}),
    )
    data = json.loads(ok(js).stdout)
    assert [p["dist"] for p in data["plugins"] if not p["builtin"]] == ["collide-b"]
    assert len(data["errors"]) == 1, data["errors"]
    err = data["errors"][0]
    assert err["plugin"] == "not-installed-xyz"
    assert ENV_VAR in err["error"] and "not installed" in err["error"]
    out = flat(ok(text).stdout)
    assert "not-installed-xyz" in out and "not installed" in out


# ------------------------------------------------------------------------------------------------
# plugins handed over in process (load_registry(extra=...)): how plugin authors test, so the same checks


def test_in_process_plugin_with_a_misspelt_hook_is_reported_and_left_out():
    import types

    from llmforge import hookimpl
    from llmforge.plugins import load_registry

    class Observer:
        @hookimpl
        def on_evnt(self, event):  # misspelt: would never run
            pass

        @hookimpl
        def validate_pipeline(self, pipeline):
            return None

    module = types.ModuleType("typo_module")

    @hookimpl
    def register_stage(register):  # misspelt: register_stages
        pass

    module.register_stage = register_stage

    reg = load_registry(env="", extra=[("observer", Observer()), ("typo_module", module)])
    errors = {e.plugin: e for e in reg.errors}
    assert set(errors) == {"observer", "typo_module"}, reg.errors
    assert errors["observer"].error == "ValueError: implements unknown hook 'on_evnt'; did you mean 'on_event'?"
    assert errors["typo_module"].error == (
        "ValueError: implements unknown hook 'register_stage'; did you mean 'register_stages'?"
    )
    assert errors["observer"].dist == "(in-process)" and "Traceback" in errors["observer"].details
    # left out like a failing entry point: none of its hooks is called, so the error cannot go unnoticed
    assert not {"observer", "typo_module"} & {p.name for p in reg.plugins}
    assert reg.pm.get_plugin("observer") is None
    assert not any(i.plugin_name == "observer" for i in reg.pm.hook.validate_pipeline.get_hookimpls())


def test_in_process_plugin_with_a_taken_name_is_reported_not_raised():
    from llmforge import hookimpl
    from llmforge.plugins import load_registry

    class Stageless:
        @hookimpl
        def validate_pipeline(self, pipeline):
            return None

    reg = load_registry(env="", extra=[("shell", Stageless()), ("mine", Stageless())])
    assert [(e.plugin, e.error) for e in reg.errors] == [("shell", "a plugin named 'shell' is already loaded")]
    assert [p.name for p in reg.plugins if not p.builtin] == ["mine"]
    assert reg.owner("stages", "shell") == "shell"  # the built-in is untouched


def test_a_stage_is_registered_by_its_kind_and_an_older_class_by_its_name():
    """`Stage.kind` names what `uses =` picks; a plugin written before it set `name`, and still works:
    it registers under that name, gets `kind` filled, and reading `.name` gives the kind."""
    from llmforge.plugins import load_registry
    from llmforge.stage import Stage
    from llmforge_plugins.shell import ShellStage

    class New(Stage):
        kind = "new_style"

    class Old(Stage):
        name = "old_style"

    class Renamed(ShellStage):  # a built-in stage subclassed and renamed the old way
        name = "old_shell"

    class Nameless(Stage):
        pass

    class Plugin:
        @hookimpl
        def register_stages(self, register):
            for cls in (New, Old, Renamed, Nameless):
                register(cls)

    reg = load_registry(env="", extra=[("mine", Plugin())])
    stages = reg.stages
    assert stages["new_style"] is New and stages["old_style"] is Old and stages["old_shell"] is Renamed
    assert stages["shell"] is ShellStage  # the subclass did not take the built-in's kind
    assert (Old.kind, Renamed.kind, ShellStage.kind) == ("old_style", "old_shell", "shell")
    assert (New.name, New().name, ShellStage.name) == ("new_style", "new_style", "shell")
    (error,) = reg.errors  # registered last: the refusal stops only its own plugin's hook
    assert error.plugin == "mine" and error.error.endswith('Nameless has no kind (kind = "...")')


# ------------------------------------------------------------------------------------------------
# extension points: declared by plugins, filled lazily, one table at a time


class _Widget:
    """The base class of a third-party extension point (what a plugin offers other plugins)."""

    name = ""


def _widgets_point():
    from llmforge.extension import ExtensionPoint, subclass_of

    return ExtensionPoint(
        hook="register_widgets",
        table="widgets",
        label="widget",
        doc="Register widgets: _Widget subclasses, by name.",
        validate=subclass_of(_Widget, instantiate=True),
    )


class _Declarer:
    """Declares the `widgets` point and registers one widget into it itself."""

    @hookimpl
    def extension_points(self):
        return [_widgets_point()]

    @hookimpl
    def register_widgets(self, register):
        class Cog(_Widget):
            name = "cog"

        register(Cog)


class _Filler:
    """Another plugin: registers into the point the first one declared."""

    @hookimpl
    def register_widgets(self, register):
        class Gear(_Widget):
            name = "gear"

        register(Gear)


def test_a_plugin_declares_an_extension_point_that_another_plugin_fills(monkeypatch):
    from typer.testing import CliRunner

    from llmforge.cli import common
    from llmforge.cli.app import build_app
    from llmforge.plugins import load_registry

    reg = load_registry(env="", extra=[("declarer", _Declarer()), ("filler", _Filler())])
    assert not reg.errors, reg.errors
    widgets = reg.table("widgets")
    assert sorted(widgets) == ["cog", "gear"] and isinstance(widgets["gear"], _Widget)  # instantiated
    assert reg.owner("widgets", "gear") == "filler" and reg.owner("widgets", "cog") == "declarer"
    assert reg.point("register_widgets").label == "widget"  # found by hook name too
    # `plugins list --json` fills every table, the plugin-declared one included
    monkeypatch.setattr(common, "_REGISTRY", reg)
    res = CliRunner().invoke(build_app(), ["plugins", "list", "--json"])
    assert res.exit_code == 0, res.output
    provides = {p["name"]: p["provides"] for p in json.loads(res.output)["plugins"]}
    assert provides["filler"] == {"widgets": ["gear"]} and provides["declarer"] == {"widgets": ["cog"]}
    assert "stages" in provides["shell"]


def test_a_hook_of_an_undeclared_point_is_refused_with_did_you_mean():
    from llmforge import hookimpl
    from llmforge.plugins import load_registry

    class Misspelt:
        @hookimpl
        def register_widget(self, register):  # the point's hook is register_widgets
            pass

    class Orphan:
        @hookimpl
        def register_gizmos(self, register):  # no plugin declares a gizmos point
            pass

    reg = load_registry(env="", extra=[("declarer", _Declarer()), ("misspelt", Misspelt()), ("orphan", Orphan())])
    errors = {e.plugin: e.error for e in reg.errors}
    assert errors["misspelt"] == (
        "ValueError: implements unknown hook 'register_widget'; did you mean 'register_widgets'?"
    )
    assert errors["orphan"].startswith("ValueError: implements unknown hook 'register_gizmos'")
    assert not {"misspelt", "orphan"} & {p.name for p in reg.plugins}
    assert list(reg.table("widgets")) == ["cog"]  # the declarer itself is fine


def test_a_table_is_filled_on_first_read_only_by_its_own_point():
    from llmforge import hookimpl
    from llmforge.plugins import load_registry

    calls: list[str] = []

    class Recorder:
        @hookimpl
        def register_readers(self, register):
            calls.append("register_readers")

        @hookimpl
        def register_stages(self, register):
            calls.append("register_stages")

    reg = load_registry(env="", extra=[("recorder", Recorder())])
    assert calls == []  # loading calls no registration hook
    assert "shell" in reg.table("stages")
    assert calls == ["register_stages"]  # reading the stages ran no reader registration
    reg.table("stages")
    assert calls == ["register_stages"]  # once per registry
    assert "jsonl" in reg.readers
    assert calls == ["register_stages", "register_readers"]


def test_extension_point_clashes_and_failures_are_the_declaring_plugins_errors():
    from llmforge import hookimpl
    from llmforge.extension import ExtensionPoint
    from llmforge.plugins import load_registry

    class Rival:  # declares `widgets` again, and a point with a core table's name
        @hookimpl
        def extension_points(self):
            return [
                _widgets_point(),
                ExtensionPoint(
                    hook="register_more_stages", table="stages", label="stage", doc="x", validate=lambda o: o
                ),
            ]

    class Crashing:
        @hookimpl
        def extension_points(self):
            raise RuntimeError("no points today")

    reg = load_registry(env="", extra=[("declarer", _Declarer()), ("rival", Rival()), ("crashing", Crashing())])
    errors = [(e.plugin, e.error) for e in reg.errors]
    assert ("rival", "extension point 'widgets' is already declared (hook register_widgets)") in errors
    assert ("rival", "extension point 'stages' is already declared (hook register_stages)") in errors
    assert ("crashing", "extension_points failed: RuntimeError: no points today") in errors
    assert list(reg.table("widgets")) == ["cog"]  # the first declaration wins
    assert "shell" in reg.stages
