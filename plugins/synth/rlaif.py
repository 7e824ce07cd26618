"""The `rlaif` stage: iterated alignment from AI feedback.

    [[stages]]
    name = "rlaif"
    uses = "rlaif"
    model = "@sft.model"                      # the starting policy
    data = "data/prompts.jsonl"               # prompt rows (prompt column or messages ending in a user turn)
    rounds = 2
    samples = 4                               # answers per prompt from the current policy
    verify = { verifier = "numeric" }         # and/or judge = { judge = "NAME" }, reward_model = "@rm"
    dpo = { beta = 0.1, learning_rate = 5e-6, max_steps = 50 }
    eval = [{ name = "qa", kind = "generation", data = "data/heldout.jsonl" }]

Each round k: the ``preferences`` generator samples the current policy through the synth stage's own machinery
(:func:`llmforge_plugins.synth.stage.synthesize`: journal, scoring, provenance), the pairs are written to
``work/round-k/pairs``, DPO (the `dpo` stage's own run, with a context whose stage folder is
``work/round-k/dpo``) trains the policy on them, and the trained model is the next round's policy; the eval
tasks, if any, run on it (and once on the starting policy, as round 0). A finished round leaves
``work/round-k/round.json`` and is skipped by ``llmforge run --resume``; an unfinished one resumes inside
(the synth journal, DPO's checkpoints, the eval's finished results).

Publishes the last round's ``model``, every round's pairs as ``dataset`` (provenance ``round = k``) and a
``report`` (report.json / report.md: per round pairs, ties, mean chosen/rejected score, preferred rate, eval).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from llmforge.data import DataOptions
from llmforge.stage import Input, Produced, Stage, StageContext, StageOptions
from llmforge_plugins.dpo import DpoOptions
from llmforge_plugins.synth.stage import JudgeFilterOptions

if TYPE_CHECKING:
    from llmforge.errors import Problem
    from llmforge.plugins import Registry
    from llmforge.stage import Artifact


class RoundDpoOptions(DpoOptions):
    """The `dpo` stage's options less ``model`` and ``data``, which every round sets (its policy, its pairs)."""

    model: str | None = Field(None, description="Set by the rlaif stage: the round's policy.")  # type: ignore[assignment]
    data: DataOptions | None = Field(None, description="Set by the rlaif stage: the round's pairs.")  # type: ignore[assignment]

    @model_validator(mode="after")
    def _set_by_rounds(self) -> RoundDpoOptions:
        if self.model is not None or self.data is not None:
            raise ValueError(
                "model and data are set by the rlaif stage each round (its policy, its pairs): leave them out"
            )
        return self


class RlaifOptions(StageOptions):
    model: Annotated[str, Input("model", "adapter")] = Field(
        description="The starting policy: an HF folder, a LoRA adapter or @stage."
    )
    data: str = Field(
        description="The prompts: JSONL/JSON/CSV/parquet rows with a prompt column or messages ending in a user "
        "turn (other columns, e.g. the reference answer, stay for the verifier)."
    )
    prompt_column: str = Field("prompt", description="The column holding each row's prompt text.")
    limit: int | None = Field(None, gt=0, description="Use at most this many prompts (the first ones).")
    system: str | None = Field(None, description="A system message for the policy's requests.")
    rounds: int = Field(2, ge=1, description="Rounds of sample -> judge -> DPO, each from the last round's model.")
    samples: int = Field(4, ge=2, description="Answers per prompt from the policy.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature of the policy.")
    max_tokens: int = Field(128, gt=0, description="Longest answer of the policy, in tokens.")
    rank: Literal["score", "pairwise"] = Field(
        "score", description="Pairs by score (best vs worst) or by the judge comparing answers (both orders)."
    )
    score: Literal["auto", "reward", "judge", "verify"] = Field(
        "auto", description="The score pairs are ranked by; auto: the first present of reward, judge, verify."
    )
    margin: float = Field(0.0, ge=0, description="A prompt whose best and worst scores are this close gives no pair.")
    verify: dict[str, Any] | None = Field(None, description="A verifier scoring the answers: { verifier = ..., ... }.")
    judge: JudgeFilterOptions | None = Field(None, description='A judge scoring/comparing: { judge = "NAME" }.')
    reward_model: Annotated[str | None, Input("reward_model")] = Field(
        None, description="A reward model scoring the answers (a reward_model stage's artifact or folder)."
    )
    batch_size: int = Field(8, gt=0, description="Requests the policy runs together (transformers).")
    dpo: RoundDpoOptions = Field(
        default_factory=RoundDpoOptions,
        description="The dpo stage's options for every round (beta, learning_rate, max_steps, lora, ...). "
        "With LoRA the merged model is the next policy.",
    )
    eval: list[Any] = Field(
        default_factory=list,
        description="Eval task specs (as the eval stage's tasks) run on the starting policy and each round's model.",
    )
    eval_limit: int | None = Field(None, gt=0, description="Use at most this many items of every eval task.")

    @field_validator("eval", mode="before")
    @classmethod
    def _one_or_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict | str) else value


class RlaifStage(Stage[RlaifOptions]):
    """Iterated alignment: each round samples the policy, pairs its answers by score or judge, trains DPO."""

    kind = "rlaif"
    summary = "Iterated alignment from AI feedback: sample, judge into pairs, DPO, for several rounds."
    Options = RlaifOptions
    produces = ("model", "dataset", "report")
    version = "1"
    cache_libraries = ("torch", "transformers", "trl", "peft")

    def judges_used(self, options: RlaifOptions, project_dir: Path) -> list[str]:
        return [options.judge.judge] if options.judge is not None else []

    def cache_key_extra(self, options: RlaifOptions, project_dir: Path) -> dict[str, Any]:
        # The prompts file and eval spec files are plain options: their content enters the key.
        from llmforge.pipeline import fingerprint

        found: dict[str, str] = {}
        for key, value in [("data", options.data)] + [(f"eval[{i}]", v) for i, v in enumerate(options.eval)]:
            if isinstance(value, str):
                p = Path(value) if Path(value).is_absolute() else project_dir / value
                if p.exists():
                    found[key] = fingerprint(p)
        return {"files": found}

    def check(
        self, options: RlaifOptions, inputs: dict[str, Artifact], registry: Registry | None = None
    ) -> list[Problem]:
        if registry is None:
            return []
        from llmforge_plugins.synth.stage import resolve_generator, resolve_verifier

        problems = resolve_generator(_generator_table(options), registry)[2]
        if options.verify is not None:
            problems += resolve_verifier(options.verify, registry)[2]
        return problems

    def run(self, options: RlaifOptions, ctx: StageContext) -> Produced | None:
        from llmforge.data import write_dataset_meta
        from llmforge.errors import StageFailed

        art = ctx.inputs.get("model")
        policy = Path(art.path) if art is not None else Path(options.model)
        rm = ctx.inputs.get("reward_model")
        reward_model = str(rm.path) if rm is not None else options.reward_model
        rounds: list[dict[str, Any]] = []
        baseline = None
        if options.eval:
            baseline = _evaluate(options, ctx, policy, ctx.work_dir / "round-0", "round-0")
            if baseline is None:
                return None
        for k in range(1, options.rounds + 1):
            rdir = ctx.work_dir / f"round-{k}"
            done = rdir / "round.json"
            if done.exists() and (rdir / "model" / "config.json").exists():
                summary = json.loads(done.read_text(encoding="utf-8"))
                ctx.log(f"round {k}: finished in an earlier attempt ({summary['pairs']} pairs): skipped")
            else:
                summary = self._round(options, ctx, k, policy, reward_model)
                if summary is None:
                    return None
            rounds.append(summary)
            policy = rdir / "model"

        _preferred_rates(rounds)
        # every sample's scores stay in round.json (the rates are computed from them), not in the report
        public = [{k: v for k, v in r.items() if k != "sample_scores"} for r in rounds]
        report = {"version": 1, "rounds": public, "baseline": baseline, "score": _first_score(rounds)}
        ctx.info.update(
            {
                "rounds": len(rounds),
                "pairs": [r["pairs"] for r in rounds],
                "preferred_rate": rounds[-1]["preferred_rate"],
            }
        )
        if not sum(r["pairs"] for r in rounds):
            raise StageFailed("rlaif: no round made a preference pair")
        with ctx.artifact("model") as out:
            shutil.copytree(policy, out, dirs_exist_ok=True)
        with ctx.artifact("dataset") as out:
            with (out / "data.jsonl").open("w", encoding="utf-8") as fh:
                for r in rounds:
                    fh.write((ctx.work_dir / r["data"] / "data.jsonl").read_text(encoding="utf-8"))
            write_dataset_meta(out, "preference", {})
        with ctx.artifact("report") as out:
            (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
            (out / "report.md").write_text(report_md(report), encoding="utf-8")
        return ctx.published

    # -- one round ------------------------------------------------------------------------------------

    def _round(
        self, options: RlaifOptions, ctx: StageContext, k: int, policy: Path, reward_model: str | None
    ) -> dict[str, Any] | None:
        from llmforge.data import write_dataset_meta
        from llmforge.errors import StageFailed
        from llmforge_plugins.dpo import DpoStage
        from llmforge_plugins.synth.stage import SynthOptions, SynthRunner, synthesize

        rdir = ctx.work_dir / f"round-{k}"
        ctx.log(f"round {k}/{options.rounds}: sampling {options.samples} answers per prompt from {policy}")
        sopts = SynthOptions(
            model=str(policy),
            generator=_generator_table(options),
            samples=options.samples,
            verify=options.verify,
            judge=options.judge,
            reward_model=reward_model,
            batch_size=options.batch_size,
        )
        result = synthesize(
            sopts,
            SynthRunner(
                registry=ctx.registry,
                log=ctx.log,
                work_dir=rdir / "synth",
                progress=ctx.progress,
                metric=ctx.metric,
                should_stop=ctx.should_stop,
                # each round samples with its own seeds: the same seeds would ask the new policy the old questions
                seed=ctx.seed + k,
                base_dir=ctx.project_dir,
                judges=dict(getattr(ctx, "judges", None) or {}),
            ),
            model_path=str(policy),
        )
        if result is None:
            return None
        pairs = [{**r, "provenance": {**r.get("provenance", {}), "round": k}} for r in result.rows]
        summary = _round_summary(k, result.records, result.report)
        summary["policy"] = str(policy)
        ctx.log(
            f"round {k}: {len(pairs)} pairs from {summary['units']} prompts ({summary['ties']} ties); "
            f"mean chosen {summary['mean_chosen']}, rejected {summary['mean_rejected']}"
        )
        if not pairs:
            raise StageFailed(
                f"rlaif: round {k} made no preference pair ({summary['ties']} of {summary['units']} prompts tied)",
                hint="more samples, a higher temperature, a smaller margin, or a finer score (a judge)",
            )
        data_dir = rdir / "pairs"
        data_dir.mkdir(parents=True, exist_ok=True)
        with (data_dir / "data.jsonl").open("w", encoding="utf-8") as fh:
            for r in pairs:
                fh.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
        write_dataset_meta(data_dir, "preference", {})

        dump = options.dpo.model_dump(exclude={"model", "data"}, exclude_unset=True)
        if options.dpo.lora.enabled:
            dump["merge"] = True  # the next round samples a model folder
        dopts = DpoOptions(**dump, model=str(policy), data=DataOptions(path=str(data_dir)))
        sub = _sub_context(ctx, rdir / "dpo", k)
        ctx.log(f"round {k}: DPO on {len(pairs)} pairs")
        if DpoStage().run(dopts, sub) is None or ctx.stop_seen or sub.stop_seen:
            ctx.stop_seen = True
            return None
        model = rdir / "model"
        shutil.rmtree(model, ignore_errors=True)
        shutil.copytree(sub.published["model"].path, model)
        summary.update({"model": f"round-{k}/model", "data": f"round-{k}/pairs", "dpo": dict(sub.info)})
        if options.eval:
            ev = _evaluate(options, ctx, model, rdir, f"round-{k}")
            if ev is None:
                return None
            summary["eval"] = ev
        (rdir / "round.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        return summary


def _generator_table(options: RlaifOptions) -> dict[str, Any]:
    table: dict[str, Any] = {
        "kind": "preferences",
        "data": options.data,
        "prompt_column": options.prompt_column,
        "temperature": options.temperature,
        "max_tokens": options.max_tokens,
        "rank": options.rank,
        "score": options.score,
        "margin": options.margin,
    }
    if options.limit is not None:
        table["limit"] = options.limit
    if options.system is not None:
        table["system"] = options.system
    return table


def _sub_context(ctx: StageContext, stage_dir: Path, k: int) -> StageContext:
    """The context DPO trains a round in: its own folder (checkpoints resume there), the run's reporting, except
    that its artifacts are the round's, not this stage's (they are logged, not announced as ours)."""

    def emit(type_: str, **fields: Any) -> None:
        if type_ == "artifact":
            ctx.emit("log", level="info", message=f"round {k}: {fields.get('kind')} written to {fields.get('path')}")
        else:
            ctx.emit(type_, **fields)

    stage_dir.mkdir(parents=True, exist_ok=True)
    return StageContext(
        stage_name=ctx.stage_name,
        run_id=ctx.run_id,
        run_dir=ctx.run_dir,
        stage_dir=stage_dir,
        inputs={},
        emit=emit,
        stop_check=ctx.stop_check,
        checkpoint_check=ctx.checkpoint_check,
        resume=ctx.resume,
        seed=ctx.seed,
        project_dir=ctx.project_dir,
        rank=ctx.rank,
        world_size=ctx.world_size,
        backend=ctx.backend,
        registry=ctx.registry,
        judges=ctx.judges,
    )


def _evaluate(options: RlaifOptions, ctx: StageContext, model: Path, rdir: Path, label: str) -> dict[str, Any] | None:
    """The eval tasks on one model, with the eval stage's machinery (its results kept in ``rdir/eval``)."""
    from llmforge.errors import ConfigError
    from llmforge_plugins.eval.stage import EvalEntry, Runner, _load_specs, evaluate

    specs, problems = _load_specs(options.eval, ctx.registry, ctx.project_dir)
    if problems:
        raise ConfigError(problems)
    ev = evaluate(
        [EvalEntry(label=label, path=model, engine="hf", source=None, quant=None, index=0)],
        specs,
        Runner(
            registry=ctx.registry,
            log=ctx.log,
            should_stop=ctx.should_stop,
            seed=ctx.seed,
            base_dir=ctx.project_dir,
            judges=dict(getattr(ctx, "judges", None) or {}),
            work_dir=rdir / "eval",
        ),
        limit=options.eval_limit,
    )
    if ev is None:
        return None
    out: dict[str, Any] = {}
    for res in ev.report["results"]:
        for name, m in res["metrics"].items():
            value = m.get("value") if isinstance(m, dict) else m
            out[f"{res['task']}.{name}"] = value
    ctx.log(f"{label}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in out.items()))
    return out


# ------------------------------------------------------------------------------------------------
# the report


def _scores_of(record: dict[str, Any]) -> list[dict[str, float]]:
    """Every sample's scores of one journaled unit: the pair's two sides and the others (rejected)."""
    out = []
    for row in record["rows"]:
        prov = row.get("provenance", {})
        out += [dict(prov.get("scores") or {}), dict(prov.get("rejected_scores") or {})]
    for rej in record["rejected"]:
        if not str(rej.get("reason", "")).startswith("empty:"):
            out.append(dict(rej.get("row", {}).get("provenance", {}).get("scores") or {}))
    return out


def _round_summary(k: int, records: list[dict[str, Any]], report: dict[str, Any]) -> dict[str, Any]:
    chosen, rejected, samples = [], [], []
    for rec in records:
        for row in rec["rows"]:
            prov = row.get("provenance", {})
            if prov.get("chosen_score") is not None:
                chosen.append(float(prov["chosen_score"]))
            if prov.get("rejected_score") is not None:
                rejected.append(float(prov["rejected_score"]))
        samples += _scores_of(rec)
    ties = sum(
        1 for rec in records if not rec["rows"] and any(str(r["reason"]).startswith("tie:") for r in rec["rejected"])
    )
    return {
        "round": k,
        "units": len(records),
        "candidates": report.get("candidates"),
        "pairs": sum(len(rec["rows"]) for rec in records),
        "ties": ties,
        "rejected": report.get("rejected", {}),
        "mean_chosen": _mean(chosen),
        "mean_rejected": _mean(rejected),
        "sample_scores": samples,
        "usage": report.get("usage"),
    }


def _first_score(rounds: list[dict[str, Any]]) -> str | None:
    for name in ("reward", "judge", "verify"):
        if any(name in s for r in rounds for s in r.get("sample_scores", [])):
            return name
    return None


def _preferred_rates(rounds: list[dict[str, Any]]) -> None:
    """Mean sample score and the preferred rate (the share of samples with the top score seen in any round) per
    round, on the score pairs are ranked by: how often the policy already gives the answer the judge prefers."""
    name = _first_score(rounds)
    values = [s[name] for r in rounds for s in r.get("sample_scores", []) if name in s] if name else []
    top = max(values) if values else None
    for r in rounds:
        mine = [s[name] for s in r.get("sample_scores", []) if name and name in s]
        r["score"] = name
        r["mean_score"] = _mean(mine)
        r["preferred_rate"] = round(sum(v >= top for v in mine) / len(mine), 4) if mine and top is not None else None


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def report_md(report: dict[str, Any]) -> str:
    rounds = report["rounds"]
    evals = sorted({k for r in rounds for k in (r.get("eval") or {})} | set(report.get("baseline") or {}))
    head = ["round", "prompts", "pairs", "ties", "mean chosen", "mean rejected", "mean score", "preferred rate"]
    lines = [
        "# RLAIF",
        "",
        f"{len(rounds)} round{'s' if len(rounds) != 1 else ''}; pairs ranked by the {report.get('score')} score.",
        "",
        "| " + " | ".join(head + evals) + " |",
        "|" + "---|" * (len(head) + len(evals)),
    ]
    if report.get("baseline"):
        lines.append(
            "| 0 (start) |" + " |" * (len(head) - 1) + "".join(f" {_fmt(report['baseline'].get(e))} |" for e in evals)
        )
    for r in rounds:
        cells = [r["round"], r["units"], r["pairs"], r["ties"], r["mean_chosen"], r["mean_rejected"]]
        cells += [r.get("mean_score"), r.get("preferred_rate")] + [(r.get("eval") or {}).get(e) for e in evals]
        lines.append("| " + " | ".join("" if c is None else _fmt(c) for c in cells) + " |")
    lines += [
        "",
        "Each round's pairs and model stay in the stage's work folder: "
        + ", ".join(f"{r.get('data')}, {r.get('model')}" for r in rounds)
        + ".",
    ]
    return "\n".join(lines) + "\n"
