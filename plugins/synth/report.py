"""The synth report (``report.json`` + ``report.md``), built from the journal alone: a resumed run's report
counts the units of every attempt, exactly as an uninterrupted run's would."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

BINS = 10


def histogram(values: list[float], bins: int = BINS) -> list[list[float]]:
    """``[[lo, hi, count], ...]`` over the values' range (one bin when they are all equal)."""
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        return []
    lo, hi = min(values), max(values)
    if lo == hi:
        return [[lo, hi, len(values)]]
    if all(float(v).is_integer() for v in values) and hi - lo <= 20:
        # whole-number scores (a judge's 1-10): one bin per value reads better than ten fractional bins
        whole = Counter(int(v) for v in values)
        return [[float(v), float(v), whole.get(v, 0)] for v in range(int(lo), int(hi) + 1)]
    width = (hi - lo) / bins
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - lo) / width))] += 1
    return [[round(lo + i * width, 6), round(lo + (i + 1) * width, 6), n] for i, n in enumerate(counts)]


def _scores(row: dict[str, Any]) -> dict[str, float]:
    prov = row.get("provenance") if isinstance(row, dict) else None
    scores = prov.get("scores") if isinstance(prov, dict) else None
    return {k: v for k, v in (scores or {}).items() if isinstance(v, (int, float))}


def build_report(
    records: list[dict[str, Any]],
    *,
    generator: str,
    teacher: str,
    total: int | None,
    budget: dict[str, Any],
    stopped_by: str | None,
) -> dict[str, Any]:
    rows = [r for rec in records for r in rec["rows"]]
    rejected = [x for rec in records for x in rec["rejected"]]
    by_reason = Counter(str(x.get("reason", "")).partition(":")[0] or "other" for x in rejected)
    values: dict[str, list[float]] = {}
    for row in rows + [x.get("row") or {} for x in rejected]:
        for name, v in _scores(row).items():
            values.setdefault(name, []).append(float(v))
    usage = {"requests": 0, "tokens": 0, "seconds": 0.0}
    for rec in records:
        for k in usage:
            usage[k] += rec["usage"].get(k, 0) or 0
    usage["seconds"] = round(float(usage["seconds"]), 3)
    candidates = sum(int(rec.get("candidates", 0)) for rec in records) or (len(rows) + len(rejected))
    return {
        "version": 1,
        "generator": generator,
        "teacher": teacher,
        "units": {"total": total, "done": len(records)},
        "rows": len(rows),
        "candidates": candidates,
        "rejected": dict(sorted(by_reason.items())),
        "scores": {
            name: {"mean": sum(v) / len(v), "min": min(v), "max": max(v), "histogram": histogram(v)}
            for name, v in sorted(values.items())
        },
        "usage": usage,
        "budget": {**budget, "stopped_by": stopped_by},
        "examples": {
            "kept": rows[:3],
            "rejected": [{"reason": x.get("reason"), "row": x.get("row")} for x in _spread(rejected)[:3]],
        },
    }


def _spread(rejected: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rejected examples of different reasons first: three of one kind say less than one of each."""
    firsts: dict[str, dict[str, Any]] = {}
    for x in rejected:
        firsts.setdefault(str(x.get("reason", "")).partition(":")[0], x)
    rest = [x for x in rejected if all(x is not f for f in firsts.values())]
    return list(firsts.values()) + rest


def _bar(n: int, top: int, width: int = 30) -> str:
    return "#" * (round(width * n / top) if top else 0)


def _short(value: Any, limit: int = 300) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_markdown(report: dict[str, Any]) -> str:
    units = report["units"]
    lines = [
        f"# Synthetic data: {report['generator']}",
        "",
        f"Teacher: `{report['teacher']}`",
        "",
        "| | |",
        "|---|---|",
        f"| units done | {units['done']}{'' if units['total'] is None else ' of ' + str(units['total'])} |",
        f"| candidates | {report['candidates']} |",
        f"| rows kept | {report['rows']} |",
        f"| rejected | {sum(report['rejected'].values())} |",
        f"| requests | {report['usage']['requests']} |",
        f"| tokens | {report['usage']['tokens']} |",
        f"| seconds | {report['usage']['seconds']:.1f} |",
    ]
    stopped = report["budget"].get("stopped_by")
    if stopped:
        lines += ["", f"Stopped by the budget's `{stopped}` limit ({report['budget'].get(stopped)})."]
    if report["rejected"]:
        lines += ["", "## Rejected by reason", "", "| reason | count |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in report["rejected"].items()]
    for name, s in report["scores"].items():
        lines += ["", f"## Score: {name}", "", f"mean {s['mean']:.3g}, min {s['min']:.3g}, max {s['max']:.3g}", ""]
        top = max((b[2] for b in s["histogram"]), default=0)
        lines += ["```"]
        lines += [
            f"{lo:>8.3g}{'' if lo == hi else f' – {hi:<8.3g}'} {n:>5} {_bar(n, top)}" for lo, hi, n in s["histogram"]
        ]
        lines += ["```"]
    if report["examples"]["kept"]:
        lines += ["", "## Kept (examples)", ""]
        lines += [f"- `{_short(r)}`" for r in report["examples"]["kept"]]
    if report["examples"]["rejected"]:
        lines += ["", "## Rejected (examples)", ""]
        lines += [f"- {x['reason']}: `{_short(x['row'])}`" for x in report["examples"]["rejected"]]
    return "\n".join(lines) + "\n"


def write_report(folder: Path, report: dict[str, Any]) -> None:
    from llmforge.runs import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "report.json", json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    atomic_write_text(folder / "report.md", render_markdown(report))
