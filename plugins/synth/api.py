"""What the `synth` stage is written against: generators, verifiers, scorers, and the environment they run in.

A synth run is a deterministic sequence of **units** (one seed task to expand, one prompt to answer, one
passage to ask about). A :class:`Generator` names its units (``units``) and turns a batch of them into
**candidates** (``generate``): rows it proposes, each with the answer the teacher gave. The stage then

1. verifies each candidate (``verify = {...}``: a :class:`Verifier` registered through
   ``register_verifiers``: code run against tests, a numeric answer, a regex, a JSON schema): a failing one is
   rejected with the verifier's reason;
2. scores the survivors (``judge = { judge = "NAME", rubric = "...", min = 6 }``, or a reward model) and rejects
   those under ``min``;
3. keeps the best of a unit's ``samples`` (or all that passed), and asks the generator for the unit's final rows
   (``rows``: a messages row per kept answer; the ``preferences`` generator pairs the best with the worst);
4. appends the unit to the stage's journal (one JSON line: its rows, its rejections and what it cost), so a
   killed or stopped run resumes after the last complete unit: no duplicate, no gap.

Everything here is cheap to import (the hook modules import it at start-up): no torch, no llama.cpp.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from llmforge.extension import ExtensionPoint, subclass_of
from llmforge.judging import JudgeRequest


def text_hash(text: str) -> str:
    """The short content hash recorded as a row's ``provenance.template`` (a prompt template's identity)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def unit_seed(seed: int, unit_id: str, sample: int = 0) -> int:
    """The seed of one request: a function of the run's seed, the unit and the sample only, so a resumed run
    asks exactly what the uninterrupted run would have asked (and a cache hit stays a hit)."""
    h = hashlib.sha256(f"{seed}:{unit_id}:{sample}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


# ------------------------------------------------------------------------------------------------
# the teacher: the model that writes


class Teacher:
    """The model a generator asks: a judge backend (``[judges.NAME]`` named by ``teacher = "NAME"``, or one the
    stage opened for ``model = "@stage"``/a path) plus accounting. ``complete`` answers chat requests in order,
    concurrently where the backend can; ``requests`` and ``tokens`` count what was asked (tokens: the answer
    tokens the backend reports, else an estimate of 4 characters a token), for budgets and the report."""

    def __init__(self, backend: Any, *, label: str) -> None:
        self.backend = backend
        self.label = label  # what provenance records: the judge's name or the model path
        self.requests = 0
        self.tokens = 0

    def identity(self) -> str:
        """What makes two teachers write the same (backend, model file, endpoint): recorded in provenance."""
        return str(self.backend.identity())

    def complete(self, requests: Sequence[JudgeRequest]) -> list[str]:
        before = getattr(self.backend, "tokens", None)
        answers = list(self.backend.complete(list(requests)))
        after = getattr(self.backend, "tokens", None)
        self.requests += len(requests)
        if isinstance(before, int) and isinstance(after, int):
            self.tokens += after - before
        else:
            self.tokens += sum(max(1, len(a) // 4) for a in answers)
        return answers

    def chat(
        self,
        conversations: Sequence[Sequence[dict[str, str]]],
        *,
        max_tokens: int,
        temperature: float,
        seeds: Sequence[int],
    ) -> list[str]:
        """Shorthand: one request per conversation, with these settings and one seed each."""
        return self.complete(
            [
                JudgeRequest(tuple(dict(m) for m in conv), max_tokens=max_tokens, temperature=temperature, seed=s)
                for conv, s in zip(conversations, seeds, strict=True)
            ]
        )


# ------------------------------------------------------------------------------------------------
# units and candidates


@dataclass
class Unit:
    """One piece of work. ``id`` is stable across runs (e.g. ``"p17"`` for the 17th prompt, ``"r3"`` for the
    third self-instruct round): the journal records finished ids, and a resumed run skips them. ``data`` is
    what the generator needs (the seed rows, the prompt, the passage); ``seed`` derives from the run's seed and
    the id (:func:`unit_seed`)."""

    id: str
    data: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


@dataclass
class Candidate:
    """A row a generator proposes for a unit. ``row`` is the dataset row (``{"messages": [...]}`` with the
    teacher's answer as the last assistant turn, plus any extra columns, e.g. the reference ``answer`` or the
    ``tests`` a verifier reads); ``answer`` is the text verifiers and judges look at (normally the last
    assistant turn); ``prompt`` the question it answers, for the judge. ``provenance`` holds the generator's
    own facts (``template``: the prompt template's hash, ``source``: the passage, ``parent``: the row an
    evolved instruction came from, ``persona``, ``topic``); the stage adds generator, teacher, seed and scores.

    The stage fills ``scores`` (name -> value: ``verify``, ``judge``, ``reward``), ``passed`` (False when a
    verifier failed it) and ``rejected`` (the reason, when it is not kept)."""

    row: dict[str, Any]
    answer: str
    prompt: str = ""
    sample: int = 0
    provenance: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    passed: bool | None = None
    rejected: str | None = None


@dataclass
class SynthEnv:
    """What a generator gets besides its options: the teacher, where its files are (``base_dir``: the
    folder of forge.toml, against which data paths resolve), the run's seed, logging, whether to stop (a stop
    request or a spent budget), the registry and the judges declared in forge.toml, and ``made``: the rows
    already accepted (read back from the journal on a resume, then grown as units finish), which a generator
    that depends on its own output (self_instruct's near-duplicate check, evolve's lineage) rebuilds its state
    from. ``judge`` is the opened judge of the stage's ``judge = {...}`` (a judges-plugin ``Judge``), or None:
    the ``preferences`` generator compares pairs with it."""

    teacher: Teacher
    base_dir: Path = field(default_factory=Path.cwd)
    seed: int = 0
    log: Callable[[str], Any] = print
    should_stop: Callable[[], bool] = lambda: False
    registry: Any = None
    judges: dict[str, Any] = field(default_factory=dict)
    made: list[dict[str, Any]] = field(default_factory=list)
    judge: Any = None
    work_dir: Path | None = None


# ------------------------------------------------------------------------------------------------
# generators


class GeneratorOptions(BaseModel):
    """The keys every ``generator = { kind = "...", ... }`` table has; a generator's ``Options`` adds its own.
    Paths (``data``) are relative to forge.toml's folder."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(description="The generator: self_instruct, from_documents, evolve, answer, preferences, ...")
    data: str | None = Field(None, description="The input rows or files the generator reads (its own doc says which).")
    limit: int | None = Field(None, gt=0, description="Use at most this many input rows (the first ones).")
    system: str | None = Field(None, description="A system message for the teacher's requests.")
    max_tokens: int = Field(256, gt=0, description="Longest answer of the teacher, in tokens.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature of the teacher (0: greedy).")


class Generator:
    """Base class of generators. Registered (as a class) through ``register_generators``.

    Class attributes: ``kind`` (what ``generator = { kind = ... }`` names), ``summary``, ``Options`` (a
    :class:`GeneratorOptions` subclass), ``output`` (the row format of the dataset: ``"messages"`` or
    ``"preference"``). Methods: :meth:`check` (cheap problems), :meth:`units` (the work, lazily: a generator
    whose next units depend on what it made reads ``env.made``), :meth:`generate` (candidates per unit, in
    order; ``samples`` of them per unit where it asks the teacher several times), :meth:`rows` (a unit's final
    rows from its scored candidates)."""

    kind: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type[GeneratorOptions]] = GeneratorOptions
    output: ClassVar[str] = "messages"

    def check(self, options: Any, base_dir: Path) -> list[Any]:
        """Problems found without running (a missing file, a column it needs): strings, or
        :class:`llmforge.errors.Problem` naming the key under the generator's table."""
        return []

    def units(self, options: Any, env: SynthEnv) -> Iterable[Unit]:  # pragma: no cover - abstract
        raise NotImplementedError

    def generate(
        self, options: Any, units: Sequence[Unit], samples: int, env: SynthEnv
    ) -> list[list[Candidate]]:  # pragma: no cover - abstract
        """For each unit, its candidates (``samples`` answers where the generator samples; a unit may give
        none, e.g. a self-instruct round whose instructions were all near-duplicates). Ask the teacher for all
        units of the batch in one ``env.teacher.complete`` call where possible: that is where concurrency pays."""
        raise NotImplementedError

    def rows(self, options: Any, unit: Unit, candidates: Sequence[Candidate], env: SynthEnv) -> list[dict[str, Any]]:
        """The unit's dataset rows from its candidates, those the stage kept (``rejected`` None) in order of
        preference. Default: each kept candidate's row. Provenance is added by the stage."""
        return [c.row for c in candidates if c.rejected is None]


def _check_options(cls: type) -> None:
    options = getattr(cls, "Options", None)
    if not (isinstance(options, type) and issubclass(options, GeneratorOptions)):
        raise TypeError(f"{cls.__qualname__}.Options must subclass llmforge_plugins.synth.api.GeneratorOptions")


def _kind(obj: Any) -> str:
    kind = getattr(obj, "kind", None)
    if not kind or not isinstance(kind, str):
        raise TypeError(f"{getattr(obj, '__qualname__', repr(obj))} has no kind")
    return kind


GENERATORS = ExtensionPoint(
    hook="register_generators",
    table="synth_generators",
    label="synth generator",
    doc="""Register synthetic-data generators: :class:`llmforge_plugins.synth.api.Generator` subclasses, by
    ``kind``. A `synth` stage's ``generator = { kind = ... }`` names one; the synth plugin registers
    self_instruct, from_documents, evolve, answer and preferences.""",
    validate=subclass_of(Generator, instantiate=True, check=_check_options, name_of=_kind),
    name_of=_kind,
)


# ------------------------------------------------------------------------------------------------
# verifiers


class VerifierOptions(BaseModel):
    """The keys every ``verify = { verifier = "...", ... }`` table has; a verifier's ``Options`` adds its own
    (the column holding the tests or the expected answer, limits, a pattern)."""

    model_config = ConfigDict(extra="forbid")

    verifier: str = Field(description="The verifier: python_tests, numeric, regex, json_schema, or a plugin's.")


@dataclass
class Verdict:
    """A verifier's word on one answer: ``passed``, a ``score`` in [0, 1] (the share of tests passed; 1.0 or
    0.0 for a yes/no check) and the ``reason`` (why it failed: the failing test, the number found, ...)."""

    passed: bool
    score: float
    reason: str = ""


class Verifier:
    """Base class of verifiers. Registered (as a class) through ``register_verifiers``.

    Class attributes: ``name`` (what ``verifier = ...`` names), ``summary``, ``Options`` (a
    :class:`VerifierOptions` subclass). :meth:`verify` judges a batch of answers, each with its row (where the
    tests, the expected answer or the schema may live), in order; it never raises for a wrong answer (that is
    a failed :class:`Verdict`), only for a misconfigured verifier. Also the reward functions of online RL."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type[VerifierOptions]] = VerifierOptions

    def check(self, options: Any) -> list[Any]:
        return []

    def verify(
        self, options: Any, rows: Sequence[dict[str, Any]], answers: Sequence[str]
    ) -> list[Verdict]:  # pragma: no cover - abstract
        raise NotImplementedError


def _check_verifier(cls: type) -> None:
    options = getattr(cls, "Options", None)
    if not (isinstance(options, type) and issubclass(options, VerifierOptions)):
        raise TypeError(f"{cls.__qualname__}.Options must subclass llmforge_plugins.synth.api.VerifierOptions")


VERIFIERS = ExtensionPoint(
    hook="register_verifiers",
    table="synth_verifiers",
    label="verifier",
    doc="""Register answer verifiers: :class:`llmforge_plugins.synth.api.Verifier` subclasses, by ``name``.
    A `synth` stage's ``verify = { verifier = ... }`` names one (rejection sampling); the synth plugin registers
    python_tests (code run against unit tests in a sandboxed child process), numeric, regex and json_schema.""",
    validate=subclass_of(Verifier, instantiate=True, check=_check_verifier),
)
