"""Run untrusted Python (a model's answer) against unit tests in a sandboxed child process.

Used by the ``python_tests`` verifier, and meant to be reused as is by anything else that scores code (an
online-RL reward): :func:`parse_tests` splits tests into separately scored pieces, :func:`run_tests` runs one
answer against them and returns a :class:`SandboxResult` (per-test outcomes, the share passed, a one-line
reason).

The child is this very file run as a script by a fresh interpreter in isolated mode (``python -I -S -B``: no
site-packages, no user site, no ``PYTHON*`` variables, no bytecode written), in a fresh temporary folder that
is removed afterwards, with a stripped environment (no proxies, no tokens, HOME is the temporary folder). Before
it runs the answer, the child

* lowers its resource limits (``resource.setrlimit``): CPU seconds, address space, file size, open files and
  processes, so a memory bomb ends in MemoryError and a runaway loop in SIGXCPU even if the parent died;
* installs an audit hook (``sys.addaudithook``; it cannot be removed) that refuses network use (every socket
  event but the creation of a local AF_UNIX socket pair), new processes (fork, exec, spawn, system, subprocess
  and the private ``_posixsubprocess`` that would bypass them), ctypes (which could undo all of this), signals to
  other processes, raising the limits again, writing or deleting outside the temporary folder, and reading
  outside it, the standard library and a few device and time-zone files (the parent's project folder, HOME and
  ``/proc/<parent>/environ`` hold secrets).

Where the kernel lets an unprivileged user create namespaces (``unshare --net --map-root-user`` works), the
child also runs in a network namespace of its own, with no interface but a loopback that is down: the network
is then gone below Python too. The parent enforces a wall-clock timeout by killing the child's whole process
group (it starts a session of its own).

This is defence in depth against accidents and a model's clumsy tricks, not a boundary against a determined
attacker with a zero-day: run code from strangers at scale in a container or VM as well.

Results travel on a private copy of the child's stdout, each line stamped with a per-run token; whatever the
answer prints goes to a capped file instead, so printing cannot forge a result. The child reports each test's
start and end as it goes, so a timeout or a crash still credits the tests before it and names the culprit.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# ------------------------------------------------------------------------------------------------
# tests: what is run, split into separately scored pieces


@dataclass
class TestPlan:
    """Tests ready to run: ``prelude`` runs once after the answer (helpers and imports of the tests);
    ``tests`` run one by one in the same namespace, each scored on its own; ``bind`` names variables bound to
    the answer's functions before the tests run (``{"candidate": "add"}`` for HumanEval-style
    ``def check(candidate)`` tests)."""

    tests: list[str]
    prelude: str = ""
    bind: dict[str, str] = field(default_factory=dict)

    __test__ = False  # not a pytest test class, despite the name


class TestsError(ValueError):
    """The tests themselves do not parse (a data problem, not the answer's)."""

    __test__ = False


def _segment(source: str, node: ast.stmt) -> str:
    return ast.get_source_segment(source, node, padded=True) or ""


def _chunks(source: str, body: Sequence[ast.stmt]) -> list[str]:
    """Statements grouped so that each group ends with an assert: setup lines before an assert belong to its
    test. What follows the last assert is a test of its own when it can fail (it holds an assert or a call),
    else it joins the last test."""
    groups: list[list[ast.stmt]] = []
    current: list[ast.stmt] = []
    for stmt in body:
        current.append(stmt)
        if isinstance(stmt, ast.Assert):
            groups.append(current)
            current = []
    if current:
        testing = any(isinstance(n, ast.Assert | ast.Call) for s in current for n in ast.walk(s))
        if testing or not groups:
            groups.append(current)
        else:
            groups[-1].extend(current)
    return [textwrap.dedent("\n".join(_segment(source, s) for s in group)) for group in groups]


def parse_tests(tests: str | Sequence[str], *, entry: str | None = None) -> TestPlan:
    """Split tests into pieces scored one by one.

    * a list: each item is one test (an assert, or a few lines ending with one);
    * a string of top-level asserts: each assert is a test, with the statements before it;
    * a string without top-level asserts that defines ``check(candidate)`` (HumanEval's form): the asserts of
      ``check``'s body are the tests, run with ``candidate`` bound to the ``entry`` function (without an entry,
      the string is one test);
    * any other string: one test.

    Raises :class:`TestsError` when a string does not parse."""
    if not isinstance(tests, str):
        items = [t for t in tests if isinstance(t, str) and t.strip()]
        for i, item in enumerate(items, 1):
            try:
                ast.parse(item)
            except SyntaxError as e:
                raise TestsError(f"test {i} does not parse: {e.msg} (line {e.lineno})") from None
        return TestPlan(tests=items)
    try:
        tree = ast.parse(tests)
    except SyntaxError as e:
        raise TestsError(f"the tests do not parse: {e.msg} (line {e.lineno})") from None
    if not tree.body:
        return TestPlan(tests=[])
    if any(isinstance(s, ast.Assert) for s in tree.body):
        return TestPlan(tests=_chunks(tests, tree.body))
    check = next((s for s in tree.body if isinstance(s, ast.FunctionDef) and s.name == "check" and s.args.args), None)
    if check is not None and entry:
        prelude = "\n".join(_segment(tests, s) for s in tree.body if s is not check)
        arg = check.args.args[0].arg
        # a call of check(...) at the top level would run every test again in the prelude: drop it
        prelude_tree = ast.parse(prelude) if prelude.strip() else ast.Module(body=[], type_ignores=[])
        kept = [
            s
            for s in prelude_tree.body
            if not (
                isinstance(s, ast.Expr)
                and isinstance(s.value, ast.Call)
                and isinstance(s.value.func, ast.Name)
                and s.value.func.id == "check"
            )
        ]
        prelude = "\n".join(_segment(prelude, s) for s in kept)
        return TestPlan(tests=_chunks(tests, check.body), prelude=prelude, bind={arg: entry})
    return TestPlan(tests=[tests])


def describe(test: str, width: int = 90) -> str:
    """A test as one line for a reason: its last statement (the assert), whitespace collapsed."""
    lines = [line for line in test.strip().splitlines() if line.strip()]
    try:
        body = ast.parse(test).body
        last = ast.get_source_segment(test, body[-1]) if body else None
    except SyntaxError:
        last = None
    text = " ".join((last or (lines[-1] if lines else "")).split())
    return text if len(text) <= width else text[: width - 1] + "…"


# ------------------------------------------------------------------------------------------------
# the parent: limits, one run, its result


@dataclass
class SandboxLimits:
    """What one run may use. ``timeout``: wall-clock seconds for the whole run (start-up, the answer, every
    test); the CPU-time limit is derived from it (the wall clock stops a sleeping answer, the CPU limit a
    spinning one even if the parent is gone). ``memory_mb``: address space (the interpreter itself needs
    ~30 MB). ``file_mb``: the largest file the child may write (its printed output included). ``open_files``:
    descriptors."""

    timeout: float = 5.0
    memory_mb: int = 512
    file_mb: int = 16
    open_files: int = 64


@dataclass
class TestOutcome:
    passed: bool
    error: str = ""  # "AssertionError", "NameError: name 'f' is not defined (answer line 3)", "not run"


@dataclass
class SandboxResult:
    """One run. ``status``: ``ok`` (every test ran), ``syntax`` (the answer does not parse), ``setup`` /
    ``answer`` / ``entry`` / ``prelude`` (running that part failed, so no test passed), ``timeout``,
    ``memory``, ``crashed`` (the child died or exited early), ``refused`` (no tests). ``tests``: one outcome
    per test, in order (tests a timeout or a crash prevented count as failed). ``message``: what stopped the
    run, if anything. ``output``: the tail of what the child printed. ``network``: how the network was cut
    (``namespace+audit`` or ``audit``)."""

    status: str
    tests: list[TestOutcome]
    texts: list[str] = field(default_factory=list)
    message: str = ""
    seconds: float = 0.0
    output: str = ""
    network: str = "audit"
    returncode: int | None = None

    @property
    def total(self) -> int:
        return len(self.tests)

    @property
    def passed(self) -> int:
        return sum(1 for t in self.tests if t.passed)

    @property
    def score(self) -> float:
        return self.passed / self.total if self.total else 0.0

    @property
    def all_passed(self) -> bool:
        return self.status == "ok" and self.total > 0 and self.passed == self.total

    def reason(self) -> str:
        """Why it did not pass, in one line ("" when it did): the stopping cause, or the first failing test
        and its error."""
        if self.all_passed:
            return ""
        if self.status != "ok":
            return self.message
        for i, outcome in enumerate(self.tests):
            if not outcome.passed:
                text = describe(self.texts[i]) if i < len(self.texts) else ""
                shown = f": {text}" if text else ""
                return f"test {i + 1} of {self.total} failed{shown} ({outcome.error})"
        return self.message or "no tests"


_CAN_UNSHARE: bool | None = None


def _namespace_prefix() -> list[str]:
    """``unshare --net --map-root-user`` when this kernel lets us (probed once): a network namespace of
    the child's own. Containers often forbid it; the audit hook does the job then."""
    global _CAN_UNSHARE
    import shutil
    import subprocess

    if _CAN_UNSHARE is None:
        tool = shutil.which("unshare")
        ok = False
        if tool and sys.platform.startswith("linux"):
            try:
                ok = (
                    subprocess.run(
                        [tool, "--net", "--map-root-user", "true"],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        timeout=10,
                    ).returncode
                    == 0
                )
            except (OSError, subprocess.SubprocessError):
                ok = False
        _CAN_UNSHARE = ok
    tool = shutil.which("unshare")
    return [tool, "--net", "--map-root-user"] if _CAN_UNSHARE and tool else []


def _child_env(home: str) -> dict[str, str]:
    # nothing from the parent: no proxies, tokens, HOME or project paths
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
    }


def _seconds(x: float) -> str:
    return f"{x:g}"


def run_tests(
    code: str,
    tests: str | Sequence[str] | TestPlan,
    *,
    setup: str = "",
    entry: str | None = None,
    limits: SandboxLimits | None = None,
    namespace: bool | None = None,
) -> SandboxResult:
    """Run ``setup`` then ``code`` then each test in a sandboxed child; never raises for what the code does.

    ``entry``: a function the code must define (and what ``check(candidate)`` tests get). ``namespace``:
    force the network namespace on or off (None: use it when available); the tests use it to check the audit
    hook alone."""
    import secrets
    import signal
    import subprocess
    import tempfile
    import time

    limits = limits or SandboxLimits()
    plan = tests if isinstance(tests, TestPlan) else parse_tests(tests, entry=entry)
    if not plan.tests:
        return SandboxResult("refused", [], message="no tests")
    prefix = _namespace_prefix() if namespace is not False else []
    if namespace and not prefix:
        raise RuntimeError("network namespaces are not available here (unshare --net --map-root-user failed)")
    token = secrets.token_hex(8)
    total = len(plan.tests)
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="llmforge-sandbox-", ignore_cleanup_errors=True) as work,
        tempfile.TemporaryFile() as err,
    ):
        work = os.path.realpath(work)
        payload = {
            "token": token,
            "root": work,
            "setup": setup,
            "code": code,
            "entry": entry,
            "prelude": plan.prelude,
            "tests": plan.tests,
            "bind": plan.bind,
            "limits": {
                "cpu": int(limits.timeout) + 2,
                "memory": limits.memory_mb * 2**20,
                "fsize": limits.file_mb * 2**20,
                "nofile": limits.open_files,
            },
        }
        cmd = [*prefix, sys.executable, "-I", "-S", "-B", os.path.abspath(__file__)]
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=work,
            env=_child_env(work),
            start_new_session=True,  # its own process group: a timeout kills everything it started
            close_fds=True,
        )
        timed_out = False
        try:
            out, _ = proc.communicate(json.dumps(payload).encode(), timeout=limits.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                out, _ = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a pipe held open by something that escaped: give up on it
                proc.kill()
                out = b""
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0, os.SEEK_END)
        size = err.tell()
        err.seek(max(0, size - 4000))
        output = err.read().decode("utf-8", "replace")
    seconds = time.monotonic() - started

    outcomes: list[TestOutcome | None] = [None] * total
    running: int | None = None
    stage: dict[str, Any] | None = None
    done = False
    for line in out.decode("utf-8", "replace").splitlines():
        if not line.startswith(token):
            continue
        try:
            event = json.loads(line[len(token) :])
        except ValueError:
            continue
        if "start" in event and isinstance(event["start"], int) and 0 <= event["start"] < total:
            running = event["start"]
        elif "test" in event and isinstance(event["test"], int) and 0 <= event["test"] < total:
            outcomes[event["test"]] = TestOutcome(bool(event.get("ok")), str(event.get("error", "")))
            running = None
        elif "stage" in event:
            stage = event
        elif event.get("done"):
            done = True

    def where() -> str:
        return f" in test {running + 1}: {describe(plan.tests[running])}" if running is not None else ""

    memory_hit = next((i for i, o in enumerate(outcomes) if o is not None and o.error.startswith("MemoryError")), None)
    if memory_hit is not None:
        running = memory_hit
    final = [o or TestOutcome(False, "not run") for o in outcomes]
    result = SandboxResult("ok", final, texts=list(plan.tests), seconds=seconds, output=output)
    result.network = "namespace+audit" if prefix else "audit"
    result.returncode = proc.returncode
    rc = proc.returncode
    if timed_out:
        result.status, result.message = "timeout", f"timeout after {_seconds(limits.timeout)} s{where()}"
    elif stage is not None:
        result.status = str(stage.get("stage"))
        error = str(stage.get("error", ""))
        if error.startswith("MemoryError"):
            result.status, result.message = "memory", f"memory limit ({limits.memory_mb} MB) in the {stage['stage']}"
        elif result.status == "syntax":
            result.message = f"syntax error line {stage.get('line')}: {stage.get('msg')}"
        elif result.status == "entry":
            result.message = error
        else:
            result.message = f"the {result.status} raised {error}"
    elif memory_hit is not None or (not done and "MemoryError" in output):
        result.status, result.message = "memory", f"memory limit ({limits.memory_mb} MB){where()}"
    elif rc is not None and rc < 0 and -rc == getattr(signal, "SIGXCPU", -1):
        result.status, result.message = "timeout", f"CPU time limit ({int(limits.timeout) + 2} s){where()}"
    elif not done:
        how = f"exit code {rc}"
        if rc is not None and rc < 0:
            try:
                how = f"signal {signal.Signals(-rc).name}"
            except ValueError:
                how = f"signal {-rc}"
        result.status, result.message = "crashed", f"the child ended early ({how}){where()}"
    return result


# ------------------------------------------------------------------------------------------------
# the child (this file run as a script): everything below runs in the sandboxed interpreter, which has
# only the standard library. Imports it needs before the guard is up are at the top of the module.

_REFUSED_EVENTS = {
    "os.fork",
    "os.forkpty",
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.startfile",
    "subprocess.Popen",
    "os.killpg",
    "resource.setrlimit",
    "resource.prlimit",
    "fcntl.ioctl",
    "os.chroot",
    "os.setuid",
}
_REFUSED_PREFIXES = ("ctypes.", "syslog.", "socket.")  # syslog talks to /dev/log below the socket events
_REFUSED_IMPORTS = {"_posixsubprocess", "_ctypes", "ctypes"}
_PATH_EVENTS = {  # event -> indexes of the path arguments that must lie in the sandbox folder
    "os.remove": (0,),
    "os.rmdir": (0,),
    "os.mkdir": (0,),
    "os.rename": (0, 1),
    "os.link": (0, 1),
    "os.symlink": (1,),
    "os.chmod": (0,),
    "os.chown": (0,),
    "os.chflags": (0,),
    "os.utime": (0,),
    "os.truncate": (0,),
    "os.mkfifo": (0,),
    "os.mknod": (0,),
    "os.setxattr": (0,),
    "os.removexattr": (0,),
    "shutil.rmtree": (0,),
}
_READABLE_FILES = {"/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/etc/localtime"}


def _guard(root: str) -> Any:
    """The audit hook of the child (see the module doc)."""
    realpath, fsdecode, fspath = os.path.realpath, os.fsdecode, os.fspath
    own = os.getpid()
    readable_dirs = tuple(
        {os.path.realpath(p) + os.sep for p in sys.path if p}
        | {os.path.realpath(root) + os.sep, "/usr/share/zoneinfo/", f"/proc/{own}/"}
    )
    inside_root = (root + os.sep, root)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

    def resolve(path: Any) -> str | None:
        if isinstance(path, int):
            return None  # an already open descriptor: checked when it was opened
        try:
            return realpath(fsdecode(fspath(path)))
        except (TypeError, ValueError):
            return None

    def writable(path: Any) -> bool:
        p = resolve(path)
        return p is None or p == root or p.startswith(inside_root[0]) or p == "/dev/null"

    def readable(path: Any) -> bool:
        p = resolve(path)
        if p is None or p in _READABLE_FILES or p == root:
            return True
        if p.startswith("/proc/self/"):
            p = f"/proc/{own}/" + p[len("/proc/self/") :]
        return p.startswith(readable_dirs)

    def refuse(what: str) -> None:
        raise PermissionError(f"sandbox: {what} is not allowed")

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, 0))[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(
                isinstance(flags, int) and flags & write_flags
            )
            if writing and not writable(path):
                refuse(f"writing {path!s} (outside the sandbox folder)")
            if not writing and not readable(path):
                refuse(f"reading {path!s}")
            return
        if event == "import":
            if args and args[0] in _REFUSED_IMPORTS:
                refuse(f"importing {args[0]}")
            return
        if event.startswith(_REFUSED_PREFIXES):
            if event == "socket.__new__" and len(args) > 1 and args[1] == 1:  # AF_UNIX: a local socket pair
                return
            refuse(f"network access ({event})" if event.startswith("socket.") else event)
        if event in _REFUSED_EVENTS:
            refuse("starting processes" if event in ("os.fork", "os.exec", "subprocess.Popen") else event)
        if event == "os.kill" and args and args[0] not in (own, 0):
            refuse("signalling other processes")
        indexes = _PATH_EVENTS.get(event)
        if indexes:
            for i in indexes:
                if i < len(args) and not writable(args[i]):
                    refuse(f"{event} on {args[i]!s} (outside the sandbox folder)")

    return hook


def _child_main() -> None:  # pragma: no cover - runs in the child (the sandbox tests exercise it)
    import builtins
    import gc
    import resource
    import signal
    import traceback

    payload = json.loads(sys.stdin.buffer.read())
    # results go on a private copy of stdout; what the answer prints lands in the (size-capped) stderr file
    results = os.dup(1)
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    token: str = payload["token"]
    write, dumps = os.write, json.dumps  # held before the answer can replace them
    reserve = [bytearray(1 << 20)]  # freed on MemoryError, so the report can still be written

    def emit(event: dict[str, Any]) -> None:
        write(results, (token + dumps(event) + "\n").encode())

    limits = payload["limits"]

    def limit(which: int, value: int) -> None:
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        try:
            resource.setrlimit(which, (value, value if which != resource.RLIMIT_CPU else value + 1))
        except (ValueError, OSError):
            pass

    limit(resource.RLIMIT_CPU, limits["cpu"])
    limit(resource.RLIMIT_AS, limits["memory"])
    limit(resource.RLIMIT_FSIZE, limits["fsize"])
    limit(resource.RLIMIT_NOFILE, limits["nofile"])
    limit(resource.RLIMIT_CORE, 0)
    # no new processes (nor threads) for an ordinary user; root ignores it, the audit hook does not
    limit(resource.RLIMIT_NPROC, 0)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-big file is an OSError, not a dead child

    # subprocess is imported by much of the standard library (asyncio, platform): load it now and disarm its
    # private fork_exec, which raises no audit event; re-importing _posixsubprocess is refused by the hook
    import _posixsubprocess
    import subprocess

    def no_fork_exec(*args: Any) -> Any:
        raise PermissionError("sandbox: starting processes is not allowed")

    _posixsubprocess.fork_exec = no_fork_exec
    assert subprocess  # loaded for the side effect above

    sys.addaudithook(_guard(payload["root"]))
    sys.setrecursionlimit(3000)

    sources = {"<setup>": payload["setup"], "<answer>": payload["code"], "<prelude>": payload["prelude"]}
    for i, test in enumerate(payload["tests"]):
        sources[f"<test {i + 1}>"] = test

    def describe_error(e: BaseException) -> str:
        try:
            text = str(e)
        except Exception:
            text = ""
        name = type(e).__name__
        head = f"{name}: {text}" if text else name
        head = " ".join(head.split())
        if len(head) > 200:
            head = head[:199] + "…"
        place = ""
        for frame, line in traceback.walk_tb(e.__traceback__):
            if frame.f_code.co_filename in ("<answer>", "<setup>"):
                place = f" ({frame.f_code.co_filename.strip('<>')} line {line})"
        return head + place

    def fail_memory() -> None:
        reserve.clear()
        namespace.clear()
        gc.collect()

    def finish() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(0)  # skip whatever the answer registered with atexit

    namespace: dict[str, Any] = {"__name__": "solution", "__builtins__": builtins}
    pristine = dict(vars(builtins))

    def restore_builtins() -> None:
        # an answer that replaces builtins (sorted = lambda x: x) must not change what the tests compare with
        current = vars(builtins)
        for name in [n for n in current if n not in pristine]:
            del current[name]
        current.update(pristine)
        namespace["__builtins__"] = builtins

    for part in ("setup", "answer"):
        source = sources[f"<{part}>"]
        if not source.strip():
            continue
        try:
            compiled = compile(source, f"<{part}>", "exec")
        except SyntaxError as e:
            if part == "setup":
                emit({"stage": "setup", "error": f"SyntaxError: {e.msg} (line {e.lineno})"})
            else:
                emit({"stage": "syntax", "line": e.lineno, "msg": e.msg})
            finish()
        except (ValueError, MemoryError, RecursionError) as e:
            emit({"stage": "syntax", "line": 0, "msg": type(e).__name__})
            finish()
        try:
            exec(compiled, namespace)
        except MemoryError:
            fail_memory()
            emit({"stage": part, "error": "MemoryError"})
            finish()
        except BaseException as e:  # SystemExit and KeyboardInterrupt too: the answer does not end the run
            emit({"stage": part, "error": describe_error(e)})
            finish()
    entry = payload.get("entry")
    if entry and not callable(namespace.get(entry)):
        emit({"stage": "entry", "error": f"the answer defines no function {entry!r}"})
        finish()
    restore_builtins()
    for name, target in payload["bind"].items():
        namespace[name] = namespace.get(target)
    if payload["prelude"].strip():
        try:
            exec(compile(payload["prelude"], "<prelude>", "exec"), namespace)
        except BaseException as e:
            emit({"stage": "prelude", "error": describe_error(e)})
            finish()
    for i, test in enumerate(payload["tests"]):
        emit({"start": i})
        restore_builtins()
        try:
            exec(compile(test, f"<test {i + 1}>", "exec"), namespace)
        except MemoryError:
            fail_memory()
            emit({"test": i, "ok": False, "error": "MemoryError"})
            finish()
        except BaseException as e:
            emit({"test": i, "ok": False, "error": describe_error(e)})
        else:
            emit({"test": i, "ok": True})
    emit({"done": True})
    finish()


if __name__ == "__main__":
    _child_main()
