"""`llmforge validate` for judges: every eval task that names a judge (``judge = "NAME"``) names one that
forge.toml declares (``[judges.NAME]``), found before any model loads. Each stage checks its own task specs
(their files, their keys); only this needs the whole configuration."""

from __future__ import annotations

from typing import Any

from llmforge.errors import Problem
from llmforge.schema import did_you_mean


def judge_problems(pipeline: Any) -> list[Problem]:
    registry = pipeline.registry
    if registry is None:
        return []
    from llmforge_plugins.eval.api import EVAL_TASKS
    from llmforge_plugins.eval.spec import load_task_specs

    try:
        table = registry.table(EVAL_TASKS)
    except KeyError:  # the eval plugin is not loaded: no eval stage either
        return []
    judges = getattr(pipeline.config, "judges", {}) or {}
    project = pipeline.config.project_dir
    declared = ", ".join(sorted(judges)) or "none"
    problems: list[Problem] = []
    for spec in pipeline.stages:
        tasks = getattr(spec.options, "tasks", None)
        if spec.uses != "eval" or not isinstance(tasks, list):
            continue
        for j, value in enumerate(tasks):
            where = f"{spec.where}.tasks[{j}]"
            found, _ = load_task_specs([value], table, project, where)  # a broken spec is the stage's to report
            for _task, options in found:
                name = getattr(options, "judge", None)
                if isinstance(name, str) and name not in judges:
                    key = f"{value}: judge" if isinstance(value, str) else f"{where}.judge"
                    problems.append(
                        Problem(
                            key,
                            f"no judge named '{name}'{did_you_mean(name, judges)} "
                            f"(declared in forge.toml: {declared}); "
                            f'declare it as [judges.{name}] with backend = "gguf", "hf" or "openai"',
                        )
                    )
    return problems
