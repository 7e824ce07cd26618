"""Wall time and peak RSS of one command, shared by the bench scripts."""

from __future__ import annotations

import json
import subprocess
import sys

# A small launcher runs each command: Linux carries a process's peak RSS across exec, so a child forked
# from this (larger) process would report at least this process's RSS. The launcher is a fresh, small
# interpreter; it forks, execs the command, and reports the command's own wall time and ru_maxrss.
LAUNCHER = r"""
import json, os, sys, time
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - started
sys.stderr.write("\n@@measured " + json.dumps({"wall": wall, "maxrss": usage.ru_maxrss * 1024,
                                               "code": os.waitstatus_to_exitcode(status)}) + "\n")
"""


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in bytes) of one command, as the OS reports them for its process."""
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    head, _, tail = proc.stderr.rpartition("@@measured ")
    if not tail:
        raise SystemExit(f"{' '.join(cmd)}: no measurement\n{proc.stderr[-3000:]}")
    result = json.loads(tail.splitlines()[0])
    if result["code"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({result['code']}):\n{head[-3000:]}")
    return result["wall"], result["maxrss"]
