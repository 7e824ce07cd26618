"""What went wrong in a failed launch: the rank that failed first, read from the processes' own records
(launch/ranks/rank-R.json) and torch elastic's failure summary, with its log's last lines."""

from __future__ import annotations

import re
import signal
from typing import Any

from llmforge.errors import EXIT_FAILED, ForgeError
from llmforge_plugins.backends.files import Launch, read_json, tail


class RankFailed(ForgeError):
    """A process of a launch failed; the message names its rank. Carries the exit code of the error
    that process raised (2 for bad data or options, 1 otherwise)."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = EXIT_FAILED):
        super().__init__(message, hint)
        self.exit_code = exit_code


def rank_records(launch: Launch) -> dict[int, dict]:
    out = {}
    for path in launch.ranks.glob("rank-*.json"):
        rec = read_json(path)
        if rec and isinstance(rec.get("rank"), int):
            out[rec["rank"]] = rec
    return out


SIGNALS = {int(s): s.name for s in signal.Signals}


def launcher_exit_codes(launch: Launch) -> dict[int, int]:
    """Exit codes per global rank from torch elastic's failure summary in the launcher's output."""
    try:
        text = (launch.logs / "launcher.log").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    found: dict[int, int] = {}  # rank -> exit code
    for m in re.finditer(r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)", text):
        found.setdefault(int(m.group(1)), int(m.group(2)))
    return found


def failure(launch: Launch, returncode: int | None, world_size: int, ctx: Any) -> ForgeError:
    """The error of a failed launch, naming the rank that failed first (also written as an event)."""
    records = rank_records(launch)
    codes = launcher_exit_codes(launch)
    # A process that died without a word (SIGKILL, os._exit, the out-of-memory killer) is the cause: the
    # others only failed or were stopped because it vanished.
    silent = sorted(r for r, rec in records.items() if rec.get("state") == "running")
    failed = sorted((rec.get("ended", 0), r) for r, rec in records.items() if rec.get("state") == "failed")
    missing = sorted(set(range(world_size)) - set(records))
    exit_code = EXIT_FAILED
    if silent:
        rank = silent[0]
        code = codes.get(rank)
        how = (
            f"exit code {code}" + (f", {SIGNALS[-code]}" if code is not None and -code in SIGNALS else "")
            if code is not None
            else "no exit status"
        )
        reason = (
            f"was killed ({how}; no Python error: a signal, os._exit or the out-of-memory killer); "
            "the launcher then stopped the other processes"
        )
    elif failed:
        rank = failed[0][1]
        rec = records[rank]
        reason = f"failed: {rec.get('error') or 'unknown error'}"
        exit_code = int(rec.get("exit_code") or EXIT_FAILED)
    elif missing and len(missing) < world_size:
        rank = missing[0]
        reason = "never started (a node that did not join the launch? check its launch-node-K.sh)"
    else:
        rank = None
        reason = (
            f"the launcher exited with code {returncode} before any process started"
            if missing
            else f"the launcher exited with code {returncode}"
        )
    if rank is None or rank in missing:
        where = launch.logs / "launcher.log"
        lines = tail(where)
        message = f"launch of stage {ctx.stage_name} failed: {reason}" if rank is None else f"rank {rank} {reason}"
    else:
        rec = records.get(rank, {})
        where = launch.rank_log(rank)
        lines = tail(where)
        host = f" on {rec['host']}" if rec.get("host") else ""
        node = f"node {rec['node']}, " if rec.get("node") is not None else ""
        pid = f"pid {rec['pid']}" if rec.get("pid") else ""
        message = f"rank {rank} ({node}{pid}{host}) {reason}"
        ctx.emit(
            "rank_failed",
            rank=rank,
            reason=reason,
            log=str(where),
            tail=lines,
            exit_code=codes.get(rank),
            node=rec.get("node"),
            host=rec.get("host"),
        )
    if lines:
        message += f"\nlast lines of {where}:\n" + "\n".join(f"  {line}" for line in lines)
    return RankFailed(message, hint=f"every process's output is in {launch.logs}", exit_code=exit_code)
