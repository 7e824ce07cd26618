"""The TUI's start-up and its cost while following a busy run.

Usage: python bench/tui.py [--runs 5] [--seconds 20] [--rate 100] [--history 100000] [--write docs/benchmarks.md]
       python bench/tui.py --baseline-python PY --baseline-script OLD/bench/tui.py [--runs 7]

The second form times only the first paint, of this install and of a baseline install (the baseline's own
copy of this script drives it, as the app's internals may differ), interleaved run by run.

1. Launch to first paint: `llmforge tui` through the real CLI entry (`llmforge.cli.main`: Typer, the
   plugin registry, the app), from process spawn until the Project screen has been drawn once, with
   Textual's headless driver (everything but the terminal writes). Also checks that no torch was
   imported. Goal (issue 6): under 1 s. `python -c pass` is measured alongside.
2. Following a run: a writer process appends `--rate` events a second (metric, progress and log
   events, through the core's EventWriter, holding the run's lock like a real run) to a run whose
   events.jsonl already holds `--history` metric events; the app follows it on the Monitor screen.
   Reported: the time until the history is loaded, and the app process's CPU time over `--seconds`
   of following, as a percentage of one core. Goal: under 15 %.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import _update  # noqa: E402 - the section writer shared by the bench scripts

PAINT_GOAL_S = 1.0
CPU_GOAL_PCT = 15.0
METRICS = ("loss", "learning_rate", "grad_norm", "tokens_per_s")


# ---------------------------------------------------------------------------------------------------
# children (this same file, run with --child-*)


def child_paint(project: str) -> None:
    """`llmforge tui -c forge.toml` with the app swapped for one that reports its first paint."""
    import llmforge.tui.app as tui_app

    class Timed(tui_app.LlmforgeApp):
        def on_ready(self) -> None:
            self.set_interval(0.005, self._check)

        def _check(self) -> None:
            screen = self.screen
            if type(screen).__name__ == "ProjectScreen" and screen.query("AreaTabs") and not getattr(self, "_done", 0):
                self._done = 1
                self.call_after_refresh(self._report)

        def _report(self) -> None:
            print(json.dumps({"painted": time.time(), "torch": "torch" in sys.modules}), flush=True)
            self.exit()

    tui_app.run_app = lambda state, area="project": Timed(state, area).run(headless=True, size=(120, 40))
    from llmforge.cli import main

    main(["tui", "-c", str(Path(project) / "forge.toml")])


def child_follow(project: str, run_id: str, seconds: float, history: int) -> None:
    """Follow `run_id` on the Monitor for `seconds` after its history loaded; print CPU use."""
    from llmforge.tui.app import LlmforgeApp
    from llmforge.tui.state import AppState

    state = AppState.discover(Path(project) / "forge.toml", Path(project) / "runs")
    state.selected_run = run_id
    result = {}

    class Following(LlmforgeApp):
        def on_ready(self) -> None:
            self.t0 = time.monotonic()
            self.set_interval(0.05, self._check)

        def _check(self) -> None:
            mon = self.screen
            model = getattr(mon, "model", None)
            if model is None:
                return
            if "loaded_s" not in result:
                if model.events_seen >= history:
                    result["loaded_s"] = time.monotonic() - self.t0
                    self.cpu0 = _cpu()
                    self.wall0 = time.monotonic()
                    self.seen0 = model.events_seen
                return
            if time.monotonic() - self.wall0 >= seconds:
                wall = time.monotonic() - self.wall0
                result.update(
                    cpu_pct=100 * (_cpu() - self.cpu0) / wall,
                    wall_s=wall,
                    events=model.events_seen - self.seen0,
                    points=len(mon.query_one("#chart-loss").data[0]),
                )
                self.exit()

    Following(state, "monitor").run(headless=True, size=(120, 40))
    print(json.dumps(result), flush=True)


def child_write(run_dir: str, rate: float, seconds: float) -> None:
    """A stand-in run: holds the lock, appends `rate` events a second for `seconds`, then ends."""
    from llmforge.events import EventWriter
    from llmforge.runs import EVENTS, RunLock

    d = Path(run_dir)
    lock = RunLock(d)
    lock.acquire()
    events = EventWriter(d / EVENTS, d.name)
    step = int(json.loads((d / "bench.json").read_text())["step"])
    print("writing", flush=True)
    period, start, n = 1.0 / rate, time.monotonic(), 0
    try:
        while time.monotonic() - start < seconds:
            kind = n % 4
            if kind == 0:
                step += 1
                events.emit("metric", stage="train", step=step, values=_values(step))
            elif kind == 1:
                events.emit("progress", stage="train", done=step, total=10**7, unit="step")
            else:
                events.emit("log", stage="train", level="info", message=f"step {step}: all is well")
            n += 1
            time.sleep(max(0.0, start + n * period - time.monotonic()))
        events.emit("run_end", status="done", exit_code=0, stages={"train": "done"})
    finally:
        events.close()
        lock.release()


def _values(step: int) -> dict:
    return {
        "loss": 4.0 / (1 + step / 500),
        "learning_rate": 3e-4,
        "grad_norm": 1.0 + (step % 7) / 10,
        "tokens_per_s": 1000.0 + step % 50,
    }


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------------------------------------------
# the parent


def make_project(root: Path, history: int) -> str:
    """A forge.toml, and a run whose events.jsonl holds `history` metric events already."""
    from llmforge.runs import EVENTS, MANIFEST, atomic_write_json

    (root / "forge.toml").write_text('[[stages]]\nname = "train"\nuses = "shell"\ncommand = "true"\n')
    run_id = "bench-run"
    d = root / "runs" / run_id
    d.mkdir(parents=True)
    atomic_write_json(
        d / MANIFEST,
        {
            "id": run_id,
            "created": time.time(),
            "config_path": str(root / "forge.toml"),
            "status": "running",
            "stages": {"train": {"uses": "shell", "status": "running"}},
        },
    )
    now = time.time()
    with open(d / EVENTS, "w") as fh:
        fh.write(
            json.dumps(
                {
                    "type": "run_start",
                    "time": now,
                    "run": run_id,
                    "stages": ["train"],
                    "resume": False,
                    "selected": ["train"],
                }
            )
            + "\n"
        )
        fh.write(
            json.dumps({"type": "stage_start", "time": now, "run": run_id, "stage": "train", "uses": "shell"}) + "\n"
        )
        for step in range(1, history - 1):
            fh.write(
                json.dumps(
                    {
                        "type": "metric",
                        "time": now,
                        "run": run_id,
                        "stage": "train",
                        "step": step,
                        "values": _values(step),
                    }
                )
                + "\n"
            )
    (d / "bench.json").write_text(json.dumps({"step": history}))
    return run_id


def measure_paint(project: Path, runs: int) -> tuple[list[float], bool]:
    times, torch = [], False
    for _ in range(runs + 1):  # the first run warms the file cache and is dropped
        t = time.time()
        out = subprocess.run(
            [sys.executable, __file__, "--child-paint", str(project)],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        times.append(rec["painted"] - t)
        torch |= rec["torch"]
    return times[1:], torch


def compare_paint(python: Path, script: Path, runs: int) -> int:
    """First paint of this install and of a baseline one, in turn run by run, on the same project."""
    from measure import load_line, machine_line

    sides = {"this": [sys.executable, __file__], "baseline": [str(python), str(script)]}
    times: dict[str, list[float]] = {k: [] for k in sides}
    with tempfile.TemporaryDirectory(prefix="llmforge-bench-tui-") as tmp:
        make_project(Path(tmp), 1000)
        for i in range(runs + 1):  # the first round warms the caches and is dropped
            for name, cmd in sides.items():
                t = time.time()
                out = subprocess.run(
                    [*cmd, "--child-paint", tmp], capture_output=True, text=True, check=True, timeout=120
                )
                if i:
                    times[name].append(json.loads(out.stdout.strip().splitlines()[-1])["painted"] - t)
    print(f"- {machine_line()}, {runs} interleaved runs each, Textual's headless driver")
    print(f"- {load_line()}")
    for name, ts in times.items():
        print(
            f"- {name}: first paint median {statistics.median(ts) * 1000:.0f} ms "
            f"(min {min(ts) * 1000:.0f}, max {max(ts) * 1000:.0f})"
        )
    print(f"- this / baseline: {statistics.median(times['this']) / statistics.median(times['baseline']):.2f}")
    return 0


def timed(cmd: list[str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        out.append(time.perf_counter() - t)
    return out


def measure_follow(project: Path, run_id: str, rate: float, seconds: float, history: int) -> dict:
    run_dir = project / "runs" / run_id
    # The writer runs a little longer than the app follows: the app must see a live run throughout.
    writer = subprocess.Popen(
        [sys.executable, __file__, "--child-write", str(run_dir), str(rate), str(seconds + 60)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "writing"
        out = subprocess.run(
            [sys.executable, __file__, "--child-follow", str(project), run_id, str(seconds), str(history)],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 300,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        writer.terminate()
        writer.wait()


def main() -> int:
    from measure import load_line, machine_line  # CPU model, flags and load in every section

    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--history", type=int, default=100_000)
    ap.add_argument("--write", type=Path, help="update this markdown file's tui section")
    ap.add_argument("--baseline-python", type=Path, help="compare the first paint with this interpreter's llmforge")
    ap.add_argument("--baseline-script", type=Path, help="the baseline's bench/tui.py (drives its own app)")
    args = ap.parse_args()
    if args.baseline_python:
        return compare_paint(args.baseline_python, args.baseline_script, args.runs)
    with tempfile.TemporaryDirectory(prefix="llmforge-bench-tui-") as tmp:
        root = Path(tmp)
        run_id = make_project(root, args.history)
        base = timed([sys.executable, "-c", "pass"], args.runs)
        paint, torch = measure_paint(root, args.runs)
        follow = measure_follow(root, run_id, args.rate, args.seconds, args.history)
    med = statistics.median(paint)
    paint_ok = med < PAINT_GOAL_S and not torch
    cpu_ok = follow["cpu_pct"] < CPU_GOAL_PCT
    lines = [
        f"- {machine_line()}, {args.runs} runs, Textual's headless driver (no terminal output)",
        f"- {load_line()}",
        f"- `python -c pass`: median {statistics.median(base) * 1000:.0f} ms",
        f"- `llmforge tui`, spawn to the Project screen's first paint: median {med * 1000:.0f} ms "
        f"(min {min(paint) * 1000:.0f}, max {max(paint) * 1000:.0f}); torch imported: {'yes' if torch else 'no'}",
        f"- following a run writing {args.rate:g} events/s on the Monitor, after loading a history of "
        f"{args.history} events in {follow['loaded_s']:.1f} s: {follow['cpu_pct']:.1f} % of one core over "
        f"{follow['wall_s']:.0f} s ({follow['events']} events; {follow['points']} points kept for the loss chart)",
        f"- goals: first paint under {PAINT_GOAL_S * 1000:.0f} ms without torch: {'met' if paint_ok else 'NOT met'}; "
        f"CPU under {CPU_GOAL_PCT:g} %: {'met' if cpu_ok else 'NOT met'}",
    ]
    print("\n".join(lines))
    if args.write:
        if "<!-- bench:tui -->" not in (args.write.read_text() if args.write.exists() else ""):
            # _update appends missing sections under the start-up heading: give this one its own.
            with open(args.write, "a") as fh:
                fh.write(
                    "\n## TUI (`bench/tui.py`)\n\nStart-up to first paint and CPU use while following a busy"
                    " run. Goals: under 1 s, under 15 % of one core.\n\n<!-- bench:tui -->\n<!-- /bench:tui -->\n"
                )
        _update(args.write, "tui", "\n".join(lines))
    return 0 if paint_ok and cpu_ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child-paint":
        child_paint(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "--child-follow":
        child_follow(sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--child-write":
        child_write(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))
    else:
        sys.exit(main())
