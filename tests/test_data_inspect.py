"""`llmforge data inspect`: rows as a stage sees them, with the loss mask shown per token."""

from __future__ import annotations

import json


def test_inspect_shows_trained_tokens_and_truncation(project, tokenizer_dir):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"What is the capital of Land{i}?"},
                {"role": "assistant", "content": f"The capital of Land{i} is Town{i}."},
            ]
        }
        for i in range(4)
    ]
    rows.append({"messages": [{"role": "usr", "content": "bad role"}, {"role": "assistant", "content": "x"}]})
    project.write("\n".join(json.dumps(r) for r in rows) + "\n", name="chat.jsonl")
    res = project.run(
        "data",
        "inspect",
        "chat.jsonl",
        "--model",
        str(tokenizer_dir),
        "--template",
        "chatml",
        "--masks",
        "--plain",
        "-n",
        "1",
    )
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "4 rows, format messages (chat), 1 bad rows skipped" in out
    assert 'chat.jsonl:5: messages[0].role: expected one of system/user/assistant/tool, got "usr"' in out
    # exactly the assistant answer and its end marker are trained
    assert "[[The capital of Land0 is Town0.<|im_end|>]]" in out
    assert out.count("[[") == 1
    assert "truncated at 2048: 0 rows (0.0%)" in out

    short = project.run(
        "data",
        "inspect",
        "chat.jsonl",
        "--model",
        str(tokenizer_dir),
        "--template",
        "chatml",
        "--max-length",
        "12",
        "--json",
    )
    data = json.loads(short.stdout)
    assert data["truncation_rate"] == 1.0 and data["template"] == "chatml"
    assert all(len(s["pieces"]) == 12 for s in data["samples"])


def test_inspect_without_a_model_and_bad_file(project):
    project.write('{"text": "hello world"}\n', name="t.jsonl")
    res = project.run("data", "inspect", "t.jsonl", "--json")
    assert json.loads(res.stdout)["samples"][0]["row"] == {"text": "hello world"}
    project.write("", name="empty.jsonl")
    res = project.run("data", "inspect", "empty.jsonl")
    assert res.returncode == 2 and "empty" in res.stderr and "Traceback" not in res.stderr
