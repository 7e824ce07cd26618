"""Curated rows keep every column: `llmforge data dedup|filter|mix` and the `curate` stage write each
kept row back as it came in (every column, in its order, nested values, unicode, parquet types), with
only the removed rows missing and only the texts a rewrite step owns changed. Through the real
command line, for text, chat and preference rows, in JSON Lines and parquet."""

from __future__ import annotations

import copy
import csv
import datetime
import decimal
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_cli

# A text that both rewrite steps change: `normalize` composes the accent (NFC) and turns the no-break
# space into a plain one, `pii` replaces the e-mail address.
RAW = "Cafe\u0301 au lait\u00a0! Write to bob@example.com"
CLEAN = "Café au lait ! Write to <EMAIL>"
PLAIN = "Nothing to change here, ünïcödé as it is."


def _meta(i: int) -> dict:
    return {"source": f"web-{i}", "tags": ["ünï", f"t{i}"], "scores": {"q": i / 4, "ok": i % 2 == 0}}


def text_rows() -> list[dict]:
    # columns in an order no writer would choose by itself: the id first, the text in the middle
    return [
        {"id": "a1", "text": RAW, "meta": _meta(1), "n": 1},
        {"id": "a2", "text": PLAIN, "meta": _meta(2), "n": 2},
        {"id": "a3", "text": RAW, "meta": _meta(3), "n": 3},
    ]  # the same text as a1 once cleaned


def chat_rows() -> list[dict]:
    def conv(answer: str) -> list[dict]:
        return [
            {"role": "user", "content": "Where is the café?", "name": "ann"},
            {"role": "assistant", "content": answer, "name": "bot"},
        ]

    return [
        {"id": "c1", "messages": conv(RAW), "meta": _meta(1)},
        {"id": "c2", "messages": conv(PLAIN), "meta": _meta(2)},
        {"id": "c3", "messages": conv(RAW), "meta": _meta(3)},
    ]


def preference_rows() -> list[dict]:
    def pair(prompt: str, chosen: str) -> dict:
        return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}], "rejected": "No idea."}

    return [
        {"id": "p1", **pair(RAW, RAW), "meta": _meta(1)},
        {"id": "p2", **pair(PLAIN, PLAIN), "meta": _meta(2)},
        {"id": "p3", **pair(RAW, RAW), "meta": _meta(3)},
    ]


def expected(kind: str, rows: list[dict]) -> list[dict]:
    """What must come out: row 3 removed (a duplicate of row 1 once cleaned), RAW rewritten to CLEAN in
    the owned fields only, everything else as it was."""
    out = copy.deepcopy(rows[:2])
    if kind == "text":
        out[0]["text"] = CLEAN
    elif kind == "chat":
        out[0]["messages"][1]["content"] = CLEAN
    else:
        out[0]["prompt"] = CLEAN
        out[0]["chosen"][0]["content"] = CLEAN
    return out


KINDS = {"text": text_rows, "chat": chat_rows, "preference": preference_rows}
STEPS = ["--step", "normalize", "--step", "pii", "--step", "exact_dedup"]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_filter_keeps_every_column_and_changes_only_the_owned_texts(kind, suffix, tmp_path):
    rows = KINDS[kind]()
    src, out = tmp_path / f"in.{suffix}", tmp_path / f"out.{suffix}"
    if suffix == "jsonl":
        _write_jsonl(src, rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), src)
        rows = pq.read_table(src).to_pylist()  # the rows as parquet gives them back
    res = run_cli("data", "filter", str(src), str(out), *STEPS)
    assert res.returncode == 0, res.stderr
    assert "kept 2 of 3 rows (removed 1)" in res.stdout, res.stdout
    if suffix == "jsonl":
        got = _read_jsonl(out)
    else:
        table = pq.read_table(out)
        assert table.schema.equals(pq.read_schema(src).remove_metadata()), table.schema  # the column types too
        got = table.to_pylist()
    want = expected(kind, rows)
    assert got == want
    assert [list(r) for r in got] == [list(r) for r in want]  # the columns in their order
    if kind != "text":  # and the keys inside the turns
        side = "messages" if kind == "chat" else "chosen"
        assert [list(m) for m in got[0][side]] == [list(m) for m in want[0][side]]


def test_dedup_of_parquet_keeps_column_types_to_parquet_and_values_to_jsonl(tmp_path):
    table = pa.table(
        {
            "id": pa.array([7, 8, 9], pa.int32()),
            "text": ["the same words", "the same words", "other words"],
            "at": pa.array(
                [datetime.datetime(2024, 5, 1, 12, 30), None, datetime.datetime(2025, 1, 2)], pa.timestamp("ms")
            ),
            "price": pa.array([decimal.Decimal("1.50"), decimal.Decimal("2.00"), None], pa.decimal128(6, 2)),
            "meta": [{"lang": "fr", "tags": ["été"]}, {"lang": "de", "tags": []}, {"lang": None, "tags": ["x"]}],
        }
    )
    src = tmp_path / "in.parquet"
    pq.write_table(table, src)
    to_parquet = run_cli("data", "dedup", str(src), str(tmp_path / "out.parquet"), "--exact-only")
    to_jsonl = run_cli("data", "dedup", str(src), str(tmp_path / "out.jsonl"), "--exact-only")
    assert to_parquet.returncode == 0 and to_jsonl.returncode == 0, to_parquet.stderr + to_jsonl.stderr
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.schema.equals(table.schema)
    assert out.to_pylist() == [table.to_pylist()[0], table.to_pylist()[2]]
    assert _read_jsonl(tmp_path / "out.jsonl") == [
        {
            "id": 7,
            "text": "the same words",
            "at": "2024-05-01T12:30:00",
            "price": "1.50",
            "meta": {"lang": "fr", "tags": ["été"]},
        },
        {
            "id": 9,
            "text": "other words",
            "at": "2025-01-02T00:00:00",
            "price": None,
            "meta": {"lang": None, "tags": ["x"]},
        },
    ]


def test_rewrites_go_back_into_the_columns_of_every_row_format(tmp_path):
    """alpaca (instruction and input joined into one turn), sharegpt (a system column), and CSV (a
    JSON-encoded message list): the rewritten texts land where they were read from."""
    alpaca = [
        {
            "id": 1,
            "instruction": "Translate\u00a0this.",
            "input": "Cafe\u0301 noir",
            "output": "Black coffee ",
            "history": [["Hi\u00a0there", "Hello"]],
            "system": "Be brief.",
            "extra": [1, 2],
        }
    ]
    sharegpt = [
        {
            "conversations": [{"from": "human", "value": "Mail bob@example.com"}, {"from": "gpt", "value": "Done."}],
            "system": "Cafe\u0301",
            "id": "s1",
        }
    ]
    messages = [{"role": "user", "content": "Call 555-123-4567 today"}, {"role": "assistant", "content": "OK"}]
    _write_jsonl(tmp_path / "alpaca.jsonl", alpaca)
    _write_jsonl(tmp_path / "sharegpt.jsonl", sharegpt)
    with open(tmp_path / "chat.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "messages", "note"])
        w.writerow(["r1", json.dumps(messages), "café"])
    for name in ("alpaca.jsonl", "sharegpt.jsonl", "chat.csv"):
        res = run_cli(
            "data",
            "filter",
            str(tmp_path / name),
            str(tmp_path / f"out-{name.split('.')[0]}.jsonl"),
            "--step",
            "normalize",
            "--step",
            "pii",
        )
        assert res.returncode == 0, res.stderr
    assert _read_jsonl(tmp_path / "out-alpaca.jsonl") == [
        {
            "id": 1,
            "instruction": "Translate this.",
            "input": "Café noir",
            "output": "Black coffee",
            "history": [["Hi there", "Hello"]],
            "system": "Be brief.",
            "extra": [1, 2],
        }
    ]
    assert _read_jsonl(tmp_path / "out-sharegpt.jsonl") == [
        {
            "conversations": [{"from": "human", "value": "Mail <EMAIL>"}, {"from": "gpt", "value": "Done."}],
            "system": "Café",
            "id": "s1",
        }
    ]
    (row,) = _read_jsonl(tmp_path / "out-chat.jsonl")
    assert list(row) == ["id", "messages", "note"] and row["note"] == "café"
    assert json.loads(row["messages"]) == [
        {"role": "user", "content": "Call <PHONE> today"},
        {"role": "assistant", "content": "OK"},
    ]


def test_mix_keeps_columns(tmp_path):
    a = [{"id": f"a{i}", "text": f"source a row {i}", "meta": {"i": i, "tags": ["ä"]}} for i in range(6)]
    b = [{"text": f"source b row {i}", "id": f"b{i}", "meta": {"i": -i, "tags": []}} for i in range(3)]
    c = [{"id": "c0", "instruction": "Say hi", "output": "Hi"}]
    _write_jsonl(tmp_path / "a.jsonl", a)
    _write_jsonl(tmp_path / "b.jsonl", b)
    _write_jsonl(tmp_path / "c.jsonl", c)
    _write_jsonl(
        tmp_path / "d.jsonl",
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "id": "d0"}],
    )
    (tmp_path / "mix.toml").write_text(
        '[[sources]]\npath = "a.jsonl"\nratio = 0.5\n\n[[sources]]\npath = "b.jsonl"\nratio = 0.5\n', encoding="utf-8"
    )
    (tmp_path / "mix2.toml").write_text(
        '[[sources]]\npath = "c.jsonl"\nepochs = 1\n\n[[sources]]\npath = "d.jsonl"\nepochs = 1\n', encoding="utf-8"
    )
    res = run_cli("data", "mix", "-c", str(tmp_path / "mix.toml"), str(tmp_path / "out.jsonl"))
    res2 = run_cli("data", "mix", "-c", str(tmp_path / "mix2.toml"), str(tmp_path / "out2.jsonl"))
    assert res.returncode == 0 and res2.returncode == 0, res.stderr + res2.stderr
    got = _read_jsonl(tmp_path / "out.jsonl")
    assert len(got) == 6 and all(r in a + b for r in got)
    assert {tuple(r) for r in got} == {("id", "text", "meta"), ("text", "id", "meta")}
    # an alpaca and a messages source cannot share one file as they came in: the normalised shape,
    # with the other columns kept
    assert sorted(_read_jsonl(tmp_path / "out2.jsonl"), key=lambda r: r["id"]) == [
        {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi"}], "id": "c0"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "id": "d0"},
    ]


def test_curate_stage_keeps_columns(project):
    """`llmforge run` of curate stages: text, chat and preference rows from parquet (types kept) and
    from JSON Lines (chat with a column mapping: the dataset remembers it, so the rows read back as
    the stage read them), and a mix of two sources."""
    data = project.root / "data"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist(text_rows()), data / "text.parquet")
    text_in = pq.read_table(data / "text.parquet").to_pylist()
    chats = [{"id": r["id"], "dialog": r["messages"], "meta": r["meta"]} for r in chat_rows()]
    _write_jsonl(data / "chat.jsonl", chats)
    _write_jsonl(data / "pref.jsonl", preference_rows())
    parquet_in = {}
    for kind in ("chat", "preference"):
        pq.write_table(pa.Table.from_pylist(KINDS[kind]()), data / f"{kind}.parquet")
        parquet_in[kind] = pq.read_table(data / f"{kind}.parquet").to_pylist()
    _write_jsonl(data / "more.jsonl", [{"id": "m1", "text": "More text\u00a0here.", "meta": {"k": [1]}}])
    steps = 'steps = ["normalize", "pii", "exact_dedup"]'
    project.write(f"""
        [[stages]]
        name = "text"
        uses = "curate"
        data = {{ path = "data/text.parquet" }}
        {steps}

        [[stages]]
        name = "chat"
        uses = "curate"
        data = {{ path = "data/chat.jsonl", columns = {{ messages = "dialog" }} }}
        {steps}

        [[stages]]
        name = "pref"
        uses = "curate"
        data = {{ path = "data/pref.jsonl" }}
        {steps}

        [[stages]]
        name = "chat_pq"
        uses = "curate"
        data = {{ path = "data/chat.parquet" }}
        {steps}

        [[stages]]
        name = "pref_pq"
        uses = "curate"
        data = {{ path = "data/preference.parquet" }}
        {steps}

        [[stages]]
        name = "mixed"
        uses = "curate"
        mix = {{ sources = [{{ path = "data/text.parquet", epochs = 1 }}, {{ path = "data/more.jsonl", epochs = 1 }}] }}
        {steps}
        """)
    res = project.run("run", timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    st = json.loads(project.run("status", "--json").stdout)

    def dataset(stage: str) -> Path:
        return Path(st["stages"][stage]["artifacts"]["dataset"]["path"])

    table = pq.read_table(dataset("text") / "data.parquet")
    assert table.schema.equals(pq.read_schema(data / "text.parquet").remove_metadata())
    assert table.to_pylist() == expected("text", text_in)
    want_chat = [{"id": r["id"], "dialog": r["messages"], "meta": r["meta"]} for r in expected("chat", chat_rows())]
    got_chat = _read_jsonl(dataset("chat") / "data.jsonl")
    assert got_chat == want_chat and [list(r) for r in got_chat] == [["id", "dialog", "meta"]] * 2
    assert json.loads((dataset("chat") / ".llmforge-data.json").read_text()) == {
        "format": "messages",
        "columns": {"messages": "dialog"},
    }
    assert _read_jsonl(dataset("pref") / "data.jsonl") == expected("preference", preference_rows())
    for stage, kind in (("chat_pq", "chat"), ("pref_pq", "preference")):
        table = pq.read_table(dataset(stage) / "data.parquet")
        assert table.schema.equals(pq.read_schema(data / f"{kind}.parquet").remove_metadata()), stage
        assert table.to_pylist() == expected(kind, parquet_in[kind]), stage
    mixed = _read_jsonl(dataset("mixed") / "data.jsonl")
    assert sorted(mixed, key=lambda r: r["id"]) == [
        {"id": "a1", "text": CLEAN, "meta": _meta(1), "n": 1},
        {"id": "a2", "text": PLAIN, "meta": _meta(2), "n": 2},
        {"id": "m1", "text": "More text here.", "meta": {"k": [1]}},
    ]
    # a stage reading the chat dataset reads it as the curate stage read its source (the mapping kept)
    stats = run_cli("data", "stats", str(dataset("chat")), "--no-near", "--json")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["rows"] == 2 and json.loads(stats.stdout)["kind"] == "chat"
