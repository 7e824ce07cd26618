"""The pipeline: stages ordered by their `@references`, inputs resolved, cache keys computed.

`load_pipeline()` is the one entry point used by `validate`, `run` and the TUI: it reads forge.toml,
validates every stage, checks references, files and cycles, runs each stage's cheap `check()` and the
plugins' `validate_pipeline` hooks, and raises one ConfigError listing everything found.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from llmforge import __version__
from llmforge.config import ForgeConfig, StageSpec, parse_config
from llmforge.errors import ConfigError, Problem
from llmforge.schema import did_you_mean, join_path
from llmforge.stage import Artifact, Input, Stage, input_marker

if TYPE_CHECKING:
    from llmforge.plugins import Registry


@dataclass(frozen=True)
class InputUse:
    """One input field of a stage: either a reference to a stage's artifact or a user path."""

    loc: tuple  # location inside the stage's options, e.g. ("inputs", "data")
    value: str  # as written
    marker: Input
    ref_stage: str | None = None
    ref_kind: str | None = None
    path: Path | None = None

    @property
    def key(self) -> str:
        """The input's name for ctx.inputs: its dotted location (`model`, `models[1]`)."""
        return join_path("", self.loc)


@dataclass
class Pipeline:
    config: ForgeConfig
    stages: list[StageSpec]  # in execution order
    inputs: dict[str, list[InputUse]] = field(default_factory=dict)
    deps: dict[str, set[str]] = field(default_factory=dict)
    #: the plugins the pipeline was built against: a ``validate_pipeline`` hook looks names up in its
    #: tables (the curate plugin: the steps a stage names)
    registry: Registry | None = None

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def upstream(self, names: set[str]) -> set[str]:
        """The names plus everything they depend on."""
        out, todo = set(), list(names)
        while todo:
            n = todo.pop()
            if n not in out:
                out.add(n)
                todo.extend(self.deps.get(n, ()))
        return out

    def downstream(self, names: set[str]) -> set[str]:
        """The names plus everything that depends on them."""
        out = set(names)
        for s in self.stages:  # execution order: parents come first
            if self.deps.get(s.name, set()) & out:
                out.add(s.name)
        return out


def iter_inputs(options: BaseModel, loc: tuple = ()) -> Iterator[tuple[tuple, str, Input]]:
    """Yield (location, value, marker) for every Input-marked value in validated options."""
    for name, fld in type(options).model_fields.items():
        value = getattr(options, name)
        marker = next((m for m in fld.metadata if isinstance(m, Input)), None) or input_marker(fld.annotation)
        here = (*loc, name)
        if marker is not None:
            if isinstance(value, str):
                yield here, value, marker
            elif isinstance(value, (list, tuple)):
                for i, v in enumerate(value):
                    if isinstance(v, str):
                        yield (*here, i), v, marker
            elif isinstance(value, dict):
                for k, v in value.items():
                    if isinstance(v, str):
                        yield (*here, k), v, marker
        elif isinstance(value, BaseModel):
            yield from iter_inputs(value, here)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                if isinstance(v, BaseModel):
                    yield from iter_inputs(v, (*here, i))


def parse_ref(value: str) -> tuple[str, str | None]:
    """'@sft' -> ('sft', None); '@sft.adapter' -> ('sft', 'adapter')."""
    body = value[1:]
    name, _, kind = body.partition(".")
    return name, (kind or None)


def build_pipeline(cfg: ForgeConfig, registry: Registry) -> tuple[Pipeline, list[Problem]]:
    problems: list[Problem] = []
    by_name = {s.name: s for s in cfg.stages}
    # Names of every [[stages]] entry, also those whose options are invalid (already reported):
    # a reference to such a stage is not "dangling".
    found = cfg.raw.get("stages")
    raw_stages: list = found if isinstance(found, list) else []
    all_names: list[str] = [e["name"] for e in raw_stages if isinstance(e, dict) and isinstance(e.get("name"), str)]
    inputs: dict[str, list[InputUse]] = {}
    deps: dict[str, set[str]] = {}
    for spec in cfg.stages:
        uses: list[InputUse] = []
        deps[spec.name] = set()
        for loc, value, marker in iter_inputs(spec.options):
            where = join_path(spec.where, loc)
            if value.startswith("@"):
                target, kind = parse_ref(value)
                if target not in by_name:
                    if target not in all_names:
                        others = [n for n in all_names if n != spec.name]
                        problems.append(
                            Problem(
                                where,
                                f"'{value}' refers to no stage{did_you_mean(target, others)}".replace(
                                    "mean '", "mean '@"
                                ),
                            )
                        )
                    continue
                if target == spec.name:
                    problems.append(Problem(where, f"'{value}': a stage cannot use its own output"))
                    continue
                target_spec = by_name[target]
                produced = target_spec.cls().outputs(target_spec.options)
                if kind is not None and kind not in produced:
                    problems.append(
                        Problem(
                            where,
                            f"'{value}': stage '{target}' produces {', '.join(produced) or 'nothing'}, not '{kind}'",
                        )
                    )
                    continue
                if kind is None:
                    wanted = [k for k in produced if not marker.kinds or k in marker.kinds]
                    if not wanted:
                        problems.append(
                            Problem(
                                where,
                                f"'{value}': stage '{target}' produces "
                                f"{', '.join(produced) or 'nothing'}; this option needs "
                                f"{' or '.join(marker.kinds)}",
                            )
                        )
                        continue
                    kind = wanted[0]
                elif marker.kinds and kind not in marker.kinds:
                    problems.append(
                        Problem(where, f"'{value}': this option needs {' or '.join(marker.kinds)}, not '{kind}'")
                    )
                    continue
                uses.append(InputUse(loc, value, marker, ref_stage=target, ref_kind=kind))
                deps[spec.name].add(target)
            else:
                path = Path(os.path.expanduser(value))
                if not path.is_absolute():
                    path = cfg.project_dir / path
                if marker.must_exist and not path.exists():
                    problems.append(Problem(where, f"file not found: {path}"))
                    continue
                uses.append(InputUse(loc, value, marker, path=path))
        inputs[spec.name] = uses

    order, cycle = _topo_order([s.name for s in cfg.stages], deps)
    if cycle:
        problems.append(Problem("stages", "cycle in references: " + " -> ".join(cycle)))
        order = [s.name for s in cfg.stages]
    pipe = Pipeline(cfg, [by_name[n] for n in order], inputs, deps, registry)
    return pipe, problems


def _topo_order(names: list[str], deps: dict[str, set[str]]) -> tuple[list[str], list[str] | None]:
    """Order stages so that dependencies come first, keeping the file's order otherwise."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        if state.get(n) == 2:
            return None
        if state.get(n) == 1:
            return stack[stack.index(n) :] + [n]
        state[n] = 1
        stack.append(n)
        for d in sorted(deps.get(n, ()), key=names.index):
            found = visit(d)
            if found:
                return found
        stack.pop()
        state[n] = 2
        order.append(n)
        return None

    for n in names:
        found = visit(n)
        if found:
            return [], found
    return order, None


def run_check(stage: Stage, options: Any, inputs: dict[str, Artifact], registry: Registry) -> list:
    """``stage.check(...)``, with the registry when the stage's ``check`` names a ``registry`` parameter
    (a stage written before it existed takes two arguments and still works)."""
    try:
        takes_registry = "registry" in inspect.signature(stage.check).parameters
    except (TypeError, ValueError):  # a callable without a readable signature
        takes_registry = False
    found = stage.check(options, inputs, registry) if takes_registry else stage.check(options, inputs)
    return list(found or [])


def load_pipeline(
    path: str | Path | None = None, overrides: list[str] | None = None, *, registry: Registry
) -> Pipeline:
    """Read and check everything against the plugins of ``registry``; raise one ConfigError with every
    problem (exit code 2)."""
    cfg, problems = parse_config(path, overrides, registry)
    pipe, more = build_pipeline(cfg, registry)
    problems += more
    if not problems:
        for spec in pipe.stages:
            arts = {
                u.key: Artifact(kind=u.ref_kind or "path", path=u.path or Path(), stage=u.ref_stage)
                for u in pipe.inputs[spec.name]
            }
            try:
                found = run_check(spec.cls(), spec.options, arts, registry)
            except Exception as exc:  # noqa: BLE001 - a buggy check is a problem to show, not a crash
                found = [Problem("", f"check() of stage kind '{spec.uses}' failed: {exc}")]
            # A stage does not know its index: its problems are located under `stages[i]` here.
            for p in found:
                where, message = (p.where, p.message) if isinstance(p, Problem) else ("", str(p))
                if not where.startswith(spec.where):
                    where = join_path(spec.where, where.split(".")) if where else spec.where
                problems.append(Problem(where, message))
        # Each plugin's answer on its own, so that one crashing plugin is named and the others still speak.
        for impl in reversed(registry.hook.validate_pipeline.get_hookimpls()):
            try:
                answer = impl.function(pipeline=pipe) if "pipeline" in impl.argnames else impl.function()
            except Exception as exc:  # noqa: BLE001
                problems.append(
                    Problem("", f"plugin {impl.plugin_name}: validate_pipeline failed: {type(exc).__name__}: {exc}")
                )
                continue
            for p in answer or []:
                problems.append(p if isinstance(p, Problem) else Problem("", str(p)))
    if problems:
        raise ConfigError(problems, source=str(cfg.path))
    return pipe


# ----------------------------------------------------------------------------------------------
# cache keys


def fingerprint(path: Path) -> str:
    """Identify a user file or folder's content: a hash for small files, size and mtime otherwise."""
    h = hashlib.sha256()
    if path.is_file():
        st = path.stat()
        h.update(f"{st.st_size}".encode())
        if st.st_size <= 32 * 2**20:
            h.update(path.read_bytes())
        else:
            h.update(f"{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for f in sorted(files):
            p = Path(root) / f
            st = p.stat()
            h.update(f"{p.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _input_identity(use: InputUse, upstream_keys: dict[str, str]) -> str:
    """What an input contributes to the cache key: the upstream stage's key, or the user path's fingerprint."""
    if use.ref_stage:
        return f"{use.ref_stage}.{use.ref_kind}:{upstream_keys[use.ref_stage]}"
    assert use.path is not None  # build_pipeline makes every InputUse either a reference or a path
    return fingerprint(use.path)


def stage_key(
    spec: StageSpec,
    uses: list[InputUse],
    upstream_keys: dict[str, str],
    registry: Registry,
    seed: int | None = None,
    project_dir: Path | None = None,
    judges: dict[str, Any] | None = None,
) -> str:
    """Hash of what determines a stage's result: kind, its version, options, inputs, library versions."""
    owner = registry.owner("stages", spec.uses)
    info = next((p for p in registry.plugins if p.name == owner), None)
    plugin_version = info.version if info else None
    payload = {
        "uses": spec.uses,
        "stage_version": spec.cls.version,
        "plugin_version": plugin_version,
        "llmforge": __version__,
        "options": spec.options.model_dump(mode="json"),
        "inputs": {u.key: _input_identity(u, upstream_keys) for u in uses},
        "libraries": {name: _dist_version(name) for name in spec.cls.cache_libraries},
        "seed": seed,  # every stage gets [project].seed as ctx.seed: another seed is another result
        "extra": _cache_key_extra(spec, project_dir, registry) if project_dir else {},
    }
    if judges and project_dir:
        used = spec.cls().judges_used(spec.options, project_dir)
        if used:  # only then: a stage without judges keeps the key it always had
            payload["judges"] = {name: _judge_identity(judges.get(name)) for name in sorted(used)}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _judge_identity(spec: Any) -> dict | None:
    """A judge's part of a cache key (llmforge.judging.JudgeSpec.key), its model files fingerprinted."""
    if spec is None:
        return None
    key = spec.key()
    key["paths"] = {name: fingerprint(path) for name, path in key["paths"].items()}
    return key


def _cache_key_extra(spec: StageSpec, project_dir: Path, registry: Registry) -> dict:
    """``cache_key_extra(...)``, with the registry when the stage's method names a ``registry`` parameter
    (the curate stage fingerprints the files its steps name: which options are files, the steps say)."""
    # The base method takes no registry; an override may add one, which the signature tells at run time.
    extra: Callable[..., dict[str, Any]] = spec.cls().cache_key_extra
    try:
        takes_registry = "registry" in inspect.signature(extra).parameters
    except (TypeError, ValueError):
        takes_registry = False
    if takes_registry:
        return extra(spec.options, project_dir, registry)
    return extra(spec.options, project_dir)


def compute_keys(pipe: Pipeline, registry: Registry) -> dict[str, str]:
    keys: dict[str, str] = {}
    for spec in pipe.stages:
        keys[spec.name] = stage_key(
            spec,
            pipe.inputs[spec.name],
            keys,
            registry,
            seed=pipe.config.project.seed,
            project_dir=pipe.config.project_dir,
            judges=pipe.config.judges,
        )
    return keys


def resolve_options(spec: StageSpec, uses: list[InputUse], artifacts: dict[str, Artifact]) -> Any:
    """The stage's options with every `@ref` replaced by the artifact's path and user paths made absolute."""
    raw = copy.deepcopy(spec.options.model_dump(mode="python"))
    for u in uses:
        value = str(artifacts[u.key].path)
        target = raw
        for part in u.loc[:-1]:
            target = target[part]
        target[u.loc[-1]] = value
    return type(spec.options).model_validate(raw)
