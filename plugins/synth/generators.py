"""The built-in generators: ``answer``, ``self_instruct``, ``from_documents`` and ``evolve``.

Each asks the teacher for a whole batch of units in one :meth:`Teacher.complete` call per step (that is where
llama.cpp's parallel sequences and an endpoint's concurrent requests pay), with one seed per request derived
from the run's seed, the unit and the sample (:func:`unit_seed`), so a resumed run asks exactly what the
uninterrupted run would have asked. The templates and the lenient parsing of answers are in ``prompts.py``.
"""

from __future__ import annotations

import csv
import glob
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from llmforge.errors import DataError
from llmforge.judging import JudgeRequest
from llmforge_plugins.synth import prompts as P
from llmforge_plugins.synth.api import Candidate, Generator, GeneratorOptions, SynthEnv, Unit, text_hash, unit_seed

Messages = list[dict[str, str]]


# ------------------------------------------------------------------------------------------------
# reading input rows


def _resolve(base_dir: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base_dir / p


def _data_problems(options: Any, base_dir: Path, *, folders: bool = False) -> list[str]:
    if not options.data:
        return ["data: required: the file the generator reads"]
    if folders and any(ch in options.data for ch in "*?["):
        return []
    path = _resolve(base_dir, options.data)
    if not path.exists():
        return [f"data: {path} does not exist"]
    if path.is_dir() and not folders:
        return [f"data: {path} is a folder; name a .jsonl, .json, .csv or .parquet file"]
    return []


def read_rows(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The rows of a JSONL, JSON (a list of objects), CSV or parquet file, each a dict. Bad input raises
    :class:`DataError` naming the file and line."""
    suffix = path.suffix.lower()
    rows: list[dict[str, Any]] = []
    try:
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as fh:
                rows = [dict(r) for r in csv.DictReader(fh)]
        elif suffix == ".parquet":
            import pyarrow.parquet as pq  # lazily: only parquet inputs pay for it

            rows = pq.read_table(path).to_pylist()
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise DataError(f"{path}: expected a list of objects")
            rows = data
        else:
            with path.open(encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{n}: not JSON ({exc.msg})") from None
                    if not isinstance(row, dict):
                        raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
                    rows.append(row)
                    if limit is not None and len(rows) >= limit:
                        break
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    return rows[:limit] if limit is not None else rows


def _where(path: Path, i: int) -> str:
    return f"{path}:{i + 1}" if path.suffix.lower() in (".jsonl", "") else f"{path} row {i + 1}"


def prompt_of(row: dict[str, Any], column: str, where: str) -> tuple[Messages, dict[str, Any]]:
    """(the conversation to answer, the row's other columns) of one input row: its ``column`` text, else its
    ``messages`` ending in a user turn, else a seed task's ``instruction`` (+ ``input``)."""
    if isinstance(row.get(column), str) and row[column].strip():
        extra = {k: v for k, v in row.items() if k != column}
        return [{"role": "user", "content": row[column]}], extra
    msgs = row.get("messages")
    if isinstance(msgs, list) and msgs:
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in msgs):
            raise DataError(f"{where}: messages: every message needs a role and a text content")
        if msgs[-1]["role"] != "user":
            raise DataError(f"{where}: messages: the last message must be the user's turn to answer")
        extra = {k: v for k, v in row.items() if k != "messages"}
        return [{"role": m["role"], "content": m["content"]} for m in msgs], extra
    if isinstance(row.get("instruction"), str) and row["instruction"].strip():
        text = row["instruction"].strip()
        if isinstance(row.get("input"), str) and row["input"].strip():
            text += "\n\n" + row["input"].strip()
        extra = {k: v for k, v in row.items() if k not in ("instruction", "input")}
        return [{"role": "user", "content": text}], extra
    raise DataError(
        f"{where}: no prompt: expected a '{column}' text, 'messages' ending in a user turn, or 'instruction'"
    )


def instruction_of(row: dict[str, Any], column: str = "prompt") -> str | None:
    """A seed task's instruction text: its prompt column, ``instruction`` (+ ``input``) or first user turn."""
    for key in (column, "prompt", "instruction"):
        if isinstance(row.get(key), str) and row[key].strip():
            text = row[key].strip()
            if key == "instruction" and isinstance(row.get("input"), str) and row["input"].strip():
                text += "\n\n" + row["input"].strip()
            return text
    msgs = row.get("messages")
    if isinstance(msgs, list):
        for m in msgs:
            if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
                return m["content"].strip() or None
    return None


def _system(options: Any) -> Messages:
    return [{"role": "system", "content": options.system}] if options.system else []


def _requests(convs: Sequence[Messages], options: Any, seeds: Sequence[int], temps: Sequence[float] | None = None):
    temps = temps if temps is not None else [options.temperature] * len(convs)
    return [
        JudgeRequest(tuple(dict(m) for m in conv), max_tokens=options.max_tokens, temperature=t, seed=s)
        for conv, s, t in zip(convs, seeds, temps, strict=True)
    ]


# ------------------------------------------------------------------------------------------------
# near-duplicates


class NearDuplicates:
    """Texts seen so far, and whether a new one is a near-duplicate of any of them: MinHash signatures of word
    bigrams (plugins/curate/minhash.py) compared entry by entry, which estimates their Jaccard similarity.
    Bigrams rather than the curate step's 5-grams: instructions are a sentence or two long."""

    NUM_PERM = 128

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.labels: list[str] = []
        self._sigs: list[Any] = []

    def _signatures(self, texts: list[str]) -> Any:
        from llmforge_plugins.curate import minhash

        hashes, offsets = minhash.shingles(texts, "word", n=2)
        return minhash.signatures(hashes, offsets, num_perm=self.NUM_PERM)

    def add(self, texts: Sequence[str], labels: Sequence[str]) -> None:
        if texts:
            self._sigs.extend(self._signatures(list(texts)))
            self.labels.extend(labels)

    def match(self, text: str, skip: str | None = None) -> tuple[float, str] | None:
        """(similarity, label) of the most similar text seen when it reaches the threshold, else None. Texts
        labelled ``skip`` are not compared (an evolution's own earlier steps)."""
        if not self._sigs:
            return None
        import numpy as np

        sig = self._signatures([text])[0]
        sims = (np.asarray(self._sigs) == sig).mean(axis=1)
        if skip is not None:
            sims[[i for i, label in enumerate(self.labels) if label == skip]] = -1.0
        best = int(np.argmax(sims))
        return (float(sims[best]), self.labels[best]) if sims[best] >= self.threshold else None


def _norm(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .!?")


def _echo(text: str, request: str, threshold: float) -> tuple[float, str] | None:
    """A small teacher often repeats its request's own sentences instead of writing something new: the share
    of ``text``'s word bigrams found in the request's fixed text (containment, exact), when over the threshold."""
    from llmforge_plugins.curate import minhash

    hashes, offsets = minhash.shingles([text, request], "word", n=2)
    mine, theirs = set(hashes[offsets[0] : offsets[1]].tolist()), set(hashes[offsets[1] : offsets[2]].tolist())
    share = len(mine & theirs) / len(mine) if mine else 0.0
    return (share, "the request's own words") if share >= threshold else None


def _short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _instructions_made(env: SynthEnv) -> list[tuple[str, str]]:
    """(unit, first user turn) of the rows made so far (journaled and this run's), in order."""
    out = []
    for row in env.made:
        text = instruction_of(row)
        if text:
            out.append((str((row.get("provenance") or {}).get("unit", "")), text))
    return out


# ------------------------------------------------------------------------------------------------
# answer


class AnswerOptions(GeneratorOptions):
    data: str | None = Field(
        None, description="The prompts: a JSONL, JSON, CSV or parquet file of rows with a prompt column or messages."
    )
    prompt_column: str = Field("prompt", description="The column holding each row's prompt text.")
    reasoning: Literal["none", "keep", "strip"] = Field(
        "none",
        description="Chain of thought: none (answer directly), keep (ask for step-by-step reasoning and keep it), "
        "strip (ask for it, keep only the final answer).",
    )
    marker: str = Field("Final answer:", description="What precedes the final answer when reasoning is asked for.")


class Answer(Generator):
    """Answers given prompts (distillation). ``data``: rows with a ``prompt`` (``prompt_column``) or
    ``messages`` ending in a user turn; their other columns (``answer``, ``tests``) stay on the rows for the
    verifiers. One unit per row (``p0``, ``p1``, ...), ``samples`` answers each. ``reasoning = "keep"|"strip"``
    asks for the reasoning first and the final answer after ``marker``; strip keeps the final answer only
    (``<think>`` blocks go too)."""

    kind = "answer"
    summary = "Answers given prompts (distillation), optionally with chain of thought kept or stripped."
    Options = AnswerOptions

    def check(self, options: Any, base_dir: Path) -> list[Any]:
        return _data_problems(options, base_dir)

    def units(self, options: Any, env: SynthEnv) -> list[Unit]:
        path = _resolve(env.base_dir, options.data or "")
        out = []
        for i, row in enumerate(read_rows(path, options.limit)):
            conv, extra = prompt_of(row, options.prompt_column, _where(path, i))
            out.append(Unit(f"p{i}", {"messages": conv, "extra": extra}, unit_seed(env.seed, f"p{i}")))
        return out

    def generate(self, options: Any, units: Sequence[Unit], samples: int, env: SynthEnv) -> list[list[Candidate]]:
        template = P.REASONING if options.reasoning != "none" else "{prompt}"
        convs, seeds, where = [], [], []
        for u in units:
            msgs = u.data["messages"]
            asked = [dict(m) for m in msgs]
            if options.reasoning != "none":
                asked[-1]["content"] = P.REASONING.format(prompt=asked[-1]["content"], marker=options.marker)
            for k in range(samples):
                convs.append(_system(options) + asked)
                seeds.append(unit_seed(env.seed, u.id, k))
                where.append((u, k))
        answers = env.teacher.complete(_requests(convs, options, seeds))
        out: dict[str, list[Candidate]] = {u.id: [] for u in units}
        for (u, k), seed, text in zip(where, seeds, answers, strict=True):
            content, answer = text.strip(), text.strip()
            if options.reasoning != "none":
                _, answer = P.final_answer(text, options.marker)
                content = answer if options.reasoning == "strip" else text.strip()
            msgs = _system(options) + [dict(m) for m in u.data["messages"]]
            row = {"messages": msgs + [{"role": "assistant", "content": content}], **u.data["extra"]}
            c = Candidate(
                row,
                answer,
                prompt=msgs[-1]["content"],
                sample=k,
                provenance={"template": text_hash(template), "seed": seed},
            )
            if not answer:
                c.rejected = (
                    "empty: the teacher gave no final answer"
                    if options.reasoning != "none"
                    else ("empty: the teacher gave no answer")
                )
            out[u.id].append(c)
        return [out[u.id] for u in units]


# ------------------------------------------------------------------------------------------------
# self_instruct


class SelfInstructOptions(GeneratorOptions):
    data: str | None = Field(
        None,
        description="The seed tasks: JSONL/JSON/CSV/parquet rows with instruction (+ input, output), "
        "prompt (+ answer) or messages.",
    )
    rounds: int | None = Field(
        10, gt=0, description="Rounds of new instructions (units r0, r1, ...); none: until the budget stops it."
    )
    examples_per_round: int = Field(3, gt=0, description="Seed tasks shown to the teacher each round.")
    instructions_per_round: int = Field(5, gt=0, description="New instructions asked for each round.")
    topics: list[str] = Field(default_factory=list, description="Topics; one is chosen per round (by its seed).")
    personas: list[str] = Field(
        default_factory=list, description="Who asks: one persona is chosen per round (by its seed)."
    )
    temperature_schedule: list[float] | None = Field(
        None, description="[first, last]: the instruction-writing temperature, linear over the rounds."
    )
    dedup_threshold: float = Field(
        0.7, gt=0, le=1, description="A new instruction this similar (MinHash, word bigrams) to one seen is dropped."
    )

    @field_validator("temperature_schedule")
    @classmethod
    def _two(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (len(v) != 2 or any(t < 0 for t in v)):
            raise ValueError("expected [first, last], two temperatures >= 0")
        return v


class SelfInstruct(Generator):
    """New instructions from seed tasks, then their answers. Each round (``r0``, ``r1``, ...) shows
    ``examples_per_round`` seed tasks (and up to 2 instructions already made) and asks for
    ``instructions_per_round`` new ones, steered by a topic and a persona when listed; one that is a
    near-duplicate of a seed task, of one made before or of another of the batch is rejected (``duplicate``);
    the others are answered (``samples`` answers each)."""

    kind = "self_instruct"
    summary = "New instructions from seed tasks (MinHash dedup, topics, personas, temperature schedule), answered."
    Options = SelfInstructOptions

    def check(self, options: Any, base_dir: Path) -> list[Any]:
        problems = _data_problems(options, base_dir)
        if options.temperature_schedule is not None and options.rounds is None:
            problems.append("temperature_schedule: needs a number of rounds to spread over")
        return problems

    def _seeds(self, options: Any, env: SynthEnv) -> list[str]:
        path = _resolve(env.base_dir, options.data or "")
        tasks = [t for t in (instruction_of(r) for r in read_rows(path, options.limit)) if t]
        if not tasks:
            raise DataError(f"{path}: no seed task (rows need instruction, prompt or messages with a user turn)")
        return tasks

    def units(self, options: Any, env: SynthEnv) -> Iterator[Unit] | list[Unit]:
        if options.rounds is not None:
            return [Unit(f"r{k}", {"round": k}, unit_seed(env.seed, f"r{k}")) for k in range(options.rounds)]
        return self._endless(env)

    def _endless(self, env: SynthEnv) -> Iterator[Unit]:
        k = 0
        while True:  # the stage's budget (or a stop request) ends it
            yield Unit(f"r{k}", {"round": k}, unit_seed(env.seed, f"r{k}"))
            k += 1

    def _temperature(self, options: Any, k: int) -> float:
        if options.temperature_schedule is None:
            return float(options.temperature)
        t0, t1 = options.temperature_schedule
        return round(float(t0 + (t1 - t0) * k / max(1, (options.rounds or 1) - 1)), 4)

    def generate(self, options: Any, units: Sequence[Unit], samples: int, env: SynthEnv) -> list[list[Candidate]]:
        seeds_tasks = self._seeds(options, env)
        made = _instructions_made(env)
        # 1. one request per round for new instructions
        asks, plans, seeds = [], [], []
        for u in units:
            k = int(u.data["round"])
            rng = random.Random(unit_seed(env.seed, u.id))
            shown = rng.sample(seeds_tasks, min(options.examples_per_round, len(seeds_tasks)))
            # only rows of earlier rounds: what a round sees does not depend on how the stage cut its batches
            earlier = [t for unit, t in made if unit.startswith("r") and unit[1:].isdigit() and int(unit[1:]) < k]
            shown += rng.sample(earlier, min(2, len(earlier)))
            topic = rng.choice(options.topics) if options.topics else None
            persona = rng.choice(options.personas) if options.personas else None
            steer = (P.TOPIC.format(topic=topic) if topic else "") + (
                P.PERSONA.format(persona=persona) if persona else ""
            )
            examples = "\n".join(f"{i + 1}. {t}" for i, t in enumerate(shown))
            prompt = P.SELF_INSTRUCT.format(examples=examples, steer=steer, n=options.instructions_per_round)
            asks.append(_system(options) + [{"role": "user", "content": prompt}])
            plans.append({"topic": topic, "persona": persona, "seed": unit_seed(env.seed, u.id)})
            seeds.append(unit_seed(env.seed, u.id))
        temps = [self._temperature(options, int(u.data["round"])) for u in units]
        lists = env.teacher.complete(_requests(asks, options, seeds, temps))

        # 2. parse, drop near-duplicates (of the seed tasks, of what was made, of the batch's earlier ones)
        seen = NearDuplicates(options.dedup_threshold)
        seen.add(seeds_tasks, [f"seed task {i + 1}" for i in range(len(seeds_tasks))])
        request = P.SELF_INSTRUCT.format(examples="", steer="", n=options.instructions_per_round)
        seen.add([t for _, t in made], [f"made in {unit or 'an earlier unit'}" for unit, _ in made])
        template = P.template_hash(P.SELF_INSTRUCT, "{instruction}")
        out: dict[str, list[Candidate]] = {u.id: [] for u in units}
        todo: list[tuple[Unit, int, str, dict[str, Any]]] = []
        for u, plan, text in zip(units, plans, lists, strict=True):
            prov = {"template": template, "seed": plan["seed"], "round": int(u.data["round"])}
            prov.update({k: plan[k] for k in ("topic", "persona") if plan[k] is not None})
            items = P.numbered_items(text)[: options.instructions_per_round]
            if not items:
                c = Candidate({"messages": _system(options) + [{"role": "user", "content": ""}]}, "", provenance=prov)
                c.rejected = "empty: no instruction in the teacher's list"
                out[u.id].append(c)
            for j, instr in enumerate(items):
                hit = seen.match(instr) or _echo(instr, request, options.dedup_threshold)
                if hit is not None or _norm(instr) in {_norm(t) for t in seeds_tasks}:
                    sim, label = hit or (1.0, "a seed task")
                    msgs = _system(options) + [{"role": "user", "content": instr}]
                    c = Candidate({"messages": msgs}, "", prompt=instr, provenance={**prov, "item": j})
                    c.rejected = f"duplicate: '{_short(instr)}' is {sim:.2f} similar to {label}"
                    out[u.id].append(c)
                    continue
                seen.add([instr], [f"{u.id} instruction {j + 1}"])
                todo.append((u, j, instr, prov))

        # 3. one more call: the surviving instructions answered, samples each
        convs, seeds, where = [], [], []
        for u, j, instr, prov in todo:
            for s in range(samples):
                convs.append(_system(options) + [{"role": "user", "content": instr}])
                seeds.append(unit_seed(env.seed, f"{u.id}.{j}", s))
                where.append((u, j, instr, prov, s))
        answers = env.teacher.complete(_requests(convs, options, seeds)) if convs else []
        for (u, j, instr, prov, s), text in zip(where, answers, strict=True):
            msgs = _system(options) + [{"role": "user", "content": instr}]
            ans = text.strip()
            c = Candidate(
                {"messages": msgs + [{"role": "assistant", "content": ans}]},
                ans,
                prompt=instr,
                sample=s,
                provenance={**prov, "item": j},
            )
            if not ans:
                c.rejected = "empty: the teacher gave no answer"
            out[u.id].append(c)
        return [out[u.id] for u in units]


# ------------------------------------------------------------------------------------------------
# from_documents


class FromDocumentsOptions(GeneratorOptions):
    data: str | None = Field(
        None, description="The documents: a text file, a folder of .txt/.md files, or a glob (relative to forge.toml)."
    )
    passage_chars: int = Field(1500, ge=100, description="Longest passage, in characters (cut on paragraphs).")
    questions_per_passage: int = Field(3, gt=0, description="Question/answer pairs asked for per passage.")
    turns: int = Field(1, gt=0, description="Turns per conversation: 2 or more asks follow-up questions.")
    include_passage: bool = Field(
        False, description="Put the passage before the first question of each row (grounded, RAG-style rows)."
    )


def document_files(data: str, base_dir: Path) -> list[Path]:
    """The files ``data`` names, in a stable order: the file, a folder's .txt/.md files (recursively), or a
    glob's matches."""
    if any(ch in data for ch in "*?["):
        pattern = data if Path(data).is_absolute() else str(base_dir / data)
        return sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    path = _resolve(base_dir, data)
    if path.is_dir():
        return sorted(
            (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".txt", ".md")),
            key=lambda p: p.relative_to(path).as_posix(),
        )
    return [path]


def passages(text: str, limit: int) -> list[tuple[int, int]]:
    """(start, end) character offsets of the passages of ``text``: whole paragraphs (split at blank lines)
    joined while they fit in ``limit`` characters; a longer paragraph is cut at the last sentence end (else
    space) before the limit. Deterministic; whitespace between passages belongs to none."""
    import re

    paras = [(m.start(), m.end()) for m in re.finditer(r"\S(?:.*?\S)?(?=\s*\n\s*\n|\s*$)", text, re.DOTALL)]
    pieces: list[tuple[int, int]] = []
    for a, b in paras:
        while b - a > limit:
            window = text[a : a + limit]
            cut = max(window.rfind(". "), window.rfind("? "), window.rfind("! "), window.rfind("\n"))
            cut = cut + 1 if cut > limit // 3 else (window.rfind(" ") if window.rfind(" ") > limit // 3 else limit)
            pieces.append((a, a + cut))
            a += cut
            while a < b and text[a].isspace():
                a += 1
        if a < b:
            pieces.append((a, b))
    out: list[tuple[int, int]] = []
    for a, b in pieces:
        if out and b - out[-1][0] <= limit:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


class FromDocuments(Generator):
    """Question/answer conversations grounded in passages of text files. ``data``: a file, a folder of .txt/.md
    files or a glob; each file is cut into passages of at most ``passage_chars`` on paragraph boundaries, one
    unit per passage (``d<file>:<passage>``). The teacher writes ``questions_per_passage`` pairs per passage;
    with ``turns`` > 1 each conversation grows by follow-up questions on the same passage. The passage (file,
    offsets, text) is each row's ``provenance.source``."""

    kind = "from_documents"
    summary = "Question/answer (and multi-turn) conversations grounded in passages of text files."
    Options = FromDocumentsOptions

    def check(self, options: Any, base_dir: Path) -> list[Any]:
        problems = _data_problems(options, base_dir, folders=True)
        if not problems and not document_files(options.data, base_dir):
            problems.append(f"data: no .txt or .md file in {options.data}")
        return problems

    def units(self, options: Any, env: SynthEnv) -> list[Unit]:
        out = []
        root = _resolve(env.base_dir, options.data or "")
        for fi, path in enumerate(document_files(options.data or "", env.base_dir)):
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise DataError(f"{path}: cannot read ({exc})") from None
            try:
                rel = path.relative_to(env.base_dir).as_posix()
            except ValueError:
                rel = path.relative_to(root).as_posix() if root.is_dir() and path.is_relative_to(root) else str(path)
            for pi, (a, b) in enumerate(passages(text, options.passage_chars)):
                uid = f"d{fi}:{pi}"
                source = {"file": rel, "start": a, "end": b, "text": text[a:b]}
                out.append(Unit(uid, {"source": source}, unit_seed(env.seed, uid)))
                if options.limit is not None and len(out) >= options.limit:
                    return out
        return out

    def generate(self, options: Any, units: Sequence[Unit], samples: int, env: SynthEnv) -> list[list[Candidate]]:
        convs, seeds, where = [], [], []
        for u in units:
            passage = u.data["source"]["text"]
            prompt = P.DOCUMENT_QA.format(n=options.questions_per_passage, passage=passage)
            for k in range(samples):
                convs.append(_system(options) + [{"role": "user", "content": prompt}])
                seeds.append(unit_seed(env.seed, u.id, k))
                where.append((u, k))
        answers = env.teacher.complete(_requests(convs, options, seeds))
        templates = [P.DOCUMENT_QA] + ([P.DOCUMENT_FOLLOWUP] if options.turns > 1 else [])
        prov_base = {"template": P.template_hash(*templates)}
        out: dict[str, list[Candidate]] = {u.id: [] for u in units}
        # conversations being built: (unit, sample, seed, pair index in its answer, [(question, answer), ...])
        live: list[tuple[Unit, int, int, int, list[tuple[str, str]]]] = []
        for (u, k), seed, text in zip(where, seeds, answers, strict=True):
            pairs = P.qa_pairs(text)[: options.questions_per_passage]
            if not pairs:
                c = Candidate(
                    {"messages": _system(options)},
                    "",
                    sample=k,
                    provenance={**prov_base, "seed": seed, "source": u.data["source"]},
                )
                c.rejected = "empty: no question/answer pair in the teacher's answer"
                out[u.id].append(c)
            live += [(u, k, seed, i, [pair]) for i, pair in enumerate(pairs)]
        for turn in range(1, options.turns):
            convs, seeds = [], []
            for u, k, _, i, qa in live:
                conversation = "\n".join(f"User: {q}\nAssistant: {a}" for q, a in qa)
                prompt = P.DOCUMENT_FOLLOWUP.format(passage=u.data["source"]["text"], conversation=conversation)
                convs.append(_system(options) + [{"role": "user", "content": prompt}])
                # named by the unit, the pair and the sample only: the same whatever the batch holds
                seeds.append(unit_seed(env.seed, f"{u.id}.t{turn}.{i}", k))
            follow = env.teacher.complete(_requests(convs, options, seeds)) if convs else []
            for (_, _, _, _, qa), text in zip(live, follow, strict=True):
                pairs = P.qa_pairs(text)
                if pairs:  # a conversation whose follow-up could not be read stays shorter
                    qa.append(pairs[0])
        for u, k, seed, i, qa in live:
            msgs = _system(options)
            for t, (q, a) in enumerate(qa):
                first = t == 0 and options.include_passage
                content = P.WITH_PASSAGE.format(passage=u.data["source"]["text"], question=q) if first else q
                msgs = msgs + [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
            c = Candidate(
                {"messages": msgs},
                qa[-1][1],
                prompt=qa[-1][0],
                sample=k,
                provenance={**prov_base, "seed": seed, "source": u.data["source"], "item": i, "turns": len(qa)},
            )
            out[u.id].append(c)
        return [out[u.id] for u in units]


# ------------------------------------------------------------------------------------------------
# evolve

Way = Literal["deeper", "broader", "concretize", "constraints", "reasoning"]
_ALL_WAYS: list[Way] = ["deeper", "broader", "concretize", "constraints", "reasoning"]


class EvolveOptions(GeneratorOptions):
    data: str | None = Field(
        None,
        description="The instructions to evolve: rows with a prompt column, messages or instruction.",
    )
    prompt_column: str = Field("prompt", description="The column holding each row's instruction.")
    depth: int = Field(1, gt=0, description="Rewrites in a row: each rewrites the previous one.")
    ways: list[Way] = Field(
        default_factory=lambda: list(_ALL_WAYS),
        min_length=1,
        description="How an instruction may evolve (one chosen per step by seed): deeper, broader, concretize, "
        "constraints, reasoning.",
    )
    dedup_threshold: float = Field(
        0.7, gt=0, le=1, description="An evolution this similar (MinHash) to its original or another is rejected."
    )


def _chain(ch: dict[str, Any]) -> str:
    return f"{ch['unit'].id} sample {ch['sample']}"


class Evolve(Generator):
    """Rewrites instructions (Evol-Instruct style) and answers the rewritten ones. One unit per input row
    (``p0``, ...); ``depth`` rewrites in a row, each in one of ``ways`` chosen by the seed; an evolution that
    is empty, copies its original or is a near-duplicate of it (or of another evolution) is rejected. Each row
    records ``provenance.parent`` (the unit and original instruction) and ``provenance.evolution`` (the ways)."""

    kind = "evolve"
    summary = "Rewrites instructions deeper or broader (Evol-Instruct style), keeping the lineage; then answers."
    Options = EvolveOptions

    def check(self, options: Any, base_dir: Path) -> list[Any]:
        return _data_problems(options, base_dir)

    def units(self, options: Any, env: SynthEnv) -> list[Unit]:
        path = _resolve(env.base_dir, options.data or "")
        out = []
        for i, row in enumerate(read_rows(path, options.limit)):
            text = instruction_of(row, options.prompt_column)
            if text is None:
                raise DataError(
                    f"{_where(path, i)}: no instruction: expected a '{options.prompt_column}' text, "
                    "'instruction' or messages with a user turn"
                )
            out.append(Unit(f"p{i}", {"instruction": text}, unit_seed(env.seed, f"p{i}")))
        return out

    def generate(self, options: Any, units: Sequence[Unit], samples: int, env: SynthEnv) -> list[list[Candidate]]:
        template = P.template_hash(P.EVOLVE, "{instruction}")
        request = P.EVOLVE.format(how="", instruction="")
        out: dict[str, list[Candidate]] = {u.id: [] for u in units}
        seen = NearDuplicates(options.dedup_threshold)
        made = _instructions_made(env)
        seen.add([t for _, t in made], [f"made in {unit or 'an earlier unit'}" for unit, _ in made])
        # chains: [unit, sample, current instruction, ways so far, steps so far]
        chains: list[dict[str, Any]] = [
            {"unit": u, "sample": k, "text": u.data["instruction"], "ways": [], "steps": []}
            for u in units
            for k in range(samples)
        ]
        for step in range(options.depth):
            convs, seeds = [], []
            for ch in chains:
                rng = random.Random(unit_seed(env.seed, f"{ch['unit'].id}.e{step}", ch["sample"]))
                way = rng.choice(options.ways)
                ch["ways"].append(way)
                prompt = P.EVOLVE.format(how=P.EVOLUTIONS[way], instruction=ch["text"])
                convs.append(_system(options) + [{"role": "user", "content": prompt}])
                seeds.append(unit_seed(env.seed, f"{ch['unit'].id}.e{step}", ch["sample"]))
            texts = env.teacher.complete(_requests(convs, options, seeds)) if convs else []
            alive = []
            for ch, text in zip(chains, texts, strict=True):
                new = P.rewritten_instruction(text)
                original = ch["unit"].data["instruction"]
                reason = None
                if not new:
                    reason = "empty: the rewrite was empty"
                elif _norm(new) in (_norm(original), _norm(ch["text"])):
                    reason = "duplicate: the rewrite copies its original"
                else:
                    # against the original, not the previous step: a deeper step may rightly keep most of it
                    own = NearDuplicates(options.dedup_threshold)
                    own.add([original], ["its original"])
                    hit = (
                        own.match(new)
                        or seen.match(new, skip=_chain(ch))
                        or _echo(new, request, options.dedup_threshold)
                    )
                    if hit is not None:
                        reason = f"duplicate: the rewrite is {hit[0]:.2f} similar to {hit[1]}"
                if reason is not None:
                    out[ch["unit"].id].append(self._candidate(options, ch, new or "", "", template, env, reason))
                    continue
                ch["text"] = new
                ch["steps"].append(new)
                alive.append(ch)
                seen.add([new], [_chain(ch)])  # the later chains of the batch are compared with it
            chains = alive
        convs = [_system(options) + [{"role": "user", "content": ch["text"]}] for ch in chains]
        seeds = [unit_seed(env.seed, f"{ch['unit'].id}.answer", ch["sample"]) for ch in chains]
        answers = env.teacher.complete(_requests(convs, options, seeds)) if convs else []
        for ch, text in zip(chains, answers, strict=True):
            ans = text.strip()
            c = self._candidate(options, ch, ch["text"], ans, template, env, None if ans else "empty: no answer")
            out[ch["unit"].id].append(c)
        return [out[u.id] for u in units]

    def _candidate(
        self, options: Any, ch: dict[str, Any], instruction: str, answer: str, template: str, env: SynthEnv, reason: Any
    ) -> Candidate:
        u = ch["unit"]
        msgs = _system(options) + [{"role": "user", "content": instruction}]
        if answer:
            msgs.append({"role": "assistant", "content": answer})
        prov = {
            "template": template,
            "seed": unit_seed(env.seed, u.id, ch["sample"]),
            "parent": {"unit": u.id, "instruction": u.data["instruction"]},
            "evolution": list(ch["ways"]),
            "steps": list(ch["steps"]),
        }
        c = Candidate({"messages": msgs}, answer, prompt=instruction, sample=ch["sample"], provenance=prov)
        c.rejected = reason
        return c


BUILTIN_GENERATORS: list[type[Generator]] = [SelfInstruct, FromDocuments, Evolve, Answer]
