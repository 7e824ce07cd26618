"""`judges`: judge backends (gguf, hf, openai) and what a judge does with them (prompt templates per mode,
structured output parsed with retries, both orders of a pair, a cache of judgments, a request budget),
shared by evaluation, synthetic data and RL stages. The declaration (`[judges.NAME]` in forge.toml, the
``register_judge_backends`` extension point) is the core's: llmforge/judging.py.

Imported at every `llmforge` start-up: nothing heavy here.
"""

from __future__ import annotations
