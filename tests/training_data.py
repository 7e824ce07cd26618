"""Tiny synthetic training data for the stage tests: a made-up world of countries and capitals."""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Zorvia", "Mekta", "Plondor", "Quesh", "Brilla", "Tavon", "Ulmar", "Fenwick"]
CAPITALS = ["Arkel", "Bistro", "Cendra", "Dulmo", "Esk", "Farro", "Gilt", "Hobb"]


def write_data(root: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    with open(data / "corpus.txt", "w") as f:
        for _ in range(20):
            for n, c in zip(NAMES, CAPITALS):
                f.write(f"The capital of {n} is {c}. {c} is a city in {n}.\n\n")
            for a in range(10):
                b = rng.randint(0, 9)
                f.write(f"{a} plus {b} equals {a + b}.\n\n")
    with open(data / "general.txt", "w") as f:
        for a in range(60):
            f.write(f"The river runs past {a} old mills and {a + 3} bridges.\n\n")
    with open(data / "chat.jsonl", "w") as f:
        for _ in range(8):
            for n, c in zip(NAMES, CAPITALS):
                f.write(
                    json.dumps(
                        {
                            "messages": [
                                {"role": "system", "content": "Answer briefly."},
                                {"role": "user", "content": f"What is the capital of {n}?"},
                                {"role": "assistant", "content": f"The capital of {n} is {c}."},
                            ]
                        }
                    )
                    + "\n"
                )
    with open(data / "prefs.jsonl", "w") as f:
        for _ in range(4):
            for i, (n, c) in enumerate(zip(NAMES, CAPITALS)):
                f.write(
                    json.dumps(
                        {
                            "prompt": f"What is the capital of {n}?",
                            "chosen": f"{c}.",
                            "rejected": f"The capital of {n} is {CAPITALS[i - 1]}.",
                        }
                    )
                    + "\n"
                )


PRETRAIN = """
[[stages]]
name = "pretrain"
uses = "pretrain"
data = {{ path = "data/corpus.txt" }}
vocab_size = 400
model = {{ size = "tiny" }}
max_steps = {steps}
max_length = 64
micro_batch_size = 8
log_every = 2
"""

SFT = """
[[stages]]
name = "sft"
uses = "sft"
model = "@pretrain"
data = {{ path = "data/chat.jsonl" }}
max_steps = {steps}
max_length = 64
micro_batch_size = 4
learning_rate = 2e-3
log_every = 2
"""

DPO = """
[[stages]]
name = "dpo"
uses = "dpo"
model = "@sft"
data = {{ path = "data/prefs.jsonl" }}
max_steps = {steps}
max_length = 64
micro_batch_size = 4
learning_rate = 5e-3
log_every = 1
lora = {{ enabled = true, r = 8, alpha = 16 }}
merge = true
"""
