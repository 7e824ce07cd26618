"""Eval reports as the front ends read them: `llmforge runs compare`, the TUI's Models screen.

An `eval` stage publishes a `report` artifact: a folder with ``report.json`` (models, tasks, results with each
metric's value, standard error and item count, gates, the selected model; the eval plugin's report.py writes
it, docs/eval.md describes it). The core must not import the plugin, so this module reads the JSON itself, and
only what the front ends show. Other stages write `report` artifacts too (curate's, the demo's old
`demo_eval`'s): a report.json without the eval layout (a ``results`` list and a ``models`` list) is not an
eval report and is passed over.

Pure Python, imported by the CLI and the TUI on demand.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmforge.runs import RunInfo

REPORT = "report.json"


@dataclass(frozen=True)
class EvalReport:
    """One eval report of a run: the stage that wrote it, its folder and its JSON."""

    stage: str
    folder: Path
    data: dict[str, Any]

    @property
    def models(self) -> list[dict[str, Any]]:
        return [m for m in self.data.get("models") or [] if isinstance(m, dict)]

    @property
    def tasks(self) -> list[dict[str, Any]]:
        return [t for t in self.data.get("tasks") or [] if isinstance(t, dict)]

    @property
    def gates(self) -> list[dict[str, Any]]:
        return [g for g in self.data.get("gates") or [] if isinstance(g, dict)]

    @property
    def selected(self) -> dict[str, Any] | None:
        sel = self.data.get("selected")
        return sel if isinstance(sel, dict) else None

    def primary(self, task: str) -> str | None:
        """The metric a leaderboard shows for `task`: the task's declared primary."""
        for t in self.tasks:
            if t.get("name") == task:
                return t.get("primary") or None
        return None

    def result(self, model: str, task: str) -> dict[str, Any] | None:
        for r in self.data.get("results") or []:
            if isinstance(r, dict) and r.get("model") == model and r.get("task") == task:
                return r
        return None

    def metric(self, model: str, task: str, metric: str) -> dict[str, Any] | None:
        res = self.result(model, task)
        value = (res or {}).get("metrics", {}).get(metric) if res else None
        return value if isinstance(value, dict) else None

    def rows(self) -> list[dict[str, Any]]:
        """One row per (model, task, metric) measured, models and tasks in the report's order, the task's
        primary metric first: {model, task, metric, name ("task.metric"), value, stderr, n,
        higher_is_better, primary}."""
        out: list[dict[str, Any]] = []
        labels = [m.get("label") for m in self.models]
        tasks = [t.get("name") for t in self.tasks]
        results = [r for r in self.data.get("results") or [] if isinstance(r, dict)]
        # results of a model or task the header does not list still count (a report cut short)
        labels += [r.get("model") for r in results if r.get("model") not in labels]
        tasks += [r.get("task") for r in results if r.get("task") not in tasks]
        for label in dict.fromkeys(labels):
            for task in dict.fromkeys(tasks):
                res = self.result(str(label), str(task))
                if res is None:
                    continue
                metrics = {k: v for k, v in (res.get("metrics") or {}).items() if isinstance(v, dict)}
                primary = self.primary(str(task))
                for name in sorted(metrics, key=lambda k: (k != primary, list(metrics).index(k))):
                    m = metrics[name]
                    out.append(
                        {
                            "model": label,
                            "task": task,
                            "metric": name,
                            "name": f"{task}.{name}",
                            "value": _number(m.get("value")),
                            "stderr": _number(m.get("stderr")),
                            "n": m.get("n"),
                            "higher_is_better": bool(m.get("higher_is_better", True)),
                            "primary": name == primary,
                        }
                    )
        return out


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def is_eval_report(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("results"), list) and isinstance(data.get("models"), list)


def read_eval_report(path: Path) -> dict[str, Any] | None:
    """The eval report in `path` (a report folder or its report.json), or None when there is none there or it
    is another kind of report. A file that cannot be read or decoded is None too: a reader skips it."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if is_eval_report(data) else None


def report_folders(run: RunInfo, stage: str) -> list[Path]:
    """Where a stage's report may be: the `report` artifact the manifest records (for a cached stage, the
    folder of the run that made it), else the stage folder's artifacts/report of this run."""
    out: list[Path] = []
    record = (run.manifest.get("stages") or {}).get(stage) or {}
    art = (record.get("artifacts") or {}).get("report")
    if isinstance(art, dict) and art.get("path"):
        out.append(Path(str(art["path"])))
    out.append(run.dir / "stages" / stage / "artifacts" / "report")
    return out


def run_reports(run: RunInfo) -> list[EvalReport]:
    """The eval reports of a run, in the order of its stages."""
    found: list[EvalReport] = []
    for stage in run.manifest.get("stages") or {}:
        for folder in report_folders(run, stage):
            data = read_eval_report(folder)
            if data is not None:
                found.append(EvalReport(stage, folder, data))
                break
    return found


def fmt_value(value: float | None, stderr: float | None = None, n: Any = None) -> str:
    """ "0.625 ± 0.048 (100)": a metric as the leaderboards show it."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = _fmt(value)
    if stderr is not None and stderr > 0:
        text += f" ± {_fmt(stderr)}"
    if n is not None:
        text += f" ({n})"
    return text


def _fmt(x: float) -> str:
    return f"{x:.4g}" if abs(x) >= 100 else f"{x:.3f}"


def fmt_delta(delta: float | None) -> str:
    return "-" if delta is None else f"{delta:+.3f}" if abs(delta) < 100 else f"{delta:+.4g}"


def _stage_summary(run: RunInfo, name: str) -> dict[str, Any]:
    st = run.record.stages.get(name)
    info = (st.info if st is not None else {}) or {}
    return {
        "status": str(run.stage_status(name)),
        "duration": st.duration if st is not None else None,
        "final_loss": info.get("final_loss") if isinstance(info.get("final_loss"), (int, float)) else None,
        "eval_loss": info.get("eval_loss") if isinstance(info.get("eval_loss"), (int, float)) else None,
    }


def compare_runs(a: RunInfo, b: RunInfo) -> dict[str, Any]:
    """Two runs side by side: each stage's status, duration and final losses, and every eval metric of their
    reports, matched by (eval stage, model label, task, metric), with the delta B - A and whether it is an
    improvement (by the metric's direction).

    Eval stages are matched by name; when each run has exactly one eval report, those two are matched
    whatever their stages are called."""
    ra, rb = run_reports(a), run_reports(b)
    pairs: dict[str, tuple[EvalReport | None, EvalReport | None]] = {}
    if len(ra) == 1 and len(rb) == 1:
        name = ra[0].stage if ra[0].stage == rb[0].stage else f"{ra[0].stage} / {rb[0].stage}"
        pairs[name] = (ra[0], rb[0])
    else:
        for rep in ra:
            pairs[rep.stage] = (rep, None)
        for rep in rb:
            pairs[rep.stage] = (pairs.get(rep.stage, (None, None))[0], rep)

    evals: list[dict[str, Any]] = []
    for stage, (x, y) in pairs.items():
        rows: dict[tuple[str, str, str], dict[str, Any]] = {}
        for side, report in (("a", x), ("b", y)):
            for row in report.rows() if report is not None else []:
                key = (str(row["model"]), str(row["task"]), str(row["metric"]))
                entry = rows.setdefault(
                    key,
                    {
                        "stage": stage,
                        "model": row["model"],
                        "task": row["task"],
                        "metric": row["metric"],
                        "name": row["name"],
                        "primary": row["primary"],
                        "higher_is_better": row["higher_is_better"],
                        "a": None,
                        "b": None,
                    },
                )
                entry[side] = {"value": row["value"], "stderr": row["stderr"], "n": row["n"]}
        for entry in rows.values():
            va = (entry["a"] or {}).get("value")
            vb = (entry["b"] or {}).get("value")
            delta = vb - va if va is not None and vb is not None else None
            entry["delta"] = delta
            entry["better"] = None if delta is None or delta == 0 else (delta > 0) == bool(entry["higher_is_better"])
            evals.append(entry)

    gates = []
    for side, reps in (("a", ra), ("b", rb)):
        for rep in reps:
            for g in rep.gates:
                gates.append({"run": side, "stage": rep.stage, **g})
    selected = {
        side: [{"stage": rep.stage, **rep.selected} for rep in reps if rep.selected]
        for side, reps in (("a", ra), ("b", rb))
    }

    stages = []
    for name in dict.fromkeys([*a.record.stages, *b.record.stages]):
        stages.append(
            {
                "name": name,
                "a": _stage_summary(a, name) if name in a.record.stages else None,
                "b": _stage_summary(b, name) if name in b.record.stages else None,
            }
        )

    def head(r: RunInfo, reps: list[EvalReport]) -> dict[str, Any]:
        return {
            "id": r.id,
            "dir": str(r.dir),
            "status": str(r.status),
            "reports": [{"stage": rep.stage, "path": str(rep.folder)} for rep in reps],
        }

    return {
        "a": head(a, ra),
        "b": head(b, rb),
        "stages": stages,
        "evals": evals,
        "gates": gates,
        "selected": selected,
    }
