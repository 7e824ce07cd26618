"""Measurements on a model outside the trainer: perplexity on held-out rows.

continued_pretrain measures forgetting with it (held-out general text, before and after training).
Rows are unpacked, one sequence at a time, so that no sample sees another and the number is the same
whatever the batch size.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def perplexity(model: Any, rows: list[dict], batch_size: int = 4) -> float:
    """exp(mean token loss) over rows of {input_ids, labels}, weighting each row by its labelled tokens."""
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            for row in rows[i : i + batch_size]:
                ids = torch.tensor([row["input_ids"]], device=device)
                labels = torch.tensor([row["labels"]], device=device)
                n = int((labels[:, 1:] != -100).sum())
                if n == 0:
                    continue
                out = model(input_ids=ids, labels=labels)
                total += float(out.loss) * n
                count += n
    return math.exp(total / max(count, 1))
