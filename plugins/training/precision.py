"""What a training stage's `precision` option becomes as TrainingArguments fields.

The decision itself is llmforge.precision.choose_precision, the one function `llmforge plan` calls too,
so that the plan and the training log never disagree. This module only adds what that pure-Python
function cannot know without torch: which device torch sees, whether the GPU has bf16, and the
arguments the Trainer takes for the choice.
"""

from __future__ import annotations

from typing import Any

import torch

from llmforge.errors import UsageError


def resolve_precision(precision: str, params: int | None = None) -> dict[str, Any]:
    """TrainingArguments fields (`use_cpu`, `bf16`, `fp16`) for a precision choice, plus `_name` and
    `_reason` for the training log. `params` is the model's parameter count: on a CPU it decides what
    "auto" becomes."""
    from llmforge.hardware import cpu_features
    from llmforge.precision import choose_precision

    cuda = torch.cuda.is_available()
    mps = torch.backends.mps.is_available()
    device = "cuda" if cuda else ("mps" if mps else "cpu")
    choice = choose_precision(
        precision,
        device=device,
        gpu_bf16=cuda and torch.cuda.is_bf16_supported(),
        cpu_bf16_fast=device == "cpu" and cpu_features()["bf16_fast"],
        params=params,
    )
    if choice.name == "fp16" and not cuda:
        raise UsageError('precision = "fp16" needs a CUDA GPU', hint='use precision = "auto", "bf16" or "fp32"')
    return {
        "use_cpu": not (cuda or mps),
        "bf16": choice.name == "bf16",
        "fp16": choice.name == "fp16",
        "_name": choice.name,
        "_reason": choice.reason,
    }
