"""A TIES merge (density 0.5) of three generated Llama models of ~0.5 GB each (a base and two fine-tunes),
timed with its peak RSS, against (a) the I/O floor and (b) mergekit, in the same run.

Usage: python bench/merge.py [--dir /tmp/llmforge-bench-merge] [--runs 3] [--write docs/benchmarks.md]
       python bench/merge.py --small --runs 1      (a ~20 MB model: proves the script works, in seconds)

* llmforge: `llmforge merge OUT -c ties.toml` (the command, start-up included);
* the I/O floor: a plain Python process that reads the three inputs' files once and writes an output
  of the same size as one model (chunked reads and writes, fsync), i.e. what any merge must at least do;
* mergekit: `mergekit-yaml ties.yml OUT` with the same recipe, when `mergekit-yaml` is installed (next
  to this Python, or on PATH; --mergekit PATH to choose; install it in its own virtualenv, e.g.
  `python -m venv /tmp/mergekit-venv && /tmp/mergekit-venv/bin/pip install mergekit==0.1.5`). mergekit
  is a baseline here, never a dependency. It runs twice: with its defaults, and with a small
  `--out-shard-size` (SMALL_SHARD parameters), because its default (5B parameters per shard) keeps the
  whole output in memory until it is written, so its peak RSS depends on that one setting.

Runs are interleaved (io, llmforge, mergekit, mergekit small shards; then again), at least 3 by default;
the tables give the median and the spread (min-max). The load average is recorded: figures from a
machine shared with other jobs are not final.

Each runs in a child process of a small launcher, which reports its wall time and its peak RSS
(`ru_maxrss`, as the OS reports it through wait4()). The inputs are in the page cache for all three
(they were just generated or read), so the comparison is of the work, not of the disk.

Goals (issue 4): no slower than mergekit, at most half its peak RSS, and peak RSS within
3 × largest tensor + output shard + 300 MB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

from measure import load_line, machine_line, measure  # bench/ is the script's folder, first on sys.path

MB = 1e6
SHAPE = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=5,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
SMALL = dict(
    SHAPE,
    vocab_size=4000,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
)
SMALL_SHARD = "20M"  # parameters per output shard for the second mergekit baseline (80 MB in float32)


def generate(root: Path, shape: dict = SHAPE) -> dict:
    """A base and two fine-tunes (base + small noise), float32, written once and reused."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    marker = root / "generated.json"
    if marker.exists():
        return json.loads(marker.read_text())
    root.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2)
    cfg.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in LlamaForCausalLM(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    base = {
        n: (torch.ones(s) if n.endswith("norm.weight") else torch.randn(s, generator=gen) * 0.02)
        for n, s in shapes.items()
    }
    for name, noise in (("base", 0.0), ("ft1", 0.002), ("ft2", 0.002)):
        d = root / name
        d.mkdir(exist_ok=True)
        tensors = {
            n: (t + torch.randn(t.shape, generator=gen) * noise).contiguous() if noise else t for n, t in base.items()
        }
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        cfg.save_pretrained(str(d))
        _tokenizer(d)
        del tensors
    info = {
        "params": sum(_numel(s) for s in shapes.values()),
        "largest_tensor_bytes": max(_numel(s) for s in shapes.values()) * 4,
        "model_bytes": (root / "base" / "model.safetensors").stat().st_size,
    }
    marker.write_text(json.dumps(info))
    return info


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 1000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        str(path)
    )


def recipes(root: Path) -> tuple[Path, Path]:
    toml = root / "ties.toml"
    toml.write_text(
        textwrap.dedent(f"""\
        method = "ties"
        base = "{root / "base"}"
        dtype = "float32"

        [parameters]
        density = 0.5
        normalize = true

        [[models]]
        model = "{root / "ft1"}"
        parameters = {{ weight = 1.0 }}

        [[models]]
        model = "{root / "ft2"}"
        parameters = {{ weight = 1.0 }}
        """)
    )
    yml = root / "ties.yml"
    yml.write_text(
        textwrap.dedent(f"""\
        merge_method: ties
        base_model: {root / "base"}
        models:
          - model: {root / "ft1"}
            parameters: {{density: 0.5, weight: 1.0}}
          - model: {root / "ft2"}
            parameters: {{density: 0.5, weight: 1.0}}
        parameters:
          normalize: true
        dtype: float32
        """)
    )
    return toml, yml


IO_FLOOR = r"""
import os, sys
out, inputs = sys.argv[1], sys.argv[2:]
buf = bytearray(16 << 20)
view = memoryview(buf)
size = 0
for path in inputs:                       # read every input once
    with open(path, "rb", buffering=0) as fh:
        while (n := fh.readinto(buf)):
            size = max(size, fh.tell())
with open(inputs[0], "rb", buffering=0) as src, open(out, "wb") as dst:   # write one model's worth
    while (n := src.readinto(buf)):
        dst.write(view[:n])
    dst.flush()
    os.fsync(dst.fileno())
"""


def find_mergekit(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    here = Path(sys.executable).parent / "mergekit-yaml"
    return str(here) if here.exists() else shutil.which("mergekit-yaml")


def compare(a: Path, b: Path) -> tuple[float, float]:
    """(largest absolute difference, share of elements that differ by more than 1e-6) between two merged
    models with the same tensor names."""
    from safetensors import safe_open

    def index(d: Path) -> dict:
        out = {}
        for f in d.glob("*.safetensors"):
            with safe_open(str(f), "pt") as fh:
                out.update({k: f for k in fh.keys()})  # noqa: SIM118 - a safetensors handle: keys() but no iteration
        return out

    ia, ib = index(a), index(b)
    worst, differing, total = 0.0, 0, 0
    for name in ia:
        with safe_open(str(ia[name]), "pt") as fa, safe_open(str(ib[name]), "pt") as fb:
            diff = (fa.get_tensor(name).double() - fb.get_tensor(name).double()).abs()
            worst = max(worst, float(diff.max()))
            differing += int((diff > 1e-6).sum())
            total += diff.numel()
    return worst, differing / total


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, help="where the models go (default /tmp/llmforge-bench-merge[-small])")
    ap.add_argument("--runs", type=int, default=3, help="runs of each, interleaved; median and spread reported")
    ap.add_argument("--small", action="store_true", help="a ~20 MB model instead of ~0.5 GB (a smoke test)")
    ap.add_argument("--mergekit", help="path of mergekit-yaml (default: beside this Python, else PATH)")
    ap.add_argument("--write", type=Path, help="update this markdown file's merge section")
    args = ap.parse_args()
    shape = SMALL if args.small else SHAPE
    root = (args.dir or Path("/tmp/llmforge-bench-merge" + ("-small" if args.small else ""))).resolve()
    info = generate(root, shape)
    toml, yml = recipes(root)
    llmforge = shutil.which("llmforge", path=str(Path(sys.executable).parent))
    llmforge_cmd = [llmforge] if llmforge else [sys.executable, "-m", "llmforge"]
    mergekit = find_mergekit(args.mergekit)
    inputs = [str(root / n / "model.safetensors") for n in ("base", "ft1", "ft2")]
    names = ("io", "llmforge", "mergekit", "mergekit-shards")
    results: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    loads = []
    for _ in range(args.runs):
        for name in names:
            out = root / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            if name == "io":
                out.mkdir()
                cmd = [sys.executable, "-c", IO_FLOOR, str(out / "model.safetensors"), *inputs]
            elif name == "llmforge":
                cmd = [*llmforge_cmd, "merge", str(out), "-c", str(toml)]
            else:
                if not mergekit:
                    continue
                cmd = [mergekit, str(yml), str(out), "--quiet"]
                if name == "mergekit-shards":
                    cmd += ["--out-shard-size", SMALL_SHARD]
            wall, rss = measure(cmd)
            results[name].append((wall, rss))
            print(f"{name}: {wall:.1f} s, peak RSS {rss / MB:.0f} MB", flush=True)
        loads.append(load_line())

    def med(name, i):
        return statistics.median(r[i] for r in results[name])

    def cell(name):
        walls, rss = [r[0] for r in results[name]], [r[1] / MB for r in results[name]]

        def spread(xs, f):
            return f" ({f(min(xs))}-{f(max(xs))})" if len(xs) > 1 else ""

        return (
            f"{statistics.median(walls):.1f} s{spread(walls, lambda x: f'{x:.1f}')} | "
            f"{statistics.median(rss):.0f} MB{spread(rss, lambda x: f'{x:.0f}')}"
        )

    out_bytes = sum(p.stat().st_size for p in (root / "out-llmforge").glob("*.safetensors"))
    shard = max(p.stat().st_size for p in (root / "out-llmforge").glob("*.safetensors"))
    budget = 3 * info["largest_tensor_bytes"] + shard + 300 * MB
    lf_wall, lf_rss = med("llmforge", 0), med("llmforge", 1)
    lines = [
        f"- {machine_line()}; {args.runs} run(s) each, interleaved: median (min-max)",
        f"- {loads[-1]}",
        f"- inputs: a base and two fine-tunes, Llama {shape['num_hidden_layers']} layers, hidden "
        f"{shape['hidden_size']}, vocab {shape['vocab_size']}, {info['params'] / 1e6:.1f} M parameters, "
        f"{info['model_bytes'] / 2**20:.0f} MiB each in float32; largest tensor "
        f"{info['largest_tensor_bytes'] / MB:.0f} MB; llmforge's output {out_bytes / 2**20:.0f} MiB in one shard",
        "- recipe: TIES, density 0.5, weights 1.0, normalize, float32 (`bench/merge.py` writes it as "
        "`ties.toml` and `ties.yml`)",
        "",
        "| | wall time | peak RSS |",
        "|---|---|---|",
        f"| I/O floor (read the 3 inputs, write 1 model) | {cell('io')} |",
        f"| `llmforge merge` | {cell('llmforge')} |",
    ]
    goals = [
        f"peak RSS within 3 × largest tensor + output shard + 300 MB = {budget / MB:.0f} MB: "
        f"{'met' if lf_rss <= budget else 'NOT met'} ({lf_rss / MB:.0f} MB; without the shard, which "
        f"llmforge never holds, the bound is {(budget - shard) / MB:.0f} MB: "
        f"{'met' if lf_rss <= budget - shard else 'not met'})"
    ]
    ok = lf_rss <= budget
    if results["mergekit"]:
        version = _version(mergekit)
        lines.append(
            f"| `mergekit-yaml` (mergekit {version}, defaults: 5B parameters per shard) | {cell('mergekit')} |"
        )
        lines.append(f"| `mergekit-yaml --out-shard-size {SMALL_SHARD}` | {cell('mergekit-shards')} |")
        mk_wall, mk_rss = med("mergekit", 0), med("mergekit", 1)
        sh_wall, sh_rss = med("mergekit-shards", 0), med("mergekit-shards", 1)
        diff, share = compare(root / "out-llmforge", root / "out-mergekit")
        goals = [
            f"no slower than mergekit: {'met' if lf_wall <= min(mk_wall, sh_wall) else 'NOT met'} "
            f"({lf_wall / mk_wall:.2f} × its time with its defaults, {lf_wall / sh_wall:.2f} × with small shards)",
            f"at most half of mergekit's peak RSS: {'met' if lf_rss <= min(mk_rss, sh_rss) / 2 else 'NOT met'} "
            f"({lf_rss / mk_rss:.2f} × its RSS with its defaults, {lf_rss / sh_rss:.2f} × with small shards)",
            *goals,
            "llmforge's and mergekit's outputs are identical"
            if share == 0
            else f"the two outputs differ in {share:.1e} of the elements (largest difference {diff:.2e}): "
            f"entries at the trim threshold, and entries whose task vectors cancel exactly (no elected "
            f"sign: llmforge keeps the base, mergekit one of the two)",
        ]
        ok = ok and lf_wall <= min(mk_wall, sh_wall) and lf_rss <= min(mk_rss, sh_rss) / 2
    else:
        lines.append("| `mergekit-yaml` | not installed | |")
    lines += [""] + [f"- {g}" for g in goals]
    print("\n".join(lines))
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from startup import _update

        _update(args.write, "merge", "\n".join(lines))
    return 0 if ok else 1


def _version(mergekit_yaml: str) -> str:
    """mergekit's version, asked of the Python that runs mergekit-yaml (it may live in another venv)."""
    python = Path(mergekit_yaml).parent / "python"
    try:
        out = subprocess.run(
            [
                str(python) if python.exists() else sys.executable,
                "-c",
                "from importlib.metadata import version; print(version('mergekit'))",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return out.stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


if __name__ == "__main__":
    sys.exit(main())
