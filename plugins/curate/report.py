"""The curation report for people: report.md from report.json."""

from __future__ import annotations


def step_action_of(step: dict) -> str:
    """A report step's action; a report written before steps had an ``action`` calls it ``kind``."""
    return step.get("action") or step.get("kind") or ""


def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def markdown(report: dict) -> str:
    lines = [
        "# Curation report",
        "",
        f"Kept **{report['rows_out']}** of {report['rows_in']} rows "
        f"(removed {report['rows_in'] - report['rows_out'] if 'mix' not in report else report['removed']}).",
    ]
    for read in report.get("read", []):
        src = f" ({read['source']})" if read.get("source") else ""
        lines.append(
            f"Read{src}: {read['rows']} {read['kind']} rows in the {read['format']} format from "
            f"{', '.join(read['files'])}" + (f"; {read['skipped']} bad rows skipped" if read["skipped"] else "") + "."
        )
    lines += [
        "",
        "## Steps",
        "",
        "| step | action | seen | kept | removed | rewritten | removed by |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for st in report["steps"]:
        why = ", ".join(f"{code} {n}" for code, n in st["removed_by"].items()) or "-"
        lines.append(
            f"| `{st['step']}` | {step_action_of(st)} | {st['seen']} | {st['kept']} | {st['removed']} | "
            f"{st['changed']} | {_cell(why)} |"
        )
    for st in report["steps"]:
        if not st["examples"]:
            continue
        lines += ["", f"### Removed by `{st['step']}` (first {len(st['examples'])})", ""]
        for ex in st["examples"]:
            lines.append(f"- `{_cell(ex['source'])}`: {_cell(ex['reason'])}  ")
            lines.append(f"  > {_cell(ex['text'])}")
    mix = report.get("mix")
    if mix:
        lines += [
            "",
            "## Mix",
            "",
            f"By {mix['by']} ({mix['unit']}), seed {mix['seed']}: {mix['rows']} rows.",
            "",
            "| source | available rows | rows | units | epochs | share | target |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for s in mix["sources"]:
            target = f"{s['target_share']:.1%}" if s["target_share"] is not None else "-"
            lines.append(
                f"| {_cell(s['name'])} | {s['available_rows']} | {s['rows']} | {s['units']:g} | "
                f"{s['epochs']:g} | {s['share']:.1%} | {target} |"
            )
    lines += [
        "",
        "Every removed row, with its reason: `reasons.jsonl` (one JSON object per line: source, step, code, reason).",
        "",
    ]
    return "\n".join(lines)
