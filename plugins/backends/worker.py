"""One process of a launched stage: `python -m llmforge_plugins.backends.worker <stage dir>/launch/stage.json`.

accelerate or torchrun starts it once per rank (RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous come
from them). It rebuilds the stage and a StageContext from stage.json and runs `stage.run()` unchanged.
Rank 0's events go to launch/events.jsonl, which the `llmforge run` process relays; the other ranks'
events are printed into their own log. Each rank keeps launch/ranks/rank-R.json up to date (running,
done, failed with its error, terminated by the launcher), so that a failed launch can name the rank
that failed first, and a rank that vanished without a word (killed) is told apart.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

from llmforge_plugins.backends.files import STOP_FILE, Launch, write_atomic


def _load(qualified: str):
    module, _, name = qualified.partition(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


class RankState:
    """This rank's record in launch/ranks/rank-R.json."""

    def __init__(self, launch: Launch, rank: int):
        self.path = launch.ranks / f"rank-{rank}.json"
        self.data = {
            "rank": rank,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node": int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0"))),
            "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
            "state": "running",
            "started": time.time(),
        }
        self.write()

    def set(self, **fields) -> None:
        self.data.update(fields, ended=time.time())
        self.write()

    def write(self) -> None:
        write_atomic(self.path, json.dumps(self.data, indent=2))


class Rank0Events:
    """Rank 0's ctx.emit: one JSON line per event, flushed, for the relay in the `llmforge run` process."""

    def __init__(self, path: Path):
        self.fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the process

    def __call__(self, type: str, **data) -> None:
        event = {"type": type, "time": round(time.time(), 3), **data}
        self.fh.write(json.dumps(event, default=str) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def _print_event(rank: int, type: str, **data) -> None:
    """Other ranks: their events stay in their own log (logs/rank-R.log)."""
    if type == "log":
        print(f"rank {rank} | {data.get('level', 'info')}: {data.get('message')}", flush=True)


class _Files:
    """Stop and checkpoint requests as files every process sees (the run folder is shared)."""

    def __init__(self, run_dir: Path, launch: Launch, rank: int):
        self.stop_files = (run_dir / "stop.request", launch.dir / STOP_FILE)
        self.checkpoint_file = run_dir / "checkpoint.request"
        self.rank = rank
        self._last = 0.0
        self._stop = False

    def stop(self) -> bool:
        now = time.monotonic()
        if not self._stop and now - self._last > 0.2:
            self._last = now
            self._stop = any(p.exists() for p in self.stop_files)
        return self._stop

    def checkpoint(self) -> bool:
        # Only rank 0 consumes the request; the training loop shares its decision with the other ranks.
        if self.rank != 0 or not self.checkpoint_file.exists():
            return False
        self.checkpoint_file.unlink(missing_ok=True)
        return True


def _redirect_output(path: Path) -> None:
    """This rank's stdout and stderr (Python's and C libraries') into its own log file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = os.fdopen(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    stage_dir = Path(spec["stage_dir"])
    launch = Launch(stage_dir)
    _redirect_output(launch.rank_log(rank))
    print(
        f"llmforge worker: stage {spec['stage_name']}, rank {rank} of {world}, pid {os.getpid()} "
        f"on {socket.gethostname()}",
        flush=True,
    )
    state = RankState(launch, rank)

    def on_term(signum, frame):  # noqa: ARG001
        # The launcher stops the group when another rank died: say so, so that this rank is not
        # mistaken for the cause.
        state.set(state="terminated", signal=signal.Signals(signum).name)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C belongs to the `llmforge run` process, which asks for a clean stop through a file.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    from llmforge.errors import ForgeError
    from llmforge.plugins import load_registry
    from llmforge.runner import _warnings_to_events
    from llmforge.stage import Artifact, StageContext

    status, ctx, emit = "done", None, None
    try:
        stage_cls = _load(spec["stage_class"])
        backend_cls = _load(spec["backend_class"])
        backend = backend_cls(backend_cls.Options.model_validate(spec["backend"]))
        # Model loading reads it (llmforge_plugins.training.models.tensor_parallel_kwargs).
        os.environ["LLMFORGE_TP_SIZE"] = str(getattr(backend.settings, "tp_size", 1))
        files = _Files(Path(spec["run_dir"]), launch, rank)
        emit = Rank0Events(launch.events) if rank == 0 else functools.partial(_print_event, rank)
        inputs = {
            k: Artifact(kind=a["kind"], path=Path(a["path"]), stage=a.get("stage"), key=a.get("key"))
            for k, a in spec["inputs"].items()
        }
        ctx = StageContext(
            stage_name=spec["stage_name"],
            run_id=spec["run_id"],
            run_dir=Path(spec["run_dir"]),
            stage_dir=stage_dir,
            inputs=inputs,
            emit=emit,
            stop_check=files.stop,
            checkpoint_check=files.checkpoint,
            resume=bool(spec["resume"]),
            seed=int(spec["seed"]),
            project_dir=Path(spec["project_dir"]),
            rank=rank,
            world_size=world,
            backend=backend,
            # this process is an edge: it loads the installed plugins itself, as the parent did
            registry=load_registry(),
        )
        if world != spec["world_size"]:
            ctx.log(f"launched as {world} processes, expected {spec['world_size']}", level="warning")
        options = stage_cls.Options.model_validate(spec["options"])
        with _warnings_to_events(ctx):
            stage_cls().run(options, ctx)
        state.set(state="done")
    except BaseException as exc:  # noqa: BLE001 - every failure is recorded for the report, then exits non-zero
        traceback.print_exc()
        if isinstance(exc, ForgeError):
            error, code = exc.render(), exc.exit_code
        elif isinstance(exc, KeyboardInterrupt):
            error, code = "interrupted", 130
        else:
            error, code = f"{type(exc).__name__}: {exc}", 1
        state.set(state="failed", error=error, exit_code=code)
        status = "failed"
    finally:
        if rank == 0:
            if isinstance(emit, Rank0Events):
                emit.close()
            outcome = {"status": status, "stopped": bool(ctx and ctx.stop_seen), "info": ctx.info if ctx else {}}
            write_atomic(launch.result, json.dumps(outcome, indent=2, default=str))
        _leave_group()
    sys.stdout.flush()
    sys.stderr.flush()
    return 0 if status == "done" else 1


def _leave_group() -> None:
    """Tear the process group down cleanly (torch warns otherwise); never fail the exit over it."""
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv))
