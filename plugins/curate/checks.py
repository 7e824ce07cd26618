"""Pipeline-level checks of curate stages: the files their steps name exist (relative to forge.toml)."""

from __future__ import annotations


def file_problems(pipeline) -> list:
    from llmforge_plugins.curate.api import StepEnv
    from llmforge_plugins.curate.registry import check_files, parse_steps

    problems = []
    for spec in pipeline.stages:
        if spec.uses != "curate":
            continue
        parsed, found = parse_steps(spec.options.steps, pipeline.registry, where=f"{spec.where}.steps")
        if found:
            continue  # already reported by the stage's check()
        env = StepEnv(base_dir=pipeline.config.project_dir, registry=pipeline.registry)
        problems += check_files(parsed, env, f"{spec.where}.steps")
    return problems
