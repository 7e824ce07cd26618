"""forge.toml validation: every kind of config error, through the real CLI and in-process.

Contract (design.md §2.9, §6): a bad config is one clear message naming the key path
(`stages[1].timeout: ...`), exit code 2, never a traceback (tracebacks only with --debug), and
every problem of a file reported in one go. `validate` and `run` load the config the same way,
so each error case is checked through both.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from llmforge.config import apply_overrides, parse_value
from llmforge.errors import ConfigError
from llmforge.pipeline import load_pipeline

OK_STAGE = """
[[stages]]
name = "first"
uses = "shell"
command = "true"
"""

HELLO = """
[project]
name = "hello-project"

[[stages]]
name = "hello"
uses = "shell"
command = "echo hi-$GREETING"
env = {GREETING = "one"}
"""

# id -> (forge.toml text or None for no file, extra CLI args, strings that stderr must contain)
CASES = {
    "unknown-key": (
        OK_STAGE
        + """
        [[stages]]
        name = "second"
        uses = "shell"
        comand = "echo hi"
        """,
        [],
        ["stages[1].comand: unknown key 'comand'; did you mean 'command'?"],
    ),
    "unknown-nested-key": (
        """
        [project]
        nme = "x"
        """
        + OK_STAGE,
        [],
        ["project.nme: unknown key 'nme'; did you mean 'name'?"],
    ),
    "unknown-section": (
        """
        [projcet]
        name = "x"
        """
        + OK_STAGE,
        [],
        ["projcet: unknown section 'projcet'; did you mean 'project'?"],
    ),
    "wrong-type": (
        OK_STAGE
        + """
        [[stages]]
        name = "second"
        uses = "shell"
        command = "true"
        timeout = "soon"
        """,
        [],
        ["stages[1].timeout: expected a number, got str 'soon'"],
    ),
    "out-of-range": (
        OK_STAGE
        + """
        [[stages]]
        name = "second"
        uses = "shell"
        command = "true"
        timeout = -1
        """,
        [],
        ["stages[1].timeout: must be > 0", "(got -1)"],
    ),
    "unknown-stage-kind": (
        OK_STAGE
        + """
        [[stages]]
        name = "second"
        uses = "shel"
        command = "true"
        """,
        [],
        ["stages[1].uses: unknown stage kind 'shel'; did you mean 'shell'?", "installed:", "copy"],
    ),
    "dangling-ref": (
        """
        [[stages]]
        name = "prep"
        uses = "shell"
        command = "true"

        [[stages]]
        name = "bundle"
        uses = "copy"
        sources = ["@prepp"]
        """,
        [],
        ["stages[1].sources[0]: '@prepp' refers to no stage; did you mean '@prep'?"],
    ),
    "cycle": (
        """
        [[stages]]
        name = "a"
        uses = "copy"
        sources = ["@b"]

        [[stages]]
        name = "b"
        uses = "copy"
        sources = ["@a"]
        """,
        [],
        ["stages: cycle in references: a -> b -> a"],
    ),
    "missing-input-file": (
        OK_STAGE
        + """
        [[stages]]
        name = "bundle"
        uses = "copy"
        sources = ["data/missing.txt"]
        """,
        [],
        ["stages[1].sources[0]: file not found:", "data/missing.txt"],
    ),
    "malformed-toml": (
        """
        [project]
        name = "p"

        [[stages]]
        name = "a"
        uses = "shell"
        command = = "echo"
        """,
        [],
        ["forge.toml:7:11: invalid TOML: Invalid value"],
    ),
    "missing-uses": (
        OK_STAGE
        + """
        [[stages]]
        name = "second"
        command = "true"
        """,
        [],
        ["stages[1].uses: required key is missing; installed stage kinds:", "shell"],
    ),
    "missing-required-option": (
        OK_STAGE
        + """
        [[stages]]
        name = "second"
        uses = "shell"
        """,
        [],
        ["stages[1].command: required key is missing"],
    ),
    "duplicate-stage-names": (
        OK_STAGE + OK_STAGE,
        [],
        ["stages[1].name: duplicate stage name 'first' (also stages[0])"],
    ),
    "missing-forge-toml": (None, [], ["forge.toml: file not found", "llmforge init"]),
    "set-unknown-stage": (
        HELLO,
        ["--set", "helo.command=x"],
        ["--set helo.command: no section or stage named 'helo'; did you mean 'hello'?"],
    ),
    "set-unknown-option": (
        HELLO,
        ["--set", "hello.comand=x"],
        ["stages[0].comand (from --set hello.comand): unknown key 'comand'; did you mean 'command'?"],
    ),
    "set-bad-value": (
        HELLO,
        ["--set", "hello.timeout=-5"],
        ["stages[0].timeout (from --set hello.timeout): must be > 0", "(got -5)"],
    ),
    "set-no-equals": (HELLO, ["--set", "hello.timeout"], ["--set hello.timeout: expected KEY=VALUE"]),
}


def validate_and_run(project, *args, **kw):
    """`llmforge validate ARGS` and `llmforge run ARGS`, side by side (2 cores, ~0.3 s each)."""
    with ThreadPoolExecutor(max_workers=2) as ex:
        return list(ex.map(lambda cmd: project.run(cmd, *args, **kw), ["validate", "run"]))


def assert_user_error(result, *needles):
    cmd = result.args[3]
    assert result.returncode == 2, (
        f"{cmd}: exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    assert "Traceback" not in result.stderr, f"{cmd}: traceback without --debug:\n{result.stderr}"
    assert result.stderr.startswith("error: "), result.stderr
    for needle in needles:
        assert needle in result.stderr, f"{cmd}: {needle!r} not in stderr:\n{result.stderr}"
    assert result.stdout == "", f"{cmd}: nothing should be printed on stdout:\n{result.stdout}"


@pytest.mark.parametrize("case", list(CASES))
def test_config_error_through_the_cli(case, project):
    text, args, needles = CASES[case]
    if text is not None:
        project.write(text)
    for result in validate_and_run(project, *args):
        assert_user_error(result, *needles)
    assert not project.runs.exists(), "a bad config must not start a run"


def test_unknown_nested_key_in_a_stage_option_table(project, plugin_site):
    """A nested options table (the probe plugin's `limits`) gets the full key path and a suggestion."""
    project.write("""
        [[stages]]
        name = "p"
        uses = "probe"

        [stages.limits]
        max_file = 3
    """)
    for result in validate_and_run(project, plugins=[plugin_site("probe-plugin")]):
        assert_user_error(result, "stages[0].limits.max_file: unknown key 'max_file'; did you mean 'max_files'?")


MANY_PROBLEMS = """
[project]
seed = -1
nme = "x"

[[stages]]
name = "a"
uses = "shell"
command = "true"
timeout = 0

[[stages]]
name = "b"
uses = "copy"
sources = ["@c"]
flatten = 3

[[stages]]
name = "a"
uses = "nope"
"""

MANY_WHERES = [
    "project.seed",
    "project.nme",
    "stages[0].timeout",
    "stages[1].flatten",
    "stages[2].name",
    "stages[2].uses",
]


def test_every_problem_is_reported_in_one_go(project):
    project.write(MANY_PROBLEMS)
    result = project.run("validate")
    assert_user_error(result, f"{len(MANY_WHERES)} problems found:", *[f"  {w}: " for w in MANY_WHERES])
    assert str(project.config) in result.stderr  # names the file


def test_validate_json_gives_problems_as_data(project):
    project.write(MANY_PROBLEMS)
    bad, valid_elsewhere = None, project.root / "ok"
    valid_elsewhere.mkdir()
    (valid_elsewhere / "forge.toml").write_text(HELLO)
    with ThreadPoolExecutor(max_workers=2) as ex:
        bad, good = ex.map(lambda cfg: project.run("validate", "--json", "-c", cfg), ["forge.toml", "ok/forge.toml"])
    assert bad.returncode == 2, bad.stderr
    assert "Traceback" not in bad.stderr
    data = json.loads(bad.stdout)
    assert data["valid"] is False
    assert [p["where"] for p in data["problems"]] == MANY_WHERES
    assert all(set(p) == {"where", "message"} and p["message"] for p in data["problems"])
    by_where = {p["where"]: p["message"] for p in data["problems"]}
    assert by_where["project.nme"] == "unknown key 'nme'; did you mean 'name'?"
    assert by_where["stages[2].name"] == "duplicate stage name 'a' (also stages[0])"

    assert good.returncode == 0, good.stderr
    data = json.loads(good.stdout)
    assert data["valid"] is True and data["stages"] == ["hello"]


def test_validate_json_reports_unreadable_files_as_data(project):
    project.write("[[stages]\nname = 1\n")
    result = project.run("validate", "--json")
    assert result.returncode == 2
    data = json.loads(result.stdout)
    assert data["valid"] is False
    (problem,) = data["problems"]
    assert problem["where"].endswith("forge.toml:1:9") and problem["message"].startswith("invalid TOML")


def test_set_overrides_change_validation(project):
    project.write(HELLO.replace('env = {GREETING = "one"}', 'env = {GREETING = "one"}\ntimeout = -1'))
    with ThreadPoolExecutor(max_workers=2) as ex:
        fixed, broken, seed = ex.map(
            lambda args: project.run("validate", *args),
            [
                ["--set", "hello.timeout=5"],  # an override replaces the bad value: valid
                ["--set", "hello.timeout=2", "--set", "hello.timeout=-3"],  # the last --set wins
                ["--set", "hello.timeout=5", "--set", "project.seed=-1"],  # a section key
            ],
        )
    assert fixed.returncode == 0, fixed.stderr
    assert "valid" in fixed.stdout
    assert_user_error(broken, "stages[0].timeout (from --set hello.timeout): must be > 0 (got -3)")
    assert_user_error(seed, "project.seed (from --set project.seed): must be >= 0 (got -1)")


def test_set_overrides_change_the_run(project):
    project.write(HELLO)
    result = project.run("run", "--set", "hello.env.GREETING=two", "--set", "project.seed=7")
    assert result.returncode == 0, result.stderr
    assert "hi-two" in result.stdout and "hi-one" not in result.stdout
    (run_dir,) = project.runs.iterdir()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config"]["stages"][0]["env"] == {"GREETING": "two"}
    assert manifest["config"]["project"]["seed"] == 7
    logs = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert any(e["type"] == "log" and e.get("message") == "hi-two" for e in logs)


def test_debug_shows_the_traceback(project):
    project.write(HELLO.replace('env = {GREETING = "one"}', "timeout = -1"))
    with ThreadPoolExecutor(max_workers=2) as ex:
        flag, env = ex.map(
            lambda kw: project.run(*kw["args"], env=kw.get("env")),
            [
                {"args": ["--debug", "validate"]},
                {"args": ["validate"], "env": {"LLMFORGE_DEBUG": "1"}},
            ],
        )
    for result in (flag, env):
        assert result.returncode == 2
        assert "Traceback (most recent call last)" in result.stderr
        assert "ConfigError" in result.stderr
        assert "stages[0].timeout: must be > 0" in result.stderr  # the message is still there


# ------------------------------------------------------------------------------------------------
# in-process (fast): more shapes of bad input, straight through load_pipeline


@pytest.fixture(scope="module")
def builtins():
    from llmforge.plugins import load_registry

    return load_registry(env="")


def problems(project, text: str, registry, overrides=()) -> dict[str, str]:
    project.write(text)
    with pytest.raises(ConfigError) as info:
        load_pipeline(project.config, list(overrides), registry=registry)
    assert info.value.exit_code == 2
    return {p.where: p.message for p in info.value.problems}


@pytest.mark.parametrize(
    "text, where, message",
    [
        ("project = 3\n" + OK_STAGE, "project", "expected a table [project], got int"),
        ('stages = "x"\n', "stages", "expected an array of tables ([[stages]])"),
        ("[project]\nname = 'x'\n", "stages", "no stages: add at least one [[stages]] table"),
        (
            '[[stages]]\nname = "model"\nuses = "shell"\ncommand = "x"\n',
            "stages[0].name",
            "'model' is reserved for a section; choose another",
        ),
        (
            '[[stages]]\nname = "2x"\nuses = "shell"\ncommand = "x"\n',
            "stages[0].name",
            "must be a word of letters, digits, '-' or '_' (got '2x')",
        ),
        ('[[stages]]\nuses = "shell"\ncommand = "x"\n', "stages[0].name", "required key is missing"),
        (
            '[model]\ndtype = "fp8"\n' + OK_STAGE,
            "model.dtype",
            "must be one of 'auto', 'float32', 'bfloat16' or 'float16' (got 'fp8')",
        ),
        ("[trackers.wandb]\nproject = 'x'\n" + OK_STAGE, "trackers.wandb", "unknown tracker 'wandb'"),
        (
            '[[stages]]\nname = "c"\nuses = "copy"\nsources = ["@c"]\n',
            "stages[0].sources[0]",
            "'@c': a stage cannot use its own output",
        ),
        (
            OK_STAGE + '[[stages]]\nname = "c"\nuses = "copy"\nsources = ["@first.model"]\n',
            "stages[1].sources[0]",
            "'@first.model': stage 'first' produces files, not 'model'",
        ),
        ('[[stages]]\nname = "c"\nuses = "copy"\nsources = []\n', "stages[0].sources", "must have at least 1"),
        (
            '[[stages]]\nname = "c"\nuses = "shell"\ncommand = "x"\nenv = {A = 1}\n',
            "stages[0].env.A",
            "expected a string, got int 1",
        ),
        ('[[stages]]\nname = "c"\nuses = "shell"\ncommand = "x"\nenv = 3\n', "stages[0].env", "expected a table"),
        (
            '[[stages]]\nname = "c"\nuses = "copy"\nsources = ["x"]\nflatten = 3\n',
            "stages[0].flatten",
            "expected true or false, got int 3",
        ),
        ("[[stages]]\n" + 'name = "a"\nuses = 5\n', "stages[0].uses", "unknown stage kind 5"),
    ],
)
def test_problem_shapes(project, builtins, text, where, message):
    found = problems(project, text, builtins)
    assert where in found, found
    assert message in found[where], found[where]


def test_problem_order_follows_the_file(project, builtins):
    found = problems(project, MANY_PROBLEMS, builtins)
    assert list(found) == MANY_WHERES


def test_a_valid_config_loads(project, builtins):
    project.write(HELLO + '\n[[stages]]\nname = "bundle"\nuses = "copy"\nsources = ["@hello", "forge.toml"]\n')
    pipe = load_pipeline(project.config, registry=builtins)
    assert pipe.names == ["hello", "bundle"]
    assert pipe.deps["bundle"] == {"hello"}
    assert pipe.config.name == "hello-project"


def test_file_order_is_kept_but_references_come_first(project, builtins):
    project.write("""
        [[stages]]
        name = "bundle"
        uses = "copy"
        sources = ["@make"]

        [[stages]]
        name = "make"
        uses = "shell"
        command = "true"
    """)
    assert load_pipeline(project.config, registry=builtins).names == ["make", "bundle"]


@pytest.mark.parametrize(
    "text, value",
    [
        ("1e-4", 1e-4),
        ("8", 8),
        ("true", True),
        ("[1, 2]", [1, 2]),
        ('"quoted"', "quoted"),
        ("echo hi there", "echo hi there"),
        ("{a = 1}", {"a": 1}),
    ],
)
def test_set_values_are_toml_or_bare_strings(text, value):
    assert parse_value(text) == value


def test_set_reaches_nested_tables_and_sections():
    raw = {"stages": [{"name": "sft", "uses": "x"}]}
    assert apply_overrides(raw, ["sft.lora.r=8", "project.seed=3", "model.path=/m"]) == []
    assert raw["stages"][0]["lora"] == {"r": 8}
    assert raw["project"] == {"seed": 3} and raw["model"] == {"path": "/m"}


def test_set_through_a_non_table_is_a_problem():
    raw = {"stages": [{"name": "sft", "uses": "x", "lr": 1}]}
    (problem,) = apply_overrides(raw, ["sft.lr.x=2"])
    assert problem.where == "--set sft.lr.x" and "'lr' is not a table" in problem.message


# ------------------------------------------------------------------------------------------------
# problems found while writing these tests, fixed in the core


def test_wrong_type_on_a_union_option_names_the_option(project, builtins):
    found = problems(project, '[[stages]]\nname = "a"\nuses = "shell"\ncommand = 5\n', builtins)
    assert set(found) == {"stages[0].command"}, found


def test_reference_to_an_invalid_stage_is_not_called_missing(project, builtins):
    found = problems(
        project,
        """
        [[stages]]
        name = "a"
        uses = "shell"
        command = "true"
        timeout = -1

        [[stages]]
        name = "b"
        uses = "copy"
        sources = ["@a"]
    """,
        builtins,
    )
    assert "stages[0].timeout" in found
    assert not any("refers to no stage" in m for m in found.values()), found


def test_set_with_a_stages_index_gets_a_useful_message():
    raw = {"stages": [{"name": "hello", "uses": "shell", "command": "x"}]}
    (problem,) = apply_overrides(raw, ["stages.0.command=y"])
    assert "did you mean 'stages'" not in problem.message
    assert "hello" in problem.message  # name the stage to use instead: hello.command=VALUE


def test_stage_check_problems_name_the_stage(project, plugin_site, monkeypatch):
    from llmforge.plugins import load_registry

    monkeypatch.syspath_prepend(str(plugin_site("probe-plugin")))
    registry = load_registry(env="probe-plugin")
    found = problems(project, OK_STAGE + '[[stages]]\nname = "p"\nuses = "probe"\ncount = 20\n', registry)
    (where,) = [w for w, m in found.items() if "exceeds limits.max_files" in m]
    assert where.startswith("stages[1]"), found
