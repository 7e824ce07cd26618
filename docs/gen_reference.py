"""Generate docs/reference/stages.md from the built-in plugins' schemas.

    python docs/gen_reference.py           # rewrite docs/reference/stages.md
    python docs/gen_reference.py --check   # exit 1 if the file is missing or stale

Everything in the reference comes from the code, through the same functions `llmforge stages show`
uses (`llmforge.schema.describe_options`): the stage kinds with every option (nested options
flattened as `lora.r`, `data.path`), the chat templates, the data readers and row formats, and the
experiment trackers. Only the built-in plugins are listed (`load_registry(env="")`), so the output
does not depend on what else is installed. tests/test_docs.py fails when the file is stale.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import typing
from pathlib import Path

from pydantic import BaseModel

DOCS = Path(__file__).resolve().parent
OUTPUT = DOCS / "reference" / "stages.md"


# ------------------------------------------------------------------------------------------------
# formatting helpers


def _cell(text: str) -> str:
    """Text for a Markdown table cell: no line breaks, pipes escaped (also inside code spans)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _text(text: str) -> str:
    """Plain text for a table cell or a heading line: `<run_dir>` must not be read as an HTML tag."""
    return _cell(str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"))


def _code(text: str) -> str:
    return _cell(f"`{text}`")


def _doc(text: str | None) -> str:
    """A docstring as Markdown: dedented, reST ``literals`` as `code`, and `<` `>` outside code
    escaped (`It is <value>.` must not read as an HTML tag)."""
    text = re.sub(r"``([^`]+)``", r"`\1`", inspect.cleandoc(text or ""))
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(p if p.startswith("`") else p.replace("<", "&lt;").replace(">", "&gt;") for p in parts)


def _value(value) -> str:
    """A default as it would be written in forge.toml."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return _code("true" if value else "false")
    if isinstance(value, str):
        return _code(json.dumps(value))
    if isinstance(value, (int, float)):
        return _code(repr(value))
    return _code(json.dumps(value))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def _tables(model: type[BaseModel], prefix: str = "") -> dict[str, tuple[str, str]]:
    """Nested option tables by dotted name -> (how its default reads, its description). A table that
    may be left out (`replay`, `heldout`) makes its required keys required only when it is given."""
    from llmforge.schema import _model_in

    out: dict[str, tuple[str, str]] = {}
    for name, field in model.model_fields.items():
        sub = _model_in(field.annotation)
        if sub is None or typing.get_origin(field.annotation) in (list, dict):
            continue
        full = f"{prefix}{name}"
        if field.is_required():
            default = "**required**"
        elif field.get_default(call_default_factory=False) is None:
            default = "unset"
        else:
            default = "the defaults below"
        out[full] = (default, field.description or "")
        out.update(_tables(sub, prefix=f"{full}."))
    return out


def _options_table(model: type[BaseModel]) -> list[str]:
    from llmforge.schema import describe_options

    tables = _tables(model)
    optional = [t for t, (default, _) in tables.items() if default == "unset"]
    rows = []
    started: set[str] = set()
    for opt in describe_options(model):
        # A row for each nested table, before its first key: it says whether the table may be left out.
        parts = opt.name.split(".")[:-1]
        for i in range(1, len(parts) + 1):
            table = ".".join(parts[:i])
            if table in tables and table not in started:
                started.add(table)
                default, description = tables[table]
                rows.append([_code(table), "table", default, "", _text(description), ""])
        if opt.required:
            table = next((t for t in sorted(optional, key=len, reverse=True) if opt.name.startswith(t + ".")), None)
            default = f"**required** when `{table}` is given" if table else "**required**"
        else:
            default = _value(opt.default)
        if opt.is_input:
            kinds = ", ".join(opt.input_kinds) if opt.input_kinds else "any kind"
            inp = f"path or `@stage` ({kinds})"
        else:
            inp = ""
        constraints = _code(opt.constraints) if opt.constraints else ""
        rows.append([_code(opt.name), _code(opt.type), default, constraints, _text(opt.description), inp])
    return _table(["option", "type", "default", "constraints", "description", "input"], rows)


# ------------------------------------------------------------------------------------------------
# sections


def _stages(reg) -> list[str]:
    from llmforge.stage import Stage

    out = ["## Stage kinds", ""]
    kinds = sorted(reg.stages)
    out.append("| kind | summary | produces | plugin |")
    out.append("|---|---|---|---|")
    for kind in kinds:
        cls = reg.stages[kind]  # the table holds the Stage subclass; the plugin that registered it is its owner
        out.append(
            f"| [`{kind}`](#{kind}) | {_text(cls.summary)} | "
            f"{', '.join(f'`{k}`' for k in cls.produces)} | {reg.owner('stages', kind)} |"
        )
    out.append("")
    for kind in kinds:
        cls = reg.stages[kind]
        out += [f"### `{kind}`", "", f"**{_text(cls.summary)}**", ""]
        own_doc = cls.__dict__.get("__doc__")
        doc = own_doc or sys.modules[cls.__module__].__doc__
        if doc:
            out += [_doc(doc), ""]
        para = [f"Produces: {', '.join(f'`{k}`' for k in cls.produces) or 'nothing'}."]
        if cls.outputs is not Stage.outputs:
            para.append(
                "Which of these it writes depends on its options (the stage's `outputs()`; "
                "[training.md](../training.md) lists them for the training stages)."
            )
        para.append(f"Plugin: `{reg.owner('stages', kind)}`. Stage version: `{cls.version}`.")
        if cls.cache_libraries:
            para.append(f"Library versions in the cache key: {', '.join(f'`{n}`' for n in cls.cache_libraries)}.")
        out += [" ".join(para), ""]
        out += _options_table(cls.Options)
        out.append("")
    return out


def _templates(reg) -> list[str]:
    out = [
        "## Chat templates",
        "",
        "Names for the `template` option of the training stages (and `--template` of "
        "`llmforge data inspect`). `hash` is what run manifests record as `info.chat_template.hash`.",
        "",
    ]
    rows = []
    for name, t in reg.chat_templates.items():
        rows.append(
            [
                _code(name),
                _text(t.summary),
                _code(t.eos),
                _code(t.bos) if t.bos else "none",
                _code(t.pad) if t.pad else "none",
                ", ".join(_code(s) for s in t.special_tokens) or "none",
                ", ".join(_code(s) for s in t.stop) or "none",
                _code(t.hash),
            ]
        )
    out += _table(["name", "summary", "eos", "bos", "pad", "special tokens", "extra stop strings", "hash"], rows)
    out.append("")
    for name, t in reg.chat_templates.items():
        out += [
            f"<details><summary><code>{name}</code> source</summary>",
            "",
            "```jinja",
            t.source.rstrip("\n"),
            "```",
            "",
            "</details>",
            "",
        ]
    return out


def _data(reg) -> list[str]:
    out = [
        "## Data readers",
        "",
        "Tried in this order; the first reader that claims a path reads it (see [data.md](../data.md)).",
        "",
    ]
    rows = []
    for name, reader in reg.readers.items():
        cls = type(reader)
        suffixes = ", ".join(_code(s) for s in cls.suffixes) or "(a folder it recognises)"
        rows.append([_code(name), suffixes, _text(_doc(cls.__dict__.get("__doc__")).split("\n\n")[0])])
    out += _table(["reader", "file endings", "notes"], rows)
    out += [
        "",
        "## Row formats",
        "",
        'With `format = "auto"` the format is detected from the first row\'s columns: among the formats '
        "whose columns are all present, one whose kind the stage can use wins, then the higher priority.",
        "",
    ]
    rows = []
    for name, fmt in reg.row_formats.items():
        cls = type(fmt)
        rows.append(
            [
                _code(name),
                _code(cls.kind),
                ", ".join(_code(c) for c in cls.columns) or "none",
                str(cls.priority),
                _text(_doc(cls.__dict__.get("__doc__"))),
            ]
        )
    out += _table(["format", "kind", "detected by the columns", "priority", "notes"], rows)
    out.append("")
    return out


def _trackers(reg) -> list[str]:
    out = [
        "## Trackers",
        "",
        "Enabled in forge.toml's `[trackers]` table: `name = true` for the defaults, or `[trackers.name]` "
        "with options (see [configuration.md](../configuration.md#trackers)).",
        "",
    ]
    for name, cls in reg.trackers.items():
        out += [f"### `{name}`", "", f"**{_text(cls.summary)}**", ""]
        doc = cls.__dict__.get("__doc__")
        if doc:
            out += [_doc(doc), ""]
        out += _options_table(cls.Options)
        out.append("")
    return out


def render() -> str:
    from llmforge.plugins import load_registry

    reg = load_registry(env="")  # the built-in plugins only: independent of what else is installed
    lines = [
        "# Reference: stages, chat templates, data formats, trackers",
        "",
        "<!-- Generated by docs/gen_reference.py from the built-in plugins' schemas. Do not edit by hand:",
        "     run `python docs/gen_reference.py` (tests/test_docs.py fails when this file is stale). -->",
        "",
        "Every option of every built-in stage kind, as `forge.toml` takes it. Nested options are written "
        "as TOML tables (`lora = { r = 8 }` or `[stages.lora]` style) and named here with dots (`lora.r`); "
        "`--set NAME.lora.r=8` overrides one. An *input* takes a path (relative to forge.toml) or a reference "
        "`@stage` / `@stage.kind` to another stage's artifact. `llmforge stages show KIND` prints the same "
        "from the installed version, including third-party stage kinds.",
        "",
        "Guides: [training.md](../training.md) (the training stages), [data.md](../data.md) (data files and "
        "row formats), [configuration.md](../configuration.md) (the rest of forge.toml).",
        "",
    ]
    lines += _stages(reg)
    lines += _templates(reg)
    lines += _data(reg)
    lines += _trackers(reg)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the reference is missing or stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else None
        if current != text:
            print(
                f"{OUTPUT} is {'missing' if current is None else 'stale'}; run: python docs/gen_reference.py",
                file=sys.stderr,
            )
            return 1
        print(f"{OUTPUT} is up to date")
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
