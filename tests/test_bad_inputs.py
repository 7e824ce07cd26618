"""Bad inputs that once ended in a traceback, a wrong exit code or a misleading message (issue 13).

Each goes through the real CLI (`python -m llmforge ...` in a subprocess) and must exit 2 with one
message that names the file, key or value at fault, and no traceback.
"""

from __future__ import annotations

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
    err = user_error(
        project.run("validate", "--set", "stages[1].timeout=1"),
        "--set stages[1].timeout:",
        "stages[1] is 'greet'",
        "--set greet.timeout=1",
        "(stages: prepare, greet)",
    )
    assert "did you mean 'stages'" not in err
    user_error(
        project.run("validate", "--set", "stages[7].timeout=1"), "there is no stages[7]", "(stages: prepare, greet)"
    )
    # the form the message suggests is accepted
    assert project.run("validate", "--set", "greet.timeout=1").returncode == 0


# ---- [project] runs_dir that is not a folder ---------------------------------------------------------


@pytest.mark.parametrize("command", ["validate", "run"])
def test_runs_dir_on_a_file_is_a_config_error(project, command):
    project.write(TWO_STAGES.replace('name = "bad-inputs"', 'name = "bad-inputs"\nruns_dir = "out/runs"'))
    (project.root / "out").write_text("not a folder\n")
    user_error(project.run(command), "project.runs_dir:", f"{project.root / 'out'} is a file")
    user_error(
        project.run(command, "--set", "project.runs_dir=out"),
        "project.runs_dir (from --set project.runs_dir):",
        f"{project.root / 'out'} is a file",
    )
    assert (project.root / "out").read_text() == "not a folder\n"


# ---- --model of the data commands: one loader, errors that name the value ---------------------------

DATA_COMMANDS = ("inspect", "lint", "stats")


def data_project(project):
    project.write('{"text": "hello world"}\n', name="t.jsonl")
    return project


def test_missing_model_folder_is_missing_not_a_hub_id(project):
    data_project(project)
    (project.root / "models").mkdir()
    for command in DATA_COMMANDS:
        err = user_error(
            project.run("data", command, "t.jsonl", "--model", "models/no_such_dir"),
            f"models/no_such_dir: no such folder ({project.root / 'models' / 'no_such_dir'})",
        )
        assert "Repo id" not in err and "Hugging Face" not in err and "huggingface.co" not in err, err


@pytest.mark.slow
def test_hub_id_out_of_reach_is_said_naming_the_value(project, tmp_path_factory):
    data_project(project)
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path_factory.mktemp("hf-home"))}
    for value in ("some-org/some-model", "gpt2"):
        user_error(
            project.run("data", "inspect", "t.jsonl", "--model", value, env=env),
            f"--model {value}: no such folder ({project.root / value})",
            "as a Hugging Face Hub model id it is not in the local cache",
            "HF_HUB_OFFLINE is set",
        )


@pytest.mark.slow
def test_folder_that_holds_no_tokenizer_is_named_by_every_data_command(project):
    data_project(project)
    (project.root / "notes").mkdir()
    (project.root / "notes" / "readme.txt").write_text("not a model\n")
    broken = project.root / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab"')
    for command in DATA_COMMANDS:
        err = user_error(
            project.run("data", command, "t.jsonl", "--model", "notes"),
            f"notes: {project.root / 'notes'} is not a model or tokenizer folder",
        )
        assert "Couldn't instantiate" not in err, err
        user_error(
            project.run("data", command, "t.jsonl", "--model", "broken"),
            f"broken: cannot load the tokenizer in {broken}: {broken / 'tokenizer.json'}: not valid JSON",
        )


def test_data_commands_still_load_a_real_tokenizer_folder(project, tokenizer_dir):
    data_project(project)
    for command in DATA_COMMANDS:
        extra = ["--template", "chatml"] if command == "lint" else []  # lint checks a chat template's round trip
        res = project.run("data", command, "t.jsonl", "--model", str(tokenizer_dir), *extra, "--json")
        assert res.returncode == 0, (command, res.stderr)


# ---- [backend] main_process_ip goes into shell scripts: an address only ------------------------------


def test_main_process_ip_that_is_no_address_is_refused(project):
    project.write(TWO_STAGES)
    user_error(
        project.run("validate", "--set", 'backend.main_process_ip="10.0.0.1$(touch pwned)"'),
        "backend.main_process_ip (from --set backend.main_process_ip): must be an IP address or a host name",
    )
    assert not (project.root / "pwned").exists()
    for ok in ("10.0.0.1", "fe80::1", "node-01.cluster.local"):
        assert project.run("validate", "--set", f'backend.main_process_ip="{ok}"').returncode == 0
