"""The curation steps on crafted rows, in process: dedup recall and precision on planted duplicates,
each filter's thresholds, normalisation, PII, the language guess, decontamination, lint, and the
pieces underneath (MinHash estimates, the hash index)."""

from __future__ import annotations

import functools
import json
import random
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from llmforge_plugins.curate import minhash
from llmforge_plugins.curate.api import Drop, StepEnv
from llmforge_plugins.curate.engine import Curator
from llmforge_plugins.curate.hashindex import HashIndex
from llmforge_plugins.curate.registry import build_steps


@functools.lru_cache(maxsize=1)
def registry():
    """The built-in plugins (the steps' table, and the readers decontaminate reads evaluation sets with)."""
    from llmforge.plugins import load_registry

    return load_registry(env="")


def steps(*specs, base: Path | None = None):
    reg = registry()
    return build_steps(list(specs), StepEnv(base_dir=base or Path.cwd(), registry=reg), reg)


def run(specs, rows, base: Path | None = None) -> tuple[list[str], Curator]:
    """Rows through the steps; returns the wheres of the kept rows and the curator (its books)."""
    curator = Curator(steps(*specs, base=base), examples=100)
    kept = [w for w, _ in curator.run(iter((f"row:{i}", r) for i, r in enumerate(rows)))]
    curator.finish()
    return kept, curator


def one(step, row):
    (answer,) = step.process_batch([row], ["x:1"])
    return answer


# ------------------------------------------------------------------------------------------------
# planted duplicates


def _jaccard(a: str, b: str, n: int = 5) -> float:
    def grams(text):
        w = [x.lower() for x in minhash.split_words(text)]
        return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}

    sa, sb = grams(a), grams(b)
    return len(sa & sb) / len(sa | sb)


def _edited(words: list[str], target: float, rng: random.Random, vocab: list[str]) -> tuple[str, float]:
    """A copy of `words` with evenly spread replacements, as many as it takes to come closest to
    `target` Jaccard similarity (5-gram sets); returns the text and its exact similarity."""
    original = " ".join(words)
    best = None
    for edits in range(1, len(words) // 2):
        copy = list(words)
        for k in range(edits):
            copy[int((k + 0.5) * len(words) / edits)] = rng.choice(vocab)
        text = " ".join(copy)
        sim = _jaccard(original, text)
        if best is None or abs(sim - target) < abs(best[1] - target):
            best = (text, sim)
        if sim < target - 0.05:
            break
    return best


@pytest.fixture(scope="module")
def planted():
    """300 distinct documents, then 30 exact copies, 60 copies at Jaccard ~0.9 (duplicates) and 60 at
    ~0.5 (not duplicates), shuffled in after their originals."""
    rng = random.Random(42)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(20000)]
    docs = [[rng.choice(vocab) for _ in range(rng.randint(120, 200))] for _ in range(300)]
    rows = [{"text": " ".join(d)} for d in docs]
    dup, far = set(), set()
    sims = {"near": [], "far": []}
    for i in range(150):
        src = docs[i]
        if i < 30:
            rows.append({"text": " ".join(src)})
            dup.add(len(rows) - 1)
        elif i < 90:
            text, sim = _edited(src, 0.9, rng, vocab)
            rows.append({"text": text})
            dup.add(len(rows) - 1)
            sims["near"].append(sim)
        else:
            text, sim = _edited(src, 0.5, rng, vocab)
            rows.append({"text": text})
            far.add(len(rows) - 1)
            sims["far"].append(sim)
    return rows, dup, far, sims


def test_planted_duplicates_recall_and_precision_at_the_default_threshold(planted):
    rows, dup, far, sims = planted
    assert 0.87 <= np.mean(sims["near"]) <= 0.93 and 0.47 <= np.mean(sims["far"]) <= 0.53  # the plant is as meant
    kept, curator = run(["exact_dedup", "near_dedup"], rows)
    removed = set(range(len(rows))) - {int(w.split(":")[1]) for w in kept}
    recall = len(removed & dup) / len(dup)
    precision = len(removed & dup) / len(removed)
    assert recall >= 0.95 and precision >= 0.95, (recall, precision, sorted(removed - dup), sorted(dup - removed))
    assert not removed & far  # the 0.5 copies stay
    exact, near = curator.books
    assert exact.removed == 30 and exact.by_code == {"exact": 30}
    # each reason names the original: copy k of the near group comes from document k
    for ex in near.examples:
        i = int(ex["source"].split(":")[1])
        assert f"of row:{i - 300}" in ex["reason"] and "estimated Jaccard" in ex["reason"], ex


def test_near_dedup_on_chat_rows_compares_the_concatenated_turns(planted):
    rows, dup, _, _ = planted
    chats = [
        {"messages": [{"role": "user", "content": "Tell me something."}, {"role": "assistant", "content": r["text"]}]}
        for r in rows
    ]
    kept, _ = run(["near_dedup"], chats)
    removed = set(range(len(rows))) - {int(w.split(":")[1]) for w in kept}
    assert len(removed & dup) / len(dup) >= 0.95 and len(removed & dup) / len(removed) >= 0.95


def test_minhash_estimates_jaccard_without_bias(planted):
    rows, _, _, _ = planted
    errors = []
    for i in range(300, 420):
        a, b = rows[i - 300]["text"], rows[i]["text"]
        sig = minhash.signatures(*minhash.shingles([a, b]))
        errors.append(float((sig[0] == sig[1]).mean()) - _jaccard(a, b))
    assert abs(np.mean(errors)) < 0.01 and np.std(errors) < 0.06  # sd of a 128-hash estimate is ~0.04


def test_char_shingles_and_lsh_parameters():
    a = "The quick brown fox jumps over the lazy dog near the river bank today."
    b = a.replace("today", "tonight")
    (near,) = steps({"step": "near_dedup", "unit": "char", "ngram": 5, "threshold": 0.7})
    batch = [{"text": a}, {"text": b}, {"text": "something else entirely, not close"}]
    answers = near.process_batch(batch, ["a:1", "b:1", "c:1"])
    assert answers[0] == {"text": a} and isinstance(answers[1], Drop) and isinstance(answers[2], dict)
    # with verification the bands favour recall (a false candidate only costs a comparison)
    bands, rows = near.bands, near.rows
    assert (bands, rows) == minhash.lsh_params(0.7, 128, 0.1) and bands * rows <= 128
    assert minhash.candidate_probability(0.8, bands, rows) > 0.97
    assert minhash.candidate_probability(0.4, bands, rows) < 0.3


def test_hash_index_keeps_the_first_value_and_grows():
    idx = HashIndex(capacity=16)
    keys = np.arange(1, 5001, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    idx.insert(keys, np.arange(5000))
    idx.insert(keys[:10], np.full(10, 99))  # already there: the first value stays
    found, values = idx.lookup(np.concatenate([keys, np.array([12345], dtype=np.uint64)]))
    assert found[:-1].all() and not found[-1]
    assert (values[:-1] == np.arange(5000)).all() and len(idx) == 5000


# ------------------------------------------------------------------------------------------------
# filters


def test_quality_filter_codes_on_crafted_rows():
    (q,) = steps(
        {"step": "quality", "min_chars": 20, "max_chars": 2000, "min_words": 3, "max_words": 300, "stats_min_words": 10}
    )
    rng = random.Random(1)
    prose = " ".join(
        rng.choice(
            [
                "river",
                "stone",
                "garden",
                "morning",
                "quiet",
                "window",
                "letter",
                "bread",
                "travel",
                "music",
                "winter",
                "orange",
                "paper",
                "silver",
                "forest",
            ]
        )
        for _ in range(60)
    )
    cases = {
        "min_chars": "too short",
        "max_chars": "word " * 500,
        "min_words": "supercalifragilistic-expialidocious",
        "max_words": " ".join(["ok"] * 301),
        "duplicate_lines": "\n".join(["the same line again"] * 6 + ["one other line here", "and a last one"]),
        "symbol_ratio": " ".join(f"w{i} ##$$@@ ++== <<>> **~~" for i in range(12)),
        "digit_ratio": " ".join(str(rng.randint(10000, 99999)) for _ in range(30)) + " numbers",
        "mean_word_length": " ".join("x" * 30 for _ in range(20)),
        "top_2gram": " ".join(["new york"] * 8 + prose.split()[:20]),
        "duplicate_5grams": " ".join([f"word{i}" for i in range(48)] + [f"word{i}" for i in range(12)]),
    }
    for code, text in cases.items():
        answer = one(q, {"text": text})
        assert isinstance(answer, Drop) and answer.code == code, (code, answer)
    assert one(q, {"text": prose}) == {"text": prose}
    # ratios wait for enough words: a short repetitive text is not judged on them
    assert isinstance(one(q, {"text": "ha ha ha ha ha ha ha ha ha"}), dict)


def test_quality_counts_tokens_with_a_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (q,) = steps({"step": "quality", "min_tokens": 3, "max_tokens": 5, "tokenizer": "tokenizer.json"}, base=tmp_path)
    assert one(q, {"text": "a b"}).code == "min_tokens"
    assert one(q, {"text": "a b a b a b"}).code == "max_tokens"
    assert one(q, {"text": "a b a b"}) == {"text": "a b a b"}


def test_language_guess_and_filter():
    from llmforge_plugins.curate.language import guess

    texts = {
        "en": "The old bridge over the river was closed for the winter, and the people of the town had to walk.",
        "de": "Die alte Brücke über den Fluss war im Winter gesperrt, und die Leute aus der Stadt mussten laufen.",
        "fr": "Le vieux pont sur la rivière était fermé pour l'hiver, et les gens de la ville devaient marcher.",
        "es": "El viejo puente sobre el río estaba cerrado por el invierno, y la gente de la ciudad tenía que caminar.",
        "ru": "Старый мост через реку был закрыт на зиму, и жители города должны были ходить пешком.",
        "ja": "古い橋は冬の間閉鎖されていたので、町の人々は歩かなければなりませんでした。",
        "zh": "这座旧桥在冬天关闭了，城里的人们不得不步行。",
        "el": "Η παλιά γέφυρα πάνω από το ποτάμι ήταν κλειστή τον χειμώνα.",
    }
    for lang, text in texts.items():
        assert guess(text)[0] == lang, (lang, guess(text))
    assert guess("x = f(y) + 3 * z")[0] != "en" or guess("x = f(y) + 3 * z")[1] < 0.1
    kept, curator = run(
        [{"step": "language", "languages": ["en", "de"], "keep_unknown": False}],
        [{"text": t} for t in texts.values()] + [{"text": "1 2 3"}],
    )
    assert kept == ["row:0", "row:1"]
    (book,) = curator.books
    assert book.by_code["fr"] == 1 and book.by_code["unknown"] == 1
    assert book.facts["languages"]["en"] == 1


def test_normalize_rewrites_and_drops_empty_rows():
    (n,) = steps("normalize")
    row = {"text": "Cafe\u0301\u00a0 au lait\x07  \r\n\r\n\r\n\r\nnext line \u200b\n\n"}
    out = one(n, row)
    assert out == {"text": "Caf\u00e9  au lait\n\nnext line"}
    assert unicodedata.is_normalized("NFC", out["text"])
    same = {"text": "already clean"}
    assert one(n, same) is same  # unchanged rows are the same object (counted as not rewritten)
    assert one(n, {"text": "\u200b \x00"}).code == "empty"
    chat = {"messages": [{"role": "user", "content": "hi\x00"}, {"role": "assistant", "content": "\u200b"}]}
    assert one(n, chat).reason == "no assistant content left after normalisation"
    pair = {
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "a "}],
        "rejected": [{"role": "assistant", "content": "a"}],
    }
    assert one(n, pair).code == "empty"


def test_pii_placeholders_and_drop():
    (p,) = steps("pii")
    text = (
        "Mail jane.doe@example.org or call +1 (555) 123-4567 / 06 12 34 56 78. Server 10.0.0.12 and "
        "2001:db8::8a2e:370:7334. Key sk-abcdefghijklmnopqrstuvwx123 and AKIAIOSFODNN7EXAMPLE and "
        "ghp_" + "a1" * 18 + ". Not these: 2024-05-01, 1,000,000, years 2023 2024 2025, time 12:30:45, x :: Int."
    )
    out = one(p, {"text": text})["text"]
    for placeholder, n in (("<EMAIL>", 1), ("<PHONE>", 2), ("<IP_ADDRESS>", 2), ("<API_KEY>", 3)):
        assert out.count(placeholder) == n, (placeholder, out)
    assert "2024-05-01" in out and "1,000,000" in out and "2023 2024 2025" in out and "12:30:45" in out
    assert p.finish() == {"found": {"email": 1, "ip": 2, "key": 3, "phone": 2}}
    (d,) = steps({"step": "pii", "drop": True, "kinds": ["email"]})
    assert one(d, {"text": "write to a@b.io"}).code == "email"
    assert one(d, {"text": "call 555-123-4567"}) == {"text": "call 555-123-4567"}  # phones not asked for


def test_decontamination_removes_exactly_the_rows_sharing_an_ngram(tmp_path):
    long_item = (
        "what is the boiling point of water at sea level in degrees celsius when the pressure is "
        "normal and the water is pure"
    )
    short_item = "name the largest planet of the solar system by its mass"  # 11 words: counts whole
    tiny_item = "what is two plus"  # 4 words: too short to count
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "qa.jsonl").write_text(
        "\n".join(json.dumps({"question": q, "id": 1}) for q in (long_item, short_item, tiny_item)) + "\n"
    )
    (tmp_path / "other.csv").write_text("prompt,answer\nan unrelated question,an unrelated answer\n")
    words = long_item.split()
    rows = [
        {"text": "notes: " + " ".join(words[3:16]) + " and more"},  # 0: a 13-gram -> drop
        {"text": "Notes: " + " ".join(words[3:15]).upper() + " and more"},  # 1: only 12 words -> keep
        {"text": "Quiz: Name the largest planet of the solar system by its mass, please."},  # 2: whole short item
        {"text": "what is two plus two"},  # 3: tiny item ignored -> keep
        {"text": "a text about something else entirely"},  # 4: keep
        {
            "messages": [
                {"role": "user", "content": "q"},  # 5: n-gram across two turns -> keep
                {"role": "assistant", "content": " ".join(words[:7])},
            ]
        },
    ]
    specs = [{"step": "decontaminate", "eval_sets": {"qa": "evals/qa.jsonl", "other": "other.csv"}}]
    text_rows = rows[:5]
    kept, curator = run(specs, text_rows, base=tmp_path)
    assert kept == ["row:1", "row:3", "row:4"]
    (book,) = curator.books
    assert book.by_code == {"qa": 2}
    reasons = {ex["source"]: ex["reason"] for ex in book.examples}
    assert 'shares the 13-gram "boiling point of water' in reasons["row:0"] and "evals/qa.jsonl:1" in reasons["row:0"]
    assert "11-gram" in reasons["row:2"] and "evals/qa.jsonl:2" in reasons["row:2"]
    chat_kept, _ = run(
        specs,
        [
            rows[5],
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " ".join(words[:13])}]},
        ],
        base=tmp_path,
    )
    assert chat_kept == ["row:0"]
    # a missing evaluation set is named before any work
    from llmforge.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        steps({"step": "decontaminate", "eval_sets": {"qa": "nope.jsonl"}}, base=tmp_path)
    assert "steps[0]: eval_sets.qa: not found: nope.jsonl" in str(info.value)


def test_lint_findings_and_the_lint_step():
    from llmforge_plugins.curate.lint import lint_row

    def m(role, content):
        return {"role": role, "content": content}

    good = {"messages": [m("system", "s"), m("user", "q"), m("assistant", "a")]}
    assert lint_row(good) == []
    codes = lambda row: sorted(f.code for f in lint_row(row))  # noqa: E731
    assert codes({"messages": [m("user", "q"), m("user", "q2"), m("assistant", "a")]}) == ["role_order"]
    assert codes({"messages": [m("user", "q"), m("assistant", " ")]}) == ["empty_turn"]
    assert codes({"messages": [m("user", "q"), m("assistant", "a"), m("system", "s")]}) == [
        "last_turn",
        "system_not_first",
    ]
    assert codes({"messages": [m("user", "q"), m("tool", "r"), m("assistant", "a")]}) == ["role_order"]
    assert codes({"messages": [m("assistant", "hi"), m("user", "q"), m("assistant", "a")]}) == ["first_turn"]
    pair = {"prompt": [m("user", "q")], "chosen": [m("assistant", "Yes.")], "rejected": [m("assistant", "yes. ")]}
    assert codes(pair) == ["near_identical_pair"]
    kept, curator = run(
        ["lint"],
        [good, {"messages": [m("user", "q"), m("user", "q"), m("assistant", "a")]}, {"text": "text rows pass through"}][
            :2
        ],
    )
    assert kept == ["row:0"] and curator.books[0].by_code == {"role_order": 1}


def test_a_step_registered_by_a_plugin_runs_like_a_builtin():
    from pydantic import Field

    from llmforge import hookimpl
    from llmforge.plugins import load_registry
    from llmforge_plugins.curate.api import CurationStep, StepOptions, row_text
    from llmforge_plugins.curate.registry import curation_steps

    class NoWordOptions(StepOptions):
        word: str = Field("foo")

    class NoWord(CurationStep):
        name = "no_word"
        summary = "Drop rows with a word."
        Options = NoWordOptions

        def process(self, row):
            return Drop(f"mentions {self.options.word}", code="word") if self.options.word in row_text(row) else row

    class Plugin:
        @hookimpl
        def register_curation_steps(self, register):
            register(NoWord)
            register(NoWord)  # the same class twice is not a conflict

    class Clash:
        @hookimpl
        def register_curation_steps(self, register):
            register(type("Other", (CurationStep,), {"name": "no_word", "process": lambda self, row: row}))

    reg = load_registry(env="", extra=[("words", Plugin()), ("clash", Clash())])
    table = curation_steps(reg)
    assert table["no_word"] is NoWord and "normalize" in table
    assert [str(c) for c in reg.conflicts if c.label == "curation step"] == [
        "curation step 'no_word' is registered by both words ((in-process)) and clash ((in-process)); using words "
        "((in-process))"
    ]
    built = build_steps([{"step": "no_word", "word": "bar"}], StepEnv(), reg)
    assert isinstance(one(built[0], {"text": "a bar"}), Drop)
