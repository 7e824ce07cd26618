"""Bad inputs that once ended in a traceback, a wrong exit code or a misleading message (issue 13).

Each goes through the real CLI (`python -m llmforge ...` in a subprocess) and must exit 2 with one
message that names the file, key or value at fault, and no traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TWO_STAGES = """
[project]
name = "bad-inputs"

[[stages]]
name = "prepare"
uses = "shell"
command = "echo one"

[[stages]]
name = "greet"
uses = "shell"
command = "echo two"
"""


def user_error(res, *needles: str) -> str:
    """The command failed as a bad input should: exit 2, no traceback, every needle in stderr."""
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr
    for needle in needles:
        assert needle in res.stderr, (needle, res.stderr)
    return res.stderr


# ---- --set addressing a stage by index -------------------------------------------------------------


def test_set_by_stage_index_names_the_stage_to_use(project):
    project.write(TWO_STAGES)
    err = user_error(project.run("validate", "--set", "stages[1].timeout=1"),
                     "--set stages[1].timeout:", "stages[1] is 'greet'", "--set greet.timeout=1",
                     "(stages: prepare, greet)")
    assert "did you mean 'stages'" not in err
    user_error(project.run("validate", "--set", "stages[7].timeout=1"), "there is no stages[7]",
               "(stages: prepare, greet)")
    # the form the message suggests is accepted
    assert project.run("validate", "--set", "greet.timeout=1").returncode == 0


# ---- [project] runs_dir that is not a folder ---------------------------------------------------------


@pytest.mark.parametrize("command", ["validate", "run"])
def test_runs_dir_on_a_file_is_a_config_error(project, command):
    project.write(TWO_STAGES.replace('name = "bad-inputs"', 'name = "bad-inputs"\nruns_dir = "out/runs"'))
    (project.root / "out").write_text("not a folder\n")
    user_error(project.run(command), "project.runs_dir:", f"{project.root / 'out'} is a file")
    user_error(project.run(command, "--set", "project.runs_dir=out"),
               "project.runs_dir (from --set project.runs_dir):", f"{project.root / 'out'} is a file")
    assert (project.root / "out").read_text() == "not a folder\n"
