"""`llmforge gguf export|quantize|check`, `llmforge import` and `llmforge chat`: thin commands over the engine.

Each parses its arguments, checks what can be checked before any work (an existing output, an unknown type,
a missing --model for --calibration), calls the engine, and writes an Ollama Modelfile next to every GGUF
it writes. Progress and log lines go to stderr, results to stdout (so `--json` and `chat --prompt` can be
piped). User errors are ForgeErrors: one message, exit 2. Heavy imports happen inside the functions.
"""

# No `from __future__ import annotations`: Typer reads these commands' Annotated parameters at every start,
# and string annotations would be compiled and evaluated there (twice per command, ~15 ms in all).

import math
from pathlib import Path
from typing import Annotated

import typer

from llmforge.errors import ForgeError, UsageError
from llmforge.formatting import fmt_bytes


def _log(stage: str = "gguf"):
    """A `log(message, level)` callable printing like `llmforge run` does, on stderr."""
    from llmforge.cli.common import console
    from llmforge.cli.render import EventPrinter

    printer = EventPrinter(live=False)
    printer.out = console(stderr=True)

    def log(message, level="info"):
        printer({"type": "log", "stage": stage, "level": level, "message": str(message)})

    return log


def _new_gguf(out: Path, force: bool) -> None:
    if out.suffix.lower() != ".gguf":
        raise UsageError(f"{out}: the output file name must end in .gguf")
    if out.is_dir():
        raise UsageError(f"{out} is a directory; give the name of the .gguf file to write")
    if out.exists() and not force:
        raise UsageError(f"{out} already exists", hint="pass --force to replace it")


# ------------------------------------------------------------------------------------------------
# llmforge gguf ...


def export(
    model: Annotated[
        Path, typer.Argument(help="An HF model directory, or a LoRA adapter directory (merged into its base first).")
    ],
    out: Annotated[Path, typer.Argument(help="The .gguf file to write (a .Modelfile is written next to it).")],
    outtype: Annotated[str, typer.Option("--outtype", help="Weight type: f32, f16, bf16 or q8_0.")] = "f16",
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
) -> None:
    """Export MODEL to one GGUF file for llama.cpp, Ollama and LM Studio, and write OUT's Ollama Modelfile.
    Exit code: 0 done, 2 bad input."""
    from llmforge_plugins.gguf.export import OUTTYPES, export_gguf
    from llmforge_plugins.gguf.modelfile import write_modelfile

    outtype = outtype.strip().lower()
    if outtype not in OUTTYPES:
        raise UsageError(
            f"--outtype {outtype}: expected one of {', '.join(OUTTYPES)}",
            hint="for Q4_K_M and the other llama.cpp types, export f16 then `llmforge gguf quantize`",
        )
    _new_gguf(out, force)
    summary = export_gguf(model, out, outtype, log=_log())
    modelfile = write_modelfile(out)
    typer.echo(
        f"wrote {out} ({summary['outtype']}, {summary['tensors']} tensors, {fmt_bytes(out.stat().st_size)}, "
        f"{summary['seconds']:.1f} s) and {modelfile.name}"
    )


def quantize(
    src: Annotated[Path, typer.Argument(help="The F32/F16/BF16 .gguf to quantize.")],
    out: Annotated[Path, typer.Argument(help="The .gguf file to write (a .Modelfile is written next to it).")],
    qtype: Annotated[str, typer.Option("--type", "-t", help="llama.cpp type: Q4_K_M, Q5_K_M, Q6_K, Q8_0, IQ4_XS, ...")],
    imatrix: Annotated[
        Path | None, typer.Option("--imatrix", help="An importance matrix (safetensors) to steer the quantizer.")
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option("--calibration", help="Calibration text: compute the importance matrix from it (needs --model)."),
    ] = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="The HF model SRC was exported from (for --calibration).")
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=2, help="Calibration tokens used at most.")] = 20000,
    threads: Annotated[int, typer.Option("--threads", min=0, help="Quantizer threads (0: all cores).")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
) -> None:
    """Quantize SRC to OUT with llama.cpp's quantizer: --type Q4_K_M [--imatrix FILE | --calibration TEXT
    --model HFDIR]. IQ1/IQ2/IQ3_XXS and Q2_K_S need an importance matrix. With --calibration, the matrix is
    kept next to OUT (OUT's name + .imatrix.safetensors) for reuse with --imatrix."""
    import shutil
    import tempfile

    from llmforge_plugins.gguf.modelfile import write_modelfile
    from llmforge_plugins.gguf.quantize import needs_imatrix, normalize_qtype, quantize_gguf, read_gguf
    from llmforge_plugins.gguf.stage import read_calibration

    qtype = normalize_qtype(qtype)
    if imatrix is not None and calibration is not None:
        raise UsageError("give --imatrix or --calibration, not both")
    if calibration is not None and model is None:
        raise UsageError("--calibration needs --model: the HF model the GGUF was exported from")
    if model is not None and calibration is None:
        raise UsageError("--model is only used with --calibration")
    if needs_imatrix(qtype) and imatrix is None and calibration is None:
        raise UsageError(
            f"{qtype} needs an importance matrix: give --calibration TEXTFILE --model HFDIR, or --imatrix FILE"
        )
    if calibration is not None and not calibration.is_file():
        raise UsageError(f"{calibration}: calibration text file not found")
    _new_gguf(out, force)
    read_gguf(src)  # a damaged input fails now, not after the importance matrix was computed
    log = _log()
    keep = out.with_name(out.stem + ".imatrix.safetensors")
    with tempfile.TemporaryDirectory(
        prefix=".llmforge-imatrix-", dir=out.parent if out.parent.exists() else None
    ) as tmp:
        if calibration is not None:
            from llmforge_plugins.gguf.imatrix import compute_imatrix

            assert model is not None  # checked above: --calibration needs --model
            imatrix = compute_imatrix(
                model, read_calibration(calibration), Path(tmp) / keep.name, max_tokens=max_tokens, log=log
            )
        summary = quantize_gguf(src, out, qtype, imatrix=imatrix, threads=threads, log=log)
        if calibration is not None:
            shutil.move(str(imatrix), keep)  # only once the quantization it was made for worked
    modelfile = write_modelfile(out)
    extra = f"; importance matrix kept as {keep.name}" if calibration is not None else ""
    typer.echo(
        f"wrote {out} ({qtype}, {fmt_bytes(summary['bytes'])}, {summary['seconds']:.1f} s) and {modelfile.name}{extra}"
    )


def check(
    model: Annotated[Path, typer.Argument(help="The HF model (or adapter) the files were exported from.")],
    files: Annotated[list[Path], typer.Argument(help="One or more .gguf files.")],
    text: Annotated[
        Path | None,
        typer.Option("--text", help="Text file to measure logits and perplexity on (default: a built-in text)."),
    ] = None,
    reference: Annotated[
        Path | None,
        typer.Option(
            "--reference",
            help="A GGUF (e.g. the f16 export) that ΔPPL is measured against instead of the HF model.",
        ),
    ] = None,
    max_kld: Annotated[
        float | None, typer.Option("--max-kld", min=0, help="Exit 1 when a file's mean KL divergence is larger.")
    ] = None,
    min_top1: Annotated[
        float | None, typer.Option("--min-top1", min=0, max=1, help="Exit 1 when a file's top-1 agreement is lower.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the scorecard as JSON.")] = False,
    task: Annotated[
        list[str] | None,
        typer.Option(
            "--task",
            "-t",
            help="An eval task (a .toml task spec, or KIND:DATAFILE) run on the HF model and on each file: "
            "downstream deltas and answer similarity. Repeat for several tasks.",
            show_default=False,
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Use at most N items of every task.")] = None,
) -> None:
    """Score GGUF files against the HF model: tokenization, logits on the same token ids (mean KL divergence,
    top-1 agreement), perplexity, size. Prints the scorecard table. With --max-kld/--min-top1 (which also
    require identical tokenization), exit 1 when a file misses them. With --task, each task's metrics on each
    file next to the HF model's, with the delta, and how similar the file's generated answers are."""
    from llmforge.cli.common import print_json
    from llmforge_plugins.gguf.check import check_gguf, scorecard_markdown
    from llmforge_plugins.gguf.stage import parity_failures

    if text is not None and not text.is_file():
        raise UsageError(f"{text}: text file not found")
    body = text.read_text(encoding="utf-8") if text is not None else None
    specs, reg = _task_specs(task or [])
    card = check_gguf(
        model, list(files), text=body, reference=reference, log=_log(), tasks=specs, registry=reg, limit=limit
    )
    if as_json:
        print_json(card)
    else:
        typer.echo(scorecard_markdown(card), nl=False)
    if max_kld is not None or min_top1 is not None:
        failures = parity_failures(
            card, math.inf if max_kld is None else max_kld, 0.0 if min_top1 is None else min_top1
        )
        if failures:
            raise ForgeError("parity check failed:\n  " + "\n  ".join(failures))


def _task_specs(values: list[str]) -> tuple[list, object]:
    """--task values as (task kind, options) pairs, read as `llmforge eval --task` reads them (the eval plugin),
    and the registry their eval models come from; a bad spec is a ConfigError (exit 2) before any model loads."""
    if not values:
        return [], None
    from llmforge.cli.common import registry
    from llmforge.errors import ConfigError

    reg = registry()
    try:
        from llmforge_plugins.eval.api import EVAL_TASKS
        from llmforge_plugins.eval.command import task_values
        from llmforge_plugins.eval.spec import load_task_specs
    except ImportError as exc:  # pragma: no cover - the eval plugin ships with llmforge
        raise UsageError(f"--task needs the eval plugin ({exc})") from None
    table = reg.table(EVAL_TASKS)
    specs, problems = load_task_specs(task_values(values, table), table, Path.cwd(), "--task")
    if problems:
        raise ConfigError(problems)
    return specs, reg


# ------------------------------------------------------------------------------------------------
# llmforge import / chat


def import_gguf(
    gguf: Annotated[Path, typer.Argument(help="The .gguf file to import.")],
    out: Annotated[Path, typer.Argument(help="The HF model directory to write (new, or empty).")],
    dtype: Annotated[
        str,
        typer.Option("--dtype", help="Weight dtype: float32, float16 or bfloat16 (quantized tensors are dequantized)."),
    ] = "float32",
) -> None:
    """Import a GGUF file as a Hugging Face model directory (config, safetensors, tokenizer and chat template),
    to fine-tune, merge or evaluate it. Exit code: 0 done, 2 bad input."""
    from llmforge_plugins.gguf.importer import import_gguf as run

    run(gguf, out, dtype=dtype, log=_log("import"))  # it checks the file, the dtype and OUT before writing
    typer.echo(f"imported {gguf} into {out}")


def chat(
    model: Annotated[Path, typer.Argument(help="An HF model directory (or LoRA adapter) or a .gguf file.")],
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="Answer this one prompt, print only the answer, and exit.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Longest answer, in tokens.")] = 256,
    temperature: Annotated[
        float, typer.Option("--temperature", min=0.0, help="Sampling temperature; 0 is greedy.")
    ] = 0.7,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sampling.")] = 0,
    system: Annotated[
        str | None, typer.Option("--system", help="A system message in front of the conversation.")
    ] = None,
    n_ctx: Annotated[
        int | None,
        typer.Option("--n-ctx", min=16, help="Context size for a GGUF (default 4096, at most the model's own)."),
    ] = None,
) -> None:
    """Chat with MODEL using its own chat template: an HF directory through transformers, a .gguf through
    llama.cpp. Reads prompts from stdin until end of input or /exit (/reset forgets the conversation); with
    --prompt, answers once. A model without a chat template continues each prompt as plain text."""
    from llmforge.chat_engine import CHAT_ENGINES
    from llmforge.cli.common import registry
    from llmforge_plugins.gguf.chat import ChatSettings, chat_main

    settings = ChatSettings(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, system=system)
    # Any installed engine may open MODEL (the registry's, in load order), not only this plugin's two.
    chat_main(
        model,
        prompt=prompt,
        settings=settings,
        engines=registry().table(CHAT_ENGINES),
        n_ctx=n_ctx,
        log=None if prompt is not None else _log("chat"),
    )


def register(cli) -> None:
    from llmforge.cli.common import sub_app

    group = sub_app("GGUF files for llama.cpp, Ollama and LM Studio: export, quantize, check.")
    group.command("export")(export)
    group.command("quantize")(quantize)
    group.command("check")(check)
    cli.add_typer(group, name="gguf")
    cli.command("import")(import_gguf)
    cli.command("chat")(chat)
