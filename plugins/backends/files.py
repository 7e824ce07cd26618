"""The files of one stage's launch, shared by the `llmforge run` process and the launched processes:
where each one lives (`Launch`), and the small helpers that write and read them."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

STOP_FILE = "stop.request"
TAIL_LINES = 12


@dataclass
class Launch:
    """The files of one stage's launch."""

    stage_dir: Path

    @property
    def dir(self) -> Path:
        return self.stage_dir / "launch"

    @property
    def logs(self) -> Path:
        return self.stage_dir / "logs"

    @property
    def spec(self) -> Path:
        return self.dir / "stage.json"

    @property
    def events(self) -> Path:
        return self.dir / "events.jsonl"

    @property
    def ranks(self) -> Path:
        return self.dir / "ranks"

    @property
    def result(self) -> Path:
        return self.dir / "result.json"

    @property
    def stop(self) -> Path:
        return self.dir / STOP_FILE

    def node_script(self, node: int) -> Path:
        return self.stage_dir / f"launch-node-{node}.sh"

    def rank_log(self, rank: int) -> Path:
        return self.logs / f"rank-{rank}.log"


def write_atomic(path: Path, text: str, mode: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]
