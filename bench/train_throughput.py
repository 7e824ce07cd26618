"""SFT throughput: llmforge against a plain TRL SFTTrainer script, same model and data.

Usage: python bench/train_throughput.py [--steps 40] [--size mini] [--runs 3] [--write docs/benchmarks.md]

Three sides, run in turn (trl, same, auto, trl, same, auto, ...) `--runs` times, each run in its own process
from the same start state; the figures are the median over the runs with their spread (min-max):
  trl       a plain SFTTrainer script with TRL's defaults; `use_cpu=True` on a CPU-only machine and
            nothing else (TRL then trains with bf16 autocast and gradient checkpointing, its defaults);
  same      llmforge's sft stage with every setting of that script spelled out (no packing, bf16, TRL's
            learning rate, schedule and warm-up, gradient checkpointing on, batch, max_length, seed):
            goal ratio >= 0.98 (our layer costs nothing). Both sides' effective TrainingArguments are
            dumped when their trainer starts and compared field by field; any difference is printed;
  auto      llmforge's sft stage with its defaults for what decides speed (padding-free packing,
            precision "auto", no gradient checkpointing), at the SAME token budget as the trl run
            (its steps are cut so that it trains on about as many useful tokens) and with TRL's learning
            rate schedule (so the held-out losses compare): goal ratio >= 1.5 against trl, with a
            held-out loss no worse. What still differs from trl is printed from the dumped arguments.
The figure is useful tokens per second: tokens that carry a label (padding never counts). Both sides
train on every token of the conversation (llmforge: train_on = "all"; TRL's default), so the same
tokens count on both sides. The held-out loss is computed by this script the same way for every model.
Every section records the CPU model and flags (measure.machine_line) and the load average: on a
machine shared with other jobs, the figures are not final.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

WORDS = [
    w
    for w in textwrap.dedent("""
    river stone market lantern orchard harbor signal copper meadow winter garden bridge thread
    canyon ledger pepper island engine silver forest candle window summer planet rocket violet
    shadow marble button feather kettle pocket ribbon saddle tunnel wagon anchor basket cellar
    """).split()
]


def make_data(folder: Path, n_rows: int, seed: int) -> None:
    """Chat rows with widely varying lengths (a long-tailed mix, like real SFT data)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def sentence(n):
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    def row():
        turns = rng.choice([1, 1, 1, 2, 3])
        msgs = []
        for _ in range(turns):
            q_len = max(3, int(rng.lognormvariate(2.3, 0.6)))
            a_len = max(3, int(rng.lognormvariate(3.4, 0.9)))  # answers from a few words to a few hundred
            msgs.append({"role": "user", "content": sentence(q_len)})
            msgs.append(
                {
                    "role": "assistant",
                    "content": " ".join(sentence(rng.randint(5, 14)) for _ in range(max(1, a_len // 10))),
                }
            )
        return {"messages": msgs}

    with open(folder / "train.jsonl", "w") as f:
        for _ in range(n_rows):
            f.write(json.dumps(row()) + "\n")
    with open(folder / "heldout.jsonl", "w") as f:
        for _ in range(48):
            f.write(json.dumps(row()) + "\n")


def make_model(folder: Path, size: str, data: Path) -> None:
    """One initial model + tokenizer (chatml), saved once; every run starts from these weights."""
    import torch
    from transformers import LlamaForCausalLM

    from llmforge.chat import resolve_template
    from llmforge.plugins import load_registry
    from llmforge_plugins.training.models import model_config, prepare_tokenizer, train_tokenizer

    template = resolve_template("chatml", load_registry().chat_templates)
    with open(data / "train.jsonl") as fh:
        texts = [m["content"] for line in fh for m in json.loads(line)["messages"]]
    tok = train_tokenizer(texts, 2048, template)
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config(size, len(tok), 1024, {}, tok))
    prepare_tokenizer(model, tok, template)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


# Imported (through PYTHONPATH) by both sides' processes: when a trainer starts training, write its
# effective TrainingArguments, and once its first step ran, whether the model recomputes activations.
ARGDUMP = r"""
import json, os
import transformers

_train, _step = transformers.Trainer.train, transformers.Trainer.training_step


def _dump(data):
    path = os.environ["BENCH_ARGS_DUMP"]
    old = json.load(open(path)) if os.path.exists(path) else {}
    json.dump({**old, **data}, open(path, "w"), default=str, indent=1, sort_keys=True)


def train(self, *a, **k):
    _dump({"args": self.args.to_dict(), "trainer": type(self).__mro__[1].__name__})
    return _train(self, *a, **k)


def training_step(self, model, *a, **k):
    if not getattr(self, "_bench_seen", False):
        self._bench_seen = True
        m = self.accelerator.unwrap_model(model)
        _dump({"model": {"gradient_checkpointing": bool(getattr(m, "is_gradient_checkpointing", False)),
                         "dtype": str(next(m.parameters()).dtype), "use_cache": getattr(m.config, "use_cache", None),
                         "attn_implementation": getattr(m.config, "_attn_implementation", None)}})
    return _step(self, model, *a, **k)


transformers.Trainer.train, transformers.Trainer.training_step = train, training_step
"""

# Fields that name places or logging, not how training runs.
IGNORED_ARGS = {
    "output_dir",
    "logging_dir",
    "logging_steps",
    "logging_strategy",
    "logging_first_step",
    "report_to",
    "disable_tqdm",
    "save_strategy",
    "save_steps",
    "save_total_limit",
    "run_name",
    "eval_steps",
    "eval_strategy",
    "per_device_eval_batch_size",
    "hub_token",
    "push_to_hub_token",
}


def args_diff(a: dict, b: dict) -> list[str]:
    """The settings that differ between two dumps (TrainingArguments fields, then the model's state)."""

    def normal(d: dict) -> dict:
        d = dict(d)
        if d.get("data_seed") is None:  # None means "the seed"
            d["data_seed"] = d.get("seed")
        if (d.get("max_steps") or -1) > 0:  # max_steps decides; epochs are not read
            d.pop("num_train_epochs", None)
        return d

    out = []
    for section in ("args", "model"):
        x, y = a.get(section, {}), b.get(section, {})
        if section == "args":
            x, y = normal(x), normal(y)
        for key in sorted(set(x) | set(y)):
            if section == "args" and key in IGNORED_ARGS:
                continue
            if x.get(key, "<unset>") != y.get(key, "<unset>"):
                name = key if section == "args" else f"model {key}"
                out.append(f"{name}: {x.get(key, '<unset>')!r} vs {y.get(key, '<unset>')!r}")
    return out


TRL_SCRIPT = r"""
import json, sys, time
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

model_dir, data, out, steps, batch, max_len = sys.argv[1:7]
rows = [json.loads(l) for l in open(data)]
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)

class Counting(SFTTrainer):
    useful = 0
    def training_step(self, model, inputs, *a, **k):
        self.useful += int((inputs["labels"][..., 1:] != -100).sum())
        return super().training_step(model, inputs, *a, **k)

args = SFTConfig(output_dir=out, use_cpu=True, max_steps=int(steps), per_device_train_batch_size=int(batch),
                 max_length=int(max_len), save_strategy="no", report_to="none", disable_tqdm=True, seed=0)
trainer = Counting(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
t0 = time.monotonic()
trainer.train()
secs = time.monotonic() - t0
trainer.save_model(out + "/final")
print("RESULT " + json.dumps({"trained_tokens": trainer.useful, "train_seconds": secs}))
"""


def _env(work: Path, name: str) -> dict:
    (work / "argdump.py").write_text(ARGDUMP)
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(work), os.environ.get("PYTHONPATH")])),
        "BENCH_ARGS_DUMP": str(work / f"args-{name}.json"),
    }


def _dumped(work: Path, name: str) -> dict:
    return json.loads((work / f"args-{name}.json").read_text())


def run_trl(name: str, model_dir: Path, data: Path, work: Path, steps: int, batch: int, max_len: int) -> dict:
    script = work / "trl_sft.py"
    script.write_text("import argdump\n" + TRL_SCRIPT)
    out = work / f"{name}-out"
    t0 = time.monotonic()
    res = subprocess.run(
        [
            sys.executable,
            str(script),
            str(model_dir),
            str(data / "train.jsonl"),
            str(out),
            str(steps),
            str(batch),
            str(max_len),
        ],
        capture_output=True,
        text=True,
        env=_env(work, name),
    )
    if res.returncode != 0:
        raise SystemExit(f"TRL baseline failed:\n{res.stderr[-3000:]}")
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))
    return {
        **json.loads(line[7:]),
        "wall_seconds": time.monotonic() - t0,
        "model": str(out / "final"),
        "dump": _dumped(work, name),
    }


def run_llmforge(
    name: str, model_dir: Path, data: Path, work: Path, steps: int, batch: int, max_len: int, extra: str
) -> dict:
    project = work / name
    project.mkdir()
    (project / "forge.toml").write_text(
        textwrap.dedent(f"""
        [[stages]]
        name = "sft"
        uses = "sft"
        model = "{model_dir}"
        data = {{ path = "{data / "train.jsonl"}" }}
        template = "chatml"
        train_on = "all"
        max_steps = {steps}
        micro_batch_size = {batch}
        max_length = {max_len}
        log_every = 10
        seed = 0
    """)
        + textwrap.dedent(extra)
    )
    t0 = time.monotonic()
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "import argdump, runpy; runpy.run_module('llmforge', run_name='__main__')",
            "run",
            "-c",
            str(project / "forge.toml"),
        ],
        capture_output=True,
        text=True,
        env=_env(work, name),
    )
    if res.returncode != 0:
        raise SystemExit(f"llmforge run ({name}) failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    status = json.loads(
        subprocess.run(
            [sys.executable, "-m", "llmforge", "status", "--json", "--runs-dir", str(project / "runs")],
            capture_output=True,
            text=True,
        ).stdout
    )
    info = status["stages"]["sft"]["info"]
    return {
        "trained_tokens": info["trained_tokens"],
        "train_seconds": info["train_seconds"],
        "wall_seconds": time.monotonic() - t0,
        "model": status["stages"]["sft"]["artifacts"]["model"]["path"],
        "dump": _dumped(work, name),
    }


def heldout_loss(model_path: str, data: Path, max_len: int) -> float:
    """Mean per-token loss on held-out chats (every token, chatml), the same for every model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for line in (data / "heldout.jsonl").read_text().splitlines():
            msgs = json.loads(line)["messages"]
            ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"][:max_len]
            t = torch.tensor([ids])
            loss = model(input_ids=t, labels=t).loss
            total += float(loss) * (len(ids) - 1)
            count += len(ids) - 1
    return total / count


# TRL's SFTConfig defaults (trl 1.16), spelled out in llmforge's options. The dumped arguments are
# compared after the run, so a default that changes upstream shows up as a printed difference.
SAME = """
    packing = false
    precision = "bf16"
    gradient_checkpointing = true
    learning_rate = 2e-5
    lr_schedule = "linear"
    warmup_ratio = 0.0
    weight_decay = 0.0
    max_grad_norm = 1.0
    """
# llmforge's defaults for what decides speed (packing, precision = "auto", no gradient checkpointing),
# with TRL's learning-rate schedule so that the held-out losses compare.
AUTO = """
    learning_rate = 2e-5
    lr_schedule = "linear"
    warmup_ratio = 0.0
    """


def main() -> int:
    from measure import load_line, machine_line

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--size", default="mini", help="model preset: tiny, mini, small, base, smollm-135m")
    ap.add_argument("--runs", type=int, default=3, help="runs of each side, interleaved; median and spread")
    ap.add_argument("--write", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llmforge-bench-"))
    try:
        data, model_dir = work / "data", work / "init-model"
        make_data(data, args.rows, seed=0)
        make_model(model_dir, args.size, data)
        common = (args.batch, args.max_length)
        every: dict[str, list[dict]] = {"trl": [], "same": [], "auto": []}
        auto_steps = 0
        for i in range(args.runs):  # interleaved, so that a slow patch of the machine hits every side
            every["trl"].append(run_trl(f"trl-{i}", model_dir, data, work, args.steps, *common))
            every["same"].append(run_llmforge(f"same-{i}", model_dir, data, work, args.steps, *common, extra=SAME))
            # The same token budget as trl: packed steps carry about batch x max_length useful tokens each.
            auto_steps = auto_steps or max(1, round(every["trl"][0]["trained_tokens"] / (args.batch * args.max_length)))
            every["auto"].append(run_llmforge(f"auto-{i}", model_dir, data, work, auto_steps, *common, extra=AUTO))
        runs = {}
        for name, rs in every.items():
            speeds = sorted(r["trained_tokens"] / r["train_seconds"] for r in rs)
            r = dict(rs[0])  # tokens, settings and model of the first run (seeded: every run trains the same)
            r["tokens_per_s"] = speeds[len(speeds) // 2]
            r["spread"] = (speeds[0], speeds[-1])
            r["train_seconds"] = sorted(x["train_seconds"] for x in rs)[len(rs) // 2]
            r["steps"] = auto_steps if name == "auto" else args.steps
            r["heldout_loss"] = heldout_loss(r["model"], data, args.max_length)
            runs[name] = r
        same_diff = args_diff(runs["trl"]["dump"], runs["same"]["dump"])
        auto_diff = args_diff(runs["trl"]["dump"], runs["auto"]["dump"])
        print("effective settings, trl (TrainingArguments as its trainer started, then the model):")
        for section in ("args", "model"):
            for key, value in sorted(runs["trl"]["dump"].get(section, {}).items()):
                if key not in IGNORED_ARGS:
                    print(f"  {key} = {value!r}")
        print("same differs from trl in:", "; ".join(same_diff) or "nothing")
        print("auto differs from trl in:", "; ".join(auto_diff) or "nothing")
        base = runs["trl"]["tokens_per_s"]
        same_ratio = runs["same"]["tokens_per_s"] / base
        auto_ratio = runs["auto"]["tokens_per_s"] / base
        loss_ok = runs["auto"]["heldout_loss"] <= runs["trl"]["heldout_loss"]
        budget = runs["auto"]["trained_tokens"] / runs["trl"]["trained_tokens"]
        lines = [
            f"- {machine_line()}; CPU only",
            f"- {load_line()}",
            f"- model preset `{args.size}` (Llama), micro-batch {args.batch}, max_length {args.max_length}, "
            f"{args.rows} chat rows of widely varying length; {args.runs} runs of each side, interleaved: "
            "median (min-max)",
            "",
            "| run | steps | useful tokens | train s | useful tokens/s | ratio vs TRL | held-out loss |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in runs.items():
            lines.append(
                f"| {name} | {r['steps']} | {r['trained_tokens']} | {r['train_seconds']:.1f} | "
                f"{r['tokens_per_s']:.0f} ({r['spread'][0]:.0f}-{r['spread'][1]:.0f}) | "
                f"{r['tokens_per_s'] / base:.2f} | {r['heldout_loss']:.3f} |"
            )
        lines += [
            "",
            "- `same` against `trl`, effective settings compared field by field: "
            + ("identical" if not same_diff else "DIFFERENT: " + "; ".join(same_diff)),
            f"- identical settings: ratio {same_ratio:.2f} (goal >= 0.98): "
            f"{'met' if same_ratio >= 0.98 and not same_diff else 'NOT met'}",
            f"- `auto` against `trl`: {budget:.2f} x its useful tokens, same learning rate schedule; "
            f"what differs: " + ("; ".join(auto_diff) or "nothing"),
            f"- llmforge auto vs TRL defaults: ratio {auto_ratio:.2f} (goal >= 1.5): "
            f"{'met' if auto_ratio >= 1.5 else 'NOT met'}; held-out loss {runs['auto']['heldout_loss']:.3f} vs "
            f"{runs['trl']['heldout_loss']:.3f}: {'no worse' if loss_ok else 'WORSE'}",
        ]
        print("\n".join(lines))
        if args.write:
            from startup import _update

            _update(args.write, "train_throughput", "\n".join(lines))
        return 0 if same_ratio >= 0.98 and not same_diff and auto_ratio >= 1.5 and loss_ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
