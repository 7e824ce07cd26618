"""The `synth` stage: a teacher model makes rows, verifiers and judges filter them, resumably.

    [judges.teacher]
    backend = "gguf"
    model = "models/teacher.gguf"

    [[stages]]
    name = "synth"
    uses = "synth"
    teacher = "teacher"                                  # or model = "@sft" / a path
    generator = { kind = "answer", data = "prompts.jsonl" }
    samples = 4                                          # answers per prompt; keep the best that passed
    verify = { verifier = "numeric", answer = "answer" }
    judge = { judge = "teacher", rubric = "Is it correct and helpful?", min = 6 }
    budget = { rows = 1000, minutes = 60 }

The flow is api.py's: units -> candidates -> verify -> score -> keep -> rows -> journal. Every finished unit is
one line of the journal (journal.py) in the stage's work folder; a resumed (or stopped, or killed) run skips
the units found there and feeds their rows to the generator (``env.made``). The dataset and the report are
written from the journal at the end. See docs/synthetic.md.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, model_validator

from llmforge.stage import Input, Produced, Stage, StageContext, StageOptions

if TYPE_CHECKING:
    from llmforge.errors import Problem
    from llmforge.planning import Estimate, PlanEnv
    from llmforge.plugins import Registry
    from llmforge.stage import Artifact
    from llmforge_plugins.synth.api import Candidate, Generator, SynthEnv, Unit


class JudgeFilterOptions(StageOptions):
    judge: str = Field(description="The judge: a [judges.NAME] of forge.toml.")
    rubric: str | None = Field(None, description="What the judge scores (default: the judges plugin's rubric).")
    min: float | None = Field(
        None, description="Reject rows the judge scores below this (1-10 scale); unset: score only."
    )


class BudgetOptions(StageOptions):
    rows: int | None = Field(None, gt=0, description="Stop once this many rows were kept.")
    tokens: int | None = Field(None, gt=0, description="Stop once the teacher wrote this many tokens.")
    requests: int | None = Field(None, gt=0, description="Stop once this many requests were sent (teacher and judge).")
    minutes: float | None = Field(None, gt=0, description="Stop after this many minutes of generation (all attempts).")


class SynthOptions(StageOptions):
    teacher: str | None = Field(None, description="The model that writes: a [judges.NAME] of forge.toml.")
    model: Annotated[str | None, Input("model", "adapter", "gguf")] = Field(
        None,
        description="Or a model to write with: @stage or a path (HF folder, LoRA adapter, .gguf file, gguf artifact).",
    )
    quant: str | None = Field(None, description="Which file of a gguf artifact (its type: Q8_0, F16).")
    concurrency: int = Field(4, ge=1, description="Requests in flight at once (llama.cpp parallel sequences).")
    n_ctx: int = Field(2048, gt=0, description="Context length of a model opened by path.")
    threads: int | None = Field(None, gt=0, description="CPU threads of a llama.cpp model opened by path.")
    batch_size: int = Field(8, gt=0, description="Requests run together by a transformers model opened by path.")
    generator: dict[str, Any] = Field(
        description='The generator and its options: { kind = "answer", data = "prompts.jsonl", ... } '
        "(self_instruct, from_documents, evolve, answer, preferences, or a plugin's)."
    )
    samples: int = Field(1, ge=1, description="Answers per unit (rejection sampling: see keep).")
    keep: Literal["best", "all"] = Field(
        "best", description="Of a unit's samples keep the best-scoring one that passed, or all that passed."
    )
    verify: dict[str, Any] | None = Field(
        None,
        description='A verifier and its options: { verifier = "python_tests" | "numeric" | "regex" | '
        '"json_schema" | a plugin\'s, ... }; failing answers are rejected.',
    )
    judge: JudgeFilterOptions | None = Field(
        None, description='Score rows with a judge: { judge = "NAME", rubric = "...", min = 6 }.'
    )
    reward_model: Annotated[str | None, Input("reward_model")] = Field(
        None, description="Score rows with a reward model (a reward_model stage's artifact or folder)."
    )
    reward_min: float | None = Field(None, description="Reject rows the reward model scores below this.")
    budget: BudgetOptions = Field(
        default_factory=BudgetOptions,
        description="Stop cleanly when reached: { rows, tokens, requests, minutes }; what was made is published.",
    )
    batch: int | None = Field(None, gt=0, description="Units per batch (default: twice the concurrency).")

    @model_validator(mode="after")
    def _one_teacher(self) -> SynthOptions:
        if (self.teacher is None) == (self.model is None):
            raise ValueError(
                'name the model that writes: teacher = "NAME" (a [judges.NAME]) or model = "@stage" / a path, not both'
            )
        return self


# ------------------------------------------------------------------------------------------------
# validating the nested tables


def resolve_generator(table: dict[str, Any], registry: Any, where: str = "generator") -> tuple[Any, Any, list]:
    """(generator, its validated options, problems) for a ``generator = {...}`` table."""
    from llmforge.errors import Problem
    from llmforge.schema import did_you_mean, validate_model
    from llmforge_plugins.synth.api import GENERATORS

    generators = registry.table(GENERATORS) if registry is not None else {}
    return _resolve(table, generators, "kind", where, "generator", Problem, did_you_mean, validate_model)


def resolve_verifier(table: dict[str, Any], registry: Any, where: str = "verify") -> tuple[Any, Any, list]:
    from llmforge.errors import Problem
    from llmforge.schema import did_you_mean, validate_model
    from llmforge_plugins.synth.api import VERIFIERS

    verifiers = registry.table(VERIFIERS) if registry is not None else {}
    found, opts, problems = _resolve(
        table, verifiers, "verifier", where, "verifier", Problem, did_you_mean, validate_model
    )
    if found is not None and opts is not None:
        problems += [_at(p, where) for p in found.check(opts)]
    return found, opts, problems


def _resolve(table, installed, key, where, what, Problem, did_you_mean, validate_model):  # noqa: ANN001, N803
    if not isinstance(table, dict):
        return None, None, [Problem(where, f"expected a table {{ {key} = ... }}, got {table!r}")]
    name = table.get(key)
    listing = ", ".join(sorted(installed)) or "none"
    if not isinstance(name, str) or not name:
        return None, None, [Problem(f"{where}.{key}", f"required: which {what} ({listing})")]
    found = installed.get(name)
    if found is None:
        return (
            None,
            None,
            [
                Problem(
                    f"{where}.{key}", f"unknown {what} '{name}'{did_you_mean(name, installed)} (installed: {listing})"
                )
            ],
        )
    opts, problems = validate_model(found.Options, table, where)
    return found, opts, problems


def _at(problem: Any, where: str) -> Any:
    from llmforge.errors import Problem

    if isinstance(problem, Problem):
        return Problem(f"{where}.{problem.where}" if problem.where else where, problem.message)
    # a plain string "key: message" names a key of the table
    m = re.match(r"([A-Za-z_][\w.\[\]]*): (.*)", str(problem), re.S)
    return Problem(f"{where}.{m.group(1)}", m.group(2)) if m else Problem(where, str(problem))


# ------------------------------------------------------------------------------------------------
# the run, shared by the stage and `llmforge synth`


@dataclass
class SynthRunner:
    """Where a synth run reports and keeps things: the stage's context, or the command's console."""

    registry: Any
    log: Callable[..., Any]
    work_dir: Path
    progress: Callable[..., Any] = lambda *a, **k: None
    metric: Callable[..., Any] | None = None
    should_stop: Callable[[], bool] = lambda: False
    seed: int = 0
    base_dir: Path = field(default_factory=Path.cwd)
    judges: dict[str, Any] = field(default_factory=dict)


@dataclass
class SynthResult:
    records: list[dict[str, Any]]
    report: dict[str, Any]
    output: str  # "messages" or "preference"

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [r for rec in self.records for r in rec["rows"]]


def synthesize(options: SynthOptions, runner: SynthRunner, *, model_path: str | None = None) -> SynthResult | None:
    """Run the generator to the end (or the budget), journaling each unit. None: a stop was requested (the
    journal keeps what was finished)."""
    from llmforge.errors import ConfigError
    from llmforge_plugins.synth.api import SynthEnv
    from llmforge_plugins.synth.journal import Journal
    from llmforge_plugins.synth.report import build_report
    from llmforge_plugins.synth.scoring import Scorers
    from llmforge_plugins.synth.teacher import EngineSettings, open_teacher

    gen, gopts, problems = resolve_generator(options.generator, runner.registry)
    verifier = vopts = None
    if options.verify is not None:
        verifier, vopts, more = resolve_verifier(options.verify, runner.registry)
        problems += more
    if gen is not None and gopts is not None:
        problems += [_at(p, "generator") for p in gen.check(gopts, runner.base_dir)]
    if options.judge is not None and options.judge.judge not in runner.judges:
        declared = ", ".join(sorted(runner.judges)) or "none"
        problems.append(
            _problem("judge.judge", f"no [judges.{options.judge.judge}] in forge.toml (declared: {declared})")
        )
    if problems:
        raise ConfigError(problems)
    assert gen is not None and gopts is not None

    journal = Journal(runner.work_dir / "journal.jsonl")
    records = journal.read()
    if records:
        rows = sum(len(r["rows"]) for r in records)
        runner.log(f"resuming: {len(records)} units ({rows} rows) already made, from {journal.path}")

    settings = EngineSettings(
        concurrency=options.concurrency,
        n_ctx=options.n_ctx,
        threads=options.threads,
        batch_size=options.batch_size,
        quant=options.quant,
    )
    teacher = open_teacher(
        teacher=options.teacher,
        model=model_path if model_path is not None else options.model,
        judges=runner.judges,
        base_dir=runner.base_dir,
        settings=settings,
        log=runner.log,
        registry=runner.registry,
    )
    judge = reward = None
    try:
        if options.judge is not None:
            from llmforge_plugins.judges.judge import Judge

            judge = Judge.open(runner.judges[options.judge.judge], cache_dir=runner.work_dir / "judge", log=runner.log)
        if options.reward_model is not None:
            from llmforge_plugins.synth.reward_model import RewardScorer

            reward = RewardScorer(options.reward_model)
        preference = gen.output == "preference"
        # A generator that compares answers with the judge itself (preferences, rank = "pairwise") gets it through
        # env.judge; scoring each answer pointwise as well would double the judge's work for nothing it reads.
        pairwise = preference and getattr(gopts, "rank", None) == "pairwise"
        scorers = Scorers(
            verifier=verifier,
            verify_options=vopts,
            judge=None if pairwise else judge,
            rubric=options.judge.rubric if options.judge else None,
            judge_min=options.judge.min if options.judge else None,
            reward=reward,
            reward_min=options.reward_min,
            keep=options.keep,
            filter=not preference,
        )
        env = SynthEnv(
            teacher=teacher,
            base_dir=runner.base_dir,
            seed=runner.seed,
            log=runner.log,
            should_stop=runner.should_stop,
            registry=runner.registry,
            judges=runner.judges,
            made=[r for rec in records for r in rec["rows"]],
            judge=judge,
            work_dir=runner.work_dir,
        )
        loop = _Loop(options, runner, gen, gopts, env, scorers, journal, records)
        stopped_by = loop.run()
        if stopped_by == "stop":
            return None
        budget = options.budget.model_dump()
        report = build_report(
            loop.records,
            generator=gen.kind,
            teacher=teacher.label,
            total=loop.total,
            budget=budget,
            stopped_by=stopped_by,
        )
        return SynthResult(loop.records, report, gen.output)
    finally:
        for thing in (reward, judge):
            if thing is not None:
                thing.close()
        close = getattr(teacher.backend, "close", None)
        if close is not None:
            close()


def _problem(where: str, message: str) -> Problem:
    from llmforge.errors import Problem

    return Problem(where, message)


class _Loop:
    """The batches of one run: units not yet journaled, generated, scored, kept, journaled."""

    def __init__(
        self,
        options: SynthOptions,
        runner: SynthRunner,
        gen: Generator,
        gopts: Any,
        env: SynthEnv,
        scorers: Any,
        journal: Any,
        records: list[dict[str, Any]],
    ) -> None:
        self.options, self.runner, self.gen, self.gopts, self.env = options, runner, gen, gopts, env
        self.scorers, self.journal, self.records = scorers, journal, list(records)
        self.done = {r["unit"] for r in records}
        self.total: int | None = None
        # what earlier attempts spent counts against the budget too
        self.spent: dict[str, float] = {
            k: sum(r["usage"].get(k, 0) or 0 for r in records) for k in ("requests", "tokens", "seconds")
        }

    def _units(self) -> Iterator[Unit]:
        units = self.gen.units(self.gopts, self.env)
        if isinstance(units, (list, tuple)):
            self.total = len(units)
        for u in units:
            if u.id not in self.done:
                yield u

    def _exceeded(self) -> str | None:
        b = self.options.budget
        rows = sum(len(r["rows"]) for r in self.records)
        if b.rows is not None and rows >= b.rows:
            return "rows"
        if b.tokens is not None and self.spent["tokens"] >= b.tokens:
            return "tokens"
        if b.requests is not None and self.spent["requests"] >= b.requests:
            return "requests"
        if b.minutes is not None and self.spent["seconds"] >= b.minutes * 60:
            return "minutes"
        return None

    def _requests(self) -> int:
        judge = self.scorers.judge
        return self.env.teacher.requests + (judge.stats["requests"] if judge is not None else 0)

    def run(self) -> str | None:
        """None: every unit done; "stop": a stop request; else the budget key that stopped it."""
        size = self.options.batch or max(1, 2 * self.options.concurrency)
        units = self._units()
        while True:
            why = self._exceeded()
            if why is not None:
                self.runner.log(f"budget: {why} limit reached, stopping after {len(self.records)} units")
                return why
            if self.runner.should_stop():
                return "stop"
            n = size
            if self.options.budget.rows is not None:
                # no batch much larger than the rows still wanted: their answers would be thrown away
                left = self.options.budget.rows - sum(len(r["rows"]) for r in self.records)
                n = max(1, min(n, left))
            batch = list(itertools.islice(units, n))
            if not batch:
                return None
            from llmforge_plugins.judges.judge import JudgeBudgetSpent

            try:
                if not self._batch(batch):
                    return "stop"
            except JudgeBudgetSpent as exc:
                # the judge's own max_requests: a budget like the stage's (what was judged is cached)
                self.runner.log(f"budget: {exc.message}; stopping after {len(self.records)} units", "warning")
                return "requests"

    def _batch(self, batch: list[Unit]) -> bool:
        """Generate, score and journal one batch. False: a stop request cut the generation short (nothing of
        the batch is kept; the resumed run makes it)."""
        from llmforge_plugins.synth.scoring import keep_best, score_batch

        t0 = time.monotonic()
        req0, tok0 = self._requests(), self.env.teacher.tokens
        per_unit = self.gen.generate(self.gopts, batch, self.options.samples, self.env)
        if len(per_unit) != len(batch) and self.runner.should_stop():
            return False  # the generator saw the stop request and returned early
        if len(per_unit) != len(batch):
            raise RuntimeError(
                f"generator '{self.gen.kind}' returned candidates for {len(per_unit)} units of a batch of {len(batch)}"
            )
        for cands in per_unit:
            for k, c in enumerate(cands):
                c.sample = c.sample or k
        score_batch([c for cands in per_unit for c in cands], self.scorers)
        seconds = time.monotonic() - t0
        requests, tokens = self._requests() - req0, self.env.teacher.tokens - tok0
        shares = [_share(requests, len(batch), i) for i in range(len(batch))]
        token_shares = [_share(tokens, len(batch), i) for i in range(len(batch))]
        for i, (unit, cands) in enumerate(zip(batch, per_unit, strict=True)):
            ordered = list(cands) if not self.scorers.filter else keep_best(cands, self.options.keep)
            rows = self.gen.rows(self.gopts, unit, [c for c in ordered if c.rejected is None], self.env)
            kept_rows = [self._with_provenance(r, unit, ordered) for r in rows]
            rejected = [
                {"reason": c.rejected, "row": self._with_provenance(c.row, unit, [c])}
                for c in cands
                if c.rejected is not None
            ]
            usage = {"requests": shares[i], "tokens": token_shares[i], "seconds": round(seconds / len(batch), 4)}
            record = {
                "unit": unit.id,
                "rows": kept_rows,
                "rejected": rejected,
                "usage": usage,
                "candidates": len(cands),
            }
            self.journal.append(record)
            self.records.append(record)
            self.env.made.extend(kept_rows)
            for name in ("requests", "tokens", "seconds"):
                self.spent[name] += usage[name]
            if self._exceeded() is not None:
                break  # the budget is spent: the batch's other units are not kept (a resumed run makes them)
        self._report_progress(seconds, tokens)
        return True

    def _with_provenance(self, row: dict[str, Any], unit: Unit, cands: list[Candidate]) -> dict[str, Any]:
        c = next((c for c in cands if c.row is row), None)
        if c is None:
            chosen = row.get("chosen")
            text = chosen[-1].get("content") if isinstance(chosen, list) and chosen else None
            c = next((c for c in cands if text is not None and c.answer == text), None)
        if c is None:
            c = next((c for c in cands if c.rejected is None), cands[0] if cands else None)
        prov: dict[str, Any] = {
            "generator": self.gen.kind,
            "teacher": self.env.teacher.label,
            "teacher_id": self.env.teacher.identity(),
        }
        if c is not None:
            from llmforge_plugins.synth.api import unit_seed

            prov.update(
                {
                    "template": c.provenance.get("template"),
                    "seed": c.provenance.get("seed", unit_seed(self.env.seed, unit.id, c.sample)),
                    "unit": unit.id,
                    "sample": c.sample,
                    "scores": dict(c.scores),
                }
            )
            prov.update({k: v for k, v in c.provenance.items() if k not in prov or prov[k] is None})
        else:
            prov["unit"] = unit.id
        own = row.get("provenance")
        if isinstance(own, dict):
            prov.update(own)  # what the generator said about this very row wins (preference scores, round)
        return {**{k: v for k, v in row.items() if k != "provenance"}, "provenance": prov}

    def _report_progress(self, seconds: float, tokens: int) -> None:
        kept = sum(len(r["rows"]) for r in self.records)
        rejected = sum(len(r["rejected"]) for r in self.records)
        candidates = sum(int(r.get("candidates", 0)) for r in self.records)
        done = len(self.records)
        self.runner.progress(done, self.total, unit="unit", rows=kept, rejected=rejected)
        if self.runner.metric is not None:
            self.runner.metric(
                step=done,
                rows=float(kept),
                rejected=float(rejected),
                acceptance=kept / candidates if candidates else 0.0,
                tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
            )


def _share(total: int, n: int, i: int) -> int:
    """Unit i's part of a batch's count: even shares, the remainder to the first units (they sum to total)."""
    return total // n + (1 if i < total % n else 0)


def empty_result(report: dict[str, Any], where: Path) -> Exception:
    """The error of a run that kept no row: what rejected the candidates, where the report is."""
    from llmforge.errors import StageFailed

    why = ", ".join(f"{k} {v}" for k, v in report["rejected"].items()) or "the generator proposed none"
    return StageFailed(
        f"synth kept no rows: {report['candidates']} candidates, rejected: {why}",
        hint=f"see {where} (its examples show the rejected rows and why)",
    )


def write_dataset(folder: Path, result: SynthResult) -> None:
    from llmforge.data import write_dataset_meta

    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "data.jsonl").open("w", encoding="utf-8") as fh:
        for row in result.rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    write_dataset_meta(folder, "preference" if result.output == "preference" else "messages", {})


# ------------------------------------------------------------------------------------------------
# the stage


class SynthStage(Stage[SynthOptions]):
    """A generator writes rows with a teacher model; verifiers, a judge and a reward model filter them;
    every finished unit is journaled so a killed or stopped run resumes without duplicates or gaps."""

    kind = "synth"
    summary = "Synthetic data: a teacher model generates, verifiers and judges filter (resumable, with budgets)."
    Options = SynthOptions
    produces = ("dataset", "report")
    version = "1"
    cache_libraries = ("llama-cpp-python", "transformers")

    def judges_used(self, options: SynthOptions, project_dir: Path) -> list[str]:
        names = {options.teacher} if options.teacher else set()
        if options.judge is not None:
            names.add(options.judge.judge)
        return sorted(names)

    def cache_key_extra(self, options: SynthOptions, project_dir: Path) -> dict[str, Any]:
        # The files a generator or a verifier reads are named inside their tables, not by Input fields (prompts,
        # seed tasks, documents, a schema file): the content of every value there that names an existing file
        # or folder enters the key, so an edited prompts file makes the data again.
        from llmforge.pipeline import fingerprint

        found: dict[str, str] = {}
        for table_name, table in (("generator", options.generator), ("verify", options.verify or {})):
            for key, value in sorted(table.items()):
                values = value if isinstance(value, list) else [value]
                for i, v in enumerate(values):
                    if not isinstance(v, str) or not v or v.startswith("@") or "\n" in v or len(v) > 1024:
                        continue
                    p = Path(v).expanduser()
                    p = p if p.is_absolute() else project_dir / p
                    try:
                        exists = p.exists()
                    except OSError:
                        continue
                    name = f"{table_name}.{key}" + (f"[{i}]" if isinstance(value, list) else "")
                    if exists:
                        found[name] = fingerprint(p)
                    elif any(c in v for c in "*?["):
                        # a glob (from_documents' data = "docs/**/*.md"): the files it matches now, each by content
                        base = project_dir if not Path(v).expanduser().is_absolute() else Path("/")
                        pattern = str(Path(v).expanduser()).lstrip("/") if base == Path("/") else v
                        matched = sorted(q for q in base.glob(pattern) if q.is_file())
                        found[name] = ",".join(f"{q.relative_to(base)}:{fingerprint(q)}" for q in matched)
        return {"files": found}

    def estimate(self, options: SynthOptions, env: PlanEnv) -> Estimate | None:
        # A teacher named by path: a .gguf file is mapped into host memory whole by llama.cpp. A declared judge
        # or an HF folder: no estimate (the judge's own machine, or a shape the plan may not know).
        from llmforge.planning import Estimate

        if options.model is None or options.model.startswith("@"):
            return None
        from llmforge_plugins.synth.teacher import gguf_file

        try:
            path = gguf_file(Path(options.model), options.quant)
        except Exception:  # noqa: BLE001 - the run reports a bad quant
            return None
        if path is None:
            return None
        size = path.stat().st_size
        return Estimate(
            device="cpu",
            peak=size,
            parts={"teacher model file": size},
            notes=["llama.cpp's KV cache (n_ctx x concurrency) not counted"],
        )

    def check(
        self, options: SynthOptions, inputs: dict[str, Artifact], registry: Registry | None = None
    ) -> list[Problem]:
        if registry is None:
            return []
        _, _, problems = resolve_generator(options.generator, registry)
        if options.verify is not None:
            problems += resolve_verifier(options.verify, registry)[2]
        return problems

    def run(self, options: SynthOptions, ctx: StageContext) -> Produced | None:
        from llmforge_plugins.synth.report import write_report

        model_path = None
        if options.model is not None:
            art = ctx.inputs.get("model")
            model_path = str(art.path) if art is not None else options.model
        reward = ctx.inputs.get("reward_model")
        if reward is not None:
            options = options.model_copy(update={"reward_model": str(reward.path)})
        result = synthesize(
            options,
            SynthRunner(
                registry=ctx.registry,
                log=ctx.log,
                work_dir=ctx.work_dir,
                progress=ctx.progress,
                metric=ctx.metric,
                should_stop=ctx.should_stop,
                seed=ctx.seed,
                base_dir=ctx.project_dir,
                judges=dict(getattr(ctx, "judges", None) or {}),
            ),
            model_path=model_path,
        )
        if result is None:
            return None  # stopped: the journal stays in work/ for `llmforge run --resume`
        report = result.report
        ctx.log(
            f"{report['rows']} rows kept of {report['candidates']} candidates "
            f"({', '.join(f'{k} {v}' for k, v in report['rejected'].items()) or 'none rejected'})"
        )
        ctx.info.update(
            {
                "rows": report["rows"],
                "candidates": report["candidates"],
                "rejected": report["rejected"],
                "stopped_by": report["budget"]["stopped_by"],
            }
        )
        if report["rows"] == 0:
            # An empty dataset would only fail the next stage, far from the cause: fail here, the report kept.
            where = ctx.stage_dir / "report"
            write_report(where, report)
            raise empty_result(report, where / "report.md")
        with ctx.artifact("dataset") as out:
            write_dataset(out, result)
        with ctx.artifact("report") as out:
            write_report(out, report)
        return ctx.published
