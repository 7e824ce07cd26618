"""`judges`: judge backends (gguf, hf, openai) and what a judge does with them (prompt templates per mode,
structured output parsed with retries, both orders of a pair, a cache of judgments, a request budget),
shared by evaluation, synthetic data and RL stages. The declaration (`[judges.NAME]` in forge.toml, the
``register_judge_backends`` extension point) is the core's: llmforge/judging.py.

Imported at every `llmforge` start-up: nothing heavy here.
"""

from __future__ import annotations

from llmforge import hookimpl


@hookimpl
def register_judge_backends(register):
    # backends.py imports llama_cpp, torch or openai only when a judge is opened
    from llmforge_plugins.judges.backends import BACKENDS

    for backend in BACKENDS:
        register(backend)


@hookimpl
def register_eval_tasks(register):
    from llmforge_plugins.judges.tasks import TASKS

    for task in TASKS:
        register(task)


@hookimpl
def validate_pipeline(pipeline):
    # a judge task naming an undeclared judge is a config problem, found before any model loads
    from llmforge_plugins.judges.checks import judge_problems

    return judge_problems(pipeline)
