"""`llmforge demo`: write the demo project, run its pipeline here, then summarise what it learnt.

A thin command over the core: the project is a plain forge.toml (runnable with `llmforge run`), the
run goes through `run_pipeline` with the CLI's event printer, and the summary reads the run's
manifest and the eval stage's report artifact (through tasks.demo_figures).
"""

# No `from __future__ import annotations`: Typer reads these commands' Annotated parameters at every start,
# and string annotations would be compiled and evaluated there (twice per command, ~15 ms in all).

import json
from pathlib import Path
from typing import Annotated

import typer


def demo(
    dir: Annotated[Path, typer.Option("--dir", "-d", help="Folder to write the project into.")] = Path("llmforge-demo"),
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help="A smaller world and a shorter pretraining: about a minute on 2 cores (the tests run it); shows the "
            "learning effect less clearly.",
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Run every stage again, ignoring cached results.")] = False,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the generated world and of training.")] = None,
) -> None:
    """Train a tiny model end to end on CPU: curate -> pretrain -> SFT -> DPO -> merge -> GGUF on a
    generated world, then evaluate.

    Writes a self-contained project (generated data and a documented forge.toml) into --dir and runs it.
    The full setting takes a few minutes on a 2-core CPU. Exit code: 0 done, 1 a stage failed, 130 stopped.
    """
    from llmforge.cli.common import console, registry
    from llmforge.cli.render import EventPrinter
    from llmforge.pipeline import load_pipeline
    from llmforge.runner import RunRequest, run_pipeline
    from llmforge_plugins.demo.project import write_project

    out = console()
    root = dir.expanduser().resolve()
    config, counts, note = write_project(root, quick=quick, seed=42 if seed is None else seed)
    out.print(f"[bold]llmforge demo[/] ({'quick' if quick else 'full'} setting) in {root}")
    out.print(
        f"  generated world: {counts['facts']} facts ({counts['train_facts']} for training, "
        f"{counts['heldout_facts']} held out); {counts['documents']} corpus documents, "
        f"{counts['sft_rows']} SFT rows, {counts['dpo_rows']} DPO pairs, {counts['eval_items']} "
        f"evaluation questions"
    )
    if note:
        out.print(f"  [yellow]{note}[/]")
    out.print(f"  pipeline: {config}  (rerun with [bold]llmforge run -c {config}[/])")

    pipe = load_pipeline(config, registry=registry())
    result = run_pipeline(pipe, RunRequest(force=force, listeners=[EventPrinter()]), registry=registry())
    print_summary(result, root, out)
    raise typer.Exit(result.exit_code)


def _rel(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


def print_summary(result, root: Path, out) -> None:
    from rich.table import Table

    from llmforge.cli.common import fmt_duration, styled

    table = Table(title=f"demo run {result.run_id}", title_justify="left")
    for col in ("stage", "status", "time", "final loss", "artifact"):
        table.add_column(col)
    report_path = None
    old_report = False
    for name, st in result.stages.items():
        loss = (st.get("info") or {}).get("final_loss")  # a cached stage carries its run's info
        arts = st.get("artifacts", {})
        # (curate writes a report artifact too; demo_eval is the stage of projects an older demo wrote)
        if "report" in arts and st.get("uses") in ("eval", "demo_eval"):
            report_path = Path(arts["report"]["path"]) / "report.json"
            old_report = st.get("uses") == "demo_eval"
        duration = st.get("duration")
        time_text = fmt_duration(duration) if st.get("status") != "cached" else "cached"
        table.add_row(
            name,
            styled(st.get("status", "?")),
            time_text,
            f"{loss:.4f}" if isinstance(loss, (int, float)) else "-",
            ", ".join(_rel(a["path"], root) for a in arts.values()) or "-",
        )
    out.print(table)
    curated = (result.stages.get("curate", {}).get("info") or {}).get("curate")
    if curated:
        removed = ", ".join(f"{step} {n}" for step, n in curated["removed"].items())
        changed = ", ".join(f"{step} {n}" for step, n in curated.get("changed", {}).items())
        out.print(
            f"curate: kept {curated['rows_out']} of {curated['rows_in']} corpus documents (removed: {removed})"
            + (f"; rewrote: {changed}" if changed else "")
        )
    if report_path is not None and report_path.exists():
        from llmforge_plugins.demo.tasks import demo_figures

        figures = json.loads(report_path.read_text()) if old_report else demo_figures(report_path.parent)
        print_evaluation(figures, report_path, out)
    if result.status == "stopped":
        out.print(
            f"stopped; continue with [bold]llmforge run --resume --run {result.run_id} -c {root / 'forge.toml'}[/]"
        )
    elif result.status == "done":
        out.print(
            f"next: [bold]llmforge run -c {root / 'forge.toml'}[/] reuses every finished stage; "
            f"change an option with --set (e.g. --set dpo.beta=0.2) and only what it affects runs again"
        )


def print_evaluation(report: dict, path: Path, out) -> None:
    from rich.table import Table

    res = report["results"]
    labels = list(res)
    table = Table(
        title=f"evaluation on {report['items']} held-out questions (never asked in SFT)", title_justify="left"
    )
    table.add_column("metric")
    for label in labels:
        table.add_column(label, justify="right")
    rows = [
        ("answers that end their turn", "ended_turn"),
        ("QA accuracy", "accuracy"),
        ("preferred (direct) answers", "preferred_rate"),
        ("direct and correct", "preferred_and_correct"),
        ("log p(direct) - log p(hedging)", "logp_margin"),
    ]
    for title, key in rows:
        if all(key in res[label] for label in labels):
            table.add_row(title, *(f"{res[label][key]:.2f}" for label in labels))
    out.print(table)
    acc = {k: r["accuracy"] for k, r in res.items()}
    pref = {k: r["preferred_rate"] for k, r in res.items()}
    out.print(
        f"evaluation: accuracy pretrained {acc.get('pretrained', 0):.2f} -> SFT {acc.get('sft', 0):.2f}"
        + (f" -> DPO {acc['dpo']:.2f}" if "dpo" in acc else "")
        + (f"; merged (SFT and DPO, halfway) {acc['merged']:.2f}" if "merged" in acc else "")
    )
    if "dpo" in pref:
        out.print(
            f"evaluation: preferred answers SFT {pref.get('sft', 0):.2f} -> DPO {pref['dpo']:.2f}"
            + (f"; RLAIF (pairs of its own answers, judged by a rule) {pref['rlaif']:.2f}" if "rlaif" in pref else "")
            + (f"; merged {pref['merged']:.2f}" if "merged" in pref else "")
        )
    if report.get("dpo_reward_accuracy") is not None:
        out.print(
            f"evaluation: DPO raised log p(direct) - log p(hedging) over the SFT model on "
            f"{report['dpo_reward_accuracy']:.0%} of the held-out pairs"
        )
    probe = report.get("knowledge_probe")
    if probe:
        out.print(
            f'evaluation: prompted like the corpus ("The capital of X is"), the pretrained model completes '
            f"{probe['accuracy']:.0%} of the held-out facts: what SFT can make answerable"
        )
    g = report.get("gguf")
    if g:
        if g.get("questions"):
            out.print(
                f"gguf: llama.cpp on the F32 export gives transformers' greedy answer, word for word, on "
                f"{g['same_greedy']}/{g['questions']} held-out questions"
            )
        for row in g.get("scorecard", []):
            out.print(
                f"gguf: {row['file']}: {row['bytes'] / 1e6:.1f} MB, {row['bpw']:.1f} bits/weight, top-1 token "
                f"agreement with the model {row['top1']:.1%} of held-out positions, "
                f"mean KL {row['mean_kld']:.4f}",
                highlight=False,
            )
        if g.get("accuracy"):
            out.print(
                "gguf: held-out accuracy in llama.cpp: "
                + ", ".join(f"{name} {acc:.2f}" for name, acc in g["accuracy"].items() if acc is not None),
                highlight=False,
            )
        if g.get("chat"):
            out.print(
                f"gguf: chat with {g['chat']['file']}: {g['chat']['question']!r} -> {g['chat']['answer']!r}",
                highlight=False,
            )
    out.print(f"report: {path.parent / 'report.md'}", highlight=False)
