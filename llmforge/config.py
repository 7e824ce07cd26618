"""forge.toml: loading, `--set` overrides, and strict validation that reports every problem at once
with its key path (`stages[2].lora.r: must be > 0 (got 0)`)."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmforge.errors import ConfigError, Problem
from llmforge.schema import did_you_mean, validate_model

if TYPE_CHECKING:
    from llmforge.plugins import Registry
    from llmforge.stage import Stage

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_CONFIG = "forge.toml"
STAGE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProjectSection(_Section):
    name: str = Field("", description="Project name (default: the folder of forge.toml).")
    description: str = Field("", description="Free text, shown in listings.")
    runs_dir: str = Field("runs", description="Where runs are stored, relative to forge.toml.")
    seed: int = Field(42, ge=0, description="Default random seed for every stage.")


class ModelSection(_Section):
    path: str | None = Field(None, description="Default base model: a local HF directory.")
    trust_remote_code: bool = Field(False, description="Allow code shipped with the model to run. Off by default.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights dtype when loading.")


class BackendSection(_Section):
    """The `[backend]` keys every backend shares. A backend's `Options` subclasses this and adds its own
    tables (`fsdp` for accelerate, `deepspeed` for deepspeed); `ForgeConfig.backend` is an instance of the
    selected backend's `Options`."""

    type: str = Field(
        "local",
        description="The backend that launches training stages: local, accelerate, "
        "deepspeed, or one a plugin registers.",
    )
    num_processes: int = Field(1, ge=1, description="Processes per node (usually one per GPU).")
    num_nodes: int = Field(1, ge=1, description="Machines taking part in the launch.")
    node_rank: int = Field(0, ge=0, description="This machine's node rank (0 runs `llmforge run`).")
    main_process_ip: str = Field("127.0.0.1", description="Address of node 0, reachable from every node.")
    main_process_port: int = Field(29500, ge=1, le=65535, description="A free TCP port on node 0 for the rendezvous.")
    rdzv_backend: Literal["static", "c10d"] = Field(
        "static", description="Rendezvous: static (fixed node ranks) or c10d (torch's elastic store)."
    )
    launcher: Literal["accelerate", "torchrun"] = Field(
        "accelerate", description="The program that starts the processes of a launch."
    )
    watchdog_minutes: float = Field(
        10.0,
        ge=0,
        description="No training step for this long: every process dumps "
        "its Python stacks into the stage folder (0 = off).",
    )
    tp_size: int = Field(1, ge=1, description="Tensor-parallel size (transformers' tp_plan, under torchrun).")

    @field_validator("main_process_ip")
    @classmethod
    def _address(cls, value: str) -> str:
        # It is written into every node's launch script and handed to the launcher: only an address.
        if not is_host_address(value):
            raise ValueError(f"must be an IP address or a host name (got {value!r})")
        return value

    @property
    def world_size(self) -> int:
        return self.num_processes * self.num_nodes


_HOST_LABEL_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


def is_host_address(value: str) -> bool:
    """An IPv4 or IPv6 address, or a host name: dot-separated labels of letters, digits, '-' (inside) and
    '_' (seen on cluster nodes), 253 characters at most."""
    import ipaddress

    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        pass
    name = value[:-1] if value.endswith(".") else value
    return 0 < len(name) <= 253 and all(_HOST_LABEL_RE.match(label) for label in name.split("."))


# The top-level tables of forge.toml; the plain ones name their model (validated by `_section` in load_config).
TOP_LEVEL = {
    "project": ProjectSection,
    "model": ModelSection,
    "backend": None,  # validated against the selected backend's Options
    "trackers": None,  # keys validated against registered trackers
    "judges": None,  # [judges.NAME] tables validated against their backend's Options (llmforge.judging)
    "stages": None,
}


@dataclass
class StageSpec:
    """One `[[stages]]` entry after validation."""

    index: int
    name: str
    uses: str
    raw: dict  # the options exactly as written (plus --set overrides)
    options: Any  # the validated Options instance
    cls: type[Stage]

    @property
    def where(self) -> str:
        return f"stages[{self.index}]"


@dataclass
class ForgeConfig:
    path: Path
    raw: dict
    project: ProjectSection
    model: ModelSection
    backend: BackendSection
    trackers: dict  # enabled tracker name -> its validated options
    stages: list[StageSpec] = field(default_factory=list)
    #: judge name -> its llmforge.judging.JudgeSpec (paths relative to forge.toml's folder)
    judges: dict = field(default_factory=dict)

    @property
    def project_dir(self) -> Path:
        return self.path.parent

    @property
    def runs_dir(self) -> Path:
        return (self.project_dir / self.project.runs_dir).resolve()

    @property
    def name(self) -> str:
        return self.project.name or self.project_dir.name

    def stage(self, name: str) -> StageSpec | None:
        return next((s for s in self.stages if s.name == name), None)


# ----------------------------------------------------------------------------------------------
# reading


def read_toml(path: Path) -> dict:
    """Parse a TOML file; a syntax error names file, line and column."""
    if not path.exists():
        raise ConfigError(
            [Problem(str(path), "file not found")], hint="create one with `llmforge init`, or pass -c PATH"
        )
    if path.is_dir():
        raise ConfigError([Problem(str(path), "is a directory, expected a forge.toml file")])
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(str(path), f"not valid UTF-8 (byte {exc.start})")]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        where = f"{path}:{m.group(1)}:{m.group(2)}" if m else str(path)
        reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", msg).strip() if m else msg
        if m is None and "end of document" in msg:
            where = f"{path}:{max(1, len(text.splitlines()))}"
            reason = msg.replace(" (at end of document)", "") + " (at the end of the file)"
        raise ConfigError([Problem(where, f"invalid TOML: {reason}")]) from None


def parse_value(text: str) -> Any:
    """A --set value: any TOML value (`1e-4`, `true`, `[1, 2]`, `"x"`), else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict, overrides: list[str], origins: dict[str, str] | None = None) -> list[Problem]:
    """Apply `--set key.path=value` items to the raw config in place.

    The first segment is a top-level section (`project.seed=1`) or a stage name (`sft.lora.r=8`).
    `origins` receives, for each key path set, the --set item it came from (to name it in errors).
    """
    problems = []
    origins = {} if origins is None else origins
    found = raw.get("stages")
    stages: list = found if isinstance(found, list) else []
    names = [s.get("name") for s in stages if isinstance(s, dict)]
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(Problem(f"--set {item}", "expected KEY=VALUE, for example sft.learning_rate=1e-4"))
            continue
        parts = key.split(".")
        head = parts[0]
        if head in TOP_LEVEL and head != "stages":
            target = raw.setdefault(head, {})
            rest = parts[1:]
            path = head
        elif head in names:
            target = stages[names.index(head)]
            rest = parts[1:]
            path = f"stages[{names.index(head)}]"
        elif head == "stages" or STAGE_INDEX_RE.match(head):
            problems.append(Problem(f"--set {key}", _by_name_hint(head, rest_of(key), value, names)))
            continue
        else:
            problems.append(
                Problem(
                    f"--set {key}",
                    f"no section or stage named '{head}'{did_you_mean(head, [*TOP_LEVEL, *filter(None, names)])}",
                )
            )
            continue
        if not rest:
            problems.append(
                Problem(
                    f"--set {key}",
                    f"name an option, for example {head}.{'seed' if head == 'project' else 'option'}=VALUE",
                )
            )
            continue
        for part in rest[:-1]:
            nxt = target.setdefault(part, {})
            if not isinstance(nxt, dict):
                problems.append(Problem(f"--set {key}", f"'{part}' is not a table"))
                break
            target = nxt
        else:
            target[rest[-1]] = parse_value(value.strip())
            origins[".".join([path, *rest])] = item
    return problems


STAGE_INDEX_RE = re.compile(r"^stages\[(-?\d+)\]$")


def rest_of(key: str) -> str:
    return key.partition(".")[2]


def _by_name_hint(head: str, rest: str, value: str, names: list) -> str:
    """What to write instead of `stages[0].x=1` or `stages.x=1`: stages are addressed by name (an index
    changes meaning when a stage is added or moved), so point at the name the index stands for."""
    listed = ", ".join(str(n) for n in names if n) or "none"
    m = STAGE_INDEX_RE.match(head)
    if m is not None:
        i = int(m.group(1))
        name = names[i] if -len(names) <= i < len(names) else None
        if isinstance(name, str) and name:
            option = rest or "option"
            return (
                f"stages are addressed by name, not by index: {head} is '{name}', so write "
                f"--set {name}.{option}={value.strip() or 'VALUE'} (stages: {listed})"
            )
        return f"stages are addressed by name, not by index; there is no {head} (stages: {listed})"
    return f"address a stage by its name: NAME.option=VALUE (stages: {listed})"


def _note_origins(problems: list[Problem], origins: dict[str, str]) -> list[Problem]:
    """Say which --set produced a problem: the user did not write that key in forge.toml."""
    out = []
    for p in problems:
        src = next((item for path, item in origins.items() if p.where == path or p.where.startswith(path + ".")), None)
        out.append(Problem(f"{p.where} (from --set {src.partition('=')[0]})", p.message) if src else p)
    return out


# ----------------------------------------------------------------------------------------------
# validation


def parse_config(
    path: str | Path | None, overrides: list[str] | None, registry: Registry
) -> tuple[ForgeConfig, list[Problem]]:
    """Read, override and validate forge.toml section by section.

    Returns the config (with the stages that validated) and every problem found, so that callers can
    go on checking the pipeline and report everything at once. Unreadable files raise ConfigError.
    """
    path = Path(path or DEFAULT_CONFIG).absolute()
    raw = read_toml(path)
    origins: dict[str, str] = {}
    problems = apply_overrides(raw, overrides or [], origins)

    for key in raw:
        if key not in TOP_LEVEL:
            problems.append(Problem(key, f"unknown section '{key}'{did_you_mean(key, TOP_LEVEL)}"))

    project = _section(raw, "project", ProjectSection, problems)
    model = _section(raw, "model", ModelSection, problems)

    trackers = raw.get("trackers", {})
    if not isinstance(trackers, dict):
        problems.append(Problem("trackers", f"expected a table [trackers], got {type(trackers).__name__}"))
        trackers = {}
    enabled: dict[str, Any] = {}
    for name, value in trackers.items():
        cls = registry.trackers.get(name)
        if cls is None:
            problems.append(
                Problem(
                    f"trackers.{name}",
                    f"unknown tracker '{name}'"
                    f"{did_you_mean(name, registry.trackers)} (installed: "
                    f"{', '.join(sorted(registry.trackers)) or 'none'})",
                )
            )
        elif value is False:
            continue
        elif value is True or isinstance(value, dict):
            opts, probs = validate_model(cls.Options, {} if value is True else value, f"trackers.{name}")
            problems += probs
            if opts is not None:
                enabled[name] = opts
        else:
            problems.append(
                Problem(
                    f"trackers.{name}",
                    f"expected true, false or a table of options, got {type(value).__name__} {value!r}",
                )
            )

    from llmforge.judging import JUDGE_BACKENDS, validate_judges

    judges, judge_problems = validate_judges(raw.get("judges", {}), path.parent, registry.table(JUDGE_BACKENDS))
    problems += judge_problems

    backend, backend_problems = _validate_backend(raw.get("backend", {}), registry)
    problems += backend_problems
    cfg = ForgeConfig(path=path, raw=raw, project=project, model=model, trackers=enabled, backend=backend)
    cfg.judges = judges
    cfg.stages, stage_problems = _validate_stages(raw.get("stages", []), registry)
    problems += stage_problems
    if "project" not in {p.where.split(".")[0] for p in problems}:
        problems += _check_runs_dir(cfg)
    if not backend_problems and not stage_problems:
        problems += _check_backend(cfg, registry)
    return cfg, _note_origins(problems, origins)


_SectionT = TypeVar("_SectionT", bound=BaseModel)


def _section(raw: dict, key: str, model: type[_SectionT], problems: list[Problem]) -> _SectionT:
    """One plain top-level table (`[project]`, `[model]`) validated against its model; its problems are
    added to ``problems`` and the defaults stand in for a table that is not valid."""
    value = raw.get(key, {})
    if not isinstance(value, dict):
        problems.append(Problem(key, f"expected a table [{key}], got {type(value).__name__}"))
        return model()
    inst, probs = validate_model(model, value, key)
    problems += probs
    return inst or model()


def _check_runs_dir(cfg: ForgeConfig) -> list[Problem]:
    """`[project] runs_dir` must be a folder, or a path where one can be made: a file there (or in the way
    of one of its parents) would otherwise fail the run when it creates its folder."""
    target = cfg.runs_dir
    for path in (target, *target.parents):
        if path.exists():
            if path.is_dir():
                return []
            where = "is a file" if path == target else f"cannot be created: {path} is a file"
            return [
                Problem(
                    "project.runs_dir", f"{target} {where}; runs_dir must be a folder (got {cfg.project.runs_dir!r})"
                )
            ]
    return []


def _validate_backend(value: Any, registry: Registry) -> tuple[BackendSection, list[Problem]]:
    """`[backend]` against the Options of the backend its `type` names.

    A table that belongs to another installed backend (`[backend.fsdp]` while `type = "deepspeed"`) is
    checked against that backend's Options and then left out, so that switching `type` (`--set
    backend.type=local`) never makes the rest of the file invalid, while typos are still caught.
    """
    if not isinstance(value, dict):
        return BackendSection(), [Problem("backend", f"expected a table [backend], got {type(value).__name__}")]
    backends = registry.backends
    name = value.get("type", "local")
    cls = backends.get(name) if isinstance(name, str) else None
    if cls is None and name == "local":
        # The default must work even when the plugin that registers `local` failed to load: stages then
        # run in the `llmforge run` process, which is all `local` does.
        inst, probs = validate_model(BackendSection, value, "backend")
        return inst or BackendSection(), probs
    if cls is None:
        broken = ""
        if registry.errors:
            broken = f"; plugins with errors: {', '.join(sorted({e.plugin for e in registry.errors}))}"
        problem = Problem(
            "backend.type",
            f"unknown backend {name!r}{did_you_mean(str(name), backends)} "
            f"(installed: {', '.join(sorted(backends)) or 'none'}{broken})",
        )
        common = {k: v for k, v in value.items() if k in BackendSection.model_fields and k != "type"}
        inst, probs = validate_model(BackendSection, common, "backend")
        return inst or BackendSection(), [problem, *probs]
    problems: list[Problem] = []
    own = dict(value)
    for key in list(own):
        if key in cls.Options.model_fields:
            continue
        owner = next((b for b in backends.values() if key in b.Options.model_fields), None)
        if owner is not None:
            problems += validate_model(owner.Options, {"type": owner.name, key: own.pop(key)}, "backend")[1]
    inst, probs = validate_model(cls.Options, own, "backend")
    return inst or cls.Options.model_construct(type=name), problems + probs


def _check_backend(cfg: ForgeConfig, registry: Registry) -> list[Problem]:
    """The selected backend's own preflight over the whole configuration (cheap; no launch)."""
    cls = registry.backends.get(cfg.backend.type)
    if cls is None:
        return []
    try:
        found = cls(cfg.backend).check(cfg) or []
    except Exception as exc:  # noqa: BLE001 - a broken backend is a problem to show, not a crash
        return [
            Problem(
                "backend",
                f"backend {cfg.backend.type!r} failed to check the configuration: {type(exc).__name__}: {exc}",
            )
        ]
    return [p if isinstance(p, Problem) else Problem("backend", str(p)) for p in found]


RESERVED_NAMES = set(TOP_LEVEL)


def _validate_stages(stages: Any, registry: Registry) -> tuple[list[StageSpec], list[Problem]]:
    problems: list[Problem] = []
    if not isinstance(stages, list):
        return [], [Problem("stages", "expected an array of tables ([[stages]])")]
    if not stages:
        problems.append(Problem("stages", "no stages: add at least one [[stages]] table"))
    specs: list[StageSpec] = []
    seen: dict[str, int] = {}
    kinds = sorted(registry.stages)
    for i, entry in enumerate(stages):
        where = f"stages[{i}]"
        if not isinstance(entry, dict):
            problems.append(Problem(where, "expected a table"))
            continue
        opts = dict(entry)
        name = opts.pop("name", None)
        uses = opts.pop("uses", None)
        if name is None:
            problems.append(Problem(f"{where}.name", "required key is missing"))
        elif not isinstance(name, str) or not STAGE_NAME_RE.match(name):
            problems.append(Problem(f"{where}.name", f"must be a word of letters, digits, '-' or '_' (got {name!r})"))
            name = None
        elif name in RESERVED_NAMES:
            problems.append(Problem(f"{where}.name", f"'{name}' is reserved for a section; choose another"))
        elif name in seen:
            problems.append(Problem(f"{where}.name", f"duplicate stage name '{name}' (also stages[{seen[name]}])"))
        else:
            seen[name] = i
        if uses is None:
            problems.append(
                Problem(
                    f"{where}.uses", "required key is missing; installed stage kinds: " + (", ".join(kinds) or "none")
                )
            )
            continue
        cls = registry.stage_class(uses) if isinstance(uses, str) else None
        if cls is None:
            broken = ""
            if registry.errors:
                names = ", ".join(sorted({e.plugin for e in registry.errors}))
                broken = f"; plugins with errors: {names} (see `llmforge plugins list`)"
            problems.append(
                Problem(
                    f"{where}.uses",
                    f"unknown stage kind {uses!r}{did_you_mean(str(uses), kinds)}"
                    f" (installed: {', '.join(kinds) or 'none'}{broken})",
                )
            )
            continue
        inst, probs = validate_model(cls.Options, opts, where)
        problems += probs
        if inst is not None and name:
            specs.append(StageSpec(i, name, uses, opts, inst, cls))
    return specs, problems
