"""Judges: a language model that scores or compares answers, declared once in forge.toml and used by name.

    [judges.local]
    backend = "gguf"                      # a .gguf file through llama.cpp
    model = "models/judge.gguf"

    [judges.server]
    backend = "openai"                    # any OpenAI-compatible endpoint: Ollama, vLLM, llama.cpp's server
    base_url = "http://127.0.0.1:8080/v1"
    model = "qwen3"
    api_key_env = "JUDGE_KEY"             # the key is read from this variable, never stored

The core holds the declaration: the ``[judges]`` table of forge.toml is validated here (every key named in
errors, ``judges.local.model: ...``) against the selected backend's ``Options``, and the validated specs
reach stages through ``StageContext.judges``. A **judge backend** (:class:`JudgeBackend`, registered through
``register_judge_backends``: :data:`JUDGE_BACKENDS`) only turns chat requests into answers. Everything a
judge does with them (prompt templates per mode, parsing structured output with retries, both orders of a
pair, the cache of judgments, the request budget) is the judges plugin's (``llmforge_plugins.judges``),
which evaluation, synthetic data and RL stages share.

Nothing heavy is imported here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from llmforge.errors import ForgeError, Problem
from llmforge.extension import ExtensionPoint, subclass_of


class JudgeOptions(BaseModel):
    """The keys every ``[judges.NAME]`` table may set; a backend's ``Options`` subclasses this."""

    model_config = ConfigDict(extra="forbid")

    backend: str = Field(description="How the judge runs: gguf, hf, openai, or one a plugin registers.")
    max_tokens: int = Field(512, gt=0, description="Longest judgment, in tokens.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature of judgments (0: greedy).")
    seed: int = Field(0, description="Seed of sampled judgments.")
    retries: int = Field(2, ge=0, description="Asks again this many times when a judgment cannot be parsed.")
    concurrency: int = Field(4, ge=1, description="Requests in flight at once (endpoints; parallel sequences).")
    max_requests: int | None = Field(
        None, gt=0, description="Budget: at most this many requests per stage (cached judgments are free)."
    )
    timeout: float = Field(120.0, gt=0, description="Seconds one request may take.")


@dataclass(frozen=True)
class JudgeRequest:
    """One chat request to a judge: the conversation (the judge's own chat template formats it), and how
    long and how random the answer may be."""

    messages: tuple[dict[str, str], ...]
    max_tokens: int = 512
    temperature: float = 0.0
    seed: int = 0


class JudgeBackend:
    """Base class of judge backends. Registered (as a class) through ``register_judge_backends``.

    Class attributes: ``name`` (what ``backend = ...`` names), ``summary``, ``Options`` (a
    :class:`JudgeOptions` subclass: the backend's own keys, e.g. ``model``, ``base_url``). The constructor
    ``Backend(options, *, base_dir, log=None)`` opens the model or connects (paths in the options are
    relative to ``base_dir``, forge.toml's folder). :meth:`complete` answers requests, concurrently where
    the backend can; a failed request raises :class:`JudgeUnavailable` with the reason."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type[JudgeOptions]] = JudgeOptions
    #: the options that name the judge's model files: their content enters the cache keys of stages using it
    model_keys: ClassVar[tuple[str, ...]] = ("model",)

    def __init__(self, options: Any, *, base_dir: Path, log: Callable[[str], Any] | None = None) -> None:
        self.options = options
        self.base_dir = Path(base_dir)

    def complete(self, requests: Sequence[JudgeRequest]) -> list[str]:  # pragma: no cover - abstract
        """The answer text to each request, in order."""
        raise NotImplementedError

    def identity(self) -> str:
        """What makes two judges give the same judgments (backend, model file and its size, endpoint
        and model name): part of the judgment cache's key, so that a changed judge never reuses old ones."""
        return self.name

    def close(self) -> None:
        """Free the model or the connection."""


class JudgeUnavailable(ForgeError):
    """A judge could not answer (the server is down, the request timed out): the message says which and why.
    The work failed (exit 1), not the input."""


@dataclass(frozen=True)
class JudgeSpec:
    """One validated ``[judges.NAME]`` table: its name, the backend class and the backend's options."""

    name: str
    backend: type[JudgeBackend]
    options: Any
    base_dir: Path

    def key(self) -> dict[str, Any]:
        """What the judge's verdicts depend on, for the cache keys of the stages that ask it: the backend and
        its options but those that only shape the traffic (concurrency, budget, timeout, retries), and, under
        ``paths``, the backend's ``model_keys`` options that name an existing file or folder (the judge model:
        the pipeline puts its fingerprint in the key, so a re-exported model judges again)."""
        traffic = {"concurrency", "max_requests", "timeout", "retries"}
        options = {k: v for k, v in self.options.model_dump(mode="json").items() if k not in traffic}
        paths = {}
        for name in self.backend.model_keys:
            value = options.get(name)
            if isinstance(value, str) and value and "://" not in value:
                path = Path(value).expanduser()
                path = path if path.is_absolute() else self.base_dir / path
                if path.exists():
                    paths[name] = path
        return {"backend": self.backend.name, "options": options, "paths": paths}

    def open(self, log: Callable[[str], Any] | None = None) -> JudgeBackend:
        return self.backend(self.options, base_dir=self.base_dir, log=log)


#: keys that would put a secret in forge.toml, and so in the run's manifest (which records the config)
SECRET_KEYS = ("api_key", "key", "token", "password", "secret", "authorization")


def validate_judges(value: Any, base_dir: Path, backends: dict[str, type[JudgeBackend]]) -> tuple[dict, list[Problem]]:
    """The ``[judges]`` table of forge.toml validated: name -> :class:`JudgeSpec`, and every problem with
    its key path (``judges.local.model: field required``; an unknown backend with a did-you-mean and the
    installed ones). Paths in the options stay as written: a backend resolves them against ``base_dir``."""
    from llmforge.schema import did_you_mean, validate_model

    if not isinstance(value, dict):
        return {}, [Problem("judges", f"expected a table [judges.NAME], got {type(value).__name__}")]
    specs: dict[str, JudgeSpec] = {}
    problems: list[Problem] = []
    installed = ", ".join(sorted(backends)) or "none"
    for name, table in value.items():
        where = f"judges.{name}"
        if not isinstance(table, dict):
            problems.append(Problem(where, f"expected a table [judges.{name}] with a backend, got {table!r}"))
            continue
        secrets = [k for k in table if str(k).lower() in SECRET_KEYS]
        for k in secrets:
            problems.append(
                Problem(
                    f"{where}.{k}",
                    "a key is never written in forge.toml (the run's manifest records the config): put it in an "
                    'environment variable and name that variable with api_key_env = "..."',
                )
            )
        if secrets:
            continue
        backend = table.get("backend")
        if backend is None:
            problems.append(Problem(f"{where}.backend", f"required: which backend runs the judge ({installed})"))
            continue
        cls = backends.get(str(backend))
        if cls is None:
            problems.append(
                Problem(
                    f"{where}.backend",
                    f"unknown judge backend '{backend}'{did_you_mean(str(backend), backends)} (installed: {installed})",
                )
            )
            continue
        opts, probs = validate_model(cls.Options, table, where)
        problems += probs
        if opts is not None:
            specs[name] = JudgeSpec(name=name, backend=cls, options=opts, base_dir=Path(base_dir))
    return specs, problems


def _check_backend(cls: type[JudgeBackend]) -> None:
    if not (isinstance(cls.Options, type) and issubclass(cls.Options, JudgeOptions)):
        raise TypeError(f"{cls.__qualname__}.Options must subclass llmforge.judging.JudgeOptions")


JUDGE_BACKENDS = ExtensionPoint(
    hook="register_judge_backends",
    table="judge_backends",
    label="judge backend",
    doc="""Register judge backends: :class:`llmforge.judging.JudgeBackend` subclasses, by ``name``. A
    ``[judges.NAME]`` table of forge.toml selects one with ``backend = ...`` and is validated against its
    ``Options``. The judges plugin registers ``gguf`` (llama.cpp), ``hf`` (transformers) and ``openai``
    (any OpenAI-compatible endpoint).""",
    validate=subclass_of(JudgeBackend, check=_check_backend),
)
