"""`llmforge data stats|lint|dedup|filter|mix|steps`: the curate plugin's commands, added to the core's
`llmforge data` group through `register_commands` (see `register` at the end). Thin over this package,
which does the work. Paths are relative to the current folder; outputs keep every column of the rows
as they came in and are written under a temporary name and renamed into place: parquet for an OUT named
*.parquet, else JSON Lines.

Imported at start-up (when the commands are added): typer only; the work is imported inside each command.
"""

# No `from __future__ import annotations`: Typer reads these commands' Annotated parameters at every start,
# and string annotations would be compiled and evaluated there (twice per command, ~15 ms in all).

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from llmforge.cli.common import console, print_json, registry

# The options several commands share, declared once.
Fmt = Annotated[str, typer.Option("--format", help="Row format (default: detected from the columns).")]
SkipBad = Annotated[
    bool, typer.Option("--skip-bad", help="Skip unreadable rows (listed) instead of stopping at the first.")
]
Reasons = Annotated[
    Path | None,
    typer.Option("--reasons", help="Also write every removed row's source and reason to this JSON Lines file."),
]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
Out = Annotated[
    Path,
    typer.Argument(help="Where to write the kept rows, every column kept (parquet for *.parquet, else JSON Lines)."),
]


@contextmanager
def _flag_hints() -> Iterator[None]:
    """Data errors name forge.toml's `on_bad_row`; on the command line the switch is --skip-bad."""
    from llmforge.errors import DataError

    try:
        yield
    except DataError as exc:
        if exc.hint and "on_bad_row" in exc.hint:
            hint = exc.hint.replace(
                'set on_bad_row = "skip" to skip bad rows and get a report',
                "pass --skip-bad to skip bad rows (they are listed)",
            )
            raise DataError(exc.message, hint.replace('`on_bad_row = "error"`', "leaving out --skip-bad")) from None
        raise


def stats(
    file: Annotated[Path, typer.Argument(help="A data file or folder.")],
    model: Annotated[
        Path | None, typer.Option("--model", "-m", help="Tokenizer or model folder: token lengths too.")
    ] = None,
    threshold: Annotated[
        float, typer.Option("--threshold", help="Jaccard similarity for the near-duplicate rate.")
    ] = 0.8,
    no_near: Annotated[bool, typer.Option("--no-near", help="Skip the near-duplicate rate (MinHash).")] = False,
    fmt: Fmt = "auto",
    skip_bad: SkipBad = False,
    as_json: Json = False,
) -> None:
    """Counts, length histograms, duplicate rates and languages of a data file, at a glance."""
    from llmforge_plugins.curate.stats import compute

    with _flag_hints():
        data = compute(file, registry(), fmt, skip_bad, model, near=not no_near, threshold=threshold)
    if as_json:
        print_json(data)
        return
    out = console()
    out.print(
        f"[bold]{file}[/]: {data['rows']:,} {data['kind']} rows ({data['format']} format, "
        f"{len(data['files'])} file{'s' if len(data['files']) != 1 else ''})"
        + (f"; {data['skipped']} bad rows skipped" if data["skipped"] else "")
    )
    for reason in data["first_skipped"][:5]:
        out.print(f"  [yellow]skipped[/] {reason}")
    for key in ("characters", "words", "tokens"):
        if data.get(key):
            _histogram(out, key, data[key])
    for key in ("turns", "prompt_turns"):
        if key in data:
            out.print(f"{key.replace('_', ' ')} per row: " + ", ".join(f"{k}: {v:,}" for k, v in data[key].items()))
    d = data["duplicates"]
    line = f"duplicates: exact {d['exact']:,} rows ({d['exact_rate']:.1%})"
    if "near" in d:
        line += f", near (Jaccard >= {d['near_threshold']}) {d['near']:,} more ({d['near_rate']:.1%})"
    out.print(line)
    langs = list(data["languages"].items())
    out.print(
        "languages (a guess): "
        + ", ".join(f"{k} {v / max(data['rows'], 1):.1%}" for k, v in langs[:6])
        + (", ..." if len(langs) > 6 else "")
    )


def _histogram(out, name: str, s: dict) -> None:
    out.print(
        f"{name}: min {s['min']:,}, p10 {s['p10']:,.0f}, median {s['median']:,.0f}, mean {s['mean']:,.1f}, "
        f"p90 {s['p90']:,.0f}, max {s['max']:,}; total {s['total']:,}"
    )
    peak = max((b["rows"] for b in s["histogram"]), default=1) or 1
    for b in s["histogram"]:
        label = f"{b['from']:,}" if b["from"] == b["to"] else f"{b['from']:,}-{b['to']:,}"
        bar = "█" * round(30 * b["rows"] / peak)
        out.print(f"  {label:>15} {bar:<30} {b['rows']:,}")


def lint(
    file: Annotated[Path, typer.Argument(help="A chat or preference data file or folder.")],
    model: Annotated[
        Path | None,
        typer.Option("--model", "-m", help="Tokenizer or model folder: truncation and template checks too."),
    ] = None,
    template: Annotated[
        str | None,
        typer.Option("--template", "-t", help="Chat template name or .jinja file (default: the model's own)."),
    ] = None,
    max_length: Annotated[int, typer.Option("--max-length", help="Sequence length for the truncation rate.")] = 2048,
    examples: Annotated[int, typer.Option("--examples", "-n", help="Examples shown per finding.")] = 3,
    fmt: Fmt = "auto",
    skip_bad: SkipBad = False,
    as_json: Json = False,
) -> None:
    """Check chat and preference rows: role order, empty turns, missing assistant turns, identical
    chosen/rejected; with --model, truncation at --max-length and the chat template's round trip.
    Exit code 1 when a row has an error, 0 when there are only warnings or nothing."""
    from llmforge_plugins.curate.lint import lint_file

    with _flag_hints():
        data = lint_file(file, registry(), fmt, skip_bad, model, template, max_length, examples)
    if as_json:
        print_json(data)
    else:
        out = console()
        kind = f"{data['kind']} rows ({data['format']} format)" if data["kind"] else "rows"
        out.print(
            f"[bold]{file}[/]: {data['rows'] + data['rejected_rows']:,} {kind}; "
            f"{data['rows_with_errors']:,} with errors, {data['rows_with_warnings']:,} with warnings"
            + (f"; {data['skipped']} unreadable rows skipped" if data["skipped"] else "")
        )
        for code, f in data["findings"].items():
            style = "red" if f["level"] == "error" else "yellow"
            out.print(f"  [{style}]{f['level']:<7}[/] {code:<22} {f['rows']:>6,} rows")
            for ex in f["examples"]:
                out.print(f"      {ex}", highlight=False)
        if "truncation_rate" in data:
            out.print(
                f"truncated at {data['max_length']} tokens: {data['truncated']:,} rows "
                f"({data['truncation_rate']:.1%}); template {data['template']}"
            )
        if not data["findings"]:
            out.print("[green]no problems found[/]")
    if data["rows_with_errors"]:
        raise typer.Exit(1)


def _print_report(report: dict, out_path: Path, as_json: bool) -> None:
    from llmforge_plugins.curate.engine import summary_lines

    if as_json:
        print_json(report)
        return
    out = console()
    read = report["read"][0]
    out.print(
        f"read {read['rows']:,} {read['kind']} rows ({read['format']} format)"
        + (f"; {read['skipped']} bad rows skipped" if read["skipped"] else "")
    )
    for line in summary_lines(report):
        out.print(line, highlight=False)
    for st in report["steps"]:
        for ex in st["examples"]:
            out.print(f"  [dim]{st['step']}:[/] {ex['source']}: {ex['reason']}", highlight=False)
    out.print(
        f"wrote {report['rows_out']:,} rows to {out_path}"
        + (f"; reasons in {report['reasons']}" if report.get("reasons") else "")
    )


def dedup(
    src: Annotated[Path, typer.Argument(help="A data file or folder.")],
    out: Out,
    threshold: Annotated[
        float, typer.Option("--threshold", help="Jaccard similarity at or above which a row is a near duplicate.")
    ] = 0.8,
    exact_only: Annotated[bool, typer.Option("--exact-only", help="Only exact duplicates (no MinHash).")] = False,
    ngram: Annotated[
        int, typer.Option("--ngram", help="Shingle length in words (or characters with --unit char).")
    ] = 5,
    unit: Annotated[str, typer.Option("--unit", help="Shingles of words or of characters: word or char.")] = "word",
    num_perm: Annotated[int, typer.Option("--num-perm", help="Hash functions per MinHash signature.")] = 128,
    reasons: Reasons = None,
    fmt: Fmt = "auto",
    skip_bad: SkipBad = False,
    as_json: Json = False,
) -> None:
    """Remove exact duplicates (content hash) and near duplicates (MinHash + LSH); keeps the first."""
    from llmforge.errors import ConfigError, Problem
    from llmforge_plugins.curate.files import curate_file

    specs: list = [{"step": "exact_dedup"}]
    if not exact_only:
        specs.append({"step": "near_dedup", "threshold": threshold, "ngram": ngram, "unit": unit, "num_perm": num_perm})
    try:
        with _flag_hints():
            report = curate_file(src, out, specs, registry(), fmt, skip_bad, reasons, labels=["exact_dedup", "near"])
    except ConfigError as exc:
        # name the flag a bad value came from: `near.num_perm` -> `--num-perm`
        raise ConfigError(
            [
                Problem("--" + p.where.removeprefix("near.").replace("_", "-"), p.message)
                if p.where.startswith("near.")
                else p
                for p in exc.problems
            ],
            hint=exc.hint,
        ) from None
    _print_report(report, out, as_json)


def _filter_specs(step: list[str], sets: list[str]) -> tuple[list, list[str]]:
    """--step and --set into step specs. `--set step.option=V` names the step (and adds it when not
    chosen); a bare `--set option=V` goes to the one chosen step that has that option."""
    from llmforge.config import parse_value
    from llmforge.errors import ConfigError, Problem
    from llmforge.schema import did_you_mean
    from llmforge_plugins.curate.registry import curation_steps

    table = curation_steps(registry())
    names = list(dict.fromkeys(step or ["quality"]))
    options: dict[str, dict] = {n: {} for n in names}
    problems = []
    for item in sets:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(
                Problem(f"--set {item}", 'expected KEY=VALUE, for example min_chars=200 or language.languages=["en"]')
            )
            continue
        head, dot, rest = key.partition(".")
        if dot and head in table:
            options.setdefault(head, {})[rest] = parse_value(value.strip())
            continue
        owners = [n for n in options if n in table and key in table[n].Options.model_fields]
        if not owners:
            owners = [n for n, cls in table.items() if key in cls.Options.model_fields]
        if len(owners) != 1:
            known = sorted({f for n in options if n in table for f in table[n].Options.model_fields})
            why = (
                f"several steps have an option '{key}' ({', '.join(owners)}): write STEP.{key}=VALUE"
                if owners
                else f"no curation step has an option '{key}'{did_you_mean(key, known)}"
            )
            problems.append(Problem(f"--set {key}", why))
            continue
        options.setdefault(owners[0], {})[key] = parse_value(value.strip())
    if problems:
        raise ConfigError(problems)
    specs = [{"step": n, **opts} for n, opts in options.items()]
    labels = [f"--set {n}" if opts else f"--step {n}" for n, opts in options.items()]
    return specs, labels


def filter_cmd(
    src: Annotated[Path, typer.Argument(help="A data file or folder.")],
    out: Out,
    step: Annotated[
        list[str] | None,
        typer.Option(
            "--step",
            help="A curation step to run (repeat for several, "
            "in order; default: quality). `llmforge data "
            "steps` lists them.",
        ),
    ] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option("--set", help="A step option: OPTION=VALUE or STEP.OPTION=VALUE (naming a step adds it)."),
    ] = None,
    reasons: Reasons = None,
    fmt: Fmt = "auto",
    skip_bad: SkipBad = False,
    as_json: Json = False,
) -> None:
    """Run rows through curation steps (quality filters by default) and keep what they keep."""
    from llmforge_plugins.curate.files import curate_file

    specs, labels = _filter_specs(step or [], sets or [])
    with _flag_hints():
        report = curate_file(src, out, specs, registry(), fmt, skip_bad, reasons, labels=labels)
    _print_report(report, out, as_json)


def mix(
    out: Annotated[
        Path,
        typer.Argument(
            help="Where to write the mixed rows, every column kept (parquet for *.parquet, else JSON Lines)."
        ),
    ],
    config: Annotated[
        Path, typer.Option("--config", "-c", help="The mix recipe (mix.toml): sources with ratio, budget or epochs.")
    ],
    seed: Annotated[int | None, typer.Option("--seed", help="Sampling seed (overrides the recipe's).")] = None,
    as_json: Json = False,
) -> None:
    """Mix several sources by ratios, budgets or epochs (rows or tokens), deterministically by seed."""
    from llmforge_plugins.curate.files import mix_file

    with _flag_hints():
        report = mix_file(config, out, registry(), seed)
    if as_json:
        print_json(report)
        return
    c = console()
    for s in report["sources"]:
        target = f" (target {s['target_share']:.1%})" if s["target_share"] is not None else ""
        units = "" if report["by"] == "rows" else f", {s['units']:,.0f} {report['unit']}"
        c.print(
            f"  {s['name']}: {s['rows']:,} of {s['available_rows']:,} rows{units}, {s['epochs']:g} epochs, "
            f"{s['share']:.1%} of the output{target}",
            highlight=False,
        )
    units = "" if report["by"] == "rows" else f"{report['units']:,.0f} {report['unit']}, "
    c.print(f"wrote {report['rows']:,} rows ({units}seed {report['seed']}) to {out}")


def steps(
    name: Annotated[str | None, typer.Argument(help="Show this step's options.")] = None,
    as_json: Json = False,
) -> None:
    """List the curation steps (from every installed plugin), or one step's options."""
    from llmforge.errors import UsageError
    from llmforge.schema import describe_options, did_you_mean
    from llmforge_plugins.curate import CURATION_STEPS
    from llmforge_plugins.curate.registry import curation_steps

    reg = registry()
    table = curation_steps(reg)
    owner = {n: reg.owner(CURATION_STEPS, n) or "?" for n in table}
    if name is None:
        rows = [
            {"step": n, "action": cls.action, "plugin": owner[n], "summary": cls.summary} for n, cls in table.items()
        ]
        if as_json:
            print_json(rows)
            return
        from rich.table import Table

        t = Table()
        for col in ("step", "action", "plugin", "summary"):
            t.add_column(col)
        for r in rows:
            t.add_row(r["step"], r["action"], r["plugin"], r["summary"])
        console().print(t)
        return
    cls = table.get(name)
    if cls is None:
        raise UsageError(
            f"unknown curation step '{name}'{did_you_mean(name, table)}", hint=f"installed: {', '.join(table)}"
        )
    opts = describe_options(cls.Options)
    if as_json:
        print_json(
            {
                "step": name,
                "action": cls.action,
                "plugin": owner[name],
                "summary": cls.summary,
                "options": [o.to_json() for o in opts],
            }
        )
        return
    from rich.markup import escape
    from rich.table import Table

    out = console()
    out.print(f"[bold]{name}[/] ({cls.action}): {escape(cls.summary)}   plugin: {owner[name]}")
    t = Table()
    for col in ("option", "type", "default", "description"):
        t.add_column(col)
    for o in opts:
        default = "[red]required[/]" if o.required else escape(repr(o.default))
        t.add_row(escape(o.name), escape(o.type), default, escape(o.description))
    out.print(t)


def register(cli: typer.Typer) -> None:
    """Add the commands to the `llmforge data` group of the root app ``cli`` (what `register_commands`
    receives), after the core's own `data inspect`."""
    from llmforge.cli.data_cmd import data_group

    data_app = data_group(cli)
    data_app.command("stats")(stats)
    data_app.command("lint")(lint)
    data_app.command("dedup")(dedup)
    data_app.command("filter")(filter_cmd)
    data_app.command("mix")(mix)
    data_app.command("steps")(steps)
