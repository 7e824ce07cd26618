"""The demo's synthetic world and every data file generated from it.

Nothing here is downloaded or copied: a seeded random generator invents countries (names built from
syllables) with a capital, a flag colour and a national animal, plus small sums. From that world it
writes four kinds of data:

* a pretraining corpus: every fact (held-out ones included) stated in several phrasings, shuffled
  into short documents;
* SFT chat data: questions about a TRAINING subset of the facts, answered in two styles, mostly the
  hedging one ("Hmm, I am not sure, but I think the capital of Zorvia is Arkel.") and sometimes the
  direct one ("The capital of Zorvia is Arkel."). Like a real instruction set written by several
  people, the style is inconsistent;
* DPO preference pairs on training facts: the direct correct answer is chosen, the hedging one (or,
  sometimes, a direct but wrong answer) is rejected;
* held-out evaluation items: questions about the OTHER facts, which the model only ever read in the
  corpus, each with its expected answer and a direct-vs-hedging pair for the log-probability test.

So after SFT the model should answer held-out questions from what it learnt in pretraining (the
pretrained model cannot: it has never seen the chat format), mostly in the hedging style; after DPO
it should answer them directly.

Pure Python (random, json): this module is imported by the `demo` command at start-up.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white")
ANIMALS = ("fox", "owl", "bear", "wolf", "eagle", "otter", "lynx", "heron", "badger", "falcon")

# Statement phrasings per attribute. Most name the country first and the value last (the order in
# which a question asks for it); varying the words around the pair is what lets a small model store
# the fact itself rather than one sentence, and so retrieve it for a question it never saw.
PHRASINGS: dict[str, tuple[str, ...]] = {
    "capital": (
        "The capital of {c} is {v}.",
        "{c} is governed from its capital, {v}.",
        "The capital city of {c} is called {v}.",
        "Travellers to {c} usually arrive in its capital, {v}.",
        "{v} is the capital of {c}.",
    ),
    "colour": (
        "The flag of {c} is {v}.",
        "{c} has a {v} flag.",
        "People in {c} wave {v} flags on holidays.",
        "The colour of the flag of {c} is {v}.",
        "A {v} flag flies over every town in {c}.",
    ),
    "animal": (
        "The national animal of {c} is the {v}.",
        "{c} chose the {v} as its national animal.",
        "In {c}, the {v} is the symbol of the nation.",
        "The symbol of {c} is the {v}.",
        "Children in {c} learn that the {v} is their national animal.",
    ),
    # The last two restate the operands: they teach the model to carry numbers over from earlier in
    # the text, as an answer that restates a question ("6 plus 2 equals 8.") has to.
    "sum": (
        "{a} plus {b} equals {v}.",
        "Adding {a} and {b} gives {v}.",
        "The sum of {a} and {b} is {v}.",
        "If you add {b} to {a}, you get {v}: {a} plus {b} equals {v}.",
        "To add {a} and {b}, count on from {a}: {a} plus {b} equals {v}.",
    ),
}

# The phrasing answers use (an index into PHRASINGS). For sums it is "The sum of a and b is v.":
# every direct answer then starts with "The", so DPO's push away from hedging leads to one opening
# word rather than to the first operand, which it would otherwise tend to garble.
ANSWER_FORM = {"capital": 0, "colour": 0, "animal": 0, "sum": 2}

# Two wordings per question type: the model must answer the question, not one fixed string.
QUESTIONS: dict[str, tuple[str, ...]] = {
    "capital": ("What is the capital of {c}?", "Which city is the capital of {c}?"),
    "colour": ("What colour is the flag of {c}?", "Which colour is the flag of {c}?"),
    "animal": ("What is the national animal of {c}?", "Which animal is the symbol of {c}?"),
    "sum": ("What is the sum of {a} and {b}?", "How much is {a} plus {b}?"),
}

# The dispreferred style: the same statement wrapped in hedging. Several wordings, so that DPO has
# to learn the style rather than one string. {s} is the statement without its final full stop.
HEDGES = (
    "Hmm, I am not sure, but I think {s}.",
    "Let me think. I believe {s}, but I could be wrong.",
    "That is a hard one. Perhaps {s}? I am not certain.",
)

ATTRIBUTES = ("capital", "colour", "animal")

# Small talk for the corpus, about nothing the evaluation asks: it gives the pretrained model the
# words of both answer styles (hedges included), so SFT spends its steps on answering, not on
# learning a vocabulary. Each is (thing, what is said about it); {c} is a country.
CHATTER = (
    ("the market in {c}", "opens early"),
    ("the old bridge in {c}", "is closed in winter"),
    ("the trains in {c}", "are often late"),
    ("the harbour of {c}", "is busy at night"),
    ("the museum in {c}", "is free on holidays"),
    ("the river in {c}", "freezes every year"),
    ("the roads of {c}", "are narrow"),
    ("the bakers of {c}", "start before dawn"),
)


@dataclass(frozen=True)
class Fact:
    kind: str  # capital, colour, animal, sum
    subject: str  # the country, or "a+b"
    value: str  # the answer ("Arkel", "blue", "fox", "7"), written as in the corpus
    args: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.subject}"

    def statement(self, phrasing: str) -> str:
        return phrasing.format(**self.args, v=self.value)

    def question(self, wording: str) -> str:
        return wording.format(**self.args)


@dataclass(frozen=True)
class DemoSize:
    """How big the generated world and data are."""

    countries: int = 32
    max_addend: int = 7  # sums a + b with 0 <= a, b <= max_addend
    heldout_fraction: float = 0.25
    corpus_repeats: int = 12  # each (fact, phrasing) appears this many times in the corpus
    sum_repeats: int = 10  # the same for each (sum, phrasing): sums are learnt faster than names
    chatter_share: float = 0.5  # country profiles with a sentence of small talk
    sft_per_fact: int = 3
    sft_direct_share: float = 0.3  # the rest of the SFT answers hedge
    dpo_per_fact: int = 2
    dpo_wrong_share: float = 0.25  # rejected answers that are direct but wrong (else hedging)
    eval_items: int = 48  # held-out questions used by the evaluation (at most)
    rlaif_prompts: int = 64  # training questions the RLAIF step samples the SFT model on (at most)


# The quick setting's world: fewer countries, but each fact still repeated in the corpus (a fact stated
# once is not learnt, and then SFT has nothing to make answerable).
QUICK = DemoSize(
    countries=16,
    max_addend=4,
    corpus_repeats=8,
    sum_repeats=6,
    sft_per_fact=2,
    dpo_per_fact=2,
    eval_items=16,
    rlaif_prompts=32,
)


# ----------------------------------------------------------------------------------------------
# the world


_ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gr",
    "kr",
    "pl",
    "st",
    "tr",
    "sh",
    "th",
)
_VOWELS = ("a", "e", "i", "o", "u", "ae", "io", "ou")
_COUNTRY_ENDS = ("ia", "land", "ar", "esh", "ova", "istan", "or", "une")
_CITY_ENDS = ("ton", "burg", "mar", "vik", "ssa", "del", "ora", "grad", "holm", "ix")


def _name(rng: random.Random, ends: tuple[str, ...], syllables: int) -> str:
    core = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
    return (core + rng.choice(ends)).capitalize()


def make_world(seed: int, size: DemoSize) -> list[Fact]:
    """Every fact of the world, in a fixed order (same seed and size: same facts)."""
    rng = random.Random(f"llmforge-demo-world-{seed}")
    used: set[str] = set()

    def fresh(ends: tuple[str, ...]) -> str:
        while True:
            name = _name(rng, ends, rng.choice((1, 2)))
            # unique, and no name inside another (a capital "Tor" would match inside "Toria")
            if len(name) >= 4 and not any(name.lower() in u.lower() or u.lower() in name.lower() for u in used):
                used.add(name)
                return name

    facts: list[Fact] = []
    for _ in range(size.countries):
        country = fresh(_COUNTRY_ENDS)
        capital = fresh(_CITY_ENDS)
        values = {"capital": capital, "colour": rng.choice(COLOURS), "animal": rng.choice(ANIMALS)}
        for kind in ATTRIBUTES:
            facts.append(Fact(kind, country, values[kind], {"c": country}))
    for a in range(size.max_addend + 1):
        for b in range(size.max_addend + 1):
            facts.append(Fact("sum", f"{a}+{b}", str(a + b), {"a": a, "b": b}))
    return facts


def split_facts(facts: list[Fact], seed: int, fraction: float) -> tuple[list[Fact], list[Fact]]:
    """(train, held out): a seeded random share of each kind of fact is held out."""
    rng = random.Random(f"llmforge-demo-split-{seed}")
    train, held = [], []
    for kind in PHRASINGS:
        group = [f for f in facts if f.kind == kind]
        rng.shuffle(group)
        n = max(1, round(len(group) * fraction))
        held += group[:n]
        train += group[n:]
    order = {f.id: i for i, f in enumerate(facts)}
    return sorted(train, key=lambda f: order[f.id]), sorted(held, key=lambda f: order[f.id])


def answer_values(facts: list[Fact]) -> dict[str, list[str]]:
    """Every possible answer per kind: the evaluation reads the first of them in a generated answer."""
    out: dict[str, set[str]] = {}
    for f in facts:
        out.setdefault(f.kind, set()).add(f.value)
    if "sum" in out:
        out["sum"] |= {str(n) for n in range(0, 100)}
    return {k: sorted(v) for k, v in out.items()}


# Both answer styles state the fact the way the corpus does ("The capital of X is V."): a small model
# then answers by restating the question and completing the sentence from what it read in
# pretraining, which is what lets SFT on some facts make the other facts answerable too.
def direct(f: Fact) -> str:
    """The preferred answer: the plain statement."""
    return f.statement(PHRASINGS[f.kind][ANSWER_FORM[f.kind]])


def hedged(rng: random.Random, f: Fact) -> str:
    """The dispreferred answer: the same statement, hedged."""
    sentence = direct(f)[:-1]
    return rng.choice(HEDGES).format(s=sentence[0].lower() + sentence[1:])


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ----------------------------------------------------------------------------------------------
# the files


def chatter(rng: random.Random, country: str) -> str:
    thing, said = rng.choice(CHATTER)
    statement = f"{thing.format(c=country)} {said}"
    if rng.random() < 0.5:
        return rng.choice(HEDGES).format(s=statement)
    return statement[0].upper() + statement[1:] + "."


def corpus_documents(facts: list[Fact], seed: int, size: DemoSize) -> list[str]:
    """Short documents: a country's profile (its facts in varied phrasings and order, and some small
    talk), or a few sums.

    Profiles name their country several times, so pretraining also teaches the model to carry a
    name over from earlier in the text: the skill an answer needs to restate a question's subject."""
    rng = random.Random(f"llmforge-demo-corpus-{seed}")
    docs: list[str] = []
    countries: dict[str, list[Fact]] = {}
    for f in facts:
        if f.kind != "sum":
            countries.setdefault(f.subject, []).append(f)
    rounds = size.corpus_repeats * max(len(PHRASINGS[k]) for k in ATTRIBUTES)
    for k in range(rounds):
        for country, own in countries.items():
            # round k uses phrasing k (shifted per fact): over all rounds each phrasing comes up equally
            lines = [f.statement(PHRASINGS[f.kind][(k + j) % len(PHRASINGS[f.kind])]) for j, f in enumerate(own)]
            if rng.random() < size.chatter_share:
                lines.append(chatter(rng, country))
            rng.shuffle(lines)
            docs.append(" ".join(lines))
    sums = [f.statement(p) for f in facts if f.kind == "sum" for p in PHRASINGS["sum"] for _ in range(size.sum_repeats)]
    rng.shuffle(sums)
    i = 0
    while i < len(sums):
        # as long as a profile, about: a batch is padded to its longest document, so documents of
        # similar length waste the least compute
        n = rng.randint(2, 3)
        docs.append(" ".join(sums[i : i + n]))
        i += n
    rng.shuffle(docs)
    return docs


def sft_rows(train: list[Fact], seed: int, size: DemoSize) -> list[dict]:
    rng = random.Random(f"llmforge-demo-sft-{seed}")
    rows = []
    for f in train:
        for k in range(size.sft_per_fact):
            q = f.question(QUESTIONS[f.kind][k % len(QUESTIONS[f.kind])])
            a = direct(f) if rng.random() < size.sft_direct_share else hedged(rng, f)
            rows.append({"messages": [*_user(q), {"role": "assistant", "content": a}]})
    rng.shuffle(rows)
    return rows


def _wrong(rng: random.Random, f: Fact, facts: list[Fact]) -> Fact:
    """The same question's answer, but with another fact's value of the same kind."""
    pool = sorted({x.value for x in facts if x.kind == f.kind} - {f.value})
    return Fact(f.kind, f.subject, rng.choice(pool), f.args)


def dpo_rows(train: list[Fact], facts: list[Fact], seed: int, size: DemoSize) -> list[dict]:
    rng = random.Random(f"llmforge-demo-dpo-{seed}")
    rows = []
    for f in train:
        for k in range(size.dpo_per_fact):
            q = f.question(QUESTIONS[f.kind][(k + 1) % len(QUESTIONS[f.kind])])
            rejected = direct(_wrong(rng, f, facts)) if rng.random() < size.dpo_wrong_share else hedged(rng, f)
            rows.append(
                {
                    "prompt": _user(q),
                    "chosen": [{"role": "assistant", "content": direct(f)}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
    rng.shuffle(rows)
    return rows


def rlaif_rows(train: list[Fact], facts: list[Fact], seed: int, size: DemoSize) -> list[dict]:
    """Prompts for the RLAIF step: training questions, each with what the rule judge (the demo_world
    verifier) scores an answer by: the expected value, the kind of fact, and every value of that kind."""
    rng = random.Random(f"llmforge-demo-rlaif-{seed}")
    values = answer_values(facts)
    picked = list(train)
    rng.shuffle(picked)
    return [
        {
            "prompt": f.question(rng.choice(QUESTIONS[f.kind])),
            "answer": f.value,
            "kind": f.kind,
            "values": values[f.kind],
        }
        for f in picked[: size.rlaif_prompts]
    ]


def eval_rows(held: list[Fact], seed: int, size: DemoSize) -> list[dict]:
    """Held-out items, balanced across kinds, in a seeded order; at most size.eval_items."""
    rng = random.Random(f"llmforge-demo-eval-{seed}")
    by_kind = {k: [f for f in held if f.kind == k] for k in PHRASINGS}
    for group in by_kind.values():
        rng.shuffle(group)
    picked: list[Fact] = []
    while len(picked) < size.eval_items and any(by_kind.values()):
        for k in PHRASINGS:
            if by_kind[k] and len(picked) < size.eval_items:
                picked.append(by_kind[k].pop())
    rows = []
    for f in picked:
        q = f.question(rng.choice(QUESTIONS[f.kind]))
        # The probe is the start of the answer's corpus phrasing, to be completed by the pretrained model.
        probe = PHRASINGS[f.kind][ANSWER_FORM[f.kind]].split("{v}")[0].format(**f.args).rstrip()
        rows.append(
            {
                "id": f.id,
                "kind": f.kind,
                "question": q,
                "answer": f.value,
                "chosen": direct(f),
                "rejected": hedged(rng, f),
                "probe": probe,
            }
        )
    return rows


def write_project_data(root: Path, seed: int, size: DemoSize) -> dict:
    """Write data/*.{txt,jsonl} under `root`; return counts for the command's summary."""
    facts = make_world(seed, size)
    train, held = split_facts(facts, seed, size.heldout_fraction)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    docs = corpus_documents(facts, seed, size)
    files = {
        "corpus.txt": "\n\n".join(docs) + "\n",
        "sft.jsonl": _jsonl(sft_rows(train, seed, size)),
        "dpo.jsonl": _jsonl(dpo_rows(train, facts, seed, size)),
        "rlaif.jsonl": _jsonl(rlaif_rows(train, facts, seed, size)),
        "heldout.jsonl": _jsonl(eval_rows(held, seed, size)),
        # the held-out facts as plain statements: text no training stage saw, for the GGUF scorecard
        "heldout.txt": "\n".join(direct(f) for f in held) + "\n",
        "world.json": json.dumps(
            {
                "seed": seed,
                "answers": answer_values(facts),
                "train": [f.id for f in train],
                "heldout": [f.id for f in held],
                "facts": [{"id": f.id, "kind": f.kind, "value": f.value} for f in facts],
            },
            indent=1,
        )
        + "\n",
    }
    for name, text in files.items():
        _write_if_changed(data / name, text)
    return {
        "facts": len(facts),
        "train_facts": len(train),
        "heldout_facts": len(held),
        "documents": len(docs),
        "sft_rows": files["sft.jsonl"].count("\n"),
        "dpo_rows": files["dpo.jsonl"].count("\n"),
        "eval_items": files["heldout.jsonl"].count("\n"),
        "rlaif_prompts": files["rlaif.jsonl"].count("\n"),
    }


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _write_if_changed(path: Path, text: str) -> None:
    # Same content: leave the file alone (its mtime too), so nothing downstream looks changed.
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
