"""`gguf`: the GGUF export as a pipeline stage: export, quantize, check parity, write Modelfiles.

The stage calls the same engine as the `llmforge gguf` commands (export.py, quantize.py, imatrix.py,
check.py, modelfile.py); this module only schedules them and reports. Its one artifact, `gguf`, is a folder:

    <model_name>-<outtype>.gguf     the export (f16 by default)
    <model_name>-<outtype>.Modelfile Ollama: FROM, TEMPLATE, stop parameters
    <model_name>-Q4_K_M.gguf, ...   one per `quantize` type, each with its Modelfile
    imatrix.safetensors             when `imatrix` calibration text was given
    report.json, report.md          the parity scorecard (with check = true)

A parity failure (a file past `max_kld`/`min_top1`, or a tokenizer that splits text differently) fails the
stage: the artifact is discarded, so nothing downstream picks up a broken file, and the scorecard is kept in
the stage folder (report.md next to artifacts/) to see why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, field_validator

from llmforge.stage import Input, Produced, Stage, StageContext, StageOptions

if TYPE_CHECKING:
    from llmforge.errors import Problem
    from llmforge.planning import Estimate, PlanEnv
    from llmforge.plugins import Registry
    from llmforge.stage import Artifact


class ImatrixOptions(StageOptions):
    calibration: Annotated[str, Input()] = Field(
        description="Calibration text: a .txt file (paragraphs separated by blank lines) like what the model will "
        "see; an importance matrix computed from it steers every quantization."
    )
    max_tokens: int = Field(20000, ge=2, description="Tokens of calibration text used at most.")


class GgufOptions(StageOptions):
    model: Annotated[str, Input("model", "adapter")] = Field(
        description="The model to export: an HF model directory, a LoRA adapter (merged into its base first) or @stage."
    )
    outtype: Literal["f32", "f16", "bf16", "q8_0"] = Field(
        "f16", description="Type of the exported weights (norms and other 1-D tensors stay f32)."
    )
    quantize: list[str] = Field(
        default_factory=list,
        description="llama.cpp quantization types made from the export, e.g. "
        '["Q4_K_M", "Q8_0"] (IQ1/IQ2/IQ3_XXS and Q2_K_S need `imatrix`).',
    )
    imatrix: ImatrixOptions | None = Field(
        None, description='Importance matrix from calibration text: {calibration = "data/calib.txt"}.'
    )
    check: bool = Field(
        True,
        description="Score every file against the HF model: tokenization, logits (mean KL "
        "divergence, top-1 agreement), perplexity, size.",
    )
    check_text: Annotated[str | None, Input()] = Field(
        None, description="Text file the check measures logits and perplexity on (default: a built-in text)."
    )
    max_kld: float = Field(
        0.5,
        ge=0,
        description="Fail when a file's mean KL divergence from the HF model is "
        "larger (raise it for very low-bit types).",
    )
    min_top1: float = Field(
        0.3, ge=0, le=1, description="Fail when a file's top-1 token agrees with the HF model's less often than this."
    )
    tasks: list[Annotated[str, Input()] | dict[str, Any]] = Field(
        default_factory=list,
        description="Eval task specs (as an eval stage's `tasks`: inline tables or .toml files) the check runs on "
        "the HF model and on each file: each task's metrics next to the HF model's with the delta, and the "
        "similarity of each file's generated answers to the HF model's.",
    )
    # not `name`: in forge.toml that key of the stage's table is the stage's own name
    model_name: str | None = Field(
        None,
        min_length=1,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="The model's name: the files' name stem (<model_name>-f16.gguf, <model_name>-Q4_K_M.gguf; "
        "\"model\" when unset) and the GGUF's general.name (unset: the model card's, else the model folder's).",
    )

    @field_validator("quantize")
    @classmethod
    def _upper(cls, value: list[str]) -> list[str]:
        return [str(v).strip().upper().replace("-", "_") for v in value]


def read_calibration(path: Path) -> list[str]:
    """Paragraphs of a text file (blank-line separated): the pieces the importance matrix is measured on."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def parity_failures(card: dict, max_kld: float, min_top1: float) -> list[str]:
    """One line per file and per broken promise, naming the file and the number."""
    out = []
    for row in card["rows"]:
        name = Path(row["file"]).name
        if not row.get("tokenization_ok", True):
            diff = row.get("tokenization_diff") or {}
            out.append(
                f"{name}: llama.cpp tokenizes the probe text differently from the HF tokenizer "
                f"(first difference at token {diff.get('at', '?')})"
            )
        if row["mean_kld"] > max_kld:
            out.append(f"{name}: mean KL divergence {row['mean_kld']:.3g} > max_kld {max_kld:g}")
        if row["top1"] < min_top1:
            out.append(f"{name}: top-1 agreement {row['top1']:.1%} < min_top1 {min_top1:.0%}")
    return out


def headline(card: dict) -> dict:
    """Per file, the numbers worth seeing in `llmforge status`."""
    return {
        Path(r["file"]).name: {
            "type": r["type"],
            "bytes": r["bytes"],
            "bpw": round(r["bpw"], 3),
            "mean_kld": r["mean_kld"],
            "top1": r["top1"],
            "ppl": r["ppl"],
            "delta_ppl": r["delta_ppl"],
            "tokenization_ok": r["tokenization_ok"],
        }
        for r in card["rows"]
    }


class GgufStage(Stage):
    """Exports a model (or a LoRA adapter, merged first) to GGUF for llama.cpp, Ollama and LM Studio, makes the
    requested quantizations with llama.cpp's quantizer (with an importance matrix from calibration text when
    given), writes an Ollama Modelfile next to each file, and checks every file against the HF model:
    tokenization, logits, perplexity. See docs/gguf.md."""

    kind = "gguf"
    summary = "Export to GGUF (f16/bf16/f32/q8_0), quantize (Q4_K_M, ...), check parity, write Ollama Modelfiles."
    Options = GgufOptions
    produces = ("gguf",)
    version = "1"
    cache_libraries = ("gguf", "llama-cpp-python", "torch", "transformers")

    def check(
        self, options: GgufOptions, inputs: dict[str, Artifact], registry: Registry | None = None
    ) -> list[Problem]:
        from llmforge.errors import Problem, UsageError
        from llmforge_plugins.gguf.quantize import needs_imatrix, normalize_qtype

        problems: list[Problem] = []
        for i, qtype in enumerate(options.quantize):
            try:
                normalize_qtype(qtype)
            except UsageError as exc:
                problems.append(Problem(f"quantize[{i}]", exc.message))
                continue
            if needs_imatrix(qtype) and options.imatrix is None:
                problems.append(
                    Problem(
                        f"quantize[{i}]",
                        f'{qtype} needs an importance matrix: add imatrix = {{ calibration = "FILE.txt" }}',
                    )
                )
        if options.quantize and options.outtype == "q8_0":
            problems.append(
                Problem(
                    "quantize",
                    "llama.cpp quantizes from f32, f16 or bf16, not from the q8_0 "
                    'export: set outtype = "f16" (or f32/bf16)',
                )
            )
        if options.outtype.upper() in options.quantize:
            problems.append(
                Problem(
                    "quantize",
                    f"{options.outtype.upper()} is the export itself (outtype); list only the types to make from it",
                )
            )
        dupes = sorted({q for q in options.quantize if options.quantize.count(q) > 1})
        if dupes:
            problems.append(Problem("quantize", f"listed twice: {', '.join(dupes)}"))
        if options.tasks and not options.check:
            problems.append(Problem("tasks", "the tasks run as part of the check: set check = true"))
        elif options.tasks and registry is not None:
            from llmforge_plugins.gguf.check import load_tasks

            problems += load_tasks(options.tasks, registry, _project_dir(options, inputs))[1]
        return problems

    def estimate(self, options: GgufOptions, env: PlanEnv) -> Estimate:
        # Planning: the files from bits per weight, the check's memory from the model input's shape.
        from llmforge_plugins.gguf.estimate import gguf_estimate

        return gguf_estimate(
            env.shape_of("model"), options.outtype, list(options.quantize), options.check, options.imatrix is not None
        )

    def run(self, options: GgufOptions, ctx: StageContext) -> Produced | None:
        from llmforge_plugins.gguf.modelfile import write_modelfile

        model = Path(options.model)
        steps = 1 + int(bool(options.quantize and options.imatrix)) + len(options.quantize) + int(options.check)
        done = 0

        def step() -> None:
            nonlocal done
            done += 1
            ctx.progress(done, steps, unit="step")

        if options.imatrix is not None and not options.quantize:
            ctx.log("imatrix is set but quantize is empty: the importance matrix is not computed", "warning")
        with ctx.artifact("gguf") as out:
            stem = options.model_name or "model"
            files = [self._export(model, out / f"{stem}-{options.outtype}.gguf", options, ctx)]
            step()
            imatrix = None
            if options.quantize and options.imatrix is not None:
                if ctx.should_stop():
                    return None  # the artifact block discards what was written
                imatrix = self._imatrix(model, out / "imatrix.safetensors", options.imatrix, ctx)
                step()
            quantized: dict[str, dict[str, Any]] = {}
            for qtype in options.quantize:
                if ctx.should_stop():
                    return None  # the artifact block discards what was written
                files.append(self._quantize(files[0], out / f"{stem}-{qtype}.gguf", qtype, imatrix, ctx, quantized))
                step()
            if ctx.should_stop():
                return None
            for path in files:
                write_modelfile(path)
            if options.check:
                self._check(model, files, out, options, ctx)
                step()
                if ctx.should_stop():
                    return None  # stopped during the downstream tasks: the artifact block discards the files
        final = ctx.published["gguf"].path
        ctx.info["files"] = {p.name: (final / p.name).stat().st_size for p in files}
        if quantized:
            ctx.info["quantized"] = quantized
        return ctx.published

    # ---- steps -------------------------------------------------------------------------------
    @staticmethod
    def _export(model: Path, dst: Path, options: GgufOptions, ctx) -> Path:
        from llmforge_plugins.gguf.export import export_gguf

        ctx.log(f"exporting {model} to {dst.name}")
        summary = export_gguf(model, dst, options.outtype, log=ctx.log, name=options.model_name)
        ctx.info["export"] = {k: summary[k] for k in ("arch", "outtype", "tensors", "bytes", "seconds") if k in summary}
        return dst

    @staticmethod
    def _imatrix(model: Path, dst: Path, spec: ImatrixOptions, ctx) -> Path:
        from llmforge_plugins.gguf.imatrix import compute_imatrix

        texts = read_calibration(Path(spec.calibration))
        return compute_imatrix(model, texts, dst, max_tokens=spec.max_tokens, log=ctx.log)

    @staticmethod
    def _quantize(src: Path, dst: Path, qtype: str, imatrix: Path | None, ctx, record: dict) -> Path:
        from llmforge_plugins.gguf.quantize import quantize_gguf

        summary = quantize_gguf(src, dst, qtype, imatrix=imatrix, log=ctx.log)
        record[qtype] = {"bytes": summary["bytes"], "seconds": summary["seconds"]}
        return dst

    @staticmethod
    def _check(model: Path, files: list[Path], out: Path, options: GgufOptions, ctx) -> None:
        """Score the files; write the report into the artifact, or, when parity is broken, into the stage folder
        and fail (raised inside the artifact block, so the artifact is discarded)."""
        from llmforge.errors import StageFailed
        from llmforge.runs import atomic_write_text
        from llmforge_plugins.gguf.check import check_gguf, scorecard_markdown

        text = Path(options.check_text).read_text(encoding="utf-8") if options.check_text else None
        ctx.log(f"checking {len(files)} file(s) against {model}")
        specs: list = []
        if options.tasks:
            from llmforge.errors import ConfigError
            from llmforge_plugins.gguf.check import load_tasks

            base = getattr(ctx, "project_dir", None) or Path.cwd()
            specs, problems = load_tasks(options.tasks, ctx.registry, base)
            if problems:
                raise ConfigError(problems)
        card = check_gguf(
            model,
            files,
            text=text,
            log=ctx.log,
            tasks=specs,
            registry=ctx.registry,
            seed=ctx.seed,
            base_dir=getattr(ctx, "project_dir", None),
            should_stop=ctx.should_stop,
        )
        failures = parity_failures(card, options.max_kld, options.min_top1)
        report = {
            "card": card,
            "thresholds": {"max_kld": options.max_kld, "min_top1": options.min_top1},
            "failures": failures,
        }
        where = ctx.stage_dir if failures else out
        atomic_write_text(where / "report.json", json.dumps(report, indent=2) + "\n")
        atomic_write_text(where / "report.md", scorecard_markdown(card))
        ctx.info["check"] = headline(card)
        if card.get("downstream"):
            from llmforge_plugins.gguf.check import downstream_headline

            ctx.info["downstream"] = downstream_headline(card["downstream"])
        if failures:
            raise StageFailed(
                "GGUF parity check failed:\n  " + "\n  ".join(failures),
                hint=f"see {ctx.stage_dir / 'report.md'}; raise max_kld or lower min_top1 only for "
                f"losses you accept (very low-bit types)",
            )


def _project_dir(options: GgufOptions, inputs: dict[str, Artifact]) -> Path:
    """The folder of forge.toml, which check() is not told: a relative path input tells it (the pipeline made it
    absolute from there), else the working folder (where `llmforge validate` runs). Inline task specs' data paths
    are relative to it."""
    values = {f"tasks[{i}]": v for i, v in enumerate(options.tasks) if isinstance(v, str)}
    if options.check_text:
        values["check_text"] = options.check_text
    for key, value in values.items():
        art, rel = inputs.get(key), Path(value)
        if art is None or art.kind != "path" or value.startswith(("@", "~")) or rel.is_absolute():
            continue
        full = Path(art.path)
        if full.parts[-len(rel.parts) :] == rel.parts:
            return full.parents[len(rel.parts) - 1]
    return Path.cwd()
