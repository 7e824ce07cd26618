"""Turning step specs into steps, over the plugin registry's table of curation steps
(``registry.table(CURATION_STEPS)``, filled through ``register_curation_steps``; a clash of names is a
``Conflict`` shown by ``llmforge plugins list``). The registry is always the caller's: the stage's
``ctx.registry``, the pipeline's, or the command line's.

A step spec, in forge.toml or on the command line, is a name (``"normalize"``) or a table with the
name under ``step`` and the step's options beside it (``{ step = "near_dedup", threshold = 0.85 }``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmforge.errors import ConfigError, Problem

if TYPE_CHECKING:  # pydantic comes with api.py: imported only where steps are built
    from llmforge.plugins import Registry
    from llmforge_plugins.curate.api import CurationStep, StepEnv, StepOptions


def curation_steps(registry: Registry) -> dict[str, type[CurationStep[Any]]]:
    """name -> step class, for every installed step (built-in ones first): the registry's table."""
    from llmforge_plugins.curate import CURATION_STEPS

    return registry.table(CURATION_STEPS)


# ------------------------------------------------------------------------------------------------
# specs


def split_spec(spec: Any) -> tuple[str | None, dict]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, dict):
        rest = dict(spec)
        name = rest.pop("step", None)
        return (name if isinstance(name, str) else None), rest
    return None, {}


def parse_steps(
    specs: list, registry: Registry, where: str = "steps", labels: list[str] | None = None
) -> tuple[list[tuple[type[CurationStep[Any]], StepOptions]], list[Problem]]:
    """Each spec's class and validated options; every problem located (``steps[2].threshold``, or
    under ``labels[i]`` when given: the command line names a step by its flag)."""
    from llmforge.schema import did_you_mean, validate_model

    table = curation_steps(registry)
    out: list[tuple[type[CurationStep[Any]], StepOptions]] = []
    problems: list[Problem] = []
    for i, spec in enumerate(specs):
        here = labels[i] if labels else f"{where}[{i}]"
        name, options = split_spec(spec)
        if name is None:
            problems.append(
                Problem(
                    here,
                    'expected a step name, or a table with `step = "name"` and the step\'s '
                    f"options (steps: {', '.join(table)})",
                )
            )
            continue
        cls = table.get(name)
        if cls is None:
            problems.append(
                Problem(
                    here, f"unknown curation step '{name}'{did_you_mean(name, table)} (installed: {', '.join(table)})"
                )
            )
            continue
        opts, found = validate_model(cls.Options, options, here)
        problems += found
        if opts is not None:
            for loc, value in step_inputs(opts):
                if value.startswith("@"):
                    problems.append(
                        Problem(
                            f"{here}.{loc}", f"'{value}': references to stages are not read inside steps; give a path"
                        )
                    )
            out.append((cls, opts))
    return out, problems


def check_files(
    parsed: list[tuple[type[CurationStep[Any]], StepOptions]],
    env: StepEnv,
    where: str = "steps",
    labels: list[str] | None = None,
) -> list[Problem]:
    """Each step's own ``check`` (files it names exist, ...), located under ``where[i]``."""
    problems = []
    for i, (cls, opts) in enumerate(parsed):
        here = labels[i] if labels else f"{where}[{i}]"
        try:
            found = cls.check(opts, env) or []
        except Exception as exc:  # noqa: BLE001 - a buggy check is a problem to show
            found = [f"check() of step '{cls.name}' failed: {exc}"]
        problems += [Problem(here, str(msg)) for msg in found]
    return problems


def build_steps(
    specs: list, env: StepEnv, registry: Registry, where: str = "steps", labels: list[str] | None = None
) -> list[CurationStep[Any]]:
    """The step instances for these specs; a ConfigError with every problem when something is wrong."""
    parsed, problems = parse_steps(specs, registry, where, labels)
    if not problems:
        problems = check_files(parsed, env, where, labels)
    if problems:
        raise ConfigError(problems)
    return [cls(opts, env) for cls, opts in parsed]


def step_inputs(options: StepOptions) -> Iterator[tuple[str, str]]:
    """(location, path) for every file a step's options name (fields marked with ``Input``), for the
    stage's cache key and the check that they exist."""
    from llmforge.stage import input_marker

    for name, fld in type(options).model_fields.items():
        marker = input_marker(fld.annotation) or next((m for m in fld.metadata if type(m).__name__ == "Input"), None)
        if marker is None:
            continue
        value = getattr(options, name)
        items = (
            value.items()
            if isinstance(value, dict)
            else enumerate(value)
            if isinstance(value, list)
            else [(None, value)]
        )
        for key, v in items:
            loc = name if key is None else f"{name}.{key}" if isinstance(key, str) else f"{name}[{key}]"
            for p in [v] if isinstance(v, str) else v if isinstance(v, list) else []:
                if isinstance(p, str):
                    yield loc, p


def fingerprints(parsed: list[tuple[type[CurationStep[Any]], StepOptions]], base: Path) -> dict[str, str]:
    """Content fingerprints of the files the steps read (an evaluation set edited in place must make
    the stage run again)."""
    from llmforge.pipeline import fingerprint

    out = {}
    for i, (_cls, opts) in enumerate(parsed):
        for loc, value in step_inputs(opts):
            path = Path(value).expanduser()
            path = path if path.is_absolute() else base / path
            out[f"steps[{i}].{loc}"] = fingerprint(path) if path.exists() else "missing"
    return out
