"""`llmforge data stats|lint|dedup|filter|mix|steps` and the `curate` stage, end to end through the real
`llmforge` command line: outputs, reports, exit codes, bad input, mixing ratios, and a curated dataset
feeding a training stage."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import run_cli


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _docs(n: int, seed: int = 0, words: int = 80) -> list[str]:
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(5000)]
    return [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n)]


@pytest.fixture(scope="module")
def dupes(tmp_path_factory) -> tuple[Path, set[int]]:
    """200 documents, 20 exact copies (lines 201-220), 20 copies with 1 of 80 words changed (221-240: 5-gram
    Jaccard similarity 71/81 = 0.88)."""
    root = tmp_path_factory.mktemp("dupes")
    docs = _docs(200)
    rows = [{"text": d} for d in docs]
    rows += [{"text": d} for d in docs[:20]]
    for d in docs[20:40]:
        w = d.split()
        w[40] = "changed"
        rows.append({"text": " ".join(w)})
    return _jsonl(root / "in.jsonl", rows), set(range(201, 241))


def test_dedup_command_removes_exact_and_near_duplicates(dupes, tmp_path):
    src, planted = dupes
    out, reasons = tmp_path / "out.jsonl", tmp_path / "removed.jsonl"
    with ThreadPoolExecutor(2) as ex:
        full, exact, bad = ex.map(
            lambda args: run_cli(*args),
            [
                ("data", "dedup", str(src), str(out), "--reasons", str(reasons)),
                ("data", "dedup", str(src), str(tmp_path / "exact.jsonl"), "--exact-only", "--json"),
                ("data", "dedup", str(src), str(tmp_path / "bad.jsonl"), "--threshold", "1.5", "--num-perm", "8"),
            ],
        )
    assert bad.returncode == 2 and "--threshold: must be < 1 (got 1.5)" in bad.stderr, bad.stderr
    assert "--num-perm: must be >= 16 (got 8)" in bad.stderr and not (tmp_path / "bad.jsonl").exists()
    assert full.returncode == 0, full.stderr
    assert "kept 200 of 240 rows (removed 40)" in full.stdout
    assert "exact_dedup    removed 20 (exact 20)" in full.stdout
    assert "near_dedup     removed 20 (near 20)" in full.stdout
    assert len(_rows(out)) == 200
    lines = _rows(reasons)
    assert {int(r["source"].rsplit(":", 1)[1]) for r in lines} == planted
    assert lines[0] == {
        "source": f"{src}:201",
        "step": "exact_dedup",
        "code": "exact",
        "reason": f"exact duplicate of {src}:1",
    }
    assert lines[-1]["step"] == "near_dedup" and lines[-1]["reason"].endswith(f"of {src}:40")
    report = json.loads(exact.stdout)
    assert exact.returncode == 0 and report["rows_out"] == 220
    assert [s["step"] for s in report["steps"]] == ["exact_dedup"]
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_filter_command_sets_step_options(tmp_path):
    rows = [
        {"text": "The old mill by the river has been closed for years, and the town is quiet now."},
        {"text": "Too short."},
        {"text": "Die alte Mühle am Fluss ist seit Jahren geschlossen, und die Stadt ist jetzt ruhig."},
        {"text": "Write to me at someone@example.com about the old mill by the river and the town."},
    ]
    src = _jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    res = run_cli(
        "data",
        "filter",
        str(src),
        str(out),
        "--step",
        "normalize",
        "--set",
        "min_chars=20",
        "--set",
        'language.languages=["en"]',
        "--set",
        'pii.kinds=["email"]',
        "--json",
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert [s["step"] for s in report["steps"]] == ["normalize", "quality", "language", "pii"]
    assert {s["step"]: s["removed_by"] for s in report["steps"]}["quality"] == {"min_chars": 1}
    kept = [r["text"] for r in _rows(out)]
    assert kept == [rows[0]["text"], rows[3]["text"].replace("someone@example.com", "<EMAIL>")]
    # a misspelt option is named, with a suggestion, before anything is written
    bad = run_cli("data", "filter", str(src), str(tmp_path / "bad.jsonl"), "--set", "min_char=20")
    assert (
        bad.returncode == 2
        and "--set min_char: no curation step has an option 'min_char'; did you mean 'min_chars'?" in bad.stderr
    ), bad.stderr
    wrong = run_cli("data", "filter", str(src), str(tmp_path / "bad.jsonl"), "--set", "quality.min_chars=-1")
    assert wrong.returncode == 2 and "--set quality.min_chars: must be >= 0 (got -1)" in wrong.stderr, wrong.stderr
    assert not (tmp_path / "bad.jsonl").exists() and "Traceback" not in bad.stderr + wrong.stderr


def test_stats_command_counts_lengths_and_duplicates(dupes):
    src, _ = dupes
    res = run_cli("data", "stats", str(src), "--json")
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout)
    assert s["rows"] == 240 and s["kind"] == "text" and s["format"] == "text"
    assert s["words"]["min"] == s["words"]["max"] == 80 and s["words"]["total"] == 240 * 80
    assert s["duplicates"]["exact"] == 20 and s["duplicates"]["near"] == 20
    assert sum(b["rows"] for b in s["characters"]["histogram"]) == 240
    text = run_cli("data", "stats", str(src))
    assert "duplicates: exact 20 rows (8.3%), near (Jaccard >= 0.8) 20 more (8.3%)" in text.stdout, text.stdout


def test_lint_command_reports_findings_truncation_and_exit_codes(tmp_path, tokenizer_dir):
    def chat(*turns):
        return {"messages": [{"role": r, "content": c} for r, c in turns]}

    rows = [
        chat(("user", "What is the capital of Land1?"), ("assistant", "The capital of Land1 is Town1.")),
        chat(("user", "hi"), ("user", "again"), ("assistant", "ok")),
        chat(("user", "hi"), ("assistant", " ")),
        chat(("user", "What is the capital of Land2? " * 20), ("assistant", "Town2.")),
    ]
    src = _jsonl(tmp_path / "chat.jsonl", rows)
    clean = _jsonl(tmp_path / "clean.jsonl", rows[:1])
    with ThreadPoolExecutor(2) as ex:
        res, ok = ex.map(
            lambda args: run_cli(*args),
            [
                (
                    "data",
                    "lint",
                    str(src),
                    "--model",
                    str(tokenizer_dir),
                    "--template",
                    "chatml",
                    "--max-length",
                    "64",
                    "--json",
                ),
                ("data", "lint", str(clean), "--model", str(tokenizer_dir), "--template", "chatml"),
            ],
        )
    assert res.returncode == 1, res.stderr
    data = json.loads(res.stdout)
    assert data["rows"] == 3 and data["rejected_rows"] == 1 and data["rows_with_errors"] == 2
    assert data["findings"]["role_order"]["examples"] == [f"{src}:2: messages[1].role: two user turns in a row"]
    assert data["findings"]["no_assistant"]["rows"] == 1  # the blank answer: the row format rejects it
    assert data["truncated"] == 1 and data["truncation_rate"] == pytest.approx(1 / 3)
    assert "template_roundtrip" not in data["findings"] and data["template"] == "chatml"
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "no problems found" in ok.stdout and "truncated at 2048 tokens: 0 rows (0.0%); template chatml" in ok.stdout


def test_malformed_inputs_exit_2_naming_file_and_line(tmp_path):
    good = json.dumps({"text": "a fine row of text"})
    (tmp_path / "bad.jsonl").write_text(f'{good}\n{{"text": oops}}\n{good}\n')
    (tmp_path / "latin1.jsonl").write_bytes(f"{good}\n".encode() + '{"text": "caf\xe9"}\n'.encode("latin-1"))
    (tmp_path / "empty.jsonl").write_text("")
    cases = [
        ("bad.jsonl", "bad.jsonl:2: invalid JSON"),
        ("latin1.jsonl", "latin1.jsonl:2: not valid UTF-8: byte 0xe9"),
        ("empty.jsonl", "empty.jsonl: empty file (no rows)"),
    ]
    commands = [
        ("dedup", "{src}", "out.jsonl"),
        ("filter", "{src}", "out.jsonl"),
        ("stats", "{src}"),
        ("lint", "{src}"),
    ]
    # every case through dedup, and each through one other command
    jobs = [
        (name, expect, [a.format(src=name) for a in cmd])
        for k, (name, expect) in enumerate(cases)
        for cmd in (commands[0], commands[k + 1])
    ]
    with ThreadPoolExecutor(2) as ex:
        results = list(ex.map(lambda job: run_cli("data", *job[2], cwd=tmp_path), jobs))
    for (_name, expect, args), res in zip(jobs, results):
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert expect in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
    assert not (tmp_path / "out.jsonl").exists()
    assert "pass --skip-bad to skip bad rows" in results[0].stderr
    skipped = run_cli("data", "dedup", "bad.jsonl", "out.jsonl", "--skip-bad", "--reasons", "why.jsonl", cwd=tmp_path)
    assert skipped.returncode == 0 and "1 bad rows skipped" in skipped.stdout, skipped.stderr
    assert len(_rows(tmp_path / "out.jsonl")) == 1  # the two good rows are one row twice
    assert [r["step"] for r in _rows(tmp_path / "why.jsonl")] == ["read", "exact_dedup"]


def test_mix_hits_its_ratios_and_is_deterministic(tmp_path):
    _jsonl(tmp_path / "web.jsonl", [{"text": f"web page {i} " + "word " * (i % 7)} for i in range(2000)])
    _jsonl(tmp_path / "code.jsonl", [{"text": f"def f{i}(): return {i}"} for i in range(700)])
    _jsonl(tmp_path / "books.jsonl", [{"text": "a long book passage " * 10 + str(i)} for i in range(100)])
    (tmp_path / "rows.toml").write_text(
        'seed = 1\n[[sources]]\npath = "web.jsonl"\nratio = 0.6\n[[sources]]\npath = "code.jsonl"\nratio = 0.3\n'
        '[[sources]]\nname = "books"\npath = "books.jsonl"\nratio = 0.1\nmax_epochs = 2\n'
    )
    (tmp_path / "tokens.toml").write_text(
        'by = "tokens"\ntotal = 20000\n[[sources]]\npath = "web.jsonl"\nratio = 0.5\n'
        '[[sources]]\npath = "books.jsonl"\nratio = 0.25\nmax_epochs = 5\n[[sources]]\npath = "code.jsonl"\n'
        "ratio = 0.25\nmax_epochs = 2\n"
    )
    with ThreadPoolExecutor(2) as ex:
        a, b, c, t = ex.map(
            lambda args: run_cli(*args, cwd=tmp_path),
            [
                ("data", "mix", "-c", "rows.toml", "a.jsonl", "--json"),
                ("data", "mix", "-c", "rows.toml", "b.jsonl"),
                ("data", "mix", "-c", "rows.toml", "c.jsonl", "--seed", "2"),
                ("data", "mix", "-c", "tokens.toml", "t.jsonl", "--json"),
            ],
        )
    assert a.returncode == b.returncode == c.returncode == t.returncode == 0, a.stderr + t.stderr
    report = json.loads(a.stdout)
    # books is scarcest (100 rows for 10%, up to 2 epochs): the total is 2000 rows
    assert report["rows"] == 2000
    for src in report["sources"]:
        assert abs(src["share"] - src["target_share"]) <= 0.01, src
    assert {s["name"]: s["epochs"] for s in report["sources"]} == {"web.jsonl": 0.6, "code.jsonl": 0.8571, "books": 2.0}
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()  # same seed, same rows
    assert (tmp_path / "a.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()
    assert "books: 200 of 100 rows, 2 epochs, 10.0% of the output (target 10.0%)" in b.stdout
    first = [r["text"].split()[0] for r in _rows(tmp_path / "a.jsonl")[:100]]  # interleaved, not in blocks
    assert 50 <= first.count("web") <= 70 and 20 <= first.count("def") <= 40
    tokens = json.loads(t.stdout)
    assert tokens["unit"] == "words (no tokenizer given)" and abs(tokens["units"] - 20000) / 20000 < 0.01
    for src in tokens["sources"]:
        assert abs(src["share"] - src["target_share"]) <= 0.01, src
    # a share that needs more passes than allowed is refused, naming the source
    (tmp_path / "short.toml").write_text(
        'total = 5000\n[[sources]]\npath = "web.jsonl"\nratio = 0.5\n[[sources]]\npath = "code.jsonl"\nratio = 0.5\n'
    )
    short = run_cli("data", "mix", "-c", "short.toml", "s.jsonl", cwd=tmp_path)
    assert (
        short.returncode == 2
        and "sources[1]: code.jsonl: its share (0.5 of 5000 rows = 2500) needs 3.57 passes" in short.stderr
    ), short.stderr
    sums = run_cli("data", "mix", "-c", "bad.toml", "s.jsonl", cwd=tmp_path)
    assert sums.returncode == 2 and "bad.toml: file not found" in sums.stderr


def test_steps_command_lists_and_shows_steps():
    with ThreadPoolExecutor(2) as ex:
        listed, shown = ex.map(
            lambda args: run_cli(*args), [("data", "steps", "--json"), ("data", "steps", "near_dedup", "--json")]
        )
    rows = {r["step"]: r for r in json.loads(listed.stdout)}
    builtin = {"normalize", "pii", "exact_dedup", "near_dedup", "quality", "language", "decontaminate", "lint"}
    assert builtin <= set(rows)
    assert rows["near_dedup"]["action"] == "dedup" and rows["near_dedup"]["plugin"] == "curate"
    options = {o["name"]: o for o in json.loads(shown.stdout)["options"]}
    assert options["threshold"]["default"] == 0.8 and options["ngram"]["default"] == 5


# ------------------------------------------------------------------------------------------------
# the stage


CURATE_PIPELINE = """
[[stages]]
name = "curate"
uses = "curate"
data = {{ path = "data/corpus.txt" }}
steps = ["normalize", "exact_dedup", "near_dedup", {{ step = "quality", min_words = 4 }},
         {{ step = "decontaminate", eval_sets = {{ held = "data/eval.jsonl" }}, ngram = 6, min_words = 6 }}]

[[stages]]
name = "pretrain"
uses = "pretrain"
data = {{ path = "@curate" }}
vocab_size = 300
model = {{ size = "tiny" }}
max_steps = {steps}
max_length = 32
micro_batch_size = 8
log_every = 1
"""


@pytest.mark.slow
def test_curate_stage_feeds_a_training_stage(project):
    docs = [f"The capital of Land{i} is Town{i}. Town{i} lies by the river of Land{i}." for i in range(40)]
    corpus = docs + docs[:5] + ["Too short.", "The bridge of Land7 is Town7 and it is closed in winter."]
    (project.root / "data").mkdir()
    (project.root / "data" / "corpus.txt").write_text("\n\n".join(corpus) + "\n")
    _jsonl(project.root / "data" / "eval.jsonl", [{"question": "Is it true that Town3 lies by the river of Land3?"}])
    project.write(CURATE_PIPELINE.format(steps=3))
    res = project.run("run", timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    st = json.loads(project.run("status", "--json").stdout)
    cur = st["stages"]["curate"]
    assert cur["info"]["curate"]["rows_in"] == 47 and cur["info"]["curate"]["rows_out"] == 40
    assert cur["info"]["curate"]["removed"] == {
        "normalize": 0,
        "exact_dedup": 5,
        "near_dedup": 0,
        "quality": 1,
        "decontaminate": 1,
    }
    dataset = Path(cur["artifacts"]["dataset"]["path"])
    # the kept rows, and (hidden, so no reader takes it for data) how the training stage is to read them
    assert sorted(p.name for p in dataset.iterdir()) == [".llmforge-data.json", "data.jsonl"]
    assert json.loads((dataset / ".llmforge-data.json").read_text()) == {"format": "text", "columns": {}}
    kept = [r["text"] for r in _rows(dataset / "data.jsonl")]
    assert len(kept) == 40 and docs[3] not in kept and "Too short." not in kept
    report_dir = Path(cur["artifacts"]["report"]["path"])
    report = json.loads((report_dir / "report.json").read_text())
    assert report["rows_out"] == 40 and report["read"][0]["rows"] == 47
    reasons = _rows(report_dir / "reasons.jsonl")
    assert len(reasons) == 7 and {r["step"] for r in reasons} == {"exact_dedup", "quality", "decontaminate"}
    assert "| `exact_dedup` | dedup | 47 | 42 | 5 | 0 | exact 5 |" in (report_dir / "report.md").read_text()
    # the training stage read exactly the curated rows
    data_report = json.loads((Path(st["dir"]) / "stages" / "pretrain" / "data-report.json").read_text())
    assert data_report["rows"] == 40 and data_report["files"] == [str(dataset / "data.jsonl")]
    assert st["stages"]["pretrain"]["status"] == "done"
    # unchanged: both reused; the evaluation set edited: curate (and so pretrain) run again
    again = project.run("run", timeout=300)
    assert "↺ curate cached" in again.stdout and "↺ pretrain cached" in again.stdout, again.stdout
    _jsonl(project.root / "data" / "eval.jsonl", [{"question": "nothing in the corpus looks like this question"}])
    third = project.run("run", "--stage", "curate")
    assert third.returncode == 0 and "↺ curate cached" not in third.stdout, third.stdout


def test_curate_stage_mixes_sources_and_validates_steps(project):
    (project.root / "data").mkdir()
    _jsonl(project.root / "data" / "a.jsonl", [{"text": f"source a row {i} " * 3} for i in range(300)])
    _jsonl(
        project.root / "data" / "b.jsonl",
        [{"text": f"source b row {i} " * 3} for i in range(300)] + [{"text": "source b row 0 " * 3}] * 50,
    )
    project.write("""
        [[stages]]
        name = "mixed"
        uses = "curate"
        steps = ["exact_dedup"]
        mix = { seed = 3, sources = [{ path = "data/a.jsonl", ratio = 0.75 },
                                     { name = "b", path = "data/b.jsonl", ratio = 0.25 }] }
        """)
    res = project.run("run")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    st = json.loads(project.run("status", "--json").stdout)
    report = json.loads((Path(st["stages"]["mixed"]["artifacts"]["report"]["path"]) / "report.json").read_text())
    assert report["steps"][0]["removed"] == 50  # the repeats in b are gone before mixing
    shares = {s["name"]: (s["rows"], s["share"]) for s in report["mix"]["sources"]}
    assert shares == {"a.jsonl": (300, 0.75), "b": (100, 0.25)} and report["rows_out"] == 400
    rows = _rows(Path(st["stages"]["mixed"]["artifacts"]["dataset"]["path"]) / "data.jsonl")
    assert len(rows) == 400
    # problems in the steps are located under the stage, with a suggestion, before anything runs
    project.write("""
        [[stages]]
        name = "c"
        uses = "curate"
        data = { path = "data/a.jsonl" }
        steps = ["normalise", { step = "near_dedup", threshold = 1.5 },
                 { step = "decontaminate", eval_sets = { x = "missing.jsonl" } }, { threshold = 0.5 }]
        """)
    bad = project.run("validate")
    assert bad.returncode == 2
    assert "stages[0].steps[0]: unknown curation step 'normalise'; did you mean 'normalize'?" in bad.stderr, bad.stderr
    assert "stages[0].steps[1].threshold: must be < 1 (got 1.5)" in bad.stderr
    assert "stages[0].steps[3]: expected a step name" in bad.stderr
    project.write("""
        [[stages]]
        name = "c"
        uses = "curate"
        data = { path = "data/a.jsonl" }
        steps = [{ step = "decontaminate", eval_sets = { x = "missing.jsonl" } }]
        """)
    missing = project.run("validate")
    assert missing.returncode == 2 and "stages[0].steps[0]: eval_sets.x: not found: missing.jsonl" in missing.stderr
    both = project.write("""
        [[stages]]
        name = "c"
        uses = "curate"
        """)
    assert both.exists()
    none = project.run("validate")
    assert none.returncode == 2 and "give `data` (one source) or `mix` (several sources)" in none.stderr, none.stderr
