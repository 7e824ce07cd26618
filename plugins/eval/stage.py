"""`eval`: every model a pipeline made, on the same tasks, in one leaderboard; gates and select.

    [[stages]]
    name = "eval"
    uses = "eval"
    models = ["@sft", "@merge", "@gguf"]          # a gguf artifact: each of its .gguf files (gguf:F16, gguf:Q4_K_M)
    tasks = [{ name = "qa", kind = "multiple_choice", data = "data/qa.jsonl" }, "tasks/wiki.toml"]
    gate = [{ metric = "qa.acc", min = 0.4 }, { metric = "qa.acc", vs = "@sft", max_drop = 0.02 }]
    select = { metric = "qa.acc", among = ["@sft", "@merge"] }   # publishes the best as this stage's `model`

Each model is opened once (plugins/eval/models.py picks the runner: transformers or llama.cpp), runs every
task, and is closed before the next. Each (model, task) result is kept in the stage's work folder as soon as
it is known, so `llmforge run --resume` after a stop or a crash does not measure it again. The report
artifact (report.py has the format) is written when every pair is done; a failing gate keeps it in the
stage folder (`stages/eval/report/`) and fails the stage, exit 1, naming the gate, the model and the numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from llmforge.stage import Input, Produced, Stage, StageContext, StageOptions

if TYPE_CHECKING:
    from llmforge.errors import Problem
    from llmforge.planning import Estimate, PlanEnv
    from llmforge.plugins import Registry
    from llmforge.stage import Artifact
    from llmforge_plugins.eval.api import EvalModel, EvalTask, TaskOptions


class GateOptions(StageOptions):
    metric: str = Field(description='"<task>.<metric>" (qa.acc, wiki.perplexity); "<task>" alone: its primary metric.')
    model: str | None = Field(
        None, description="The model the gate applies to: a label or @stage (default: every model evaluated)."
    )
    min: float | None = Field(None, description="Fail when the metric is below this.")
    max: float | None = Field(None, description="Fail when the metric is above this (perplexity).")
    vs: str | None = Field(
        None,
        description="Compare with this model (a label or @stage): no other model may fall behind it by more "
        "than max_drop.",
    )
    max_drop: float | None = Field(
        None,
        ge=0,
        description="With vs: the largest regression allowed (absolute; 'behind' follows the metric's direction: "
        "lower accuracy, higher perplexity). Default 0.",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> GateOptions:
        threshold = self.min is not None or self.max is not None
        if self.vs is None and self.max_drop is not None:
            raise ValueError('max_drop compares with another model: add vs = "@stage" (or a label)')
        if self.vs is not None and threshold:
            raise ValueError("a gate is either a threshold (min/max) or a comparison (vs/max_drop): write two gates")
        if self.vs is None and not threshold:
            raise ValueError('a gate needs min, max, or vs (e.g. { metric = "qa.acc", min = 0.4 })')
        return self


class SelectOptions(StageOptions):
    metric: str = Field(description='The metric that decides ("qa.acc"; highest wins, lowest for perplexity).')
    among: list[str] = Field(
        default_factory=list,
        description="The candidates: labels or @stage references (default: every model of the published kind).",
    )
    publish: Literal["model", "gguf"] | None = Field(
        None,
        description='What the winner is published as: "model" (an HF folder) or "gguf" (a .gguf file). Default: '
        '"gguf" when every candidate is a GGUF file (a label like "gguf:Q4_K_M" or a .gguf path), else "model".',
    )


TaskEntry = Annotated[str, Input()] | dict[str, Any]


class EvalOptions(StageOptions):
    models: list[Annotated[str, Input("model", "adapter", "gguf")]] = Field(
        min_length=1,
        description="The models: @stage references or paths (HF folders, LoRA adapters, .gguf files, gguf "
        "artifacts: each .gguf file in one is a model, labelled <stage>:<type>, e.g. gguf:Q4_K_M).",
    )
    labels: dict[str, str] = Field(
        default_factory=dict,
        description='Rename models in the report: { "@sft" = "chat", "gguf:Q4_K_M" = "q4" } (default labels: the '
        "stage's name, or the folder's / file's name).",
    )
    tasks: list[TaskEntry] = Field(
        min_length=1,
        description="Task specs: inline tables ({ name, kind, data, ... }) or paths of .toml task spec files.",
    )
    limit: int | None = Field(None, gt=0, description="Use at most this many items of every task.")
    batch_size: int | None = Field(None, gt=0, description="Requests the model runs together (default: its own).")
    n_ctx: int | None = Field(None, gt=0, description="Context length for llama.cpp models (default: the model's).")
    gate: list[GateOptions] = Field(
        default_factory=list,
        description='Fail the stage when a model regresses: { metric = "qa.acc", min = 0.4 } or '
        '{ metric = "qa.acc", vs = "@sft", max_drop = 0.02 } (one table or a list).',
    )
    select: SelectOptions | None = Field(
        None, description="Publish the best model by a metric as this stage's model (or gguf) artifact."
    )

    @field_validator("gate", mode="before")
    @classmethod
    def _one_or_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value


def _spec_tables(options: EvalOptions, project_dir: Path) -> list[tuple[Any, Path | None, dict | None, Path]]:
    """Each task entry as written (an inline table or a .toml path), its file (None inline), its table (None when
    the file is unreadable: check() reports that) and the folder its relative paths are read from."""
    from llmforge.config import read_toml

    out: list[tuple[Any, Path | None, dict | None, Path]] = []
    for entry in options.tasks:
        if not isinstance(entry, str):
            out.append((entry, None, entry if isinstance(entry, dict) else None, project_dir))
            continue
        path = Path(entry) if Path(entry).is_absolute() else project_dir / entry
        try:
            data: dict | None = read_toml(path)
        except Exception:  # noqa: BLE001 - check() reports a bad spec file; keys only need a value
            data = None
        out.append((entry, path, data, path.parent))
    return out


# ------------------------------------------------------------------------------------------------
# the models of a stage


@dataclass
class EvalEntry:
    """One model of the leaderboard: a folder or a .gguf file, how it is labelled and where it came from."""

    label: str
    path: Path
    engine: str  # the eval model that runs it: "hf", "gguf", or a plugin's (guessed from the path until opened)
    source: str | None  # "@sft" when it came from a stage
    quant: str | None  # the GGUF type, from the file name
    index: int  # which entry of `models` brought it

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "path": str(self.path),
            "engine": self.engine,
            "source": self.source,
            "quant": self.quant,
        }


def gguf_files(path: Path) -> list[Path]:
    """The .gguf files a path means: itself, or those in a folder (a gguf artifact) in name order."""
    if path.is_file():
        return [path] if path.suffix.lower() == ".gguf" else []
    if path.is_dir() and not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        # by name, ignoring case: the export (model-f16) before its quants (model-Q4_K_M), as the gguf stage made them
        return sorted((p for p in path.glob("*.gguf") if p.is_file()), key=lambda p: p.name.lower())
    return []


def quant_of(file: Path) -> str:
    """The type part of a GGUF file name, as the gguf stage writes them (<name>-<type>.gguf): F16, Q4_K_M."""
    stem = file.stem
    return (stem.rpartition("-")[2] or stem).upper()


def _base_label(value: str, art: Artifact | None) -> str:
    if art is not None and art.stage:
        return art.stage
    path = Path(value)
    return path.stem if path.suffix.lower() == ".gguf" else (path.name or str(path))


def expand_models(models: list[str], inputs: dict[str, Artifact], labels: dict[str, str]) -> list[EvalEntry]:
    """The leaderboard's models from the stage's (resolved) ``models``: a gguf artifact or folder becomes one
    entry per file. Labels: the stage's name (``sft``), the folder's or file's name for a path, ``<base>:<type>``
    for each file of a gguf folder, then renamed by ``labels``; a label met twice gets ``-2``, ``-3``."""
    from llmforge.errors import UsageError

    out: list[EvalEntry] = []
    for i, value in enumerate(models):
        art = inputs.get(f"models[{i}]")
        path = Path(art.path if art is not None and art.kind != "path" else value)
        source = f"@{art.stage}" if art is not None and art.stage else None
        base = _base_label(value, art)
        files = gguf_files(path)
        if art is not None and art.kind == "gguf" or (path.is_dir() and files):
            if not files:
                raise UsageError(f"models[{i}]: {path} holds no .gguf file")
            out += [EvalEntry(f"{base}:{quant_of(f)}", f, "gguf", source, quant_of(f), i) for f in files]
        elif files:  # a .gguf file
            out.append(EvalEntry(base, path, "gguf", source, quant_of(path), i))
        else:
            out.append(EvalEntry(base, path, "hf", source, None, i))
    for entry in out:
        new = labels.get(entry.label)
        if new is None and entry.source in labels:
            new = labels[entry.source]
            if sum(e.source == entry.source for e in out) > 1:  # a gguf artifact: keep each file apart
                new = f"{new}:{entry.quant}"
        entry.label = new or entry.label
    seen: dict[str, int] = {}
    for entry in out:
        seen[entry.label] = seen.get(entry.label, 0) + 1
        if seen[entry.label] > 1:
            entry.label = f"{entry.label}-{seen[entry.label]}"
    return out


# ------------------------------------------------------------------------------------------------
# what check() knows before anything ran: labels exact for HF models, a prefix for gguf folders


@dataclass
class _Known:
    exact: set[str]  # labels as the report will show them (after `labels`)
    prefixes: set[str]  # "gguf:" (the files of a gguf artifact are known only once it was made)
    refs: set[str]  # "@sft"
    gguf: set[str]  # labels and refs that mean GGUF files
    originals: set[str]  # labels before `labels` renames them: what its keys may name

    def knows(self, name: str) -> bool:
        if name.startswith("@"):
            return name.partition(".")[0] in self.refs
        return name in self.exact or any(name.startswith(p) and len(name) > len(p) for p in self.prefixes)

    def is_gguf(self, name: str) -> bool:
        key = name.partition(".")[0] if name.startswith("@") else name
        return key in self.gguf or any(name.startswith(p) for p in self.prefixes)

    def listing(self) -> str:
        names = sorted(self.exact) + sorted(f"{p}<type>" for p in self.prefixes) + sorted(self.refs)
        return ", ".join(names) or "none"


def _known_models(options: EvalOptions, inputs: dict[str, Artifact]) -> _Known:
    known = _Known(set(), set(), set(), set(), set())
    renamed = options.labels
    for i, value in enumerate(options.models):
        art = inputs.get(f"models[{i}]")
        base = _base_label(value, art)
        ref = f"@{art.stage}" if art is not None and art.stage else None
        path = Path(art.path) if art is not None and art.kind == "path" else Path(value)
        is_gguf = (art is not None and art.kind == "gguf") or bool(gguf_files(path))
        if ref:
            known.refs.add(ref)
            known.originals.add(ref)
            if is_gguf:
                known.gguf.add(ref)
        if is_gguf and not path.is_file():
            known.prefixes.add(f"{renamed.get(ref, base) if ref else base}:")
            known.originals.add(f"{base}:")
        else:
            label = renamed.get(base) or (renamed.get(ref) if ref else None) or base
            known.exact.add(label)
            known.originals.add(base)
            if is_gguf:
                known.gguf.add(label)
    for old, new in renamed.items():
        known.exact.add(new)
        if known.is_gguf(old):
            known.gguf.add(new)
    return known


def publish_kind(options: EvalOptions) -> str | None:
    """What `select` publishes: ``select.publish``, else "gguf" when every candidate named is a GGUF file
    by its look (``<stage>:<type>``, ``.gguf``, ``@stage.gguf``), else "model". None without select. Read from
    the options alone: the pipeline asks before any input exists."""
    if options.select is None:
        return None
    if options.select.publish:
        return options.select.publish
    among = options.select.among
    looks = [":" in a or a.lower().endswith(".gguf") for a in among]
    return "gguf" if among and all(looks) else "model"


class EvalStage(Stage[EvalOptions]):
    """Evaluates models (HF folders, adapters, each GGUF file of a gguf artifact) on task specs: one leaderboard
    of models x tasks (each metric with its standard error and item count), per-item records, gates that fail
    the run when a model regresses, and select, which publishes the best model for later stages. See docs/eval.md."""

    kind = "eval"
    summary = "Evaluate models (HF, adapters, each GGUF quant) on tasks: leaderboard, gates, select the best."
    Options = EvalOptions
    produces = ("report", "model", "gguf")
    version = "1"
    cache_libraries = ("torch", "transformers", "llama-cpp-python")

    def outputs(self, options: EvalOptions) -> tuple[str, ...]:
        kind = publish_kind(options)
        return ("report", kind) if kind else ("report",)

    def cache_key_extra(self, options: EvalOptions, project_dir: Path) -> dict[str, Any]:
        # The items the tasks read are named inside specs (inline or in .toml files), not by Input fields:
        # their content enters the key here, so an edited data file is evaluated again.
        from llmforge.pipeline import fingerprint
        from llmforge_plugins.eval.spec import is_path_key

        found: dict[str, str] = {}
        for entry, path, data, base in _spec_tables(options, project_dir):
            if path is not None:
                found[str(entry)] = fingerprint(path) if path.exists() else "missing"
            table = data or {}
            for key, value in table.items():
                if is_path_key(key) and isinstance(value, str):
                    p = Path(value).expanduser()
                    p = p if p.is_absolute() else base / p
                    found[f"{entry if isinstance(entry, str) else table.get('name')}:{key}"] = (
                        fingerprint(p) if p.exists() else "missing"
                    )
        return {"task_data": found}

    def judges_used(self, options: EvalOptions, project_dir: Path) -> list[str]:
        # the judges the task specs name (inline, or in .toml files): a changed judge makes the stage run again
        tables = _spec_tables(options, project_dir)
        return sorted({d["judge"] for _, _, d, _ in tables if d and isinstance(d.get("judge"), str)})

    def estimate(self, options: EvalOptions, env: PlanEnv) -> Estimate | None:
        # One model is open at a time: the largest HF input, in float32 as the hf eval model loads it on the CPU
        # (GGUF files are no larger than the model they came from). Models whose shape is unknown are skipped.
        from llmforge.planning import RUNTIME_BYTES, Estimate, ShapeUnknown

        shapes = []
        for i in range(len(options.models)):
            try:
                shapes.append(env.shape_of(f"models[{i}]"))
            except ShapeUnknown:
                continue
        if not shapes:
            return None
        shape = max(shapes, key=lambda s: s.params())
        device = env.device
        parts = {"largest model (float32)": shape.params() * 4, "runtime": RUNTIME_BYTES[device]}
        return Estimate(
            device=device,
            peak=sum(parts.values()),
            parts=parts,
            notes=["one model open at a time; llama.cpp's KV cache and batches not counted"],
            shape=shape,
        )

    # ---- validation ------------------------------------------------------------------------------
    def check(
        self, options: EvalOptions, inputs: dict[str, Artifact], registry: Registry | None = None
    ) -> list[Problem]:
        from llmforge.errors import Problem
        from llmforge_plugins.eval.report import split_metric

        problems: list[Problem] = []
        names: set[str] = set()
        if registry is not None:
            project = _project_dir(options, inputs)
            specs, found = _load_specs(options.tasks, registry, project or Path.cwd())
            if project is None:
                # Inline specs' files are read from forge.toml's folder, which nothing here told: the run says
                # which are missing (exit 2 before any model is loaded); a guess from the working folder would not.
                found = [p for p in found if not (p.where.startswith("tasks[") and "file not found" in p.message)]
            problems += [_in_entry(p, options.tasks) for p in found]
            names = {o.name for _, o in specs}
            if len(specs) < len(options.tasks):
                names = set()  # some specs are broken: metrics can't be checked against the good ones only
        known = _known_models(options, inputs)

        def task_of(metric: str, where: str) -> None:
            if not names:
                return
            task, m = split_metric(metric)
            if task not in names and metric not in names:
                problems.append(
                    Problem(where, f"'{metric}' names no task of this stage (tasks: {', '.join(sorted(names))})")
                )

        def model_named(name: str, where: str) -> None:
            if not known.knows(name):
                problems.append(
                    Problem(where, f"'{name}' is not one of the evaluated models (models: {known.listing()})")
                )

        for key in options.labels:
            if key not in known.originals and not any(key.startswith(p) for p in known.originals if p.endswith(":")):
                listing = ", ".join(sorted(n + "<type>" if n.endswith(":") else n for n in known.originals))
                problems.append(Problem(f"labels.{key}", f"'{key}' names none of the models (models: {listing})"))
        for i, gate in enumerate(options.gate):
            task_of(gate.metric, f"gate[{i}].metric")
            if gate.model is not None:
                model_named(gate.model, f"gate[{i}].model")
            if gate.vs is not None:
                model_named(gate.vs, f"gate[{i}].vs")
        if options.select is not None:
            task_of(options.select.metric, "select.metric")
            kind = publish_kind(options)
            for j, name in enumerate(options.select.among):
                where = f"select.among[{j}]"
                if not known.knows(name):
                    model_named(name, where)
                elif known.is_gguf(name) != (kind == "gguf"):
                    what = "a GGUF file" if known.is_gguf(name) else "an HF model"
                    problems.append(
                        Problem(
                            where,
                            f"'{name}' is {what}, but select publishes the winner as a '{kind}' artifact: "
                            f'choose among one kind (set select.publish = "gguf" for GGUF files)',
                        )
                    )
        return problems

    # ---- the run ---------------------------------------------------------------------------------
    def run(self, options: EvalOptions, ctx: StageContext) -> Produced | None:
        from llmforge.errors import ConfigError, StageFailed, UsageError
        from llmforge_plugins.eval.report import (
            evaluate_gates,
            failed_gates,
            leaderboard_rows,
            select_best,
        )

        specs, problems = _load_specs(options.tasks, ctx.registry, ctx.project_dir)
        if problems:
            raise ConfigError(problems)
        entries = expand_models(options.models, ctx.inputs, options.labels)
        ev = evaluate(
            entries,
            specs,
            Runner(
                registry=ctx.registry,
                log=ctx.log,
                progress=ctx.progress,
                should_stop=ctx.should_stop,
                metric=ctx.metric,
                seed=ctx.seed,
                base_dir=ctx.project_dir,
                judges=dict(getattr(ctx, "judges", None) or {}),
                work_dir=ctx.work_dir,
            ),
            limit=options.limit,
            n_ctx=options.n_ctx,
            batch_size=options.batch_size,
        )
        if ev is None:
            return None  # stopped: the finished pairs stay in work/ for --resume
        report, items, reused = ev.report, ev.items, ev.reused
        report["gates"] = evaluate_gates(report, [g.model_dump() for g in options.gate])
        failed = failed_gates(report["gates"])
        selected = None
        if options.select is not None and not failed:
            kind = publish_kind(options) or "model"
            among = options.select.among or [e.label for e in entries if (e.engine == "gguf") == (kind == "gguf")]
            selected = select_best(report, options.select.metric, among)
            if selected is None:
                raise StageFailed(f"select: no model among {', '.join(among)} has a value for {options.select.metric}")
            winner = next(e for e in entries if e.label == selected["model"])
            if (winner.engine == "gguf") != (kind == "gguf"):
                raise UsageError(
                    f"select: the best model, {winner.label}, is a {winner.engine} model; "
                    f"this stage publishes a '{kind}' artifact (select.publish)"
                )
            report["selected"] = {**selected, "kind": kind}

        columns, rows = leaderboard_rows(report)
        ctx.log("leaderboard:")
        for row in rows:
            ctx.log("  " + row[0] + ": " + ", ".join(f"{c} {v}" for c, v in zip(columns[1:], row[1:])))
        for g in report["gates"]:
            ctx.log(f"gate {'passed' if g['passed'] else 'FAILED'}: {g['message']}", "info" if g["passed"] else "error")
        ctx.info.update(_summary(report, reused))

        def write(folder: Path) -> None:
            write_evaluation(folder, report, items)

        if failed:
            # The report of a failed gate is kept (the stage folder, not an artifact: a failed stage publishes
            # nothing, so nothing downstream takes a regressed model), and the stage fails: exit 1.
            where = ctx.stage_dir / "report"
            shutil.rmtree(where, ignore_errors=True)
            write(where)
            lines = [g["message"] for g in failed]
            raise StageFailed(
                f"{len(failed)} eval gate{'s' if len(failed) != 1 else ''} failed: " + "; ".join(lines),
                hint=f"see {where / 'report.md'}",
            )
        with ctx.artifact("report") as out:
            write(out)
        if report["selected"] is not None:
            winner = next(e for e in entries if e.label == report["selected"]["model"])
            kind = report["selected"]["kind"]
            with ctx.artifact(kind) as out:
                _publish(winner.path, out)
            ctx.log(
                f"selected {winner.label} (best {report['selected']['metric']} = {report['selected']['value']:.4g}) "
                f"as this stage's {kind} artifact"
            )
        return ctx.published


# ------------------------------------------------------------------------------------------------
# helpers


def _project_dir(options: EvalOptions, inputs: dict[str, Artifact]) -> Path | None:
    """The folder forge.toml is in, which check() is not told: a relative path input tells it (the pipeline
    made it absolute from there); None when no input does (every model a reference, every task inline)."""
    values = {**{f"models[{i}]": v for i, v in enumerate(options.models)}}
    values.update({f"tasks[{i}]": v for i, v in enumerate(options.tasks) if isinstance(v, str)})
    for key, value in values.items():
        art = inputs.get(key)
        rel = Path(value)
        if art is None or art.kind != "path" or value.startswith("@") or rel.is_absolute() or value.startswith("~"):
            continue
        full = Path(art.path)
        if full.parts[-len(rel.parts) :] == rel.parts:
            return full.parents[len(rel.parts) - 1]
    return None


def _in_entry(problem: Problem, tasks: list[Any]) -> Problem:
    """A problem inside a task spec file (``tasks/qa.toml: choices: ...``) located at its entry of ``tasks``,
    the file named in the message: the pipeline puts a stage's problems under ``stages[i]``."""
    from llmforge.errors import Problem

    for i, value in enumerate(tasks):
        if isinstance(value, str) and problem.where.startswith(f"{value}: "):
            return Problem(f"tasks[{i}]", f"{problem.where}: {problem.message}")
    return problem


def _load_specs(
    values: list[Any], registry: Any, base_dir: Path
) -> tuple[list[tuple[EvalTask, TaskOptions]], list[Problem]]:
    from llmforge_plugins.eval.api import EVAL_TASKS
    from llmforge_plugins.eval.spec import load_task_specs

    return load_task_specs(values, registry.table(EVAL_TASKS), base_dir, "tasks")


@dataclass
class Runner:
    """Where an evaluation reports and keeps things: the stage's context, or the command's console."""

    registry: Any
    log: Callable[..., Any]
    progress: Callable[..., Any] = lambda *a, **k: None
    should_stop: Callable[[], bool] = lambda: False
    metric: Callable[..., Any] | None = None
    seed: int = 0
    base_dir: Path = field(default_factory=Path.cwd)
    judges: dict[str, Any] = field(default_factory=dict)
    #: finished (model, task) results and the judges' cache live here (None: nothing kept)
    work_dir: Path | None = None


@dataclass
class Evaluation:
    report: dict[str, Any]
    items: dict[tuple[str, str], list[dict[str, Any]]]
    reused: int = 0


def evaluate(
    entries: list[EvalEntry],
    specs: list[tuple[EvalTask, TaskOptions]],
    runner: Runner,
    *,
    limit: int | None = None,
    n_ctx: int | None = None,
    batch_size: int | None = None,
) -> Evaluation | None:
    """Every model on every task: each model opened once (only when one of its pairs is not done yet),
    closed before the next. Each finished (model, task) result is kept in ``runner.work_dir`` at once, and
    found there again by a resumed run. None when a stop was requested (between tasks, or seen by a task,
    whose partial result is not kept)."""
    if limit:
        specs = [(t, o.model_copy(update={"limit": min(o.limit or limit, limit)})) for t, o in specs]
    report: dict[str, Any] = {
        "models": [e.to_json() for e in entries],
        "tasks": [
            # primary_for: a kind whose metric depends on its options (generation: named after its scorer)
            {"name": o.name, "kind": t.kind, "primary": t.primary_for(o), "spec": o.model_dump(mode="json")}
            for t, o in specs
        ],
        "results": [],
        "gates": [],
        "selected": None,
    }
    total = len(entries) * len(specs)
    runner.log(
        f"evaluating {len(entries)} model{'s' if len(entries) != 1 else ''} "
        f"({', '.join(e.label for e in entries)}) on {len(specs)} task{'s' if len(specs) != 1 else ''} "
        f"({', '.join(o.name for _, o in specs)})"
    )
    cache = _PairCache(runner.work_dir / "results") if runner.work_dir is not None else None
    done = reused = 0
    items: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for entry in entries:
        model: EvalModel | None = None
        try:
            for task, opts in specs:
                if runner.should_stop():
                    return None
                key = _pair_key(entry, opts)
                found = cache.get(key) if cache is not None else None
                if found is None:
                    if model is None:
                        model = _open_model(entry, runner, n_ctx, batch_size)
                        # the runner that opened it (a plugin's may take a path before the built-in ones)
                        entry.engine = type(model).name or entry.engine
                        report["models"][entries.index(entry)]["engine"] = entry.engine
                    found = _run_pair(task, opts, model, entry, runner)
                    if runner.should_stop():
                        return None  # the task may have returned early: its result is not kept
                    if cache is not None:
                        cache.put(key, found)
                else:
                    reused += 1
                report["results"].append(
                    {"model": entry.label, "task": opts.name, "metrics": found["metrics"], "info": found["info"]}
                )
                items[(entry.label, opts.name)] = found["items"]
                done += 1
                runner.progress(done, total, unit="task", model=entry.label, task=opts.name)
                _record(runner, entry.label, opts.name, found["metrics"])
        finally:
            if model is not None:
                model.close()
    if reused:
        runner.log(f"reused {reused} finished model × task result{'s' if reused != 1 else ''} from an earlier attempt")
    return Evaluation(report, items, reused)


def write_evaluation(folder: Path, report: dict[str, Any], items: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
    """A report folder: the per-item files (each result names its own), report.json and report.md."""
    from llmforge_plugins.eval.report import write_items, write_report

    for (label, task), recs in items.items():
        rel = write_items(folder, label, task, recs)
        next(r for r in report["results"] if r["model"] == label and r["task"] == task)["items"] = rel
    write_report(folder, report)


def _open_model(entry: EvalEntry, runner: Runner, n_ctx: int | None, batch_size: int | None) -> EvalModel:
    from llmforge_plugins.eval.models import open_model

    runner.log(f"opening {entry.label} ({entry.engine}): {entry.path}")
    return open_model(
        entry.path, runner.registry, label=entry.label, n_ctx=n_ctx, batch_size=batch_size, log=runner.log
    )


def _run_pair(task: EvalTask, opts: TaskOptions, model: EvalModel, entry: EvalEntry, runner: Runner) -> dict:
    import time

    from llmforge_plugins.eval.api import TaskEnv

    env = TaskEnv(
        base_dir=runner.base_dir,
        log=runner.log,
        progress=lambda d, t: runner.progress(d, t, unit="item", model=entry.label, task=opts.name),
        should_stop=runner.should_stop,
        seed=runner.seed,
        registry=runner.registry,
        judges=runner.judges,
        cache_dir=runner.work_dir / "judgments" if runner.work_dir is not None else None,
    )
    started = time.monotonic()
    result = task.run(opts, model, env)
    info = dict(result.info)
    info.setdefault("seconds", round(time.monotonic() - started, 3))
    return {"metrics": {k: m.to_json() for k, m in result.metrics.items()}, "info": info, "items": result.items}


def _pair_key(entry: EvalEntry, opts: TaskOptions) -> str:
    blob = json.dumps(
        {"label": entry.label, "path": str(entry.path), "spec": opts.model_dump(mode="json")}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class _PairCache:
    """Finished (model, task) results in the stage's work folder, one JSON file each, written atomically."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> dict | None:
        path = self.folder / f"{key}.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # none yet, or torn by a crash: measured again

    def put(self, key: str, value: dict) -> None:
        from llmforge.runs import atomic_write_text
        from llmforge_plugins.eval.report import _finite

        atomic_write_text(self.folder / f"{key}.json", json.dumps(_finite(value), default=str))


def _record(runner: Runner, label: str, task: str, metrics: dict[str, dict]) -> None:
    values = {
        f"{label}/{task}.{name}": float(m["value"])
        for name, m in metrics.items()
        if isinstance(m.get("value"), (int, float))
    }
    if values and runner.metric is not None:
        runner.metric(**values)


def _summary(report: dict, reused: int) -> dict[str, Any]:
    """What the manifest keeps (`llmforge status`, the TUI): each model's figures, gates, the selection."""
    board: dict[str, dict[str, float | None]] = {}
    for r in report["results"]:
        row = board.setdefault(r["model"], {})
        for name, m in r["metrics"].items():
            row[f"{r['task']}.{name}"] = m.get("value")
    gates = report["gates"]
    out: dict[str, Any] = {"leaderboard": board}
    if gates:
        out["gates"] = {"passed": sum(g["passed"] for g in gates), "failed": sum(not g["passed"] for g in gates)}
    if report.get("selected"):
        out["selected"] = report["selected"]["model"]
    if reused:
        out["reused"] = reused
    return out


def _publish(src: Path, out: Path) -> None:
    """The winner into the artifact folder: hard links where the file system allows (no second copy of the
    weights), copies elsewhere. A .gguf file brings its Ollama Modelfile along."""
    files = [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()]
    root = src.parent if src.is_file() else src
    if src.is_file():
        modelfile = src.with_suffix(".Modelfile")
        if modelfile.is_file():
            files.append(modelfile)
    for f in files:
        dst = out / f.relative_to(root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, dst)
        except OSError:
            shutil.copy2(f, dst)
