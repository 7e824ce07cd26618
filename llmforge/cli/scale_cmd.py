"""`llmforge doctor` (this machine and its software) and `llmforge plan` (memory and disk per stage).
The fit check `llmforge run` makes before it starts is the core's (llmforge.planning.fit_check)."""

# No `from __future__ import annotations`: Typer reads these commands' Annotated parameters at every start,
# and string annotations would be compiled and evaluated there (twice per command, ~15 ms in all).

from pathlib import Path
from typing import Annotated

import typer

from llmforge.cli.common import ConfigOption, JsonOption, SetOption, console, print_json, print_table, runs_dir
from llmforge.formatting import fmt_bytes


def doctor(
    as_json: JsonOption = False,
    runs: Annotated[
        Path | None,
        typer.Option("--runs-dir", help="Where runs go (for free disk); default from ./forge.toml, else ./runs."),
    ] = None,
) -> None:
    """What this machine and its Python environment can do: versions, known conflicts, CPU, RAM, disk,
    GPUs, NCCL/gloo. Problems are listed as warnings; the exit code is 0."""
    from llmforge.doctor import collect

    report = collect(runs_dir(runs))
    if as_json:
        print_json(report)
        return
    out = console()
    o, c, m = report["os"], report["cpu"], report["memory"]
    # print_table: rich tables on a terminal, whole lines one record each when piped (nothing folded)
    feats = c["features"]
    flags = ", ".join(f"{k}" if v else f"no {k}" for k, v in feats.items() if k != "bf16_fast")
    system = [
        ["llmforge", report["llmforge"]],
        ["OS", f"{o['system']} {o['release']} ({o['machine']})"],
        ["Python", f"{report['python']['version']} ({report['python']['executable']})"],
        ["CPU", f"{c['model']}, {c['physical_cores']} cores / {c['logical_cores']} threads"],
        ["CPU features", f"{flags}; bf16 {'fast' if feats['bf16_fast'] else 'emulated (slow)'}"],
        ["RAM", f"{m['total_gib']} GiB, {m['available_gib']} GiB available"],
    ]
    d = report["disk"]
    system.append(["disk", f"{d['free_gib']} GiB free in {d['path']}" if d["free_gib"] is not None else "unknown"])
    t = report["torch"]
    if "version" in t:
        dist = t.get("distributed", {})
        system.append(
            [
                "torch",
                f"{t['version']}, CUDA {t['cuda_build'] or 'none (CPU build)'}"
                f"{', usable' if t['cuda_available'] else ''}{', MPS' if t['mps_available'] else ''}",
            ]
        )
        system.append(["collectives", ", ".join(f"{k} {'yes' if dist.get(k) else 'no'}" for k in ("nccl", "gloo"))])
    if "llama_cpp" in report:
        system.append(["llama.cpp AMX kernels", report["llama_cpp"]["line"]])
    print_table(["system", "value"], system)
    print_table(["packages", "version"], [[name, version] for name, version in report["packages"].items()])

    if report["gpus"]:
        print_table(
            ["#", "name", "memory", "compute", "bf16", "driver"],
            [
                [
                    str(g["index"]),
                    g["name"],
                    f"{g['memory_total_gib']} GiB",
                    g["compute_capability"] or "?",
                    {True: "yes", False: "no", None: "?"}[g["bf16"]],
                    g["driver"] or "?",
                ]
                for g in report["gpus"]
            ],
            title=f"GPUs (from {report['gpu_source']})",
        )
    else:
        out.print("GPUs: none found")
    for w in report["warnings"]:
        out.print(f"[yellow]warning[/]: {w}", highlight=False)
    if not report["warnings"]:
        out.print("[green]no problems found[/]")


def plan(
    config: ConfigOption = Path("forge.toml"),
    overrides: SetOption = None,
    as_json: JsonOption = False,
    gpu: Annotated[
        str | None,
        typer.Option(
            "--gpu", help="Plan for GPUs described instead of this machine's: [N x]SIZE, e.g. 8GB or 2x24GB (bf16)."
        ),
    ] = None,
    ram: Annotated[
        str | None,
        typer.Option("--ram", help="Plan for this much host RAM (e.g. 64GB); with no --gpu, a CPU-only machine."),
    ] = None,
) -> None:
    """Estimated peak memory (per process) and disk of each stage of forge.toml, against this machine (or
    one described with --gpu/--ram), with what to change when a stage does not fit. Exit code 0 (the
    estimate is advice)."""
    from llmforge.cli.common import registry
    from llmforge.errors import UsageError
    from llmforge.pipeline import load_pipeline
    from llmforge.planning import described_machine
    from llmforge.planning import plan as make_plan

    machine = None
    if gpu is not None or ram is not None:
        try:
            machine = described_machine(gpu, ram)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    result = make_plan(load_pipeline(config, overrides or [], registry=registry()), machine=machine)
    result.described = machine is not None
    if as_json:
        print_json(result.to_json())
        return
    render_plan(result)


def fmt_size(n: float | None) -> str:
    """A size as the plan shows it: two decimals (3.25 GiB), to tell near estimates apart."""
    return fmt_bytes(n, digits=2)


def render_plan(result) -> None:
    from rich.table import Table

    out = console()
    m = result.machine
    gpus = ", ".join(f"{g['name']} {fmt_size(g['memory_total_bytes'])}" for g in m.gpus) or "no GPU"
    disk = f"{fmt_size(m.disk_free)} free disk" if m.disk_free is not None else "free disk unknown"
    if result.described:
        out.print(
            f"machine (described): {fmt_size(m.ram_total)} RAM, {len(m.gpus) or 'no'} GPU{'s' * (len(m.gpus) != 1)}"
            + (f" of {fmt_size(m.gpus[0]['memory_total_bytes'])}" if m.gpus else "")
        )
    else:
        out.print(f"machine: {fmt_size(m.ram_total)} RAM ({fmt_size(m.ram_available)} available), {gpus}, {disk}")
    style = {"fits": "green", "tight": "yellow", "does not fit": "red"}
    for sp in result.stages:
        est = sp.estimate
        out.print()
        if est is None:
            out.print(f"[bold]{sp.name}[/] ({sp.kind}): [dim]{sp.note}[/]", highlight=False)
            continue
        what = []
        if sp.shape is not None:
            sh = sp.shape
            what.append(f"{sh.params() / 1e6:,.1f}M parameters ({sh.dtype})")
            if sh.moe:  # weights and optimizer count every expert; activations only the active ones
                what.append(
                    f"{sh.active_params() / 1e6:,.1f}M active ({sh.experts_per_tok} of {sh.experts} experts a token)"
                )
        if sp.training is not None:
            t = sp.training
            how = "QLoRA" if t.qlora else f"LoRA r={t.lora_r}" if t.lora else "full"
            what.append(
                f"{how}, {t.precision}, micro-batch {t.micro_batch} x {t.seq} tokens"
                + (", gradient checkpointing" if t.checkpointing else "")
                + f", {sp.backend.describe()}"
            )
        out.print(f"[bold]{sp.name}[/] ({sp.kind}): {'; '.join(what)}", highlight=False)
        table = Table(show_header=True, box=None, pad_edge=False)
        table.add_column("estimate", no_wrap=True)
        table.add_column("size", justify="right", no_wrap=True)
        for k, v in est.parts.items():
            table.add_row(f"  {k}", fmt_size(v))
        where = "GPU" if est.device == "cuda" else "RAM"
        limit = f" of {fmt_size(sp.device_limit)}" if sp.device_limit else ""
        table.add_row(f"[bold]peak per process ({where})[/]", f"[bold]{fmt_size(est.peak)}[/]{limit}")
        for k, v in est.host_parts.items():
            table.add_row(f"  host RAM: {k}", fmt_size(v))
        if est.host:
            table.add_row("[bold]host RAM per node[/]", f"[bold]{fmt_size(est.host)}[/]")
        for k, v in est.disk_parts.items():
            table.add_row(f"  disk: {k}", fmt_size(v))
        table.add_row("[bold]disk[/]", f"[bold]{fmt_size(est.disk)}[/]")
        out.print(table)
        out.print(
            f"[{style.get(sp.verdict, 'white')}]{sp.verdict}[/]" + "".join(f"; {p}" for p in sp.problems),
            highlight=False,
        )
        for n in est.notes:
            out.print(f"  note: {n}", highlight=False)
        for s in sp.suggestions:
            mark = "[green]fits[/]" if s.fits else "[red]still too big[/]"
            out.print(f"  try {s.text}: {fmt_size(s.peak)} ({mark})  {s.set_args()}", highlight=False)
    out.print(f"\ndisk for the whole pipeline: about {fmt_size(result.disk_total)}")


def register(app: typer.Typer) -> None:
    app.command()(doctor)
    app.command()(plan)
