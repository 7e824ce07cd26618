"""pytest fixtures for plugin authors: llmforge's real registry, pipeline and runner in a test.

Installing llmforge installs these fixtures too: the module is a pytest plugin, entered through the
``pytest11`` entry point ``llmforge.testing`` (as datasette ships its fixtures), so any test suite in
an environment with llmforge can use them without a conftest.py::

    import my_plugin

    def test_my_stage(llmforge_registry, llmforge_project):
        registry = llmforge_registry(my_plugin)           # built-ins + this plugin; fails on load errors
        llmforge_project.write('''
            [[stages]]
            name = "s"
            uses = "my_stage"
        ''')
        run = llmforge_project.run(registry)              # the real runner, in this process
        assert run.exit_code == 0, run.failure()
        assert (run.artifact("s", "files") / "out.txt").exists()

Fixtures (all prefixed ``llmforge_``, so they never shadow a suite's own):

* ``llmforge_registry``: a factory, ``llmforge_registry(*plugins, env="", check=True)``;
* ``llmforge_project``: a :class:`ForgeProject` in a temporary folder (forge.toml, data files,
  ``pipeline()``, ``problems()``, ``run()``);
* ``llmforge_tokenizer_dir`` / ``llmforge_tiny_model_dir`` (session-scoped): a byte-level BPE
  tokenizer with ChatML markers trained on the spot, and a tiny random Llama with it, saved as
  Hugging Face folders (a few MB; built once per session, on first use).

pytest imports this module at start-up in every test session of the environment, so it imports only
the standard library and pytest here; llmforge's modules (pydantic among them) and the heavy
libraries are imported inside the fixtures that need them.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from llmforge.plugins import Registry

__all__ = ["ForgeProject", "RunOutcome", "load_test_registry"]


# ------------------------------------------------------------------------------------------------
# the registry


def _named(plugin: Any) -> tuple[str, Any]:
    """(name, plugin object): a pair as given, a module by its name, any other object by its class."""
    if isinstance(plugin, tuple) and len(plugin) == 2 and isinstance(plugin[0], str):
        return plugin
    name = getattr(plugin, "__name__", None) if isinstance(getattr(plugin, "__name__", None), str) else None
    return (name or type(plugin).__name__), plugin


def load_test_registry(*plugins: Any, env: str | None = "", check: bool = True) -> Registry:
    """A fresh registry with the built-in plugins plus ``plugins`` (modules, objects, or (name, object)
    pairs), registered in process exactly as installed ones are (``load_registry(extra=...)``).

    ``env=""`` (the default) keeps other installed third-party plugins out, whatever the environment
    has; pass ``env=None`` to load everything installed. With ``check`` (the default), any load error
    (a misspelt hook, a ``register()`` that refused an object, a hook that raised) and any name a
    given plugin lost to another plugin fails the test, naming the plugin; ``check=False`` returns the
    registry as it is, for tests of those errors.
    """
    from llmforge.plugins import load_registry

    named = [_named(p) for p in plugins]
    registry = load_registry(env=env, extra=named)
    if check:
        ours = {name for name, _ in named}
        # Every table filled first: a register() that refused an object, or a hook that raised, shows too.
        registry.collect()
        problems = [
            f"{e.plugin}: {e.error}" if e.dist == "(in-process)" else f"{e.plugin} ({e.dist}): {e.error}"
            for e in registry.errors
        ]
        problems += [str(c) for c in registry.conflicts if c.loser.split(" ")[0] in ours]
        if problems:
            pytest.fail("llmforge could not load the plugins under test:\n  " + "\n  ".join(problems), pytrace=False)
    return registry


@pytest.fixture
def llmforge_registry() -> Callable[..., Any]:
    """Factory: ``llmforge_registry(*plugins, env="", check=True)`` -> a fresh ``Registry`` with the
    built-ins plus these plugin objects; a load error fails the test (see ``load_test_registry``)."""
    return load_test_registry


# ------------------------------------------------------------------------------------------------
# a project and its runs


@dataclass
class RunOutcome:
    """What a run left behind: the runner's result, plus its events read back from ``events.jsonl``
    (the file every reader sees, so a test sees what ``llmforge logs`` would)."""

    result: Any  # llmforge.runner.RunResult
    events: list[dict] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return self.result.run_id

    @property
    def run_dir(self) -> Path:
        return self.result.run_dir

    @property
    def status(self) -> str:
        return self.result.status

    @property
    def exit_code(self) -> int:
        return self.result.exit_code

    @property
    def stages(self) -> dict:
        """The manifest's record per stage: status, artifacts, error, info, ..."""
        return self.result.stages

    def artifact(self, stage: str, kind: str) -> Path:
        """The folder of a published artifact (also of a stage reused from the cache)."""
        record = self.stages.get(stage)
        if record is None:
            raise KeyError(f"no stage '{stage}' in this run (stages: {', '.join(self.stages)})")
        found = (record.get("artifacts") or {}).get(kind)
        if found is None:
            raise KeyError(
                f"stage '{stage}' ({record.get('status')}) published no '{kind}' artifact "
                f"(published: {', '.join(record.get('artifacts') or {}) or 'nothing'})"
            )
        return Path(found["path"])

    def of_type(self, type_: str, stage: str | None = None) -> list[dict]:
        """The events of one type (``log``, ``metric``, ``progress``, ``artifact``, your own), optionally of one
        stage."""
        return [e for e in self.events if e.get("type") == type_ and (stage is None or e.get("stage") == stage)]

    def messages(self, stage: str | None = None, level: str | None = None) -> list[str]:
        """The ``log`` messages (``ctx.log``), optionally of one stage and one level."""
        return [e.get("message", "") for e in self.of_type("log", stage) if level is None or e.get("level") == level]

    def metrics(self, stage: str | None = None) -> list[dict]:
        """Each ``metric`` event's values with its ``step``: ``[{"step": 10, "loss": 2.3}, ...]``."""
        return [{"step": e.get("step"), **e.get("values", {})} for e in self.of_type("metric", stage)]

    def failure(self) -> str:
        """The errors of failed stages, one per line (for an assertion's message)."""
        return (
            "\n".join(
                f"{name}: {rec.get('status')}: {rec.get('error')}"
                for name, rec in self.stages.items()
                if rec.get("error")
            )
            or f"run {self.status} (exit {self.exit_code})"
        )


class ForgeProject:
    """A project folder for a test: write forge.toml and data files, validate, and run the pipeline with
    llmforge's real runner in this process."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def config(self) -> Path:
        return self.root / "forge.toml"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def write(self, text: str, name: str = "forge.toml") -> Path:
        """Write a file (dedented, so it can be indented in the test) relative to the project; its path."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
        return path

    def write_rows(self, name: str, rows: Iterable[dict]) -> Path:
        """Write rows as JSON Lines (``data/train.jsonl``), the format every reader and stage takes; its path."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return path

    def pipeline(self, registry=None, overrides: Iterable[str] = ()):
        """The validated pipeline (``load_pipeline``); raises ``ConfigError`` with every problem."""
        from llmforge.pipeline import load_pipeline

        return load_pipeline(self.config, list(overrides), registry=registry or _builtins())

    def problems(self, registry=None, overrides: Iterable[str] = ()) -> dict[str, str]:
        """What ``llmforge validate`` would report: ``{"stages[0].times": "must be >= 1 (got 0)"}``, or
        ``{}`` when the project is valid. Several problems at one place are joined with ``; ``."""
        from llmforge.errors import ConfigError

        try:
            self.pipeline(registry, overrides)
        except ConfigError as exc:
            out: dict[str, str] = {}
            for p in exc.problems:
                out[p.where] = f"{out[p.where]}; {p.message}" if p.where in out else p.message
            return out
        return {}

    def run(
        self,
        registry=None,
        *,
        overrides: Iterable[str] = (),
        stages: Iterable[str] = (),
        from_stage: str | None = None,
        force: bool = False,
        resume: bool = False,
        stop_when: Callable[[dict], bool] | None = None,
        listeners: Iterable[Callable[[dict], None]] = (),
    ) -> RunOutcome:
        """Run the pipeline as ``llmforge run`` would (``stages``: ``--stage``; ``from_stage``: ``--from``;
        ``force``, ``resume``, ``overrides``: ``--set``), in this process, and return what it left.

        ``stop_when(event)``: the first event for which it returns True requests a stop, the way
        ``llmforge stop`` does (the ``stop.request`` file); the stage sees it through
        ``ctx.should_stop()``. ``listeners`` see every event as it is written.
        A bad configuration raises ``ConfigError``, as ``llmforge run`` exits with 2.
        """
        from llmforge.runner import RunRequest, run_pipeline
        from llmforge.runs import STOP_REQUEST, request

        registry = registry or _builtins()
        pipe = self.pipeline(registry, overrides)
        watch = list(listeners)
        if stop_when is not None:
            asked: list[bool] = []

            def stopper(event: dict) -> None:
                if not asked and stop_when(event):
                    asked.append(True)
                    request(pipe.config.runs_dir / event["run"], STOP_REQUEST)

            watch.append(stopper)
        req = RunRequest(only=list(stages), from_stage=from_stage, force=force, resume=resume, listeners=watch)
        result = run_pipeline(pipe, req, registry=registry)
        return RunOutcome(result, _read_events(result.run_dir / "events.jsonl"))


def _builtins() -> Registry:
    from llmforge.plugins import load_registry

    return load_registry(env="")


def _read_events(path: Path) -> list[dict]:
    """The run's events as `llmforge logs` reads them (a torn last line skipped, a damaged one named)."""
    from llmforge.events import read_records  # the dicts as written, which tests index

    return list(read_records(path)) if path.exists() else []


@pytest.fixture
def llmforge_project(tmp_path: Path) -> ForgeProject:
    """A :class:`ForgeProject` in a fresh temporary folder."""
    return ForgeProject(tmp_path / "project")


# ------------------------------------------------------------------------------------------------
# tiny real models (torch, transformers and tokenizers are imported only when these are used)

_CORPUS = [f"What is the capital of Land{i}? The capital of Land{i} is Town{i}." for i in range(200)]


@pytest.fixture(scope="session")
def llmforge_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (500 tokens, ChatML markers and chat template) trained on the spot and
    saved as a Hugging Face folder: what ``template``, ``data inspect --model`` and the training stages load."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # The template as installed (the built-in chat templates plugin registers `chatml`): the core names no plugin.
    CHATML = load_test_registry().chat_templates["chatml"]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        _CORPUS,
        trainers.BpeTrainer(
            vocab_size=500,
            special_tokens=list(CHATML.special_tokens),
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=CHATML.eos, pad_token=CHATML.pad)
    fast.chat_template = CHATML.source
    out = tmp_path_factory.mktemp("llmforge-tokenizer")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def llmforge_tiny_model_dir(tmp_path_factory, llmforge_tokenizer_dir) -> Path:
    """A tiny random Llama (2 layers, hidden size 32; about 40k parameters) with that tokenizer, saved as a
    Hugging Face folder: a real ``model`` input for ``sft``, ``dpo``, ``merge`` or ``gguf`` stages."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(llmforge_tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    # The same weights in every session (results a test can compare), without reseeding the tests' RNG.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("llmforge-tiny-model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
