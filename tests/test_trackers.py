"""The built-in trackers (plugins/trackers.py): what a run writes is read back with the real readers,
TensorBoard's EventAccumulator and MLflow's client, and compared value by value.

The round trips need the `trackers` extra (tensorboard, mlflow-skinny, and SQLAlchemy + alembic for
MLflow's SQLite store); they are skipped without it. Configuration errors are checked always.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field

from llmforge import hookimpl
from llmforge.errors import ConfigError
from llmforge.pipeline import load_pipeline
from llmforge.plugins import load_registry
from llmforge.runner import RunRequest, run_pipeline
from llmforge.stage import Stage, StageOptions

# MLflow 3.17's SQL store uses a loader SQLAlchemy 2.1 deprecates: their business, not this test's.
pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")


def need(*modules: str) -> None:
    for m in modules:
        pytest.importorskip(m, reason=f"the trackers extra is not installed ({m} missing)")


def need_tensorboard() -> None:
    need("tensorboard")


def need_mlflow() -> None:
    need("mlflow", "sqlalchemy", "alembic")


# Values a float32 holds exactly: TensorBoard stores scalars as float32, so equality is exact.
def loss_at(step: int) -> float:
    return 2.0 - 0.25 * step


def lr_at(step: int) -> float:
    return 0.5**step


class EmitOptions(StageOptions):
    steps: int = Field(4, ge=1)
    fail_after: int | None = Field(None, description="raise after this many steps, unless resumed")


class EmitMetrics(Stage):
    """A stand-in for a training loop: one metric event per step, a checkpoint of the step count in
    its work folder, a warning, and optionally a crash half-way (to exercise failure and resume)."""

    kind = "emit-metrics"
    summary = "test stage"
    Options = EmitOptions

    def run(self, options, ctx):
        saved = ctx.work_dir / "steps_done"
        start = int(saved.read_text()) if ctx.resume and saved.exists() else 0
        if start == 0:
            ctx.log("warming up without a scheduler", level="warning")
        ctx.log("an info line the default settings keep out of TensorBoard")
        for step in range(start, options.steps):
            ctx.metric(step=step, loss=loss_at(step), lr=lr_at(step), note="not a number")
            saved.write_text(str(step + 1))
            if options.fail_after == step + 1 and not ctx.resume:
                raise RuntimeError("simulated crash")


class EmitPlugin:
    @hookimpl
    def register_stages(self, register):
        register(EmitMetrics)


def write_config(root: Path, trackers: str, stages: str) -> Path:
    path = root / "forge.toml"
    path.write_text('[project]\nname = "tracked"\n\n' + trackers.strip() + "\n\n" + stages.strip() + "\n")
    return path


TWO_STAGES = """
[[stages]]
name = "train"
uses = "emit-metrics"
steps = 4

[[stages]]
name = "eval"
uses = "emit-metrics"
steps = 2
"""


def run(path: Path, **request):
    registry = load_registry(extra=[("emit-plugin", EmitPlugin())])
    pipe = load_pipeline(path, registry=registry)
    return run_pipeline(pipe, RunRequest(**request), registry=registry)


def accumulator(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list(log_dir.glob("events.out.tfevents.*")), f"no event file in {log_dir}"
    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})  # 0 = keep everything
    ea.Reload()
    return ea


def scalars(ea, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def texts(ea, tag: str) -> list[str]:
    from tensorboard.util import tensor_util

    return [tensor_util.make_ndarray(e.tensor_proto).item().decode() for e in ea.Tensors(tag)]


def mlflow_runs(uri: str, experiment: str) -> tuple[object, list]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {uri}"
    return client, client.search_runs([exp.experiment_id])


def history(client, run, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def warnings_in(run_dir: Path) -> list[str]:
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return [e["message"] for e in events if e["type"] == "log" and "disabled" in e.get("message", "")]


@pytest.fixture(autouse=True)
def _no_ambient_mlflow(monkeypatch):
    # A developer's own MLFLOW_TRACKING_URI must not receive test runs (and would change defaults).
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


# ----------------------------------------------------------------------------------------------
# round trips


def test_metrics_reach_tensorboard_and_mlflow_with_their_steps(tmp_path):
    need_tensorboard()
    need_mlflow()
    path = write_config(tmp_path, "[trackers]\ntensorboard = true\n\n[trackers.mlflow]\n", TWO_STAGES)
    res = run(path)
    assert res.status == "done" and res.exit_code == 0
    assert warnings_in(res.run_dir) == [], "no tracker was disabled"

    # TensorBoard: defaults put the event files inside the run.
    ea = accumulator(res.run_dir / "tensorboard")
    assert scalars(ea, "train/loss") == [(s, loss_at(s)) for s in range(4)]
    assert scalars(ea, "train/lr") == [(s, lr_at(s)) for s in range(4)]
    assert scalars(ea, "eval/loss") == [(s, loss_at(s)) for s in range(2)]
    assert "train/note" not in ea.Tags()["scalars"], "a string value is not a scalar"
    ((step, duration),) = scalars(ea, "train/duration_s")
    assert step == 0 and duration == pytest.approx(res.stages["train"]["duration"], rel=1e-6, abs=1e-6)
    # Text: the warnings (not the info line), the config as given, and the outcome.
    assert texts(ea, "train/logs") == ["**warning**: warming up without a scheduler"]
    config_text = texts(ea, "config")[0]
    assert '"tensorboard": true' in config_text and config_text.startswith("```")
    assert texts(ea, "logs") == [f"run {res.run_id} done (exit code 0)"]

    # MLflow: defaults are a SQLite store in the project and an experiment named after it.
    assert (tmp_path / "mlflow.db").is_file()
    client, runs = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "tracked")
    assert len(runs) == 1
    (mrun,) = runs
    assert mrun.info.run_name == res.run_id and mrun.info.status == "FINISHED"
    assert history(client, mrun, "train.loss") == [(s, loss_at(s)) for s in range(4)]
    assert history(client, mrun, "train.lr") == [(s, lr_at(s)) for s in range(4)]
    assert history(client, mrun, "eval.loss") == [(s, loss_at(s)) for s in range(2)]
    assert mrun.data.metrics["eval.duration_s"] == pytest.approx(res.stages["eval"]["duration"], abs=1e-9)
    assert "train.note" not in mrun.data.metrics
    params = mrun.data.params
    assert params["train.uses"] == "emit-metrics" and params["train.steps"] == "4"
    assert params["train.fail_after"] == "null", "defaults are logged too"
    assert params["project.name"] == "tracked" and params["project.seed"] == "42"
    tags = mrun.data.tags
    assert tags["llmforge.run_id"] == res.run_id and tags["llmforge.status"] == "done"
    assert tags["llmforge.exit_code"] == "0"
    assert tags["llmforge.stage.train"] == "done" and tags["llmforge.stage.eval"] == "done"

    # A second run of the project is a second MLflow run in the same experiment.
    res2 = run(path, force=True)
    _, runs = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "tracked")
    assert sorted(r.info.run_name for r in runs) == sorted([res.run_id, res2.run_id])


def test_failed_run_is_recorded_and_resume_continues_the_same_runs(tmp_path):
    need_tensorboard()
    need_mlflow()
    path = write_config(
        tmp_path,
        "[trackers]\ntensorboard = true\nmlflow = true\n",
        """
[[stages]]
name = "train"
uses = "emit-metrics"
steps = 5
fail_after = 2
""",
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = run(path)
    assert first.status == "failed" and first.exit_code == 1
    client, (mrun,) = mlflow_runs(uri, "tracked")
    assert mrun.info.status == "FAILED"
    assert mrun.data.tags["llmforge.status"] == "failed" and mrun.data.tags["llmforge.stage.train"] == "failed"
    assert history(client, mrun, "train.loss") == [(0, loss_at(0)), (1, loss_at(1))]
    ea = accumulator(first.run_dir / "tensorboard")
    assert texts(ea, "train/logs")[-1].startswith("**stage train failed**: RuntimeError: simulated crash")

    second = run(path, resume=True)
    assert second.status == "done" and second.run_id == first.run_id
    client, runs = mlflow_runs(uri, "tracked")
    assert len(runs) == 1, "a resumed llmforge run continues its MLflow run"
    (mrun,) = runs
    assert mrun.info.status == "FINISHED" and mrun.data.tags["llmforge.status"] == "done"
    assert history(client, mrun, "train.loss") == [(s, loss_at(s)) for s in range(5)]
    # TensorBoard reads both event files of the run folder as one run.
    ea = accumulator(first.run_dir / "tensorboard")
    assert len(list((first.run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert scalars(ea, "train/loss") == [(s, loss_at(s)) for s in range(5)]


def test_cli_run_with_options_relative_to_forge_toml(project, cli, tmp_path):
    need_tensorboard()
    need_mlflow()
    project.write("""
        [project]
        name = "cli-project"

        [trackers.tensorboard]
        log_dir = "tb"
        logs = "all"

        [trackers.mlflow]
        tracking_uri = "sqlite:///store/tracking.db"
        experiment = "my-experiment"
        tags = { team = "nlp" }

        [[stages]]
        name = "hello"
        uses = "shell"
        command = "echo hello from the stage"
    """)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = cli("run", "-c", str(project.config), cwd=elsewhere)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "could not start" not in res.stderr and "INFO mlflow" not in res.stderr
    (run_dir,) = [d for d in project.runs.iterdir() if d.is_dir()]

    # log_dir is relative to forge.toml, with one folder per run inside it.
    ea = accumulator(project.root / "tb" / run_dir.name)
    assert [s for s, _ in scalars(ea, "hello/duration_s")] == [0]
    assert "**stage" not in " ".join(texts(ea, "hello/logs"))
    assert "hello from the stage" in texts(ea, "hello/logs"), "logs = 'all' keeps info lines"
    assert not list(elsewhere.iterdir()), "nothing is written to the current directory"

    client, (mrun,) = mlflow_runs(f"sqlite:///{project.root / 'store' / 'tracking.db'}", "my-experiment")
    assert mrun.info.run_name == run_dir.name and mrun.info.status == "FINISHED"
    assert mrun.data.tags["team"] == "nlp"
    assert mrun.data.params["hello.command"] == "echo hello from the stage"
    assert mrun.data.params["hello.env"] == "{}"


def test_long_and_nested_options_become_bounded_params(tmp_path):
    from llmforge_plugins.trackers import config_params

    path = tmp_path / "forge.toml"
    path.write_text(f"""
[[stages]]
name = "s"
uses = "shell"
command = "echo {"x" * 2000}"
env = {{ A = "1", "B C" = "2" }}
""")
    cfg = load_pipeline(path, registry=load_registry()).config
    params = config_params(cfg)
    assert len(params["s.command"]) == 500 and params["s.command"].endswith("...")
    assert params["s.env.A"] == "1" and params["s.env.B C"] == "2"
    assert params["s.uses"] == "shell" and params["s.timeout"] == "null"


# ----------------------------------------------------------------------------------------------
# never stop training


def test_a_tracker_that_cannot_start_does_not_stop_the_run(tmp_path, capsys):
    need_tensorboard()
    need_mlflow()
    (tmp_path / "store.db").mkdir()  # a folder where the SQLite file should be: MLflow cannot open it
    path = write_config(
        tmp_path,
        """
[trackers]
tensorboard = true

[trackers.mlflow]
tracking_uri = "sqlite:///store.db"
""",
        TWO_STAGES,
    )
    res = run(path)
    assert res.status == "done"
    # The runner reports it as a warning event (older runners printed it on stderr).
    logged = [
        e["message"]
        for e in map(json.loads, (res.run_dir / "events.jsonl").read_text().splitlines())
        if e["type"] == "log"
    ]
    said = "\n".join(logged) + capsys.readouterr().err
    assert "tracker mlflow could not start and is disabled" in said and "cannot open the MLflow database" in said
    ea = accumulator(res.run_dir / "tensorboard")  # the other tracker is unaffected
    assert scalars(ea, "eval/loss") == [(s, loss_at(s)) for s in range(2)]


def test_close_is_idempotent_and_events_after_close_are_ignored(tmp_path):
    need_tensorboard()
    need_mlflow()
    from llmforge_plugins.trackers import MlflowOptions, MlflowTracker, TensorBoardOptions, TensorBoardTracker

    path = write_config(tmp_path, "", TWO_STAGES)
    cfg = load_pipeline(path, registry=load_registry(extra=[("emit-plugin", EmitPlugin())])).config
    run_dir = tmp_path / "runs" / "manual"
    run_dir.mkdir(parents=True)
    (run_dir / "manifest.json").write_text(json.dumps({"status": "stopped"}))
    tb = TensorBoardTracker(TensorBoardOptions(), run_dir, cfg)
    ml = MlflowTracker(MlflowOptions(), run_dir, cfg)
    for tracker in (tb, ml):
        tracker.on_event(
            {"type": "metric", "time": 1.0, "run": "manual", "stage": "train", "step": None, "values": {"loss": 3.0}}
        )
        tracker.on_event({"type": "metric", "time": 2.0, "run": "manual", "stage": "train", "values": {"loss": 2.5}})
        tracker.close()
        tracker.close()
        tracker.on_event(
            {"type": "metric", "time": 3.0, "run": "manual", "stage": "train", "step": 9, "values": {"loss": 1.0}}
        )
        tracker.close()
    # Steps missing from the events are counted per stage; nothing after close() was written.
    assert scalars(accumulator(run_dir / "tensorboard"), "train/loss") == [(0, 3.0), (1, 2.5)]
    client, (mrun,) = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "tracked")
    assert history(client, mrun, "train.loss") == [(0, 3.0), (1, 2.5)]
    # No run_end was seen: close() took the outcome from the run's manifest.
    assert mrun.info.status == "KILLED"


# ----------------------------------------------------------------------------------------------
# configuration errors (no tracker library needed)


def test_unknown_tracker_name_is_a_config_error_with_a_suggestion(project):
    project.write("""
        [trackers]
        tensorbord = true

        [[stages]]
        name = "hello"
        uses = "shell"
        command = "true"
    """)
    res = project.run("validate")
    assert res.returncode == 2, res.stdout + res.stderr
    out = res.stdout + res.stderr
    assert "trackers.tensorbord: unknown tracker 'tensorbord'; did you mean 'tensorboard'?" in out
    assert "mlflow" in out and "Traceback" not in out


def test_bad_tracker_options_name_their_key_path(project):
    project.write("""
        [trackers.tensorboard]
        log_dir = 3
        flush_secs = 0
        logs = "some"

        [trackers.mlflow]
        experimnt = "x"

        [[stages]]
        name = "hello"
        uses = "shell"
        command = "true"
    """)
    res = project.run("run")
    assert res.returncode == 2, res.stdout + res.stderr
    out = res.stdout + res.stderr
    assert "trackers.tensorboard.log_dir: expected a string" in out
    assert "trackers.tensorboard.flush_secs: must be > 0 (got 0)" in out
    assert "trackers.tensorboard.logs:" in out and "'warnings'" in out
    assert "trackers.mlflow.experimnt: unknown key 'experimnt'; did you mean 'experiment'?" in out
    assert not project.runs.exists(), "nothing ran"


@pytest.mark.parametrize(
    "tracker, module",
    [
        ("tensorboard = true", "tensorboard"),
        ("mlflow = true", "mlflow"),
        ("mlflow = true", "sqlalchemy"),  # the default SQLite store needs SQLAlchemy
    ],
)
def test_missing_tracker_library_is_reported_at_validation(tmp_path, monkeypatch, tracker, module):
    # None in sys.modules is how Python itself marks a module as unimportable: find_spec() then
    # answers None and `import` raises ImportError, as when the package is not installed.
    monkeypatch.setitem(sys.modules, module, None)
    path = write_config(tmp_path, f"[trackers]\n{tracker}\n", TWO_STAGES)
    with pytest.raises(ConfigError) as info:
        load_pipeline(path, registry=load_registry(extra=[("emit-plugin", EmitPlugin())]))
    (problem,) = info.value.problems
    name = tracker.split()[0]
    assert problem.where == f"trackers.{name}"
    assert module in problem.message and "pip install" in problem.message


def test_mlflow_uri_resolution(tmp_path, monkeypatch):
    from llmforge_plugins.trackers import tracking_uri

    root = tmp_path.resolve()
    assert tracking_uri(None, root) == f"sqlite:///{root}/mlflow.db"
    assert tracking_uri("sqlite:///sub/x.db", root) == f"sqlite:///{root}/sub/x.db"
    assert tracking_uri("sqlite:////abs/x.db", root) == "sqlite:////abs/x.db"
    assert tracking_uri("mlruns", root) == (root / "mlruns").as_uri()
    assert tracking_uri("file:mlruns", root) == (root / "mlruns").as_uri()
    assert tracking_uri("http://localhost:5000", root) == "http://localhost:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking_uri(None, root) == "http://tracking:5000", "MLflow's own variable is honoured"
    assert tracking_uri("sqlite:///x.db", root) == f"sqlite:///{root}/x.db", "the option wins over it"


def test_startup_imports_no_tracker_library():
    # The plugin module is imported at every start-up; its libraries only when a run uses them.
    # `llmforge --help` runs inside a fresh interpreter, which then lists what it imported.
    code = (
        "import json, runpy, sys\n"
        "sys.argv = ['llmforge', '--help']\n"
        "try:\n    runpy.run_module('llmforge', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    modules = set(json.loads(res.stdout.strip().splitlines()[-1]))
    assert "llmforge_plugins.hooks.trackers" in modules, "the measurement sees the trackers plugin"
    top = {m.split(".")[0] for m in modules}
    assert not top & {"tensorboard", "mlflow", "torch", "sqlalchemy"}, top & {"tensorboard", "mlflow", "torch"}
