"""Data loading: the built-in readers and row formats (plugins/data_formats.py) through llmforge.data.

Every test writes real files (jsonl, json, csv, txt, parquet written with pyarrow, a folder written
by `datasets`' save_to_disk) under tmp_path and calls load_data in-process with the real plugin
registry. Errors are asserted as the exact line a user sees: `file:line: field: reason`.
"""

from __future__ import annotations

import gzip
import inspect
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from llmforge.data import KINDS, DataOptions, Dataset, check_messages, load_data, write_report
from llmforge.errors import DataError
from llmforge.plugins import load_registry


@pytest.fixture(scope="module")
def registry():
    reg = load_registry(env="")  # the built-in plugins, loaded through their entry points
    assert not [e for e in reg.errors if e.plugin == "data_formats"], reg.errors
    return reg


@pytest.fixture
def data(tmp_path: Path, registry):
    return Data(tmp_path, registry)


class Data:
    """A project folder: write data files, load them as a training stage would."""

    def __init__(self, root: Path, registry):
        self.root = root
        self.registry = registry

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def jsonl(self, name: str, rows: list) -> Path:
        """Rows are dicts (one JSON line each) or raw strings (written as they are)."""
        return self.write(name, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))

    def load(self, path: str | list[str], expect: tuple[str, ...] = KINDS, **options) -> Dataset:
        return load_data(
            DataOptions(path=path, **options),
            self.registry.readers,
            self.registry.row_formats,
            base=self.root,
            expect=expect,
        )

    def error(self, path: str | list[str], expect: tuple[str, ...] = KINDS, **options) -> DataError:
        with pytest.raises(DataError) as info:
            self.load(path, expect=expect, **options)
        return info.value


def chat(user: str = "Hi", answer: str = "Hello!") -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def msgs(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in pairs]


# ------------------------------------------------------------------------------------------------
# registration and start-up
# ------------------------------------------------------------------------------------------------


def test_builtin_readers_and_formats_are_registered(registry):
    assert list(registry.readers) == ["hf_dataset", "jsonl", "json", "csv", "parquet", "txt"]
    assert set(registry.row_formats) == {"text", "alpaca", "sharegpt", "messages", "preference"}
    info = next(p for p in registry.plugins if p.name == "data_formats")
    assert info.builtin and set(info.provides) == {"readers", "row_formats"}


def test_startup_imports_neither_pyarrow_nor_datasets():
    # `llmforge --help` in a fresh interpreter, then the module list. (-X importtime would not do: it
    # does not list modules loaded by importlib.import_module, which is how entry points load.)
    code = (
        "import json, sys\n"
        "sys.argv = ['llmforge', '--help']\n"
        "from llmforge.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "from llmforge.cli.common import registry\n"
        "registry().readers\n"
        "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    loaded = set(json.loads(res.stderr.strip().splitlines()[-1]))
    assert "llmforge_plugins.data_formats" in loaded  # the plugin itself was loaded
    assert not {m.split(".")[0] for m in loaded} & {"pyarrow", "datasets", "pandas", "torch"}


# ------------------------------------------------------------------------------------------------
# messages
# ------------------------------------------------------------------------------------------------


def test_messages_jsonl_is_normalised_and_located_by_line(data):
    data.jsonl(
        "data/chat.jsonl",
        [
            chat(),
            "",  # blank lines are skipped but still counted
            {
                "messages": [
                    {"role": "developer", "content": "Be brief."},
                    {"role": " User ", "content": "2+2?", "name": "x"},
                    {"role": "assistant", "content": [{"type": "text", "text": "4"}, {"type": "text", "text": "."}]},
                ],
                "id": 7,
            },
        ],
    )
    ds = data.load("data/chat.jsonl")
    assert (ds.kind, ds.format, ds.files) == ("chat", "messages", ["data/chat.jsonl"])
    assert ds.wheres == ["data/chat.jsonl:1", "data/chat.jsonl:3"]
    assert ds.rows == [
        {"messages": msgs(("user", "Hi"), ("assistant", "Hello!"))},
        {"messages": msgs(("system", "Be brief."), ("user", "2+2?"), ("assistant", "4."))},
    ]
    assert len(ds) == 2 and ds.summary() == "2 chat rows (messages format) from 1 file"


def test_bad_role_is_reported_with_file_line_and_field(data):
    data.jsonl("data/chat.jsonl", [chat()] * 16 + [{"messages": msgs(("system", "s"), ("user", "u"), ("usr", "a"))}])
    err = data.error("data/chat.jsonl")
    assert err.message == 'data/chat.jsonl:17: messages[2].role: expected one of system/user/assistant/tool, got "usr"'
    assert 'on_bad_row = "skip"' in err.hint
    assert err.exit_code == 2


@pytest.mark.parametrize(
    "messages, reason",
    [
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": 42}],
            "messages[1].content: expected a string, got 42",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}],
            "messages[1].content: expected a string, got null",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": {"text": "a"}}],
            "messages[1].content: expected a string, got an object",
        ),
        (
            [
                {"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
                {"role": "assistant", "content": "a"},
            ],
            'messages[0].content[0]: expected a text part ({"type": "text", "text": ...}), got "image_url" part',
        ),
        ([{"role": "user"}, {"role": "assistant", "content": "a"}], "messages[0].content: missing"),
        ([{"content": "q"}, {"role": "assistant", "content": "a"}], "messages[0].role: missing"),
        ([{"role": 1, "content": "q"}], "messages[0].role: expected one of system/user/assistant/tool, got 1"),
        (["hi"], 'messages[0]: expected an object with role and content, got "hi"'),
        ("hello", 'messages: expected a list of messages, got "hello"'),
        ({"role": "user"}, "messages: expected a list of messages, got an object"),
        ([], "messages: empty list of messages"),
        ([{"role": "user", "content": "q"}], "messages: no assistant turn to train on"),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}],
            "messages: no assistant turn to train on",
        ),
    ],
)
def test_messages_errors(data, messages, reason):
    data.jsonl("data/c.jsonl", [chat(), {"messages": messages}])
    assert data.error("data/c.jsonl").message == f"data/c.jsonl:2: {reason}"


def test_check_messages_returns_clean_copies():
    src = [{"role": "USER", "content": "q", "extra": 1}, {"role": "assistant", "content": "a"}]
    assert check_messages(src, assistant=True) == msgs(("user", "q"), ("assistant", "a"))
    assert src[0]["role"] == "USER"  # the input is not modified


# ------------------------------------------------------------------------------------------------
# alpaca
# ------------------------------------------------------------------------------------------------


def test_alpaca_rows_become_chat(data):
    data.jsonl(
        "data/a.jsonl",
        [
            {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"},
            {"instruction": "Say hi.", "output": "Hi"},  # input is optional
            {"instruction": "Say hi.", "input": "", "output": "Hi", "system": "You are terse."},
            {"instruction": "And now?", "input": None, "output": "Bye", "history": [["Hello", "Hi there"]]},
        ],
    )
    ds = data.load("data/a.jsonl")
    assert (ds.kind, ds.format) == ("chat", "alpaca")
    assert [r["messages"] for r in ds.rows] == [
        msgs(("user", "Translate.\n\nBonjour"), ("assistant", "Hello")),
        msgs(("user", "Say hi."), ("assistant", "Hi")),
        msgs(("system", "You are terse."), ("user", "Say hi."), ("assistant", "Hi")),
        msgs(("user", "Hello"), ("assistant", "Hi there"), ("user", "And now?"), ("assistant", "Bye")),
    ]


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"instruction": "x"}, "output: missing"),
        ({"instruction": "x", "output": 3}, "output: expected a string, got 3"),
        ({"instruction": "x", "output": ""}, "output: empty"),
        ({"instruction": "", "input": "", "output": "y"}, "instruction: empty"),
        ({"instruction": "x", "input": ["a"], "output": "y"}, "input: expected a string, got a list"),
        (
            {"instruction": "x", "output": "y", "history": ["q"]},
            'history[0]: expected an [instruction, answer] pair, got "q"',
        ),
    ],
)
def test_alpaca_errors(data, row, reason):
    data.jsonl("data/a.jsonl", [{"instruction": "i", "output": "o"}, row])
    assert data.error("data/a.jsonl", format="alpaca").message == f"data/a.jsonl:2: {reason}"


# ------------------------------------------------------------------------------------------------
# sharegpt
# ------------------------------------------------------------------------------------------------


def test_sharegpt_roles_and_aliases(data):
    data.jsonl(
        "data/s.jsonl",
        [
            {
                "conversations": [
                    {"from": "system", "value": "sys"},
                    {"from": "human", "value": "q"},
                    {"from": "gpt", "value": "a"},
                ]
            },
            {
                "conversations": [
                    {"from": "User", "value": "q"},
                    {"from": "function_call", "value": '{"name": "f"}'},
                    {"from": "observation", "value": "42"},
                    {"from": "assistant", "value": "It is 42."},
                ],
                "system": "Use tools.",
            },
            {"conversations": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
        ],
    )
    ds = data.load("data/s.jsonl")
    assert (ds.kind, ds.format) == ("chat", "sharegpt")
    assert [r["messages"] for r in ds.rows] == [
        msgs(("system", "sys"), ("user", "q"), ("assistant", "a")),
        msgs(
            ("system", "Use tools."),
            ("user", "q"),
            ("assistant", '{"name": "f"}'),
            ("tool", "42"),
            ("assistant", "It is 42."),
        ),
        msgs(("user", "q"), ("assistant", "a")),
    ]


@pytest.mark.parametrize(
    "conversations, reason",
    [
        (
            [{"from": "human", "value": "q"}, {"from": "usr", "value": "a"}],
            "conversations[1].from: expected one of human/gpt/system/tool "
            "(or user/assistant/function_call/observation/...), "
            'got "usr"',
        ),
        ([{"from": "human", "value": "q"}, {"from": "gpt"}], "conversations[1].value: missing"),
        (
            [{"from": "human", "value": "q"}, {"from": "gpt", "value": 5}],
            "conversations[1].value: expected a string, got 5",
        ),
        ([{"value": "q"}], "conversations[0].from: missing"),
        ([{"from": "human", "value": "q"}], "conversations: no assistant turn to train on"),
        ([], "conversations: empty list of turns"),
    ],
)
def test_sharegpt_errors(data, conversations, reason):
    data.jsonl("data/s.jsonl", [{"conversations": conversations}])
    assert data.error("data/s.jsonl").message == f"data/s.jsonl:1: {reason}"


# ------------------------------------------------------------------------------------------------
# preference
# ------------------------------------------------------------------------------------------------


def test_preference_strings_lists_and_implicit_prompt(data):
    data.jsonl(
        "data/p.jsonl",
        [
            {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
            {
                "prompt": msgs(("system", "s"), ("user", "2+2?")),
                "chosen": msgs(("assistant", "4")),
                "rejected": msgs(("assistant", "5")),
            },
            # the prompt repeated at the start of each answer is dropped
            {
                "prompt": "2+2?",
                "chosen": msgs(("user", "2+2?"), ("assistant", "4")),
                "rejected": msgs(("user", "2+2?"), ("assistant", "5")),
            },
            # no prompt column: the shared opening turns are the prompt
            {
                "chosen": msgs(("user", "hi"), ("assistant", "hello"), ("user", "2+2?"), ("assistant", "4")),
                "rejected": msgs(("user", "hi"), ("assistant", "hello"), ("user", "2+2?"), ("assistant", "5")),
            },
        ],
    )
    ds = data.load("data/p.jsonl", expect=("preference",))
    assert (ds.kind, ds.format) == ("preference", "preference")
    four, five = msgs(("assistant", "4")), msgs(("assistant", "5"))
    assert ds.rows == [
        {"prompt": msgs(("user", "2+2?")), "chosen": four, "rejected": five},
        {"prompt": msgs(("system", "s"), ("user", "2+2?")), "chosen": four, "rejected": five},
        {"prompt": msgs(("user", "2+2?")), "chosen": four, "rejected": five},
        {"prompt": msgs(("user", "hi"), ("assistant", "hello"), ("user", "2+2?")), "chosen": four, "rejected": five},
    ]


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "q", "chosen": "a"}, "rejected: missing"),
        (
            {"prompt": msgs(("user", "q"), ("assistant", "a")), "chosen": "b", "rejected": "c"},
            'prompt[1].role: the prompt must end with a user turn, got "assistant"',
        ),
        (
            {"prompt": "q", "chosen": msgs(("user", "other"), ("assistant", "a")), "rejected": "b"},
            'chosen[0].role: expected assistant (the answer to the prompt), got "user"',
        ),
        ({"prompt": "q", "chosen": "a", "rejected": "a"}, "rejected: same as chosen: the pair teaches nothing"),
        ({"prompt": "q", "chosen": "a", "rejected": 1}, "rejected: expected a list of messages, got 1"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "chosen: empty"),
        ({"chosen": "a", "rejected": "b"}, "prompt: missing (needed when chosen and rejected are plain strings)"),
        (
            {"chosen": msgs(("user", "q"), ("assistant", "a")), "rejected": msgs(("user", "r"), ("assistant", "b"))},
            "rejected: does not start with the same turns as chosen "
            "(with no prompt column, the shared opening turns are the prompt)",
        ),
        (
            {"prompt": "q", "chosen": msgs(("assistant", "a")), "rejected": msgs(("assistant", "b"), ("usr", "c"))},
            'rejected[1].role: expected one of system/user/assistant/tool, got "usr"',
        ),
    ],
)
def test_preference_errors(data, row, reason):
    data.jsonl("data/p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, row])
    assert data.error("data/p.jsonl").message == f"data/p.jsonl:2: {reason}"


# ------------------------------------------------------------------------------------------------
# text
# ------------------------------------------------------------------------------------------------

TXT = "\ufeffFirst doc, line 1\r\n    indented line 2\r\n\n\n   \nSecond doc\n\nThird doc\n\n"


@pytest.mark.parametrize(
    "split, texts, lines",
    [
        ("blank_line", ["First doc, line 1\n    indented line 2", "Second doc", "Third doc"], [1, 6, 8]),
        ("line", ["First doc, line 1", "    indented line 2", "Second doc", "Third doc"], [1, 2, 6, 8]),
        ("file", ["First doc, line 1\n    indented line 2\n\n\n   \nSecond doc\n\nThird doc"], [1]),
    ],
)
def test_txt_split_modes(data, split, texts, lines):
    data.write("data/notes.txt", TXT.encode("utf-8"))
    ds = data.load("data/notes.txt", text_split=split)
    assert (ds.kind, ds.format) == ("text", "text")
    assert [r["text"] for r in ds.rows] == texts
    assert ds.wheres == [f"data/notes.txt:{n}" for n in lines]


def test_text_rows_from_jsonl_and_empty_text(data):
    data.jsonl("data/t.jsonl", [{"text": "one"}, {"text": "   "}, {"text": None}, {"body": "x"}])
    assert data.load("data/t.jsonl", limit=1).rows == [{"text": "one"}]
    assert data.error("data/t.jsonl").message == "data/t.jsonl:2: text: empty"
    ds = data.load("data/t.jsonl", on_bad_row="skip")
    assert ds.skipped == [
        ("data/t.jsonl:2", "text: empty"),
        ("data/t.jsonl:3", "text: expected a string, got null"),
        ("data/t.jsonl:4", "text: missing"),
    ]


# ------------------------------------------------------------------------------------------------
# JSON Lines and JSON
# ------------------------------------------------------------------------------------------------


def test_bad_json_lines_are_located_and_skippable(data):
    data.jsonl("data/x.jsonl", [chat(), '{"messages": []', "[1, 2]", chat("q2")])
    err = data.error("data/x.jsonl")
    assert err.message == "data/x.jsonl:2: invalid JSON: Expecting ',' delimiter (column 16)"
    ds = data.load("data/x.jsonl", on_bad_row="skip")
    assert ds.wheres == ["data/x.jsonl:1", "data/x.jsonl:4"]
    assert ds.skipped == [
        ("data/x.jsonl:2", "invalid JSON: Expecting ',' delimiter (column 16)"),
        ("data/x.jsonl:3", "expected a JSON object ({...}), got a list"),
    ]


def test_gzipped_jsonl(data):
    data.write("data/x.jsonl.gz", gzip.compress((json.dumps(chat()) + "\n").encode()))
    ds = data.load("data/x.jsonl.gz")
    assert ds.rows == [{"messages": msgs(("user", "Hi"), ("assistant", "Hello!"))}]
    assert ds.wheres == ["data/x.jsonl.gz:1"]


def test_json_list_rows_know_their_line(data):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]
    data.write("data/a.json", json.dumps(rows, indent=2))
    ds = data.load("data/a.json")
    assert ds.format == "alpaca" and ds.wheres == ["data/a.json:2", "data/a.json:6"]
    assert ds.rows[1]["messages"] == msgs(("user", "c"), ("assistant", "d"))


def test_json_object_holding_one_list(data):
    data.write("data/wrapped.json", '{"version": 2,\n "data": [\n  {"text": "a"},\n  {"text": "b"}\n ]}')
    ds = data.load("data/wrapped.json")
    assert ds.rows == [{"text": "a"}, {"text": "b"}] and ds.wheres == ["data/wrapped.json:3", "data/wrapped.json:4"]
    data.write("data/splits.json", json.dumps({"test": [{"text": "t"}], "train": [{"text": "a"}]}))
    assert data.load("data/splits.json").rows == [{"text": "a"}]  # several lists: the train one


def test_json_that_is_really_json_lines(data):
    data.write("data/lines.json", json.dumps({"text": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    ds = data.load("data/lines.json")
    assert ds.rows == [{"text": "a"}, {"text": "b"}] and ds.wheres == ["data/lines.json:1", "data/lines.json:2"]


@pytest.mark.parametrize(
    "content, message",
    [
        (
            '[\n  {"text": "a"},\n  {"text": "b"\n  {"text": "c"}\n]',
            "data/x.json:4: invalid JSON: Expecting ',' delimiter (column 3)",
        ),
        (
            '{"a": [], "b": []}',
            "data/x.json: expected a list of objects, or an object holding one list; this object "
            "holds lists under 'a', 'b'",
        ),
        (
            '{"a": 1}',
            "data/x.json: expected a list of objects, or an object holding one list; this object holds no list",
        ),
        ('\n"text"', 'data/x.json:2: expected a list of objects, or an object holding one list; got "text"'),
        ("[]", "data/x.json: empty file (no rows)"),
        ("  \n", "data/x.json: empty file (no rows)"),
    ],
)
def test_json_file_errors(data, content, message):
    data.write("data/x.json", content)
    # a broken document cannot be skipped past: these fail even with on_bad_row = "skip" (except empty files)
    policy = "error" if "empty file" in message else "skip"
    assert data.error("data/x.json", on_bad_row=policy).message == message


def test_json_list_of_non_objects(data):
    data.write("data/x.json", '[{"text": "a"}, 3]')
    assert data.error("data/x.json").message == "data/x.json:1: expected a JSON object ({...}), got 3"


# ------------------------------------------------------------------------------------------------
# CSV
# ------------------------------------------------------------------------------------------------


def test_csv_rows_with_multiline_fields(data):
    data.write(
        "data/a.csv",
        'instruction,input,output\r\nGreet,,Hello\r\n"Write, please","a\r\nb","two\r\nlines"\r\n\r\nLast,x,y\r\n',
    )
    ds = data.load("data/a.csv")
    assert ds.format == "alpaca"
    assert ds.wheres == ["data/a.csv:2", "data/a.csv:3", "data/a.csv:7"]  # the quoted row spans 3-5
    assert [r["messages"] for r in ds.rows] == [
        msgs(("user", "Greet"), ("assistant", "Hello")),
        msgs(("user", "Write, please\n\na\r\nb"), ("assistant", "two\r\nlines")),
        msgs(("user", "Last\n\nx"), ("assistant", "y")),
    ]


def test_csv_messages_as_json_cells_and_tsv(data):
    data.write("data/m.tsv", "messages\tid\n" + json.dumps(chat()["messages"]) + "\t1\n")
    ds = data.load("data/m.tsv")
    assert ds.format == "messages" and ds.rows == [chat()]


def test_csv_field_count_and_header_errors(data):
    data.write("data/a.csv", "text,id\nhello,1\nextra,2,3\n")
    assert data.error("data/a.csv").message == "data/a.csv:3: expected 2 fields (as in the header), got 3"
    assert data.load("data/a.csv", on_bad_row="skip").rows == [{"text": "hello"}]
    data.write("data/d.csv", "text,text\na,b\n")
    assert data.error("data/d.csv").message == "data/d.csv:1: header: column 'text' appears more than once"
    # an unclosed quote must not swallow the rest of the file: the record where it opens is named
    data.write("data/q.csv", 'text\nok\n"never closed\nmore\nrows\n')
    err = data.error("data/q.csv", on_bad_row="skip")
    assert err.message == "data/q.csv:3: cannot parse CSV: unexpected end of data" and "quot" in err.hint
    data.write("data/q.csv", 'text\nok\n"closed"then more\n')
    assert data.error("data/q.csv").message == "data/q.csv:3: cannot parse CSV: ',' expected after '\"'"


def test_csv_header_only_is_empty(data):
    data.write("data/a.csv", "text\n")
    assert data.error("data/a.csv").message == "data/a.csv: empty file (no rows)"


def test_csv_missing_column(data):
    data.write("data/a.csv", "instruction,input\nGreet,\n")
    assert data.error("data/a.csv", format="alpaca").message == "data/a.csv:2: output: missing"


# ------------------------------------------------------------------------------------------------
# encodings
# ------------------------------------------------------------------------------------------------

LATIN1 = "caf\xe9".encode("latin-1")  # b"caf\xe9": not UTF-8
BAD_BYTE = (
    "not valid UTF-8: byte 0xe9 at column {col} (the file must be UTF-8; re-save or convert it, "
    "e.g. iconv -f latin1 -t utf-8)"
)


def test_bad_encoding_in_jsonl_names_the_line_and_is_skippable(data):
    data.write("data/x.jsonl", b'{"text": "ok"}\n{"text": "' + LATIN1 + b'"}\n{"text": "fine"}\n')
    assert data.error("data/x.jsonl").message == "data/x.jsonl:2: " + BAD_BYTE.format(col=14)
    ds = data.load("data/x.jsonl", on_bad_row="skip")
    assert ds.rows == [{"text": "ok"}, {"text": "fine"}] and ds.skipped == [("data/x.jsonl:2", BAD_BYTE.format(col=14))]


def test_bad_encoding_in_txt(data):
    data.write("data/x.txt", b"first\n\nsecond starts\nthen " + LATIN1 + b"\n\nthird\n")
    assert data.error("data/x.txt").message == "data/x.txt:4: " + BAD_BYTE.format(col=9)
    assert [r["text"] for r in data.load("data/x.txt", on_bad_row="skip").rows] == ["first", "third"]
    assert data.error("data/x.txt", text_split="file").message == "data/x.txt:4: " + BAD_BYTE.format(col=9)


def test_bad_encoding_in_csv_and_json(data):
    data.write("data/x.csv", b'text\nok\n"multi\n' + LATIN1 + b'"\nfine\n')
    assert data.error("data/x.csv").message == "data/x.csv:4: " + BAD_BYTE.format(col=4)
    assert data.load("data/x.csv", on_bad_row="skip").rows == [{"text": "ok"}, {"text": "fine"}]
    data.write("data/x.json", b'[\n{"text": "ok"},\n{"text": "' + LATIN1 + b'"}\n]')
    assert data.error("data/x.json", on_bad_row="skip").message == "data/x.json:3: " + BAD_BYTE.format(col=14)


# ------------------------------------------------------------------------------------------------
# parquet and saved Hugging Face datasets
# ------------------------------------------------------------------------------------------------


def test_parquet_by_record_batches(data):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [chat(f"q{i}", f"a{i}") for i in range(5)]
    rows[3] = {"messages": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": None}]}
    path = data.root / "data" / "chat.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    assert (
        data.error("data/chat.parquet").message
        == "data/chat.parquet:row 3: messages[1].content: expected a string, got null"
    )
    ds = data.load("data/chat.parquet", on_bad_row="skip")
    assert ds.wheres == [
        "data/chat.parquet:row 0",
        "data/chat.parquet:row 1",
        "data/chat.parquet:row 2",
        "data/chat.parquet:row 4",
    ]
    assert ds.rows[4 - 1] == chat("q4", "a4")
    assert data.load("data/chat.parquet", limit=2).rows == [chat("q0", "a0"), chat("q1", "a1")]


def test_parquet_that_is_not_parquet_or_empty_or_mistyped(data):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data.write("data/x.parquet", "hello")
    assert data.error("data/x.parquet").message.startswith("data/x.parquet: cannot read as parquet: ")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), data.root / "data" / "empty.parquet")
    assert data.error("data/empty.parquet").message == "data/empty.parquet: empty file (no rows)"
    pq.write_table(pa.table({"prompt": ["q"], "chosen": ["a"], "rejected": [7]}), data.root / "data" / "p.parquet")
    assert data.error("data/p.parquet").message == "data/p.parquet:row 0: rejected: expected a list of messages, got 7"


def test_saved_hf_dataset_and_dataset_dict(data):
    import datasets

    rows = [{"instruction": f"i{n}", "output": f"o{n}"} for n in range(3)]
    datasets.Dataset.from_list(rows).save_to_disk(str(data.root / "data" / "hf"))
    ds = data.load("data/hf")
    assert ds.format == "alpaca" and ds.files == ["data/hf"]
    assert ds.wheres == ["data/hf:row 0", "data/hf:row 1", "data/hf:row 2"]
    assert ds.rows[2]["messages"] == msgs(("user", "i2"), ("assistant", "o2"))

    train = datasets.Dataset.from_list([{"text": "train me"}])
    test = datasets.Dataset.from_list([{"text": "not me"}])
    datasets.DatasetDict({"test": test, "train": train}).save_to_disk(str(data.root / "dd"))
    ds = data.load("dd")
    assert ds.rows == [{"text": "train me"}] and ds.wheres == ["dd/train:row 0"]

    datasets.DatasetDict({"a": train, "b": test}).save_to_disk(str(data.root / "nosplit"))
    err = data.error("nosplit")
    assert err.message == "nosplit: a dataset with the splits a, b and no train split"

    datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "q"}]}]).save_to_disk(str(data.root / "bad"))
    assert data.error("bad").message == "bad:row 0: messages: no assistant turn to train on"

    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(data.root / "empty"))
    assert data.error("empty").message == "empty: empty file (no rows)"


# ------------------------------------------------------------------------------------------------
# folders, lists of paths, limit
# ------------------------------------------------------------------------------------------------


def test_folder_reading_order(data):
    import datasets

    for name in ("part10", "part2", "part1"):
        data.jsonl(f"data/{name}.jsonl", [{"text": name}])
    data.jsonl("data/sub/a.jsonl", [{"text": "sub/a"}])
    data.write("data/z.json", json.dumps([{"text": "z"}]))
    data.write("data/.hidden.jsonl", "not even json")  # hidden: never read
    data.write("data/README.md", "# about this data")  # no reader: ignored
    datasets.Dataset.from_list([{"text": "hf"}]).save_to_disk(str(data.root / "data" / "sub" / "hf"))
    ds = data.load("data")
    assert ds.files == [
        "data/part1.jsonl",
        "data/part2.jsonl",
        "data/part10.jsonl",
        "data/sub/a.jsonl",
        "data/sub/hf",
        "data/z.json",
    ]
    assert [r["text"] for r in ds.rows] == ["part1", "part2", "part10", "sub/a", "hf", "z"]
    # a list of paths is read in the order given
    assert data.load(["data/z.json", "data/part1.jsonl"]).files == ["data/z.json", "data/part1.jsonl"]


def test_limit_stops_across_files(data):
    data.jsonl("data/a.jsonl", [{"text": "a1"}, {"text": "a2"}])
    data.jsonl("data/b.jsonl", [{"text": "b1"}, {"text": "b2"}])
    data.jsonl("data/c.jsonl", ["broken"])
    ds = data.load("data", limit=3)
    assert [r["text"] for r in ds.rows] == ["a1", "a2", "b1"] and ds.files == ["data/a.jsonl", "data/b.jsonl"]


def test_missing_paths_and_unknown_files(data):
    assert data.error("nope.jsonl").message == "nope.jsonl: file not found"
    data.write("data/x.xml", "<a/>")
    assert data.error("data/x.xml").message == (
        "data/x.xml: no reader for this file type (known: .jsonl, "
        ".ndjson, .jsonl.gz, .ndjson.gz, .json, .json.gz, .csv, .tsv, "
        ".csv.gz, .tsv.gz, .parquet, .txt, .txt.gz)"
    )
    assert data.error("data").message.startswith("data: no readable data files")


def test_empty_files(data):
    data.jsonl("data/a.jsonl", [{"text": "a"}])
    data.write("data/b.jsonl", "\n\n")
    data.write("data/c.txt", "  \n")
    assert data.error("data").message == "data/b.jsonl: empty file (no rows)"
    ds = data.load("data", on_bad_row="skip")
    assert ds.rows == [{"text": "a"}]
    assert ds.skipped == [("data/b.jsonl", "empty file (no rows)"), ("data/c.txt", "empty file (no rows)")]


# ------------------------------------------------------------------------------------------------
# formats: detection, override, column mapping
# ------------------------------------------------------------------------------------------------


def test_detection_and_override(data):
    data.jsonl("data/x.jsonl", [{"text": "plain", **chat()}])
    assert data.load("data/x.jsonl").format == "messages"  # higher priority
    assert data.load("data/x.jsonl", expect=("text",)).format == "text"  # what the stage can use wins
    assert data.load("data/x.jsonl", format="text").rows == [{"text": "plain"}]
    err = data.error("data/x.jsonl", format="sharegtp")
    assert err.message == "unknown data format 'sharegtp'; did you mean 'sharegpt'?"


def test_kind_the_stage_cannot_use(data):
    data.jsonl("data/t.jsonl", [{"text": "a"}])
    assert (
        data.error("data/t.jsonl", expect=("chat",)).message
        == "data/t.jsonl:1: rows are in the text format (text data), this stage needs chat data"
    )
    assert (
        data.error("data/t.jsonl", expect=("preference",), format="messages").message
        == 'format = "messages": rows are in the messages format (chat data), this stage needs preference data'
    )


def test_undetectable_rows(data):
    data.jsonl("data/x.jsonl", [{"question": "q", "answer": "a"}, {"text": "ok"}])
    err = data.error("data/x.jsonl")
    assert err.message == "data/x.jsonl:1: cannot tell the row format from the columns ['answer', 'question']"
    assert "format =" in err.hint and "alpaca: instruction, output" in err.hint
    ds = data.load("data/x.jsonl", on_bad_row="skip")  # detection waits for a row that fits
    assert ds.rows == [{"text": "ok"}] and len(ds.skipped) == 1


def test_mixed_formats_in_one_folder(data):
    data.jsonl("data/a.jsonl", [chat()])
    data.jsonl("data/b.jsonl", [{"instruction": "i", "output": "o"}])
    assert data.error("data").message == (
        "data/b.jsonl:1: messages: missing (this row looks like the alpaca format, but the data's format is "
        "messages, detected at data/a.jsonl:1; one dataset has one format)"
    )


def test_column_mapping(data):
    data.jsonl("data/qa.jsonl", [{"question": "q", "answer": "a", "output": "ignored"}, {"question": "q2"}])
    ds = data.load("data/qa.jsonl", columns={"instruction": "question", "output": "answer"}, on_bad_row="skip")
    assert ds.format == "alpaca" and ds.rows == [{"messages": msgs(("user", "q"), ("assistant", "a"))}]
    assert ds.skipped == [("data/qa.jsonl:2", "answer: missing")]  # the user's column name, not ours
    data.jsonl("data/d.jsonl", [{"dialog": [{"role": "usr", "content": "q"}]}])
    assert (
        data.error("data/d.jsonl", columns={"messages": "dialog"}).message
        == 'data/d.jsonl:1: dialog[0].role: expected one of system/user/assistant/tool, got "usr"'
    )


# ------------------------------------------------------------------------------------------------
# skip policy and the report
# ------------------------------------------------------------------------------------------------


def test_skip_policy_counts_and_report(data, tmp_path):
    data.jsonl("data/chat.jsonl", [chat(), "{oops", {"messages": msgs(("user", "only"))}, chat("q", "a")])
    ds = data.load("data/chat.jsonl", on_bad_row="skip")
    assert len(ds.rows) == 2 and len(ds.skipped) == 2
    assert ds.summary() == (
        "2 chat rows (messages format) from 1 file; 2 bad rows skipped, first: data/chat.jsonl:2: "
        "invalid JSON: Expecting property name enclosed in double quotes (column 2)"
    )
    report = json.loads(write_report(ds, tmp_path / "out").read_text())
    assert report["rows"] == 2 and report["skipped"] == 2 and report["files"] == ["data/chat.jsonl"]
    assert report["first_skipped"][1] == "data/chat.jsonl:3: messages: no assistant turn to train on"
    assert report["skipped_rows"] == [
        {
            "where": "data/chat.jsonl:2",
            "reason": "invalid JSON: Expecting property name enclosed in double quotes (column 2)",
        },
        {"where": "data/chat.jsonl:3", "reason": "messages: no assistant turn to train on"},
    ]


def test_nothing_left_after_skipping_is_an_error(data):
    data.jsonl("data/chat.jsonl", [{"messages": msgs(("user", "a"))}, {"messages": msgs(("user", "b"))}])
    assert data.error("data/chat.jsonl", on_bad_row="skip").message == (
        "data/chat.jsonl: no usable rows (2 bad rows skipped; first: data/chat.jsonl:1: messages: no assistant "
        "turn to train on)"
    )


# ------------------------------------------------------------------------------------------------
# streaming
# ------------------------------------------------------------------------------------------------


def test_jsonl_reader_streams_line_by_line(tmp_path, registry):
    # Through a pipe whose writer is still open: a reader that read the whole file first would block.
    fifo = tmp_path / "live.jsonl"
    os.mkfifo(fifo)
    may_finish, finished = threading.Event(), threading.Event()

    def writer():
        with open(fifo, "w") as fh:
            fh.write(json.dumps({"text": "first"}) + "\n")
            fh.flush()
            may_finish.wait(10)
            fh.write(json.dumps({"text": "second"}) + "\n")
        finished.set()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    records = registry.readers["jsonl"].read(fifo, DataOptions(path=str(fifo)))
    assert inspect.isgenerator(records)
    first = next(records)
    assert first.data == {"text": "first"} and not finished.is_set()
    may_finish.set()
    assert [r.data for r in records] == [{"text": "second"}]
    thread.join(5)


def test_csv_reader_stops_at_the_limit(data):
    # The unterminated quote on line 3 is never parsed: reading stops once `limit` rows are in.
    data.write("data/a.csv", 'text\nfirst\n"unterminated\n')
    assert data.load("data/a.csv", limit=1).rows == [{"text": "first"}]


# ------------------------------------------------------------------------------------------------
# writing rows back as they came in (restore_row, RowFormat.restore)


def _restored(data: Data, name: str, rows: list, fn, **options) -> list[dict]:
    """Each row of the file rewritten with ``fn`` applied to every text, written back as curation does."""
    from llmforge.data import iter_records, restore_row
    from llmforge_plugins.curate.api import map_text

    data.jsonl(name, rows)
    return [
        restore_row(src, map_text(src.row, fn))
        for src in iter_records(
            DataOptions(path=name, **options), data.registry.readers, data.registry.row_formats, base=data.root
        )
    ]


def test_restore_writes_texts_back_where_each_format_read_them(data):
    up = str.upper
    # content parts (joined when read) go back as one part; other keys of a turn stay
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "x"},
            {"role": "assistant", "content": "c"},
        ],
        "id": 1,
    }
    assert _restored(data, "p.jsonl", [parts], up) == [
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "AB"}], "name": "x"},
                {"role": "assistant", "content": "C"},
            ],
            "id": 1,
        }
    ]
    # preference without a prompt column: the shared opening turns are the prompt, in both sides
    implicit = {
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}],
        "k": "v",
    }
    assert _restored(data, "i.jsonl", [implicit], up) == [
        {
            "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "GOOD"}],
            "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "BAD"}],
            "k": "v",
        }
    ]
    # an answer list that repeats the prompt keeps repeating it, rewritten alike
    repeated = {
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
        "rejected": "bad",
    }
    assert _restored(data, "r.jsonl", [repeated], up) == [
        {
            "prompt": [{"role": "user", "content": "Q"}],
            "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "GOOD"}],
            "rejected": "BAD",
        }
    ]
    # alpaca: instruction and input (one user turn) split again at the blank line that joined them
    alpaca = {"instruction": "one\n\ntwo", "input": "three", "output": "four"}
    assert _restored(data, "a.jsonl", [alpaca], up) == [
        {"instruction": "ONE\n\nTWO", "input": "THREE", "output": "FOUR"}
    ]
    # a rewrite that changes the blank lines: the whole turn in instruction, nothing lost
    assert _restored(data, "b.jsonl", [alpaca], lambda t: t.replace("\n\n", " ")) == [
        {"instruction": "one two three", "input": "", "output": "four"}
    ]


def test_restore_keeps_the_users_column_names_and_a_column_mapped_away(data):
    rows = [{"text": "not this one", "body": "this", "id": 3}]
    assert _restored(data, "m.jsonl", rows, str.upper, columns={"text": "body"}) == [
        {"text": "not this one", "body": "THIS", "id": 3}
    ]


def test_restore_refuses_a_rewrite_that_changes_turns(data):
    from llmforge.data import iter_records, restore_row

    data.jsonl("c.jsonl", [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    (src,) = iter_records(DataOptions(path="c.jsonl"), data.registry.readers, data.registry.row_formats, base=data.root)
    with pytest.raises(DataError, match=r"c.jsonl:1: a rewrite step changed the row's turns"):
        restore_row(src, {"messages": src.row["messages"][1:]})


def test_a_dataset_folder_is_read_with_the_format_it_records(data):
    from llmforge.data import write_dataset_meta

    data.jsonl(
        "out/data.jsonl",
        [{"dialog": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "id": 1}],
    )
    with pytest.raises(DataError, match="cannot tell the row format"):
        data.load("out")
    write_dataset_meta(data.root / "out", "messages", {"messages": "dialog"})
    ds = data.load("out")
    assert ds.kind == "chat" and ds.rows[0]["messages"][1]["content"] == "a" and ds.files == ["out/data.jsonl"]
    # what the user sets wins over what the folder records
    with pytest.raises(DataError, match="text"):
        data.load("out", format="text")


def test_the_default_restore_places_texts_by_value_in_order(registry):
    """A third-party format without a restore method: texts copied from the row are found by value,
    equal texts each in their own place; a text the format transformed cannot be placed (an error,
    not a silent loss)."""
    from llmforge.data import RowError, RowFormat

    class Qa(RowFormat):
        name, kind, columns = "qa", "chat", ("q", "a")

        def normalize(self, row):
            return {"messages": [{"role": "user", "content": row["q"]}, {"role": "assistant", "content": row["a"]}]}

    raw = {"q": "same", "a": "same", "id": 1, "meta": {"note": "x"}}
    old = Qa().normalize(raw)
    new = {"messages": [old["messages"][0], {"role": "assistant", "content": "changed"}]}
    assert Qa().restore(raw, old, new) == {"q": "same", "a": "changed", "id": 1, "meta": {"note": "x"}}
    assert raw == {"q": "same", "a": "same", "id": 1, "meta": {"note": "x"}}  # not edited in place

    class Upper(Qa):
        def normalize(self, row):
            return {
                "messages": [{"role": "user", "content": row["q"].upper()}, {"role": "assistant", "content": row["a"]}]
            }

    raw = {"q": "x", "a": "y"}
    old = Upper().normalize(raw)
    with pytest.raises(RowError, match="restore method"):
        Upper().restore(raw, old, {"messages": [{"role": "user", "content": "Z"}, old["messages"][1]]})
