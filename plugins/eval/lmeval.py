"""The `lm_eval` task kind: any lm-evaluation-harness task, run on llmforge's own eval models.

lm-evaluation-harness (``pip install 'llmforge[lmeval]'``) holds hundreds of task definitions (prompt
templates, answer choices, metrics and their aggregation); rewriting them would be a worse copy. This kind
runs one of them, by name, on an :class:`~llmforge_plugins.eval.api.EvalModel`: lm-eval builds the
requests and scores the answers, our model answers them (:class:`_Adapter` maps lm-eval's three request
types onto ``loglikelihood``, ``loglikelihood_rolling`` and ``generate``). So an HF folder, a LoRA adapter
and a GGUF file run the same lm-eval task through the same backends the other task kinds use, and the
results land in the same leaderboard::

    tasks = [{ name = "capitals", kind = "lm_eval", task = "my_capitals", include_path = "lm_tasks" }]

``include_path`` is a folder of the user's own task YAMLs (lm-eval's format). A YAML's local
``data_files`` (``dataset_path: json``, ``csv``, ``parquet``) may be written relative to the YAML's own
folder. Data is never downloaded here: a task whose dataset is neither a local file nor already in the
Hugging Face datasets cache fails at once with an error that says so (lm-eval would otherwise retry the
Hub for half a minute on a machine without network).

lm_eval is imported inside :meth:`LmEvalTask.run` only: it is an optional extra, and importing it costs
seconds that `llmforge --help` must not pay.
"""

from __future__ import annotations

import contextlib
import difflib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from llmforge.errors import DataError, ForgeError, Problem, UsageError
from llmforge_plugins.eval.api import EvalModel, EvalTask, Metric, TaskEnv, TaskOptions, TaskResult

EXTRA_HINT = "pip install 'llmforge[lmeval]'"
#: requests handed to the model at once: big enough for its batching and prefix sharing, small enough that
#: progress moves and a stop request is honoured within a chunk
CHUNK = 512
#: bootstrap resamples for metrics without a closed-form standard error (f1, bleu, ...). lm-eval's command
#: line uses 100,000, which takes longer than a small task itself; 1,000 gives the stderr to about 3%.
#: Means (acc, acc_norm, exact_match) get the exact sample stderr whatever this is.
BOOTSTRAP_ITERS = 1000
#: dataset builders that read local files (anything else names a dataset on the Hub)
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}


class LmEvalOptions(TaskOptions):
    task: str = Field(description="The lm-evaluation-harness task (or group) to run, e.g. `arc_easy` or your own.")
    include_path: str | None = Field(
        None, description="A folder of your own lm-eval task YAMLs, relative to the spec's file."
    )
    primary: str = Field(
        "acc",
        description="The metric a gate or select takes when none is named, shown first in the leaderboard "
        "(the task's metric_list names them: acc for most, word_perplexity for wikitext, exact_match:strict-match).",
    )
    num_fewshot: int | None = Field(  # type: ignore[assignment]
        None, ge=0, description="Examples shown before each item (default: the lm-eval task's own)."
    )


class _Stopped(ForgeError):
    """The run was asked to stop while the model was answering."""


def _require_lm_eval() -> Any:
    try:
        # (no stubs, no py.typed: an optional extra, typed as Any here)
        import lm_eval  # type: ignore[import-untyped]
        import lm_eval.api.model  # type: ignore[import-untyped]  # noqa: F401  (the adapter's base class)
    except ImportError as exc:
        raise UsageError(
            "the lm_eval task kind needs lm-evaluation-harness, which is not installed",
            hint=f"{EXTRA_HINT} (the `lmeval` extra); import failed: {exc}",
        ) from exc
    return lm_eval


def _adapter_class(lm_eval: Any) -> type:
    """The lm-eval ``LM`` subclass that answers with an EvalModel, built once lm_eval is importable."""
    LM = lm_eval.api.model.LM

    class _Adapter(LM):  # type: ignore[misc, valid-type]
        """lm-eval's model interface over an EvalModel: requests go to the model in chunks (each chunk
        batched, sorted and prefix-shared by the model as it likes), with progress and stop checks between."""

        def __init__(self, model: EvalModel, env: TaskEnv) -> None:
            super().__init__()
            self.model = model
            self.env = env

        @property
        def tokenizer_name(self) -> str:
            # lm-eval keys its request cache by this when a chat template is applied
            return str(self.model.path)

        def _chunks(self, items: Sequence[Any]) -> Iterator[Sequence[Any]]:
            done = 0
            for start in range(0, len(items), CHUNK):
                if self.env.should_stop():
                    raise _Stopped("stopped by request")
                yield items[start : start + CHUNK]
                done += min(CHUNK, len(items) - start)
                self.env.progress(done, len(items))

        def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
            pairs = [tuple(r.args) for r in requests]
            out: list[tuple[float, bool]] = []
            for chunk in self._chunks(pairs):
                out += [(float(ll), bool(greedy)) for ll, greedy in self.model.loglikelihood(chunk)]
            return out

        def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
            texts = [r.args[0] for r in requests]
            out: list[float] = []
            for chunk in self._chunks(texts):
                out += [float(ll) for ll, _tokens in self.model.loglikelihood_rolling(chunk)]
            return out

        def generate_until(self, requests: list[Any]) -> list[str]:
            # Requests of one task share their generation settings; group by them so each group is one
            # batched call, and put the answers back in request order.
            groups: dict[str, list[int]] = {}
            for i, r in enumerate(requests):
                groups.setdefault(repr(sorted(r.args[1].items(), key=str)), []).append(i)
            out = [""] * len(requests)
            for indices in groups.values():
                kwargs = dict(requests[indices[0]].args[1])
                until = kwargs.get("until") or []
                stop = [until] if isinstance(until, str) else list(until)
                sample = bool(kwargs.get("do_sample", False))
                temperature = float(kwargs.get("temperature", 0.0) or 0.0) if sample else 0.0
                max_new = int(kwargs.get("max_gen_toks", 256))
                prompts = [requests[i].args[0] for i in indices]
                answers: list[str] = []
                for chunk in self._chunks(prompts):
                    answers += self.model.generate(
                        chunk, max_new_tokens=max_new, stop=stop, temperature=temperature, seed=self.env.seed
                    )
                for i, answer in zip(indices, answers):
                    out[i] = answer
            return out

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            if add_generation_prompt:
                return self.model.prompt(chat_history)
            # lm-eval prefills the assistant's answer (the last message): the prompt up to it, then its text
            *before, last = chat_history
            return self.model.prompt(before) + str(last.get("content", ""))

    return _Adapter


# ------------------------------------------------------------------------------------------------
# tasks: found, loaded without the network


def _task_manager(lm_eval: Any, task: str, include_path: Path | None) -> Any:
    """lm-eval's task index. Indexing its ~15,000 built-in YAMLs takes seconds: a task found in the
    user's own folder is looked up there alone."""
    from lm_eval.tasks import TaskManager  # type: ignore[import-untyped]

    if include_path is not None:
        own = TaskManager(include_path=str(include_path), include_defaults=False)
        if task in own.all_tasks:
            return own
        return TaskManager(include_path=str(include_path))
    return TaskManager()


def _unknown_task(task: str, manager: Any, include_path: Path | None) -> UsageError:
    close = difflib.get_close_matches(task, manager.all_tasks, n=3, cutoff=0.6)
    where = f"lm-eval's tasks or {include_path}" if include_path else "lm-eval's tasks"
    hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else None
    if include_path is None:
        hint = (hint + " " if hint else "") + "(your own task YAMLs: include_path = a folder of them)"
    return UsageError(f"unknown lm-eval task {task!r}: not among {where}", hint=hint)


def _local_data_files(cfg: dict[str, Any], yaml_dir: Path) -> dict[str, Any] | None:
    """The YAML's ``dataset_kwargs`` with relative ``data_files`` made absolute against the YAML's folder,
    when they exist there (lm-eval itself reads them relative to the working directory); None when
    nothing changes."""
    kwargs = cfg.get("dataset_kwargs")
    if not isinstance(kwargs, dict) or "data_files" not in kwargs:
        return None
    changed = False

    def fix(value: Any) -> Any:
        nonlocal changed
        if isinstance(value, str):
            if "://" not in value and not Path(value).is_absolute() and (yaml_dir / value).exists():
                changed = True
                return str(yaml_dir / value)
            return value
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        return value

    fixed = {**kwargs, "data_files": fix(kwargs["data_files"])}
    return fixed if changed else None


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """The Hugging Face libraries in offline mode while a task loads its data: a dataset that is neither
    local nor cached fails at once instead of retrying the Hub (five retries, ~25 s, on a machine without
    network). Both libraries read these flags at call time; they are put back afterwards."""
    import datasets.config as dconfig
    import huggingface_hub.constants as hconstants

    saved = (hconstants.HF_HUB_OFFLINE, dconfig.HF_HUB_OFFLINE, getattr(dconfig, "HF_DATASETS_OFFLINE", None))
    hconstants.HF_HUB_OFFLINE = True
    dconfig.HF_HUB_OFFLINE = True
    if saved[2] is not None:
        dconfig.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hconstants.HF_HUB_OFFLINE, dconfig.HF_HUB_OFFLINE = saved[0], saved[1]
        if saved[2] is not None:
            dconfig.HF_DATASETS_OFFLINE = saved[2]


def _load_tasks(manager: Any, task: str) -> dict[str, Any]:
    """``manager.load([task])`` (tasks, groups), without the network, a single task's relative local data
    files resolved against its YAML's folder."""
    spec: Any = task
    entry = manager.task_index.get(task)
    yaml_path = getattr(entry, "yaml_path", None)
    if yaml_path is not None:
        try:
            # lm-eval's own YAML reader (includes and !function tags), so the config is the one it would build
            from lm_eval.tasks._yaml_loader import load_yaml  # type: ignore[import-untyped]

            cfg = load_yaml(yaml_path, resolve_func=True)
        except Exception:  # noqa: BLE001 - anything odd: let lm-eval load it by name and report it
            cfg = None
        if isinstance(cfg, dict) and cfg.get("task") == task and "group" not in cfg and "class" not in cfg:
            fixed = _local_data_files(cfg, Path(yaml_path).parent)
            if fixed is not None:
                spec = {**cfg, "dataset_kwargs": fixed}
    try:
        with _offline():
            return manager.load([spec])
    except (ConnectionError, OSError, FileNotFoundError) as exc:
        raise DataError(
            f"lm-eval task {task!r}: its data is not available locally ({_short(exc)})",
            hint="lm-eval downloads most tasks' data from the Hugging Face Hub; llmforge runs offline. Fetch it "
            "once where there is network (it stays in the Hugging Face datasets cache), or declare the task "
            "in your include_path with `dataset_path: json` and local `data_files`.",
        ) from exc


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


# ------------------------------------------------------------------------------------------------
# results


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _metrics_of(scores: dict[str, Any], higher: dict[str, Any], n: int, prefix: str = "") -> dict[str, Metric]:
    """lm-eval's ``{"acc,none": .., "acc_stderr,none": ..}`` as our metrics. A filter other than lm-eval's
    default ``none`` (gsm8k's ``strict-match``) is kept in the name: ``exact_match:strict-match``."""
    out: dict[str, Metric] = {}
    for key, value in scores.items():
        if "," not in key or "_stderr," in key:
            continue
        metric, filt = key.split(",", 1)
        number = _number(value)
        if number is None:
            continue
        stderr = _number(scores.get(f"{metric}_stderr,{filt}"))
        name = prefix + (metric if filt == "none" else f"{metric}:{filt}")
        out[name] = Metric(number, stderr, n, bool(higher.get(metric, True)))
    return out


def _item_records(task_obj: Any, samples: list[dict[str, Any]], metric_names: list[str]) -> list[dict[str, Any]]:
    """One record per document: the prompt, the model's answer, the target and the per-item score. For a
    multiple-choice task also the choices and which one the model chose (``chosen``: highest
    log-likelihood, lm-eval's ``acc``; ``chosen_norm``: per character, ``acc_norm``)."""
    first = next((m for m in metric_names if "_stderr" not in m), None)
    multiple_choice = getattr(task_obj, "OUTPUT_TYPE", None) == "multiple_choice"
    records = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        args = s.get("arguments") or [()]
        prompt = args[0][0] if args and args[0] else ""
        record: dict[str, Any] = {"doc_id": s["doc_id"], "prompt": prompt, "target": s.get("target")}
        if multiple_choice:
            lls = [float(r[0]) for r in s["filtered_resps"]]
            choices = [a[1] for a in args]
            chosen = max(range(len(lls)), key=lambda i: lls[i])
            lengths = [len(c) for c in choices]
            normed = [ll / (n or 1) for ll, n in zip(lls, lengths)]
            record.update(
                choices=choices,
                loglikelihoods=lls,
                chosen=chosen,
                chosen_norm=max(range(len(normed)), key=lambda i: normed[i]),
                answer=choices[chosen],
            )
        else:
            resp = s.get("filtered_resps") or [""]
            record["answer"] = resp[0] if isinstance(resp, list) and resp else resp
        scores = {m: s[m] for m in metric_names if m in s and _number(s[m]) is not None}
        record["scores"] = scores
        record["score"] = scores.get(first) if first else None
        records.append(record)
    return records


class LmEvalTask(EvalTask):
    kind = "lm_eval"
    summary = "An lm-evaluation-harness task (its data available locally), run on this model (extra: lmeval)."
    Options: ClassVar[type[TaskOptions]] = LmEvalOptions
    primary = "acc"

    def primary_for(self, options: Any) -> str:
        return str(options.primary)

    def check(self, options: Any) -> list[Any]:
        problems = []
        if not options.task.strip():
            problems.append(Problem("task", "an lm-eval task name is needed"))
        if options.data is not None:
            problems.append(Problem("data", "an lm_eval task reads its own data (declare it in the task's YAML)"))
        return problems

    def run(self, options: Any, model: EvalModel, env: TaskEnv) -> TaskResult:
        lm_eval = _require_lm_eval()
        include = None
        if options.include_path:
            include = Path(options.include_path).expanduser()
            if not include.is_absolute():
                include = Path(env.base_dir) / include
            if not include.is_dir():
                raise UsageError(f"task {options.name!r}: include_path {include} is not a folder")
        manager = _task_manager(lm_eval, options.task, include)
        if options.task not in manager.all_tasks:
            raise _unknown_task(options.task, manager, include)
        loaded = _load_tasks(manager, options.task)
        adapter = _adapter_class(lm_eval)(model, env)
        chat = bool(options.chat)  # lm-eval's default, and ours for log-likelihood tasks: no chat template
        started = time.monotonic()
        try:
            res = lm_eval.simple_evaluate(
                model=adapter,
                tasks=list(loaded["tasks"].values()) if not loaded["groups"] else [options.task],
                task_manager=manager,
                num_fewshot=options.num_fewshot,
                limit=options.limit,
                bootstrap_iters=BOOTSTRAP_ITERS,
                log_samples=True,
                apply_chat_template=chat,
                fewshot_as_multiturn=chat,
                system_instruction=options.system,
                random_seed=env.seed,
                numpy_random_seed=env.seed,
                torch_random_seed=env.seed,
                fewshot_random_seed=options.fewshot_seed,
            )
        except _Stopped:
            raise
        except (ConnectionError, FileNotFoundError) as exc:
            raise DataError(
                f"lm-eval task {options.task!r}: its data is not available locally ({_short(exc)})"
            ) from exc
        if res is None:  # only on a non-zero rank, which a single process never is
            raise ForgeError(f"lm-eval returned no results for {options.task!r}")
        return self._result(options, loaded, res, time.monotonic() - started, lm_eval, env.log)

    def _result(
        self, options: Any, loaded: dict[str, Any], res: dict[str, Any], seconds: float, lm_eval: Any, log: Any
    ) -> TaskResult:
        results, higher = res.get("results", {}), res.get("higher_is_better", {})
        n_samples = res.get("n-samples", {})
        leaves = list(loaded["tasks"])
        n_of = {t: int(n_samples.get(t, {}).get("effective", 0)) for t in leaves}
        top = options.task
        metrics: dict[str, Metric] = {}
        if top in results:
            n_top = n_of.get(top) or sum(n_of.values())
            metrics.update(_metrics_of(results[top], higher.get(top, {}), n_top))
        if len(leaves) > 1 or top not in results:
            # a group or tag: its aggregate (when lm-eval computes one) and each task's own, `task/metric`
            for leaf in leaves:
                if leaf in results:
                    metrics.update(_metrics_of(results[leaf], higher.get(leaf, {}), n_of[leaf], prefix=f"{leaf}/"))
        items: list[dict[str, Any]] = []
        samples = res.get("samples") or {}
        for leaf in leaves:
            names = [k.split(",")[0] for k in results.get(leaf, {}) if "," in k]
            for record in _item_records(loaded["tasks"][leaf], samples.get(leaf, []), names):
                if len(leaves) > 1:
                    record["task"] = leaf
                items.append(record)
        if not metrics:
            raise ForgeError(f"lm-eval task {options.task!r} reported no numeric metric", hint=str(results)[:300])
        if options.primary not in metrics:
            # not an error after the work is done: the figures are kept, a gate naming the task alone says more
            log(
                f"warning: task {options.name!r}: primary = {options.primary!r} is not among the metrics lm-eval "
                f"task {options.task!r} reports ({', '.join(metrics)}): set primary in the task's spec"
            )
        num_fewshot = {t: res.get("configs", {}).get(t, {}).get("num_fewshot") for t in leaves}
        info = {
            "lm_eval": getattr(lm_eval, "__version__", None),
            "lm_eval_task": top,
            "lm_eval_tasks": leaves,
            "num_fewshot": num_fewshot if len(leaves) > 1 else num_fewshot.get(leaves[0]),
            "seconds": round(seconds, 3),
        }
        return TaskResult(metrics, items, info)
