"""Launching a stage on N processes per node and M nodes, shared by the accelerate and deepspeed backends.

For each launched stage the `llmforge run` process (node 0) writes into the stage folder:

    accelerate.yaml           the accelerate config (DDP or FSDP), when launcher = "accelerate"
    deepspeed.json            the DeepSpeed config (deepspeed backend)
    launch-node-K.sh          the command for node K (K = 0 .. num_nodes-1): env, node rank, rendezvous
    slurm.sbatch              one task per node, each running its launch-node-$SLURM_NODEID.sh
    launch/stage.json         what every process needs to rebuild the stage and its context
    launch/events.jsonl       rank 0's events, relayed by this process into the run's events.jsonl
    launch/ranks/rank-R.json  each process's state: running, done, failed (with the error), terminated
    launch/result.json        rank 0's `info` and whether the stage stopped on request
    logs/rank-R.log           each process's stdout and stderr
    logs/launcher.log         what accelerate / torchrun printed on node 0

then runs launch-node-0.sh itself, the very script a user would run (supervise.py), and reports a failed
launch by the rank that failed first (failures.py). torchrun's agent (under accelerate too) tears the
whole group down as soon as one process dies, so a dead rank ends the launch instead of leaving the
others waiting in a collective.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from llmforge.backend import Backend, stage_is_distributed
from llmforge.errors import Problem
from llmforge_plugins.backends.files import Launch, write_atomic
from llmforge_plugins.backends.supervise import run_node

WORKER = "llmforge_plugins.backends.worker"
# Variables copied into the node scripts: what decides which code and data a process sees, and how the
# processes talk. Never the whole environment (it may hold tokens and passwords).
ENV_PREFIXES = ("LLMFORGE_", "NCCL_", "TORCH_NCCL_", "GLOO_", "HF_")
ENV_NAMES = ("PYTHONPATH", "CUDA_VISIBLE_DEVICES", "TRANSFORMERS_OFFLINE", "OMP_NUM_THREADS")
ENV_SECRETS = ("TOKEN", "KEY", "SECRET", "PASSWORD")
ENV_SKIP = ("LLMFORGE_MAIN_PROCESS_IP", "LLMFORGE_MAIN_PROCESS_PORT")


def qualified_name(obj: type) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def yaml_text(data: dict, indent: int = 0) -> str:
    """A small YAML writer for accelerate's flat config (scalars and one level of tables). Strings are
    written as JSON strings, which YAML reads as double-quoted scalars."""
    out = []
    pad = "  " * indent
    for key, value in data.items():
        if isinstance(value, dict):
            out.append(f"{pad}{key}:")
            out.append(yaml_text(value, indent + 1).rstrip("\n"))
        elif isinstance(value, bool):
            out.append(f"{pad}{key}: {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            out.append(f"{pad}{key}: {value}")
        elif isinstance(value, (list, tuple)):
            out.append(f"{pad}{key}: {json.dumps(list(value))}")
        else:
            out.append(f"{pad}{key}: {json.dumps(str(value))}")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------
# the backend


class LaunchingBackend(Backend):
    """A backend that starts each training stage on `num_processes` × `num_nodes` processes."""

    def handles(self, stage: Any, options: Any) -> bool:
        flag = stage_is_distributed(stage, options)
        if flag is not None:
            return flag
        # The built-in training stages (pretrain, continued_pretrain, sft, dpo) all train with the HF
        # Trainer on TrainOptions; other stages (shell, copy, merge, gguf, eval) keep running here.
        from llmforge_plugins.training.options import TrainOptions

        return isinstance(options, TrainOptions)

    # ---- preflight -----------------------------------------------------------------------------
    def check(self, cfg: Any) -> list[Problem]:
        s = self.settings
        problems: list[Problem] = []
        if s.node_rank != 0:
            problems.append(
                Problem(
                    "backend.node_rank",
                    "`llmforge run` drives node 0 (it writes the manifest and "
                    "the events); start the other nodes with the launch-node-K.sh scripts it "
                    "writes into each launched stage's folder (see docs/scaling.md)",
                )
            )
        if s.tp_size > 1:
            if s.launcher != "torchrun":
                problems.append(
                    Problem(
                        "backend.tp_size", 'tensor parallelism runs under torchrun: set backend.launcher = "torchrun"'
                    )
                )
            if self.world_size % s.tp_size:
                problems.append(
                    Problem(
                        "backend.tp_size",
                        f"{s.tp_size} does not divide the {self.world_size} processes (num_processes × num_nodes)",
                    )
                )
        for spec in cfg.stages:
            try:
                launched = self.handles(spec.cls(), spec.options)
            except Exception:  # noqa: BLE001 - a stage class that cannot be built is reported elsewhere
                launched = False
            if launched:
                problems += self.check_stage(spec, cfg)
        return problems

    def check_stage(self, spec: Any, cfg: Any) -> list[Problem]:
        """Problems of one launched stage under this backend's settings."""
        return []

    # ---- what the subclasses provide -------------------------------------------------------------
    def accelerate_config(self) -> dict:
        """The accelerate YAML as a dict (launcher = "accelerate")."""
        return base_accelerate_config(self.settings, "MULTI_GPU")

    def torchrun_env(self) -> dict[str, str]:
        """Environment that makes accelerate inside each process apply the same settings under torchrun
        (what `accelerate launch` would export from the YAML)."""
        return {}

    def prepare_files(self, stage: Any, options: Any, ctx: Any, launch: Launch) -> list[Path]:
        """Backend files written before launch (e.g. deepspeed.json); returns their paths."""
        return []

    # ---- the launch ------------------------------------------------------------------------------
    def launch(self, stage: Any, options: Any, ctx: Any) -> None:
        launch = Launch(ctx.stage_dir)
        files = self.prepare(stage, options, ctx, launch)
        ctx.info["launch"] = {
            "backend": self.name,
            "launcher": self.settings.launcher,
            "world_size": self.world_size,
            "num_nodes": self.settings.num_nodes,
            "node_scripts": [str(launch.node_script(k)) for k in range(self.settings.num_nodes)],
        }
        ctx.emit(
            "launch",
            backend=self.name,
            launcher=self.settings.launcher,
            world_size=self.world_size,
            num_nodes=self.settings.num_nodes,
            num_processes=self.settings.num_processes,
            files=[str(p) for p in files],
        )
        ctx.log(
            f"launching {self.world_size} process(es) on {self.settings.num_nodes} node(s) with "
            f"{self.settings.launcher}: {launch.node_script(0)}; logs in {launch.logs}"
        )
        if self.settings.num_nodes > 1:
            others = ", ".join(str(launch.node_script(k)) for k in range(1, self.settings.num_nodes))
            ctx.log(
                f"waiting for the other nodes: run {others} on them (or sbatch "
                f"{ctx.stage_dir / 'slurm.sbatch'}); the run folder must be on a shared filesystem"
            )
        run_node(launch, ctx, self.world_size)

    def prepare(self, stage: Any, options: Any, ctx: Any, launch: Launch) -> list[Path]:
        """Write everything a launch needs; return the user-facing files."""
        s = self.settings
        # A new attempt (a resume) starts from clean launch state; the last attempt's logs are kept aside.
        shutil.rmtree(launch.dir, ignore_errors=True)
        if launch.logs.exists():
            previous = ctx.stage_dir / "logs.previous"
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(launch.logs, previous)
        for old in ctx.stage_dir.glob("launch-node-*.sh"):
            old.unlink()
        launch.ranks.mkdir(parents=True)
        launch.logs.mkdir(parents=True)
        port = s.main_process_port
        if s.num_nodes == 1 and not port_is_free(port):
            # One machine: the port only has to be free here, so take another rather than fail.
            port = free_port()
            ctx.log(f"port {s.main_process_port} is in use here: this launch uses port {port}", level="warning")
        files = self.prepare_files(stage, options, ctx, launch)
        spec = {
            "version": 1,
            "stage_class": qualified_name(type(stage)),
            "backend_class": qualified_name(type(self)),
            "backend": s.model_dump(mode="json"),
            "stage_name": ctx.stage_name,
            "run_id": ctx.run_id,
            "run_dir": str(ctx.run_dir),
            "stage_dir": str(ctx.stage_dir),
            "project_dir": str(ctx.project_dir),
            "options": options.model_dump(mode="json"),
            "inputs": {k: a.to_json() for k, a in ctx.inputs.items()},
            "resume": ctx.resume,
            "seed": ctx.seed,
            "world_size": self.world_size,
        }
        write_atomic(launch.spec, json.dumps(spec, indent=2))
        if s.launcher == "accelerate":
            config = self.accelerate_config()
            config["main_process_port"] = port
            yaml_path = ctx.stage_dir / "accelerate.yaml"
            write_atomic(yaml_path, "# written by llmforge for this launch; see docs/scaling.md\n" + yaml_text(config))
            files.insert(0, yaml_path)
        for node in range(s.num_nodes):
            path = launch.node_script(node)
            write_atomic(path, self.node_script(ctx, launch, node, port), mode=0o755)
            files.append(path)
        sbatch = ctx.stage_dir / "slurm.sbatch"
        write_atomic(sbatch, slurm_script(ctx, launch, s.num_nodes, s.num_processes), mode=0o644)
        files.append(sbatch)
        return files

    def node_script(self, ctx: Any, launch: Launch, node: int, port: int) -> str:
        s = self.settings
        python = shlex.quote(sys.executable)
        if s.launcher == "accelerate":
            cmd = [
                f"{python} -m accelerate.commands.launch",
                f"--config_file {shlex.quote(str(ctx.stage_dir / 'accelerate.yaml'))}",
                f"--machine_rank {node}",
                '--main_process_ip "$MAIN_PROCESS_IP"',
                '--main_process_port "$MAIN_PROCESS_PORT"',
                "--max_restarts 0",
            ]
        else:
            cmd = [
                f"{python} -m torch.distributed.run",
                f"--nnodes {s.num_nodes}",
                f"--nproc-per-node {s.num_processes}",
                "--max-restarts 0",
            ]
            if s.rdzv_backend == "c10d":
                cmd += [
                    "--rdzv-backend c10d",
                    '--rdzv-endpoint "$MAIN_PROCESS_IP:$MAIN_PROCESS_PORT"',
                    f"--rdzv-id {shlex.quote(ctx.run_id + '-' + ctx.stage_name)}",
                ]
            else:
                cmd += [f"--node-rank {node}", '--master-addr "$MAIN_PROCESS_IP"', '--master-port "$MAIN_PROCESS_PORT"']
        cmd += [f"-m {WORKER}", shlex.quote(str(launch.spec))]
        env = {**node_env(), **(self.torchrun_env() if s.launcher == "torchrun" else {})}
        lines = [
            "#!/usr/bin/env bash",
            f"# llmforge: stage {ctx.stage_name!r} of run {ctx.run_id}, node {node} of {s.num_nodes} "
            f"({s.num_processes} process(es) per node, backend {self.name}, launcher {s.launcher}).",
            "# Run it on that node; every node must see the run folder at this same path (a shared filesystem).",
            "# LLMFORGE_MAIN_PROCESS_IP / LLMFORGE_MAIN_PROCESS_PORT override node 0's address (slurm.sbatch sets it).",
            "set -euo pipefail",
            f"cd {shlex.quote(str(ctx.project_dir))}",
            *[f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())],
            # The configured address is assigned quoted on its own line, then used as a variable: the
            # default of a ${...:-word} inside double quotes would be expanded by bash ($(...), `...`).
            f"MAIN_PROCESS_IP={shlex.quote(str(s.main_process_ip))}",
            f"MAIN_PROCESS_PORT={int(port)}",
            'MAIN_PROCESS_IP="${LLMFORGE_MAIN_PROCESS_IP:-$MAIN_PROCESS_IP}"',
            'MAIN_PROCESS_PORT="${LLMFORGE_MAIN_PROCESS_PORT:-$MAIN_PROCESS_PORT}"',
            "exec " + " \\\n    ".join(cmd),
        ]
        return "\n".join(lines) + "\n"


def node_env() -> dict[str, str]:
    out = {}
    for key, value in os.environ.items():
        if key in ENV_SKIP or any(word in key.upper() for word in ENV_SECRETS):
            continue
        if key.startswith(ENV_PREFIXES) or key in ENV_NAMES:
            out[key] = value
    return out


def base_accelerate_config(s: Any, distributed_type: str) -> dict:
    return {
        "compute_environment": "LOCAL_MACHINE",
        # MULTI_GPU is accelerate's "one process per device through torchrun"; it is also what gives real
        # multi-process (gloo) runs on a CPU-only machine, where MULTI_CPU starts a single process.
        "distributed_type": distributed_type,
        "num_processes": s.num_processes * s.num_nodes,  # all machines together
        "num_machines": s.num_nodes,
        "machine_rank": 0,  # each node's launch-node-K.sh passes its own --machine_rank
        "main_process_ip": s.main_process_ip,
        "main_process_port": s.main_process_port,
        "rdzv_backend": s.rdzv_backend,
        "same_network": True,
        # The stage's `precision` option decides (TrainingArguments bf16/fp16), in every process.
        "mixed_precision": "no",
        "use_cpu": False,
        "gpu_ids": "all",
        "downcast_bf16": "no",
    }


def sbatch_quote(text: str) -> str:
    """A value for an `#SBATCH` line, which sbatch (not bash) reads: double quotes group, a backslash
    escapes the next character (Slurm's `_get_argument`)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def slurm_script(ctx: Any, launch: Launch, num_nodes: int, per_node: int) -> str:
    folder = str(launch.logs)
    if "\n" in folder:
        # sbatch reads directives line by line: such a path cannot be written in one, so Slurm's default
        # (slurm-<job>.out in the submit folder) is kept rather than splitting the directive.
        output = "# --output left out: the logs folder's path holds a line break"
    else:
        # %j is Slurm's job id; a literal % in the folder's name is written %%.
        output = f"#SBATCH --output={sbatch_quote(folder.replace('%', '%%') + '/slurm-%j.out')}"
    return "\n".join(
        [
            "#!/usr/bin/env bash",
            f"# llmforge: stage {ctx.stage_name!r} of run {ctx.run_id} "
            f"on {num_nodes} node(s) x {per_node} process(es).",
            "# Submit with `sbatch` from a login node that sees the run folder at the same path as the compute nodes.",
            "# It starts the stage's processes only: rank 0 writes the artifacts, the checkpoints and",
            "# launch/events.jsonl; the run's manifest is written by `llmforge run` (see docs/scaling.md).",
            f"#SBATCH --job-name={shlex.quote(('llmforge-' + ctx.stage_name)[:64])}",
            f"#SBATCH --nodes={num_nodes}",
            "#SBATCH --ntasks-per-node=1",
            f"#SBATCH --gpus-per-node={per_node}",
            output,
            "set -euo pipefail",
            'export LLMFORGE_MAIN_PROCESS_IP="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
            # The stage folder reaches the inner shell as its $1, quoted once for this shell: no quoting
            # nested inside another quoted string, so any path (spaces, quotes) arrives intact.
            "srun --ntasks-per-node=1 bash -c 'exec bash \"$1/launch-node-$SLURM_NODEID.sh\"' llmforge-node "
            + shlex.quote(str(ctx.stage_dir)),
            "",
        ]
    )


def require(module: str, hint: str) -> Problem | None:
    """A problem at backend.type when a package the backend needs is not installed (found without importing)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return Problem("backend.type", f"needs the {module} package, which is not installed ({hint})")
    return None
