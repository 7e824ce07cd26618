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
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    head, _, tail = proc.stderr.rpartition("@@measured ")
    if not tail:
        raise SystemExit(f"{' '.join(cmd)}: no measurement\n{proc.stderr[-3000:]}")
    result = json.loads(tail.splitlines()[0])
    if result["code"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({result['code']}):\n{head[-3000:]}")
    return result["wall"], result["maxrss"]


# ----------------------------------------------------------------------------------------------
# Which machine a figure comes from. The same kind of machine has been an AMD EPYC without native bf16
# and an Intel Xeon with AVX512-BF16 and AMX: what `precision = "auto"` picks, and how fast bf16 and
# llama.cpp's kernels are, depend on it, so every section records it.

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")


def cpu_info() -> dict:
    """The CPU model, core count and the flags that decide training and llama.cpp speed, read the way
    llmforge itself reads them (llmforge.hardware: /proc/cpuinfo on Linux, the platform's name elsewhere)."""
    import os
    import platform

    from llmforge import hardware

    flags = hardware.cpu_flags()
    return {
        "model": hardware.cpu_model(),
        "cores": os.cpu_count(),
        "flags": [f for f in CPU_FLAGS if f in flags],
        "python": platform.python_version(),
    }


def machine_line() -> str:
    """One line for a benchmark section: date, CPU model, cores, the relevant flags, Python."""
    import time

    c = cpu_info()
    flags = " ".join(c["flags"]) or "none of " + " ".join(CPU_FLAGS)
    return (
        f"date: {time.strftime('%Y-%m-%d')}, CPU: {c['model']}, {c['cores']} cores, flags: {flags}, "
        f"Python {c['python']}"
    )


def load_line() -> str:
    """The load average while a benchmark ran: figures from a machine shared with other jobs are not final."""
    import os

    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "load average: unknown"
    cores = os.cpu_count() or 1
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {cores} cores" + (
        ": the machine was shared, figures are not final" if five > cores * 0.75 else ""
    )


if __name__ == "__main__":
    print(machine_line())
    print(load_line())
