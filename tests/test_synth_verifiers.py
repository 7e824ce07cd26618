"""The synth plugin's built-in verifiers and the code sandbox: real child processes, a real listening socket,
real files; nothing mocked."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from llmforge.errors import DataError
from llmforge_plugins.synth import sandbox
from llmforge_plugins.synth.sandbox import SandboxLimits, parse_tests, run_tests
from llmforge_plugins.synth.verifiers import (
    BUILTIN_VERIFIERS,
    JsonSchema,
    Numeric,
    PythonTests,
    Regex,
    extract_code,
    extract_json,
    final_number,
)


def opts(cls, **kw):
    return cls.Options.model_validate({"verifier": cls.name, **kw})


# ------------------------------------------------------------------------------------------------
# python_tests: the acceptance case (a wrong and a right solution against the same tests)

ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(2, 2) == 4\n"
RIGHT = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nIt adds."
WRONG = "```python\ndef add(a, b):\n    return a * b if a > 0 else a + b\n```"


def test_python_tests_right_and_wrong_solution():
    verifier = PythonTests()
    o = opts(PythonTests)
    assert verifier.check(o) == []
    rows = [{"tests": ADD_TESTS}, {"tests": ADD_TESTS}]
    right, wrong = verifier.verify(o, rows, [RIGHT, WRONG])
    assert right.passed and right.score == 1.0 and right.reason == ""
    assert not wrong.passed
    assert wrong.score == pytest.approx(2 / 3)
    assert wrong.reason == "test 1 of 3 failed: assert add(1, 2) == 3 (AssertionError)"


def test_python_tests_forms_of_tests_and_answers():
    verifier = PythonTests()
    humaneval = (
        "METADATA = {}\n\ndef check(candidate):\n    assert candidate('ab') == 'ba'\n    assert candidate('') == ''\n"
    )
    rows = [
        {"tests": ["assert rev('ab') == 'ba'", "x = rev('')\nassert x == ''"]},  # a list: MBPP's test_list
        {"tests": humaneval, "entry_point": "rev"},
        {"tests": ADD_TESTS},
        {"tests": ADD_TESTS},
        {"tests": "assert f(1) == 1"},
        {"tests": "assert rev('a') == 'a'"},
    ]
    answers = [
        "def rev(s):\n    return s[::-1]",  # no fence: the whole answer
        "```python\ndef rev(s):\n    return s\n```\nthen fixed:\n```python\ndef rev(s):\n    return s[::-1]\n```",
        "```python\ndef add(a, b)\n    return a + b\n```",  # syntax error
        "I cannot write code.",
        "```python\ndef f(x):\n    raise SystemExit(0)\n```",  # exiting does not end the run or pass a test
        "<think>```python\ndef rev(s): return s\n```</think>",  # only thinking: no code
    ]
    o = opts(PythonTests, entry_column="entry_point", workers=3)
    v = verifier.verify(o, [dict(r, entry_point=r.get("entry_point")) for r in rows], answers)
    assert [x.passed for x in v] == [True, True, False, False, False, False]
    assert v[2].reason == "syntax error line 1: expected ':'"
    assert v[3].reason == "syntax error line 1: invalid syntax"  # prose is not code
    assert v[4].reason.startswith("test 1 of 1 failed: assert f(1) == 1 (SystemExit")
    assert v[5].reason == "no code in the answer"
    # an entry the answer does not define
    (missing,) = verifier.verify(opts(PythonTests, entry="rev"), [{"tests": "assert 1"}], ["def other(): pass"])
    assert missing.reason == "the answer defines no function 'rev'"


def test_python_tests_misconfiguration_names_the_key():
    verifier = PythonTests()
    with pytest.raises(DataError, match="no column 'tests'.*tests_column"):
        verifier.verify(opts(PythonTests), [{"answer": 1}], ["x = 1"])
    problems = verifier.check(opts(PythonTests, setup="import (", entry="not a name"))
    assert [p.where for p in problems] == ["setup", "entry"]
    with pytest.raises(ValueError, match="memory_mb"):
        opts(PythonTests, memory_mb=1)
    with pytest.raises(ValueError, match="tests_colum"):
        opts(PythonTests, tests_colum="t")


def test_parse_tests_chunks():
    plan = parse_tests("import math\nx = 2\nassert math.sqrt(x * 2) == 2\nassert x == 2; assert x > 1\ny = 1\n")
    assert plan.tests == ["import math\nx = 2\nassert math.sqrt(x * 2) == 2", "assert x == 2", "assert x > 1\ny = 1"]
    plan = parse_tests(
        "def check(candidate):\n    for i in range(3):\n        assert candidate(i) == i\n\ncheck(f)\n", entry="f"
    )
    assert plan.tests == ["for i in range(3):\n    assert candidate(i) == i"] and plan.bind == {"candidate": "f"}
    assert "check(f)" not in plan.prelude
    with pytest.raises(sandbox.TestsError, match="line 1"):
        parse_tests("assert (")


def test_extract_code():
    assert extract_code("```py\na = 1\n```\ntext\n```python\nb = 2\n```", "all") == "a = 1\n\nb = 2"
    assert extract_code("```py\na = 1\n```\n```python\nb = 2\n```", "last") == "b = 2"
    assert extract_code("```\nc = 3\n```") == "c = 3"
    assert extract_code("```bash\nls\n```\nprint(1)") == "```bash\nls\n```\nprint(1)"  # no python or bare fence


# ------------------------------------------------------------------------------------------------
# the sandbox


def test_infinite_loop_times_out_and_the_child_is_dead():
    code = "import os\nopen('pid', 'w').write(str(os.getpid()))\n"
    started = time.monotonic()
    r = run_tests(code, ["assert 1", "while True:\n    pass"], limits=SandboxLimits(timeout=1))
    assert time.monotonic() - started < 4
    assert r.status == "timeout"
    assert r.reason() == "timeout after 1 s in test 2: while True: pass"
    assert [t.passed for t in r.tests] == [True, False]  # the test before the loop keeps its credit
    assert r.score == 0.5


def test_timeout_kills_the_process_group():
    # the child's pid is read from inside the test; after the timeout nothing of it may be alive
    tests = ["print('PID', PID, flush=True)\nassert 1", "import time\ntime.sleep(60)"]
    r = run_tests("import os\nPID = os.getpid()", tests, limits=SandboxLimits(timeout=1))
    assert r.status == "timeout"
    pid = int(r.output.split("PID", 1)[1].split()[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_memory_bomb_hits_the_memory_limit():
    bomb = "chunks = []\nwhile True:\n    chunks.append(bytearray(10 * 2**20))"
    r = run_tests(
        "def f():\n    return 1\n", ["assert f() == 1", bomb, "assert f() == 1"], limits=SandboxLimits(memory_mb=128)
    )
    assert r.status == "memory"
    assert r.reason().startswith("memory limit (128 MB) in test 2")
    assert [t.passed for t in r.tests] == [True, False, False]
    r = run_tests("x = bytearray(2**40)", "assert 1", limits=SandboxLimits(memory_mb=128))
    assert r.status == "memory" and r.reason() == "memory limit (128 MB) in the answer"


@pytest.mark.parametrize("namespace", [None, False])
def test_network_is_refused_and_the_listener_sees_nothing(namespace):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        attempts = [
            f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)",
            f"import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\ns.connect(('127.0.0.1', {port}))",
            "import socket\nsocket.getaddrinfo('localhost', 80)",
            f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)",
        ]
        for code in attempts:
            r = run_tests(code, "assert 1", namespace=namespace)
            assert r.status == "answer", (code, r.reason())
            assert "network access" in r.reason() or "PermissionError" in r.reason(), r.reason()
        with pytest.raises(BlockingIOError):
            listener.accept()
    # a local socket pair (what asyncio's event loop needs) still works
    r = run_tests("import asyncio\nasyncio.run(asyncio.sleep(0))", "assert 1", namespace=namespace)
    assert r.all_passed, r.reason()


def test_network_namespace_when_the_kernel_allows_it():
    if not sandbox._namespace_prefix():
        pytest.skip("no unprivileged network namespaces here")
    # /proc/self/net shows the namespace the process is in (sysfs would show the host's)
    code = "NAMES = [line.split(':')[0].strip() for line in open('/proc/self/net/dev').readlines()[2:]]"
    r = run_tests(code, "assert NAMES == ['lo'], NAMES")
    assert r.all_passed, r.reason()
    assert r.network == "namespace+audit"


def test_files_land_in_a_temporary_folder_that_is_removed():
    code = "import os\nHERE = os.getcwd()\nopen('out.txt', 'w').write('hello')\nprint('CWD', HERE)"
    r = run_tests(
        code, ["assert open('out.txt').read() == 'hello'", "import tempfile\nassert tempfile.gettempdir() == HERE"]
    )
    assert r.all_passed, r.reason()
    here = r.output.split("CWD", 1)[1].split()[0]
    assert "llmforge-sandbox-" in here and not Path(here).exists()
    outside = Path(here).parent / "llmforge-sandbox-escape.txt"
    for code in (
        f"open({str(outside)!r}, 'w').write('x')",
        f"import os\nos.open({str(outside)!r}, os.O_WRONLY | os.O_CREAT)",
        "import os\nos.remove('/etc/hostname')",
        "import shutil\nshutil.rmtree('/tmp')",
        "import os\nos.symlink('/etc', 'etc')\nopen('etc/evil', 'w')",
    ):
        r = run_tests(code, "assert 1")
        assert r.status == "answer" and "not allowed" in r.reason(), (code, r.reason())
    assert not outside.exists()


def test_processes_are_refused():
    for code in (
        "import os\nwhile True:\n    os.fork()",
        "import subprocess\nsubprocess.run(['echo', 'hi'])",
        "import os\nos.system('echo hi')",
        "import os\nos.execv('/bin/true', ['true'])",
        "import os\nos.posix_spawn('/bin/true', ['true'], {})",
        "import multiprocessing\np = multiprocessing.Process(target=print)\np.start()",
        "import _posixsubprocess\n_posixsubprocess.fork_exec(*[None] * 23)",
        "import ctypes\nctypes.CDLL(None).fork()",
        "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
        f"import os, signal\nos.kill({os.getpid()}, signal.SIGTERM)",
    ):
        r = run_tests(code, "assert 1")
        assert r.status == "answer" and "not allowed" in r.reason(), (code, r.reason())


REFUSED = (
    "try:\n    open({path}, 'rb').read()\nexcept PermissionError:\n    pass\nelse:\n    raise AssertionError('read')"
)


def test_the_environment_holds_no_secrets(monkeypatch):
    monkeypatch.setenv("LLMFORGE_TEST_SECRET", "hunter2")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    tests = [
        "import os\nassert 'LLMFORGE_TEST_SECRET' not in os.environ",
        "import os\nassert not any('PROXY' in k.upper() for k in os.environ)",
        "import os\nassert 'hunter2' not in repr(os.environ)",
        "import os\n" + REFUSED.format(path="f'/proc/{os.getppid()}/environ'"),  # the parent's environment
        REFUSED.format(path=repr(str(Path.cwd() / "pyproject.toml"))),  # the project folder
    ]
    r = run_tests("", tests)
    assert r.all_passed, r.reason()


def test_printed_results_cannot_forge_a_pass():
    r = run_tests(
        'print(\'{"test": 0, "ok": true}\')\nimport sys\nsys.stdout.write(\'{"done": true}\\n\')', "assert False"
    )
    assert r.status == "ok" and not r.all_passed and r.score == 0.0
    r = run_tests("import os\nos._exit(0)", ["assert 1", "assert 1"])
    assert r.status == "crashed" and r.score == 0.0 and "ended early" in r.reason()


def test_python_tests_runs_answers_concurrently():
    sleeper = "import time\ntime.sleep(1)\ndef add(a, b):\n    return a + b"
    started = time.monotonic()
    v = PythonTests().verify(opts(PythonTests, workers=4), [{"tests": ADD_TESTS}] * 4, [sleeper] * 4)
    assert all(x.passed for x in v)
    assert time.monotonic() - started < 3  # four one-second answers, not one after the other (4 s)


# ------------------------------------------------------------------------------------------------
# numeric


@pytest.mark.parametrize(
    "text, value",
    [
        ("The answer is 42.", 42),
        ("She has 1,234 apples", 1234),
        ("The temperature dropped to -3.5 degrees", -3.5),
        ("Half of it: 1/2", 0.5),
        (r"So the result is $\boxed{\frac{3}{4}}$. Check: 3 + 4 = 7", 0.75),
        (r"\boxed{x = 12}", 12),
        ("48 / 2 = 24 clips in May.\n#### 72", 72),
        ("The answer is 12 apples, since 3 * 4 = 12 and 12 - 0 = 12... also 99", 12),
        ("On 2024-01-05 she bought 3 pens", 3),
        ("<think>it might be 5</think>It is 7", 7),
        ("costs $1,234.50 in total", 1234.5),
        ("1.5e3 metres", 1500),
        ("no digits here", None),
    ],
)
def test_final_number(text, value):
    assert final_number(text) == (None if value is None else pytest.approx(value))


def test_numeric_verifier():
    v = Numeric()
    o = opts(Numeric)
    rows = [
        {"answer": "Natalia sold 48/2 = 24 clips in May. #### 72"},
        {"answer": 42},
        {"answer": 42},
        {"answer": "?"},
        {"answer": 0.5},
    ]
    answers = ["Altogether 48 + 24 = 72 clips.", "I think it is 41.", "Well...", "7", r"\boxed{\dfrac{1}{2}}"]
    got = v.verify(o, rows, answers)
    assert [x.passed for x in got] == [True, False, False, False, True]
    assert got[1].reason == "expected 42, found 41"
    assert got[2].reason == "no number in the answer"
    assert got[3].reason == "no number in the expected answer (answer: '?')"
    (close,) = v.verify(opts(Numeric, rel_tolerance=0.01), [{"answer": 100}], ["about 100.9"])
    assert close.passed
    (far,) = v.verify(opts(Numeric, tolerance=0.5), [{"answer": 100}], ["about 100.9"])
    assert far.reason == "expected 100, found 100.9"
    (pat,) = v.verify(
        opts(Numeric, pattern=r"Answer:\s*(.*)", answer_column="gold"), [{"gold": "3"}], ["Answer: 3\nSteps: 1, 2"]
    )
    assert pat.passed
    assert [p.where for p in v.check(opts(Numeric, pattern="("))] == ["pattern"]
    with pytest.raises(DataError, match="no column 'answer'"):
        v.verify(o, [{"solution": 1}], ["1"])


# ------------------------------------------------------------------------------------------------
# regex


def test_regex_verifier():
    v = Regex()
    o = opts(Regex, pattern=r"^Answer: \d+$", flags=["multiline"], must_not="(?i)as an ai")
    answers = ["Reasoning...\nAnswer: 3", "Answer: three", "As an AI, I think\nAnswer: 3"]
    got = v.verify(o, [{}] * 3, answers)
    assert [x.passed for x in got] == [True, False, False]
    assert got[1].reason == r"does not match /^Answer: \d+$/"
    assert got[2].reason == "matches the forbidden /(?i)as an ai/ at 'As an AI'"
    full = opts(Regex, pattern=r"yes|no", mode="fullmatch", flags=["ignorecase"])
    assert [x.passed for x in v.verify(full, [{}] * 3, ["  YES\n", "yes, sure", "No"])] == [True, False, True]
    assert [p.where for p in v.check(opts(Regex))] == ["pattern"]
    assert [p.where for p in v.check(opts(Regex, pattern="ok", must_not="["))] == ["must_not"]
    with pytest.raises(ValueError, match="flags"):
        opts(Regex, pattern="x", flags=["verbose"])


# ------------------------------------------------------------------------------------------------
# json_schema

PERSON = {
    "type": "object",
    "required": ["name", "age"],
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
}


def test_json_schema_verifier_messy_answers(tmp_path):
    v = JsonSchema()
    o = opts(JsonSchema, schema=PERSON)
    assert v.check(o) == []
    answers = [
        'Sure! Here it is:\n```json\n{"name": "Ada", "age": 36}\n```\nAnything else?',
        'The record is {"name": "Bob", "age": 7, "tags": ["a"]} as requested.',
        '{"name": "Cy", "age": "old"}',
        'Result: {"name": "Di", "age": 3, "tags": ["x", 5]}',
        "I could not produce it.",
        '```json\n{"name": "Ed", "age": 1,}\n```',
    ]
    got = v.verify(o, [{}] * len(answers), answers)
    assert [x.passed for x in got] == [True, True, False, False, False, False]
    assert got[2].reason == "$.age: 'old' is not of type 'integer'"
    assert got[3].reason == "$.tags[1]: 5 is not of type 'string'"
    assert got[4].reason == "no JSON object or array in the answer"
    assert got[5].reason.startswith("the ```json block is not valid JSON")
    strict = opts(JsonSchema, schema=PERSON, strict=True)
    assert [x.passed for x in v.verify(strict, [{}] * 2, answers[:2])] == [False, False]
    assert v.verify(strict, [{}], ['  {"name": "F", "age": 2}\n'])[0].passed
    # from a file and from a column
    path = tmp_path / "person.json"
    path.write_text(json.dumps(PERSON))
    from_file = opts(JsonSchema, schema_file=str(path))
    assert v.check(from_file) == [] and v.verify(from_file, [{}], answers[:1])[0].passed
    col = opts(JsonSchema, schema_column="schema")
    rows = [{"schema": json.dumps({"type": "array", "maxItems": 2})}, {"schema": {"type": "array", "maxItems": 2}}]
    got = v.verify(col, rows, ["[1, 2]", "[1, 2, 3]"])
    assert got[0].passed and got[1].reason == "$: [1, 2, 3] is too long"
    assert extract_json('text [1, {"a": 2}] more') == [1, {"a": 2}]


def test_json_schema_problems_name_the_key(tmp_path):
    v = JsonSchema()
    assert [p.where for p in v.check(opts(JsonSchema))] == ["schema"]
    assert [p.where for p in v.check(opts(JsonSchema, schema=PERSON, schema_column="s"))] == ["schema"]
    assert [p.where for p in v.check(opts(JsonSchema, schema={"type": "nonsense"}))] == ["schema"]
    assert [p.where for p in v.check(opts(JsonSchema, schema_file=str(tmp_path / "none.json")))] == ["schema_file"]
    (tmp_path / "bad.json").write_text("{not json")
    assert [p.where for p in v.check(opts(JsonSchema, schema_file=str(tmp_path / "bad.json")))] == ["schema_file"]
    assert JsonSchema.Options.path_keys == ("schema_file",)
    with pytest.raises(ValueError, match="schem"):
        opts(JsonSchema, schem={})


def test_builtins_are_registered():
    assert [c.name for c in BUILTIN_VERIFIERS] == ["python_tests", "numeric", "regex", "json_schema"]
    from llmforge.plugins import load_registry

    table = load_registry().table("synth_verifiers")
    assert {"python_tests", "numeric", "regex", "json_schema"} <= set(table)
    assert isinstance(table["numeric"], Numeric)


def test_main_guards_do_not_run_and_floods_are_capped():
    main = "def add(a, b):\n    return a + b\n\nif __name__ == '__main__':\n    print(add(int(input()), 1))\n"
    assert run_tests(main, ADD_TESTS).all_passed  # the example under the guard would wait for stdin
    r = run_tests("for _ in range(40):\n    print('x' * 2**20)", "assert 1", limits=SandboxLimits(file_mb=8))
    assert r.status == "answer" and "OSError" in r.reason() and "File too large" in r.reason(), r.reason()


def test_an_answer_cannot_replace_the_builtins_the_tests_use():
    cheat = "import builtins\nbuiltins.sorted = lambda x: x\nbuiltins.len = lambda x: 3\n\ndef sort(x):\n    return x\n"
    r = run_tests(cheat, ["assert sort([3, 1, 2]) == sorted([3, 1, 2])", "assert len([]) == 0"])
    assert [t.passed for t in r.tests] == [False, True]
