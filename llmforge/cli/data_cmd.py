"""`llmforge data`: the command group, and its core command `inspect`, which shows training data the way a
stage will see it, masks included. Plugins add more commands to the group through `register_commands`
and `data_group(cli)` (the curate plugin adds stats, lint, dedup, filter, mix and steps)."""

# No `from __future__ import annotations`: Typer reads these commands' Annotated parameters at every start,
# and string annotations would be compiled and evaluated there (twice per command, ~15 ms in all).

from pathlib import Path
from typing import Annotated

import typer

from llmforge.cli.common import JsonOption, console, print_json, registry, sub_app


def inspect(
    file: Annotated[Path, typer.Argument(help="A data file or folder.")],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model or tokenizer directory: tokenize rows.")
    ] = None,
    masks: Annotated[
        bool, typer.Option("--masks", help="Show which tokens are trained and which are ignored.")
    ] = False,
    template: Annotated[
        str | None,
        typer.Option("--template", "-t", help="Chat template name or .jinja file (default: the model's own)."),
    ] = None,
    max_length: Annotated[int, typer.Option("--max-length", help="Sequence length for the truncation rate.")] = 2048,
    rows: Annotated[int, typer.Option("--rows", "-n", help="How many rows to show.")] = 2,
    fmt: Annotated[str, typer.Option("--format", help="Row format (default: detected from the columns).")] = "auto",
    train_on: Annotated[str, typer.Option("--train-on", help="assistant, all or last_turn.")] = "assistant",
    plain: Annotated[bool, typer.Option("--plain", help="Mark trained tokens with [[ ]] instead of colour.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Rows as a stage reads them; with --model, rendered through the chat template, with --masks the
    trained tokens highlighted, and the truncation rate at --max-length."""
    from llmforge.data import DataOptions, load_data

    reg = registry()
    ds = load_data(
        DataOptions(path=str(file), format=fmt, on_bad_row="skip"), reg.readers, reg.row_formats, base=Path.cwd()
    )
    summary = {
        "file": str(file),
        "format": ds.format,
        "kind": ds.kind,
        "rows": len(ds.rows),
        "skipped": len(ds.skipped),
        "first_skipped": [f"{w}: {r}" for w, r in ds.skipped[:5]],
    }
    shown: list[dict] = []
    if model is None:
        shown = [{"where": w, "row": r} for w, r in zip(ds.wheres[:rows], ds.rows[:rows])]
    else:
        summary.update(_tokenized(ds, model, template, max_length, train_on, rows, shown))
    if as_json:
        print_json({**summary, "samples": shown})
        return
    _print(summary, shown, masks, plain)


def _tokenized(
    ds, model: str, template: str | None, max_length: int, train_on: str, rows: int, shown: list[dict]
) -> dict:
    from llmforge.chat import ChatTemplateError, encode_row, load_chat_tokenizer

    tok, tpl = load_chat_tokenizer(model, template, Path.cwd(), registry().chat_templates, ds.kind)
    lengths, truncated, trained, total = [], 0, 0, 0
    for i, (where, row) in enumerate(zip(ds.wheres, ds.rows)):
        try:
            ids, labels, cut = encode_row(tok, tpl, ds.kind, row, max_length, train_on)
        except ChatTemplateError as exc:  # a row the template cannot say (gemma: two user turns in a row)
            raise ChatTemplateError(f"{where}: {exc.message}", hint=exc.hint) from None
        lengths.append(len(ids))
        truncated += bool(cut)
        trained += sum(1 for x in labels if x != -100)
        total += len(ids)
        if i < rows:
            pieces = [tok.decode([t]) for t in ids]
            shown.append(
                {
                    "where": where,
                    "tokens": len(ids),
                    "truncated": bool(cut),
                    "pieces": [[p, lab != -100] for p, lab in zip(pieces, labels)],
                }
            )
    n = max(len(lengths), 1)
    return {
        "template": tpl.name if tpl else None,
        "max_length": max_length,
        "truncation_rate": truncated / n,
        "truncated": truncated,
        "mean_tokens": sum(lengths) / n,
        "max_tokens": max(lengths, default=0),
        "trained_fraction": trained / max(total, 1),
    }


def _print(summary: dict, shown: list[dict], masks: bool, plain: bool) -> None:
    from rich.markup import escape
    from rich.text import Text

    out = console()  # the file's name, the skip reasons and the rows are text, never markup: escaped
    out.print(
        f"[bold]{escape(str(summary['file']))}[/]: {summary['rows']} rows, format {summary['format']} "
        f"({summary['kind']})" + (f", {summary['skipped']} bad rows skipped" if summary["skipped"] else "")
    )
    for reason in summary["first_skipped"]:
        out.print(f"  [yellow]skipped[/] {escape(str(reason))}", highlight=False)
    if "truncation_rate" in summary:
        out.print(
            f"tokens: mean {summary['mean_tokens']:.1f}, max {summary['max_tokens']}; truncated at "
            f"{summary['max_length']}: {summary['truncated']} rows ({100 * summary['truncation_rate']:.1f}%); "
            f"trained tokens {100 * summary['trained_fraction']:.1f}%"
            + (f"; template {escape(str(summary['template']))}" if summary.get("template") else "")
        )
    for sample in shown:
        out.rule(sample["where"])
        if "row" in sample:
            out.print(sample["row"], highlight=False, markup=False)
            continue
        text = Text()
        if masks:
            in_span = False
            for piece, is_trained in sample["pieces"]:
                if plain:
                    if is_trained and not in_span:
                        text.append("[[")
                    if not is_trained and in_span:
                        text.append("]]")
                    text.append(piece)
                else:
                    text.append(piece, style="bold green" if is_trained else "dim")
                in_span = is_trained
            if plain and in_span:
                text.append("]]")
        else:
            text.append("".join(p for p, _ in sample["pieces"]))
        out.print(text)
        if sample["truncated"]:
            out.print(f"[yellow](truncated at {summary['max_length']} tokens)[/]")
    if masks and not plain:
        out.print("[bold green]trained[/] / [dim]ignored (label -100)[/]")


GROUP = "data"


def register(app: typer.Typer) -> None:
    data_app = sub_app("Look at, check and curate training data.")
    data_app.command("inspect")(inspect)
    app.add_typer(data_app, name=GROUP)


def data_group(cli: typer.Typer) -> typer.Typer:
    """The `llmforge data` group of the root app ``cli``, for a plugin's ``register_commands(cli)`` to add
    `llmforge data <command>` to. Typer builds the click group only when the app runs, so commands added
    here after ``register`` appear in `llmforge data --help`, after the core's."""
    for info in cli.registered_groups:
        if info.name == GROUP and info.typer_instance is not None:
            return info.typer_instance
    raise LookupError(f"the command line has no `{GROUP}` group")
