"""The eval report: its files, its leaderboard, and the gate and select decisions made from it.

A report artifact is a folder (the layout every reader agrees on: the TUI, `llmforge runs compare`)::

    report.json                  {"version": 1, "models": [...], "tasks": [...], "results": [...],
                                  "gates": [...], "selected": {...} | null}
    report.md                    the leaderboard (models x tasks, "value ± stderr (n)"), gates, selection
    items/<model>/<task>.jsonl   one record per item (prompt, answer, score, ...)

Gates and select are pure functions of a report's results (tested on their own): the stage and the
command only call them. A metric is named ``<task>.<metric>`` (``qa.acc``); a bare ``<task>`` means that
task's primary metric. Nothing heavy is imported here.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from llmforge.errors import DataError, UsageError

VERSION = 1
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


# ------------------------------------------------------------------------------------------------
# files


def item_file(label: str, task: str) -> str:
    """Where a (model, task)'s per-item records live inside the report folder, relative to it. A label such
    as ``gguf:Q4_K_M`` keeps its name but for characters a file name cannot portably hold."""
    return f"items/{_safe(label)}/{_safe(task)}.jsonl"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"


def _finite(value: Any) -> Any:
    """NaN and infinities as null: report.json stays strict JSON (a task with no items has no value)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_items(folder: Path, label: str, task: str, items: Iterable[dict[str, Any]]) -> str:
    """Write one (model, task)'s item records as JSON Lines under ``folder``; the path relative to it."""
    rel = item_file(label, task)
    path = Path(folder) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for item in items:
            fh.write(json.dumps(_finite(item), ensure_ascii=False, default=str) + "\n")
    return rel


def write_report(folder: Path, report: dict[str, Any]) -> None:
    """Write report.json and report.md into ``folder`` (each atomically: a reader never sees half a file).
    The per-item files are written with :func:`write_items`."""
    from llmforge.runs import atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = _finite({"version": VERSION, **{k: v for k, v in report.items() if k != "version"}})
    atomic_write_text(folder / REPORT_JSON, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    atomic_write_text(folder / REPORT_MD, leaderboard_markdown(data))


def read_report(where: Path | str) -> dict[str, Any]:
    """A report from its folder or its report.json. A missing, unreadable or foreign file is a DataError
    naming it."""
    path = Path(where)
    if path.is_dir():
        path = path / REPORT_JSON
    if not path.is_file():
        raise DataError(f"{path}: no eval report here (report.json not found)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable eval report: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise DataError(f"{path}: not an eval report (no results list)")
    version = data.get("version")
    if version != VERSION:
        raise DataError(f"{path}: eval report version {version!r}; this llmforge reads version {VERSION}")
    return data


def read_items(folder: Path, label: str, task: str) -> list[dict[str, Any]]:
    """The per-item records of one (model, task) of a report folder ([] when there are none)."""
    path = Path(folder) / item_file(label, task)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------
# reading figures


def split_metric(name: str) -> tuple[str, str | None]:
    """``qa.acc`` -> ("qa", "acc"); ``qa`` -> ("qa", None): the task's primary metric. The task is what
    comes before the last dot, so task names with dots (``mmlu.anatomy.acc``) still work."""
    task, dot, metric = name.rpartition(".")
    return (task, metric) if dot else (name, None)


def _task_entry(report: dict[str, Any], task: str) -> dict[str, Any] | None:
    return next((t for t in report.get("tasks", []) if t.get("name") == task), None)


def resolve_metric(report: dict[str, Any], name: str) -> tuple[str, str]:
    """(task, metric) of a gate's or select's metric name, the primary metric filled in; UsageError when the
    report has no such task."""
    task, metric = split_metric(name)
    entry = _task_entry(report, task)
    if entry is None and metric is not None and _task_entry(report, name) is not None:
        task, metric, entry = name, None, _task_entry(report, name)  # a task name with a dot and no metric
    if entry is None:
        known = ", ".join(t["name"] for t in report.get("tasks", [])) or "none"
        raise UsageError(f"metric {name!r}: no task {task!r} in this eval (tasks: {known})")
    return task, metric or entry.get("primary") or ""


def figure(report: dict[str, Any], label: str, task: str, metric: str) -> dict[str, Any] | None:
    """The metric's record ({"value", "stderr", "n", "higher_is_better"}) of one model on one task."""
    for r in report.get("results", []):
        if r.get("model") == label and r.get("task") == task:
            found = (r.get("metrics") or {}).get(metric)
            return found if isinstance(found, dict) else None
    return None


def _value(fig: dict[str, Any] | None) -> float | None:
    if fig is None:
        return None
    v = fig.get("value")
    if v is None or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        return None
    return float(v)


def fmt_figure(fig: dict[str, Any] | None) -> str:
    """'0.625 ± 0.121 (16)', '12.4 (200)' without a standard error, '-' when missing."""
    v = _value(fig)
    if fig is None:
        return "-"
    n = fig.get("n")
    tail = f" ({n})" if n is not None else ""
    if v is None:
        return f"n/a{tail}"
    se = fig.get("stderr")
    err = f" ± {_num(se)}" if isinstance(se, (int, float)) and math.isfinite(float(se)) else ""
    return f"{_num(v)}{err}{tail}"


def _num(v: float) -> str:
    return f"{v:.4g}" if abs(v) >= 1000 else f"{v:.3f}"


# ------------------------------------------------------------------------------------------------
# the leaderboard


def leaderboard_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(columns, rows): one row per model, one column per task metric (the primary first), each cell
    'value ± stderr (n)'. What report.md and `llmforge eval` show."""
    columns = ["model"]
    keys: list[tuple[str, str]] = []
    for t in report.get("tasks", []):
        names: list[str] = []
        for r in report.get("results", []):
            if r.get("task") == t["name"]:
                names += [m for m in (r.get("metrics") or {}) if m not in names]
        primary = t.get("primary")
        names.sort(key=lambda m: (m != primary,))
        for m in names:
            keys.append((t["name"], m))
            columns.append(f"{t['name']}.{m}")
    rows = []
    for m in report.get("models", []):
        label = m["label"]
        rows.append([label] + [fmt_figure(figure(report, label, task, metric)) for task, metric in keys])
    return columns, rows


def leaderboard_markdown(report: dict[str, Any]) -> str:
    """report.md: the leaderboard, the models (path, engine), the gates and the selection."""
    columns, rows = leaderboard_rows(report)
    out = ["# Evaluation", ""]
    if len(columns) > 1:
        out += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        out += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    else:
        out.append("No results.")
    tasks = report.get("tasks", [])
    if tasks:
        out += [
            "",
            "Tasks: " + "; ".join(f"`{t['name']}` ({t.get('kind')}, primary {t.get('primary')})" for t in tasks),
        ]
    out += ["", "## Models", "", "| model | engine | quant | source | path |", "|---|---|---|---|---|"]
    for m in report.get("models", []):
        out.append(
            f"| {_md(m['label'])} | {m.get('engine') or '-'} | {m.get('quant') or '-'} | "
            f"{m.get('source') or '-'} | {_md(str(m.get('path') or '-'))} |"
        )
    gates = report.get("gates") or []
    if gates:
        failed = sum(not g.get("passed") for g in gates)
        out += ["", f"## Gates: {len(gates) - failed} passed, {failed} failed", ""]
        out += [f"- {'PASS' if g.get('passed') else 'FAIL'}: {g.get('message')}" for g in gates]
    sel = report.get("selected")
    if sel:
        out += [
            "",
            "## Selected",
            "",
            f"`{sel['model']}`: best {sel['metric']} = {_num(sel['value'])}"
            + (f", published as the `{sel['kind']}` artifact" if sel.get("kind") else ""),
        ]
    return "\n".join(out) + "\n"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|")


# ------------------------------------------------------------------------------------------------
# gates and select


def match_models(report: dict[str, Any], name: str) -> list[str]:
    """The labels a gate's or select's model name means: a label (``sft``, ``gguf:Q4_K_M``), or a
    reference (``@gguf``: every model it brought, each quant of a gguf artifact). [] when none."""
    labels = [m["label"] for m in report.get("models", [])]
    if name in labels:
        return [name]
    if name.startswith("@"):
        stage = name[1:].partition(".")[0]
        return [
            m["label"]
            for m in report.get("models", [])
            if m.get("source") and str(m["source"])[1:].partition(".")[0] == stage
        ]
    return []


def _known_metrics(report: dict[str, Any], task: str, metric: str) -> str:
    """When no model has ``metric`` for ``task`` (a typo: qa.accuracy), the metrics the task does have."""
    names: list[str] = []
    for r in report.get("results", []):
        if r.get("task") == task:
            names += [m for m in (r.get("metrics") or {}) if m not in names]
    if not names or metric in names:
        return ""
    return f" ({task} has no metric {metric!r}; its metrics: {', '.join(names)})"


def _compare(value: float, reference: float, higher_is_better: bool) -> float:
    """How far ``value`` fell behind ``reference``: positive is worse, whichever way the metric goes."""
    return reference - value if higher_is_better else value - reference


def evaluate_gates(report: dict[str, Any], gates: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (gate, model) it applies to: the gate's keys, the model, the value (and the
    reference's), ``passed``, and a one-line message that names the metric, the models and the numbers.

    A gate is ``{metric, min?, max?, model?}`` (a threshold on every model, or on ``model``'s) or
    ``{metric, vs, max_drop, model?}`` (no model falls more than ``max_drop`` behind ``vs``: below it for a
    metric where higher is better, above it for perplexity). A model without a value fails its gate."""
    out: list[dict[str, Any]] = []
    for gate in gates:
        task, metric = resolve_metric(report, gate["metric"])
        shown = f"{task}.{metric}"
        base = {
            "metric": shown,
            "min": gate.get("min"),
            "max": gate.get("max"),
            "max_drop": gate.get("max_drop"),
            "vs": gate.get("vs"),
        }
        wanted = gate.get("model")
        labels = match_models(report, wanted) if wanted else [m["label"] for m in report.get("models", [])]
        if wanted and not labels:
            raise UsageError(f"gate on {shown}: model {wanted!r} is not one of the evaluated models")
        if gate.get("vs") is not None:
            refs = match_models(report, gate["vs"])
            if len(refs) != 1:
                raise UsageError(
                    f"gate on {shown}: vs {gate['vs']!r} must name one evaluated model "
                    f"({'it names ' + ', '.join(refs) if refs else 'it names none'})"
                )
            ref = refs[0]
            ref_fig = figure(report, ref, task, metric)
            ref_value = _value(ref_fig)
            hib = bool((ref_fig or {}).get("higher_is_better", True))
            max_drop = float(gate.get("max_drop") or 0.0)
            for label in labels:
                if label == ref:
                    continue
                value = _value(figure(report, label, task, metric))
                rec = {**base, "model": label, "value": value, "reference": ref_value}
                if value is None or ref_value is None:
                    missing = label if value is None else ref
                    known = _known_metrics(report, task, metric)
                    rec.update(passed=False, message=f"{shown}: no value for {missing} (gate vs {ref}){known}")
                else:
                    drop = _compare(value, ref_value, hib)
                    rec["passed"] = drop <= max_drop + 1e-12
                    way = "below" if hib else "above"
                    rec["message"] = (
                        f"{shown} of {label} = {_num(value)}, {_num(drop)} {way} {ref}'s {_num(ref_value)} "
                        f"(max_drop {_num(max_drop)})"
                        if drop > 0
                        else f"{shown} of {label} = {_num(value)}, not worse than {ref}'s {_num(ref_value)}"
                    )
                out.append(rec)
            continue
        for label in labels:
            value = _value(figure(report, label, task, metric))
            rec = {**base, "model": label, "value": value, "reference": None}
            lo, hi = gate.get("min"), gate.get("max")
            if value is None:
                rec.update(passed=False, message=f"{shown}: no value for {label}{_known_metrics(report, task, metric)}")
            else:
                broken = []
                if lo is not None and value < lo:
                    broken.append(f"< min {_num(lo)}")
                if hi is not None and value > hi:
                    broken.append(f"> max {_num(hi)}")
                limits = [f"min {_num(lo)}"] if lo is not None else []
                limits += [f"max {_num(hi)}"] if hi is not None else []
                rec["passed"] = not broken
                detail = " and ".join(broken) if broken else f"(within {', '.join(limits)})"
                rec["message"] = f"{shown} of {label} = {_num(value)} {detail}"
            out.append(rec)
    return out


def failed_gates(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [g for g in records if not g.get("passed")]


def select_best(report: dict[str, Any], metric: str, among: Sequence[str] = ()) -> dict[str, Any] | None:
    """The best model by ``metric`` (its direction from the metric: highest accuracy, lowest perplexity)
    among ``among`` (labels or @references; empty: every model). Ties go to the first listed. None when
    no candidate has a value. UsageError for a name that matches no model."""
    task, name = resolve_metric(report, metric)
    if among:
        labels: list[str] = []
        for entry in among:
            found = match_models(report, entry)
            if not found:
                raise UsageError(f"select: {entry!r} is not one of the evaluated models")
            labels += [x for x in found if x not in labels]
    else:
        labels = [m["label"] for m in report.get("models", [])]
    best: tuple[str, float] | None = None
    for label in labels:
        fig = figure(report, label, task, name)
        value = _value(fig)
        if value is None:
            continue
        hib = bool((fig or {}).get("higher_is_better", True))
        if best is None or (value > best[1] if hib else value < best[1]):
            best = (label, value)
    if best is None:
        if _known_metrics(report, task, name):
            raise UsageError(f"select: {_known_metrics(report, task, name).strip()[1:-1]}")
        return None
    model = next(m for m in report["models"] if m["label"] == best[0])
    return {"model": best[0], "metric": f"{task}.{name}", "value": best[1], "path": model.get("path")}
