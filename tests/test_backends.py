"""Backends on CPU: a tiny SFT under `accelerate` on 2 real gloo processes follows the 1-process loss curve
(same global batch), stops at the same step on every rank and resumes in one process; two "nodes" of one
process each on localhost complete a run; and the generated files (accelerate YAML, DeepSpeed JSON, node
scripts, Slurm file) are what accelerate, DeepSpeed and bash accept. `[backend]` errors name their key. (A killed
rank is tested in test_watchdog.py, together with the watchdog: it kills the rank the watchdog caught hanging.)

Everything runs for real: `llmforge run` in a subprocess, accelerate launch / torchrun, the HF Trainer.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Project, _env
from training_data import write_data

FORGE = """
[backend]
type = "accelerate"
num_processes = 2
main_process_port = {port}

[[stages]]
name = "sft"
uses = "sft"
model = "{base}"
data = {{ path = "data/chat.jsonl" }}
max_steps = {steps}
max_length = 128
micro_batch_size = 4
learning_rate = 2e-3
log_every = 1
precision = "fp32"
"""

LOCAL = ["--set", "backend.type=local", "--set", "backend.num_processes=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_base(root: Path) -> Path:
    """A real tiny Llama (hidden 32, 2 layers) with a BPE tokenizer trained on the test corpus, saved
    as a model folder the way a training stage saves one."""
    from transformers import LlamaForCausalLM

    from llmforge.chat import resolve_template
    from llmforge.plugins import load_registry
    from llmforge_plugins.training import models

    write_data(root)
    template = resolve_template("chatml", load_registry(env="").chat_templates)
    texts = [t for t in (root / "data" / "corpus.txt").read_text().split("\n\n") if t.strip()]
    tok = models.train_tokenizer(texts, 400, template)
    cfg = models.model_config("tiny", len(tok), 128, {"hidden_size": 32, "intermediate_size": 64}, tok)
    models.set_seed(0)
    model = LlamaForCausalLM(cfg)
    models.prepare_tokenizer(model, tok, template)
    out = root / "base"
    models.save_model_dir(model, tok, out, template)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("base"))


def project_with(root: Path, base: Path, steps: int, port: int | None = None) -> Project:
    project = Project(root)
    write_data(root)
    project.write(FORGE.format(port=port or free_port(), base=base, steps=steps))
    return project


def events_of(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines() if x.strip()]


def losses(events: list[dict]) -> dict[int, float]:
    return {e["step"]: e["values"]["loss"] for e in events if e["type"] == "metric" and "loss" in e["values"]}


def the_run(project: Project) -> Path:
    (run_dir,) = project.runs.glob("2*")
    return run_dir


def start(project: Project, *args: str) -> subprocess.Popen:
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "llmforge", "run", *args],
        cwd=project.root,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = predicate()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# ------------------------------------------------------------------------------------------------
# multi-process runs


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_processes_follow_one_process_stop_together_and_resume_in_one(base, tmp_path):
    # Steps of this tiny model take a few hundredths of a second and the stop file is seen a moment after it
    # is written (events reach the file, then the file poll): with 30 steps a CI run once saw the stop land
    # at step 29, leaving one step to show that training went on. 80 steps keep a tail after a late stop.
    steps = 80
    ref = project_with(tmp_path / "ref", base, steps)
    res = ref.run("run", *LOCAL, "--set", "sft.gradient_accumulation=2", timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    reference = losses(events_of(the_run(ref)))
    assert sorted(reference) == list(range(1, steps + 1))

    # The same global batch (4 per process x 2 processes, no accumulation), stopped mid-way.
    project = project_with(tmp_path / "multi", base, steps)
    proc = start(project)
    run_dir = wait_for(lambda: next(project.runs.glob("2*"), None) if project.runs.exists() else None, 60, "the run")
    wait_for(
        lambda: (run_dir / "events.jsonl").exists() and max(losses(events_of(run_dir)), default=0) >= 4, 240, "step 4"
    )
    (run_dir / "stop.request").write_text("")  # what `llmforge stop` writes
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:] + err[-3000:]

    stage_dir = run_dir / "stages" / "sft"
    # two processes really ran, one per rank, each with its own log
    for rank in (0, 1):
        log = (stage_dir / "logs" / f"rank-{rank}.log").read_text()
        assert f"rank {rank} of 2" in log
        record = json.loads((stage_dir / "launch" / "ranks" / f"rank-{rank}.json").read_text())
        assert record["state"] == "done" and record["rank"] == rank
    multi = losses(events_of(run_dir))
    stopped_at = max(multi)
    assert 4 <= stopped_at < steps
    for step, loss in multi.items():
        assert loss == pytest.approx(reference[step], rel=1e-3, abs=1e-4), (step, loss, reference[step])
    # every rank saved its part and stopped at the same step: one complete checkpoint, both RNG states
    (ckpt,) = (stage_dir / "work" / "checkpoints").glob("checkpoint-*")
    assert ckpt.name == f"checkpoint-{stopped_at}"
    assert json.loads((ckpt / "llmforge-complete").read_text())["world_size"] == 2
    assert (ckpt / "rng_state_0.pth").exists() and (ckpt / "rng_state_1.pth").exists()

    # The 2-process checkpoint resumes in one process (only [backend] changes: the stage's key is the same).
    res = project.run("run", "--resume", *LOCAL, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    events = events_of(run_dir)
    messages = [e["message"] for e in events if e["type"] == "log"]
    assert f"resuming from checkpoint-{stopped_at}" in messages
    assert any(m.startswith(f"checkpoint-{stopped_at} was written by 2 process(es), this run has 1") for m in messages)
    after = {s: v for s, v in losses(events).items() if s > stopped_at}
    assert sorted(after) == list(range(stopped_at + 1, steps + 1))
    # it continued the trained model (not a fresh start) and went on learning
    assert after[stopped_at + 1] < reference[1] - 0.3
    assert after[steps] < after[stopped_at + 1]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["sft"]["status"] == "done"
    assert (Path(manifest["stages"]["sft"]["artifacts"]["model"]["path"]) / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_nodes_of_one_process_each_complete_a_run(base, tmp_path):
    project = project_with(tmp_path, base, steps=6)
    proc = start(project, "--set", "backend.num_nodes=2", "--set", "backend.num_processes=1")
    script = wait_for(
        lambda: next(project.runs.glob("*/stages/sft/launch-node-1.sh"), None) if project.runs.exists() else None,
        60,
        "launch-node-1.sh",
    )
    assert "--machine_rank 1" in script.read_text()
    # "node 1": the script llmforge wrote, started on its own, as a user would on the second machine
    node1 = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=240, env=_env())
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert node1.returncode == 0, node1.stdout[-2000:] + node1.stderr[-2000:]
    stage_dir = script.parent
    records = {r: json.loads((stage_dir / "launch" / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)}
    assert [(records[r]["node"], records[r]["state"]) for r in (0, 1)] == [(0, "done"), (1, "done")]
    manifest = json.loads((the_run(project) / "manifest.json").read_text())
    assert manifest["stages"]["sft"]["status"] == "done"
    assert sorted(losses(events_of(the_run(project)))) == list(range(1, 7))


# ------------------------------------------------------------------------------------------------
# generated files, without launching


def _prepared(tmp_path: Path, base: Path, backend: dict, nodes: int = 1):
    """Run a backend's prepare() for an sft stage of a real (validated) project, as a launch would."""
    from llmforge.backend import build_backend
    from llmforge.pipeline import load_pipeline
    from llmforge.plugins import load_registry
    from llmforge.stage import StageContext
    from llmforge_plugins.backends.files import Launch

    write_data(tmp_path)
    table = "\n".join(f"{k} = {json.dumps(v)}" for k, v in backend.items() if not isinstance(v, dict))
    subs = "\n".join(
        f"[backend.{k}]\n" + "\n".join(f"{a} = {json.dumps(b)}" for a, b in v.items())
        for k, v in backend.items()
        if isinstance(v, dict)
    )
    body = FORGE.split("[[stages]]")[1].format(base=base, steps=4)
    (tmp_path / "forge.toml").write_text(f"[backend]\n{table}\nnum_nodes = {nodes}\n{subs}\n\n[[stages]]{body}")
    registry = load_registry(env="")
    pipe = load_pipeline(tmp_path / "forge.toml", registry=registry)
    spec = pipe.stages[0]
    backend_obj = build_backend(pipe.config, registry)
    stage_dir = tmp_path / "runs" / "r1" / "stages" / "sft"
    stage_dir.mkdir(parents=True)
    logs: list[str] = []
    ctx = StageContext(
        stage_name="sft",
        run_id="r1",
        run_dir=stage_dir.parent.parent,
        stage_dir=stage_dir,
        inputs={},
        emit=lambda t, **d: logs.append(d.get("message", "")),
        stop_check=lambda: False,
        checkpoint_check=lambda: False,
        project_dir=tmp_path,
        backend=backend_obj,
    )
    assert backend_obj.handles(spec.cls(), spec.options)
    files = backend_obj.prepare(spec.cls(), spec.options, ctx, Launch(stage_dir))
    return backend_obj, stage_dir, files


@pytest.mark.parametrize(
    "strategy,version,reshard",
    [("FULL_SHARD", 2, True), ("SHARD_GRAD_OP", 2, False), ("HYBRID_SHARD", 1, "HYBRID_SHARD")],
)
def test_accelerate_yaml_is_read_by_accelerate_with_the_fsdp_settings(tmp_path, base, strategy, version, reshard):
    from accelerate.commands.config.config_args import load_config_from_file

    _, stage_dir, files = _prepared(
        tmp_path,
        base,
        {
            "type": "accelerate",
            "num_processes": 2,
            "main_process_port": 29555,
            "fsdp": {
                "enabled": True,
                "sharding_strategy": strategy,
                "cpu_offload": True,
                "activation_checkpointing": True,
            },
        },
        nodes=2,
    )
    config = load_config_from_file(str(stage_dir / "accelerate.yaml"))
    assert config.distributed_type.value == "FSDP"
    assert (config.num_processes, config.num_machines) == (4, 2)  # all machines together
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == version and fsdp["fsdp_reshard_after_forward"] == reshard
    assert fsdp["fsdp_offload_params"] is True and fsdp["fsdp_activation_checkpointing"] is True
    # auto-wrap without a class list: accelerate wraps the model's own decoder layers (_no_split_modules)
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp
    assert [p.name for p in files] == ["accelerate.yaml", "launch-node-0.sh", "launch-node-1.sh", "slurm.sbatch"]


def test_node_scripts_and_slurm_file(tmp_path, base):
    backend, stage_dir, _ = _prepared(
        tmp_path,
        base,
        {
            "type": "accelerate",
            "num_processes": 2,
            "main_process_ip": "10.0.0.5",
            "main_process_port": 29556,
            "launcher": "torchrun",
            "fsdp": {"enabled": True},
        },
        nodes=2,
    )
    for node in (0, 1):
        script = stage_dir / f"launch-node-{node}.sh"
        assert os.access(script, os.X_OK)
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        text = script.read_text()
        assert "-m torch.distributed.run" in text and "--nnodes 2" in text and f"--node-rank {node}" in text
        assert "--nproc-per-node 2" in text and "-m llmforge_plugins.backends.worker" in text
        assert "MAIN_PROCESS_IP=10.0.0.5\n" in text
        assert 'MAIN_PROCESS_IP="${LLMFORGE_MAIN_PROCESS_IP:-$MAIN_PROCESS_IP}"' in text
        # under torchrun, the FSDP settings travel as the environment accelerate launch would set
        assert "export ACCELERATE_USE_FSDP=true" in text and "export FSDP_VERSION=2" in text
    sbatch = (stage_dir / "slurm.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(stage_dir / "slurm.sbatch")]).returncode == 0
    assert "#SBATCH --nodes=2" in sbatch and "#SBATCH --ntasks-per-node=1" in sbatch
    assert "launch-node-$SLURM_NODEID.sh" in sbatch and "scontrol show hostnames" in sbatch
    spec = json.loads((stage_dir / "launch" / "stage.json").read_text())
    assert spec["stage_class"] == "llmforge_plugins.sft:SftStage" and spec["world_size"] == 4
    assert spec["options"]["micro_batch_size"] == 4


def test_scripts_pass_a_run_folder_with_a_space_and_quotes_intact(tmp_path, base):
    """Node scripts and the Slurm file carry paths with spaces and quotes through bash (and sbatch) intact,
    and the configured address reaches the launcher as written, overridable by the environment."""
    import shlex
    import stat

    root = tmp_path / 'my "team\'s" $HOME `x` proj'
    root.mkdir()
    backend, stage_dir, _ = _prepared(
        root,
        base,
        {"type": "accelerate", "num_processes": 2, "main_process_ip": "fe80::1", "main_process_port": 29558},
        nodes=2,
    )
    script = stage_dir / "launch-node-1.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # the script with its launcher replaced by printing its arguments, one per line
    text = script.read_text()
    assert text.count("\nexec ") == 1
    probe = text.replace("\nexec ", "\nprintf '%s\\n' \"$PWD\" ", 1)
    env = {k: v for k, v in os.environ.items() if k != "LLMFORGE_MAIN_PROCESS_IP"}
    args = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, env=env, check=True).stdout
    args = args.splitlines()
    assert args[0] == str(root)  # cd into the project folder worked
    assert args[args.index("--config_file") + 1] == str(stage_dir / "accelerate.yaml")
    assert args[args.index("--main_process_ip") + 1] == "fe80::1"
    assert args[-1] == str(stage_dir / "launch" / "stage.json")
    env["LLMFORGE_MAIN_PROCESS_IP"] = "node-7"
    args = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, env=env, check=True).stdout
    assert args.splitlines()[args.splitlines().index("--main_process_ip") + 1] == "node-7"

    sbatch = stage_dir / "slurm.sbatch"
    assert subprocess.run(["bash", "-n", str(sbatch)]).returncode == 0
    # sbatch reads a directive's value with quotes and backslash escapes, as a POSIX shell word
    output = next(line for line in sbatch.read_text().splitlines() if line.startswith("#SBATCH --output="))
    assert shlex.split(output.removeprefix("#SBATCH ")) == [f"--output={stage_dir / 'logs'}/slurm-%j.out"]
    # run the Slurm file with stand-ins for srun and scontrol: the node script it starts is the right one
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, body in (("srun", 'shift\nexec "$@"\n'), ("scontrol", "echo node-0\n")):
        (fake / name).write_text("#!/usr/bin/env bash\n" + body)
        (fake / name).chmod(stat.S_IRWXU)
    (stage_dir / "launch-node-0.sh").write_text('echo "$0 on $LLMFORGE_MAIN_PROCESS_IP"\n')
    res = subprocess.run(
        ["bash", str(sbatch)],
        capture_output=True,
        text=True,
        env={**env, "PATH": f"{fake}:{env['PATH']}", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "n"},
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{stage_dir / 'launch-node-0.sh'} on node-0"


@pytest.mark.parametrize("address", ['10.0.0.1"; touch pwned; "', "$(touch pwned)", "a b", ""])
def test_main_process_ip_must_be_an_address(tmp_path, base, address):
    problems = _problems(tmp_path, base, f"backend.main_process_ip={json.dumps(address)}")
    assert any(
        p.startswith(
            "backend.main_process_ip (from --set backend.main_process_ip): must be an IP address or a host name"
        )
        for p in problems
    ), problems
    assert not (tmp_path / "pwned").exists()


def test_deepspeed_backend_stores_a_validated_config_for_the_trainer(tmp_path, base):
    pytest.importorskip("deepspeed")
    from llmforge_plugins.backends.dsconfig import build_deepspeed_config

    backend, stage_dir, files = _prepared(
        tmp_path,
        base,
        {
            "type": "deepspeed",
            "num_processes": 2,
            "main_process_port": 29557,
            "deepspeed": {"zero_stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"},
        },
    )
    stored = json.loads((stage_dir / "deepspeed.json").read_text())
    assert stored == build_deepspeed_config(backend.settings.deepspeed, precision="fp32")
    assert stored["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert stage_dir / "deepspeed.json" in files
    # each process's Trainer gets it through TrainingArguments(deepspeed=...)
    context = type("C", (), {"stage_dir": stage_dir})()
    assert backend.trainer_args(context) == {"deepspeed": str(stage_dir / "deepspeed.json")}


def _failed_launch(tmp_path: Path, records: dict[int, dict], launcher_log: str = ""):
    """What a failed launch leaves behind (rank records, logs), read back by the report."""
    from llmforge_plugins.backends.failures import failure
    from llmforge_plugins.backends.files import Launch

    launch = Launch(tmp_path)
    launch.ranks.mkdir(parents=True)
    launch.logs.mkdir()
    for rank, rec in records.items():
        (launch.ranks / f"rank-{rank}.json").write_text(
            json.dumps({"rank": rank, "pid": 100 + rank, "host": "h", "node": rank // 2, **rec})
        )
        (launch.logs / f"rank-{rank}.log").write_text(f"rank {rank} started\nrank {rank} last words\n")
    (launch.logs / "launcher.log").write_text(launcher_log)
    emitted: list = []
    ctx = type("Ctx", (), {"stage_name": "sft", "emit": lambda self, t, **d: emitted.append((t, d))})()
    return failure(launch, 1, 4, ctx), emitted


def test_a_failed_launch_names_the_rank_that_failed_first(tmp_path):
    # rank 2 raised first (bad data: exit code 2 like the same error in one process); rank 0 then lost its
    # peer; rank 1 and 3 were stopped by the launcher
    err, emitted = _failed_launch(
        tmp_path / "a",
        {
            0: {"state": "failed", "error": "RuntimeError: Connection closed by peer", "exit_code": 1, "ended": 20.0},
            1: {"state": "terminated"},
            2: {"state": "failed", "error": "data.jsonl:3: messages: expected a list", "exit_code": 2, "ended": 10.0},
            3: {"state": "terminated"},
        },
    )
    assert err.exit_code == 2
    assert err.message.startswith("rank 2 (node 1, pid 102 on h) failed: data.jsonl:3: messages: expected a list")
    assert "rank 2 last words" in err.message and "rank-2.log" in err.message
    assert emitted[0][0] == "rank_failed" and emitted[0][1]["rank"] == 2
    # a rank that vanished without a word is the cause, whatever the others said; the launcher's summary
    # gives its exit status
    summary = (
        "Root Cause (first observed failure):\n[0]:\n  time      : 2026-11-30_10:00:00\n  host      : h\n"
        "  rank      : 3 (local_rank: 1)\n  exitcode  : -9 (pid: 103)\n  error_file: <N/A>\n"
    )
    err, _ = _failed_launch(
        tmp_path / "b",
        {
            0: {"state": "failed", "error": "RuntimeError: Connection reset", "exit_code": 1, "ended": 5.0},
            1: {"state": "terminated"},
            2: {"state": "terminated"},
            3: {"state": "running"},
        },
        summary,
    )
    assert err.exit_code == 1
    assert err.message.startswith("rank 3 (node 1, pid 103 on h) was killed (exit code -9, SIGKILL;")
    # a node that never joined
    err, _ = _failed_launch(
        tmp_path / "c", {0: {"state": "terminated"}, 1: {"state": "terminated"}}, "rendezvous timed out\n"
    )
    assert err.message.startswith("rank 2 never started") and "rendezvous timed out" in err.message


# ------------------------------------------------------------------------------------------------
# [backend] validation


def _problems(tmp_path: Path, base: Path, *overrides: str) -> list[str]:
    from llmforge.errors import ConfigError
    from llmforge.pipeline import load_pipeline
    from llmforge.plugins import load_registry

    project = project_with(tmp_path, base, steps=4, port=29500)
    try:
        load_pipeline(project.config, list(overrides), registry=load_registry(env=""))
    except ConfigError as exc:
        return [str(p) for p in exc.problems]
    return []


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (
            ["backend.type=accelerat"],
            "backend.type (from --set backend.type): unknown backend 'accelerat'; did you mean "
            "'accelerate'? (installed: accelerate, deepspeed, local)",
        ),
        (["backend.num_processes=0"], "backend.num_processes (from --set backend.num_processes): must be >= 1 (got 0)"),
        (
            ["backend.fsdp.sharding_strategy=ZERO"],
            "backend.fsdp.sharding_strategy (from --set backend.fsdp.sharding_strategy): must be one of",
        ),
        (
            ["backend.type=deepspeed", "backend.deepspeed.zero_stage=4"],
            "backend.deepspeed.zero_stage (from --set backend.deepspeed.zero_stage): must be <= 3 (got 4)",
        ),
        (
            ["backend.type=deepspeed", "backend.deepspeed.offload_params=cpu"],
            "backend.deepspeed.offload_params (from --set backend.deepspeed.offload_params): parameter offload needs "
            "zero_stage = 3",
        ),
        (["backend.type=local"], "backend.num_processes: the local backend runs one process"),
        (
            ["backend.node_rank=1", "backend.num_nodes=2"],
            "backend.node_rank (from --set backend.node_rank): `llmforge run` drives node 0",
        ),
        (["backend.tp_size=2"], "backend.tp_size (from --set backend.tp_size): tensor parallelism runs under torchrun"),
        (
            ["backend.fsdp.enabled=true", "sft.lora.enabled=true", "sft.merge=true"],
            "stages[0].merge (from --set sft.merge): merging the LoRA adapter needs the whole base model",
        ),
    ],
    ids=["type", "num_processes", "fsdp", "zero_stage", "offload", "local", "node_rank", "tp", "fsdp-merge"],
)
def test_backend_problems_name_their_key(tmp_path, base, overrides, expected):
    problems = _problems(tmp_path, base, *overrides)
    assert any(p.startswith(expected) for p in problems), problems


def test_tables_of_other_backends_are_checked_but_do_not_block_a_switch(tmp_path, base):
    # [backend.fsdp] belongs to accelerate: with type = "deepspeed" it is still checked for typos...
    problems = _problems(tmp_path, base, "backend.type=deepspeed", "backend.fsdp.enabeld=true")
    assert any(p.startswith("backend.fsdp.enabeld") for p in problems), problems
    # ...and otherwise ignored, as is [backend.deepspeed] under accelerate
    assert _problems(tmp_path, base, "backend.type=deepspeed", "backend.fsdp.enabled=true") == []
    assert _problems(tmp_path, base, "backend.deepspeed.zero_stage=3") == []


@pytest.mark.gpu
@pytest.mark.timeout(900)
def test_tensor_parallel_sft_on_two_gpus(base, tmp_path):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("tensor parallelism needs 2 GPUs")
    project = project_with(tmp_path, base, steps=6)
    res = project.run("run", "--set", "backend.tp_size=2", "--set", "backend.launcher=torchrun", timeout=800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run_losses = losses(events_of(the_run(project)))
    assert sorted(run_losses) == list(range(1, 7))


@pytest.mark.gpu
@pytest.mark.timeout(900)
def test_fsdp_on_two_gpus_follows_ddp_and_saves_a_whole_model(base, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    if torch.cuda.device_count() < 2:
        pytest.skip("FSDP needs 2 GPUs")
    curves = {}
    for name, extra in (("ddp", []), ("fsdp", ["--set", "backend.fsdp.enabled=true"])):
        project = project_with(tmp_path / name, base, steps=6)
        res = project.run("run", *extra, timeout=800)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        events = events_of(the_run(project))
        assert not any("did not shard" in e.get("message", "") for e in events)
        curves[name] = losses(events)
        model_dir = json.loads((the_run(project) / "manifest.json").read_text())["stages"]["sft"]["artifacts"]
        model, info = AutoModelForCausalLM.from_pretrained(model_dir["model"]["path"], output_loading_info=True)
        assert not info["missing_keys"] and all(p.numel() > 0 for p in model.parameters())
    for step, loss in curves["ddp"].items():
        assert curves["fsdp"][step] == pytest.approx(loss, rel=1e-2), (step, curves)
