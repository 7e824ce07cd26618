"""Evaluation: the API a plugin implements to add a task kind (`register_eval_tasks`) or a way of running
a model for evaluation (`register_eval_models`).

This module belongs to the eval plugin, which declares both extension points (``EVAL_TASKS`` and
``EVAL_MODELS``, below), as the merge plugin declares merge methods: the core knows nothing of
evaluation. A third-party task kind imports its base classes from here::

    from llmforge_plugins.eval.api import EvalTask, TaskOptions, TaskResult, mean_metric

    class Echo(EvalTask):
        kind = "echo"
        summary = "Does the model repeat a word?"

        class Options(TaskOptions):
            word: str = "hello"

        def run(self, options, model, env):
            prompt = model.prompt([{"role": "user", "content": f"Say {options.word}."}])
            answer = model.generate([prompt], max_new_tokens=8)[0]
            hit = float(options.word in answer.lower())
            items = [{"prompt": prompt, "answer": answer, "score": hit}]
            return TaskResult({"contains": mean_metric([hit])}, items)

The pieces:

* a **task** (:class:`EvalTask`) is a kind of measurement (perplexity, multiple choice, generation, a
  judge's score); a **task spec** is one instance of it, a small TOML table (its ``Options``): name, data
  file, few-shot examples, the kind's own keys. `tasks = [...]` in an `eval` stage lists specs (inline
  tables or paths to ``.toml`` files);
* an **eval model** (:class:`EvalModel`) runs one model for tasks: log-likelihoods of continuations,
  rolling log-likelihood of texts, batched generation, the chat prompt as the model was trained. The
  eval plugin registers ``hf`` (transformers: a model folder or a LoRA adapter) and ``gguf``
  (llama.cpp: a .gguf file);
* results are :class:`TaskResult`: metrics (:class:`Metric`: value, standard error, items) and per-item
  records (prompt, answer, score) that the report keeps for inspection.

No torch at import time: this module is imported when the plugin registry is built.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from llmforge.extension import ExtensionPoint, subclass_of

# ------------------------------------------------------------------------------------------------
# metrics


@dataclass(frozen=True)
class Metric:
    """One figure of one task on one model: its value, the standard error of that value (None when it has
    none, e.g. perplexity), and how many items it was measured on. ``higher_is_better`` orders a
    leaderboard and tells a gate which way a regression goes."""

    value: float
    stderr: float | None
    n: int
    higher_is_better: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "stderr": self.stderr, "n": self.n, "higher_is_better": self.higher_is_better}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Metric:
        return cls(float(data["value"]), data.get("stderr"), int(data["n"]), bool(data.get("higher_is_better", True)))


def mean_metric(values: Iterable[float], *, higher_is_better: bool = True) -> Metric:
    """The mean of per-item scores with its standard error, as lm-evaluation-harness reports it: the sample
    standard deviation (n - 1) over sqrt(n). One item has no spread: stderr 0."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return Metric(math.nan, None, 0, higher_is_better)
    mean = sum(xs) / n
    if n == 1:
        return Metric(mean, 0.0, 1, higher_is_better)
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return Metric(mean, math.sqrt(var / n), n, higher_is_better)


@dataclass
class TaskResult:
    """What one task measured on one model: ``metrics`` by name (``acc``, ``acc_norm``, ``perplexity``,
    ``exact_match``, ``win_rate``, ...), and one record per item (at least ``prompt``, ``answer`` and
    ``score``; a task adds what helps inspection: ``target``, ``choices``, ``judgment``)."""

    metrics: dict[str, Metric]
    items: list[dict[str, Any]] = field(default_factory=list)
    #: anything else worth keeping in the report (tokens scored, judge failures, time taken)
    info: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# models


class EvalModel:
    """A model opened for evaluation. Registered (as a class) through ``register_eval_models``.

    Class attributes: ``name`` (``hf``, ``gguf``), ``summary``, ``opens`` (what it opens, in words:
    ``a .gguf file``). :meth:`refuse` decides cheaply, without heavy imports, whether it opens a path;
    the constructor ``Model(path, *, n_ctx=None, batch_size=None, log=None)`` opens it.

    Every method takes a list and returns a list in the same order, so that an implementation batches,
    sorts by length and shares prefixes as it likes (the speed of an eval is here). ``label`` is how the
    model is named in a leaderboard (set by whoever opens it: ``sft``, ``gguf:Q4_K_M``).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    opens: ClassVar[str] = ""

    path: Path
    label: str = ""
    #: tokens the model can attend to (prompt and answer together)
    context: int = 0

    def __init__(
        self,
        path: Path,
        *,
        n_ctx: int | None = None,
        batch_size: int | None = None,
        log: Callable[[str], Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.label = self.path.name

    @classmethod
    def refuse(cls, path: Path) -> str | None:
        """None when this class opens ``path``, else why not, in a few words."""
        return "not supported"

    # -- what tasks ask ---------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """For each (context, continuation): the summed log-probability of the continuation's tokens given
        the context, and whether greedy decoding would have produced exactly those tokens.

        The pair is tokenized as lm-evaluation-harness does (context and context+continuation encoded,
        the continuation's tokens being what the whole adds after the context's; trailing spaces of the
        context moved to the continuation), so that its accuracies match lm-eval's on the same model. The
        context is encoded with the tokenizer's BOS when the model's tokenizer adds one."""
        raise NotImplementedError

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        """For each text: the summed log-probability of all its tokens (the first predicted from BOS, or
        not scored where the model has none), in windows of the context length when longer, and how many
        tokens were scored. Perplexity is exp(-sum / tokens)."""
        raise NotImplementedError

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 256,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        seed: int = 0,
    ) -> list[str]:
        """The answer to each prompt (rendered already: see :meth:`prompt`), cut before the first stop
        string and at the model's end-of-turn/EOS tokens. Greedy at temperature 0."""
        raise NotImplementedError

    def prompt(self, messages: Sequence[dict[str, Any]]) -> str:
        """``messages`` rendered with the model's own chat template, ready for the answer (the template
        the model was trained with travels with it: tokenizer_config.json or the GGUF's metadata). A model
        without a template gets the last message's content as a plain prompt."""
        raise NotImplementedError

    @property
    def has_chat_template(self) -> bool:
        return False

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text (the mean of the model's last hidden states, or llama.cpp's embedding): how
        the GGUF scorecard compares a quant's answers with the HF model's. Optional."""
        raise NotImplementedError

    def close(self) -> None:
        """Free the model (memory, a llama.cpp handle)."""


EVAL_MODELS = ExtensionPoint(
    hook="register_eval_models",
    table="eval_models",
    label="eval model",
    doc="""Register ways of running a model for evaluation: :class:`llmforge_plugins.eval.api.EvalModel`
    subclasses. The first, in load order, whose ``refuse(path)`` returns None opens a path. The eval plugin
    registers ``hf`` (a transformers model folder or a LoRA adapter) and ``gguf`` (a .gguf file, llama.cpp).""",
    validate=subclass_of(EvalModel),
)


# ------------------------------------------------------------------------------------------------
# tasks


class TaskOptions(BaseModel):
    """The keys every task spec has; a task kind's ``Options`` subclasses this and adds its own.

    Paths (``data``, ``fewshot_data``) are relative to the file that declares the spec (forge.toml or the
    task's .toml file); the loader resolves them before ``run``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The task's name in reports and gates (`qa` makes metrics `qa.acc`).")
    kind: str = Field(description="The task kind: perplexity, multiple_choice, generation, judge, pairwise, ...")
    data: str | None = Field(None, description="The items: a .jsonl, .csv or .parquet file.")
    limit: int | None = Field(None, gt=0, description="Use at most this many items (the first ones).")
    num_fewshot: int = Field(0, ge=0, description="Examples shown before each item.")
    fewshot_data: str | None = Field(
        None, description="Where few-shot examples come from (default: the items themselves, never the item asked)."
    )
    fewshot_seed: int = Field(1234, description="Seed of the few-shot sample.")
    chat: bool | None = Field(
        None,
        description="Ask through the model's chat template (default: when the model has one, for generation and "
        "judge tasks; never for log-likelihood tasks, as lm-eval does).",
    )
    system: str | None = Field(None, description="A system message for chat prompts.")


@dataclass
class TaskEnv:
    """What a running task gets besides its options and the model: where its spec lives, how to log and
    report progress, whether to stop, the run's seed, the registry, and the judges declared in forge.toml
    (name -> :class:`llmforge.judging.JudgeSpec`; a judge task opens one with the judges plugin)."""

    base_dir: Path = field(default_factory=Path.cwd)
    log: Callable[[str], Any] = print
    progress: Callable[[float, float], Any] = lambda done, total: None
    should_stop: Callable[[], bool] = lambda: False
    seed: int = 0
    registry: Any = None
    judges: dict[str, Any] = field(default_factory=dict)
    #: a folder the task may keep files in across a resume (a judge's cache)
    cache_dir: Path | None = None


class EvalTask:
    """Base class of task kinds. Registered (as a class) through ``register_eval_tasks``.

    Class attributes: ``kind`` (what a spec's ``kind`` names), ``summary``, ``Options`` (a
    :class:`TaskOptions` subclass), ``primary`` (the metric a leaderboard shows first and a gate takes
    when none is named). :meth:`run` measures one model; it reads its items with
    :func:`llmforge_plugins.eval.spec.read_items` (file, line and field named in errors)."""

    kind: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type[TaskOptions]] = TaskOptions
    primary: ClassVar[str] = ""

    def primary_for(self, options: Any) -> str:
        """The primary metric of one spec: ``primary``, unless the kind's metric depends on its options (a
        generation task's metric is named after its scorer)."""
        return self.primary

    def check(self, options: Any) -> list[Any]:
        """Problems with a spec found without running it (a missing file, a column the kind needs): plain
        strings, or :class:`llmforge.errors.Problem` to name the key."""
        return []

    def run(self, options: Any, model: EvalModel, env: TaskEnv) -> TaskResult:  # pragma: no cover - abstract
        raise NotImplementedError


def _task_kind(obj: Any) -> str:
    kind = getattr(obj, "kind", None)
    if not kind or not isinstance(kind, str):
        raise TypeError(f"{getattr(obj, '__qualname__', repr(obj))} has no kind")
    return kind


def _check_task(cls: type[EvalTask]) -> None:
    if not (isinstance(cls.Options, type) and issubclass(cls.Options, TaskOptions)):
        raise TypeError(f"{cls.__qualname__}.Options must subclass llmforge_plugins.eval.api.TaskOptions")


EVAL_TASKS = ExtensionPoint(
    hook="register_eval_tasks",
    table="eval_tasks",
    label="eval task kind",
    doc="""Register evaluation task kinds: :class:`llmforge_plugins.eval.api.EvalTask` subclasses, by
    ``kind``. A task spec (`tasks = [...]` of an `eval` stage, or `llmforge eval --task`) names its kind; the
    eval plugin registers perplexity, multiple_choice, generation, judge and pairwise.""",
    validate=subclass_of(EvalTask, instantiate=True, check=_check_task, name_of=_task_kind),
    name_of=_task_kind,
)
