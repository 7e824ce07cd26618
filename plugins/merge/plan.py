"""From a recipe to a plan: every check a merge makes before it reads a single tensor's data.

`static_problems` needs no files (the stage's `check()` and `llmforge validate` use it): the method
exists, the number of models suits it, every parameter is known and in range, slices are well formed.
`prepare` opens the inputs (headers only) and builds the `Plan`: for every output tensor its inputs,
its parameters resolved for its layer and name, its dtype and shape, and the output shards. It stops
at the first thing that cannot work (different architectures, a tensor of another shape, vocabularies
that differ, quantized inputs, a damaged safetensors file, not enough disk) with one message naming it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmforge.errors import ConfigError, Problem, UsageError
from llmforge.formatting import fmt_bytes
from llmforge.schema import did_you_mean
from llmforge_plugins.merge.api import MergeMethod, Param, TensorInfo, interpolate
from llmforge_plugins.merge.options import FilterValue, MergeOptions, parse_size
from llmforge_plugins.merge.sources import FLOAT_DTYPES, LAYER_RE, Source, is_embedding, layer_of, open_source
from llmforge_plugins.merge.writer import nbytes

# ------------------------------------------------------------------------------------------------
# static checks


def _values(value: Any, where: str):
    """(where, scalar-or-list) pairs of a parameter value, through lists of filters."""
    if isinstance(value, list) and value and isinstance(value[0], FilterValue):
        for i, entry in enumerate(value):
            yield f"{where}[{i}].value", entry.value
    else:
        yield where, value


def _check_param_table(params: dict, where: str, method: MergeMethod, per_model: bool) -> list[Problem]:
    problems = []
    known = [p.name for p in method.params]
    for name, value in params.items():
        here = f"{where}.{name}"
        spec = method.param(name)
        if spec is None:
            listed = ", ".join(known) if known else "none"
            problems.append(
                Problem(
                    here,
                    f"method {method.name} has no parameter '{name}'"
                    f"{did_you_mean(name, known)} (its parameters: {listed})",
                )
            )
            continue
        if per_model and not spec.per_model:
            problems.append(
                Problem(
                    here, f"'{name}' applies to the whole merge, not to one model: set it in the recipe's parameters"
                )
            )
            continue
        for loc, v in _values(value, here):
            items = v if isinstance(v, list) else [v]
            if isinstance(v, list) and spec.kind == "bool":
                problems.append(Problem(loc, "must be true or false, not a list"))
                continue
            if isinstance(v, list) and not v:
                problems.append(Problem(loc, "an empty list"))
                continue
            for i, item in enumerate(items):
                why = spec.check(item)
                if why:
                    problems.append(Problem(f"{loc}[{i}]" if isinstance(v, list) else loc, why))
                    break
    return problems


def static_problems(options: MergeOptions, methods: dict[str, MergeMethod]) -> list[Problem]:
    """What is wrong with a recipe, without opening any file. Locations are recipe key paths."""
    problems: list[Problem] = []
    method = methods.get(options.method)
    if method is None:
        problems.append(
            Problem(
                "method",
                f"unknown merge method '{options.method}'{did_you_mean(options.method, methods)} "
                f"(known: {', '.join(sorted(methods))})",
            )
        )
    if options.slices and options.models:
        problems.append(Problem("slices", "give either models or slices, not both"))
    elif not options.slices and not options.models:
        problems.append(Problem("models", "no models to merge"))
    for i, sl in enumerate(options.slices):
        lengths = set()
        for j, src in enumerate(sl.sources):
            start, end = src.layer_range
            if start < 0 or end <= start:
                problems.append(
                    Problem(
                        f"slices[{i}].sources[{j}].layer_range",
                        f"[start, end) with 0 <= start < end (got [{start}, {end}])",
                    )
                )
            lengths.add(end - start)
        if len(lengths) > 1:
            problems.append(
                Problem(
                    f"slices[{i}].sources",
                    f"every source of a slice must span the same number of layers (got {sorted(lengths)})",
                )
            )
    if method is None:
        return problems
    own = getattr(method, "recipe_problems", None)
    if own is not None:  # a method that plans its own merge (moe) checks its own recipe
        return problems + own(options, methods)
    problems += _moe_only(options)
    has_base = options.base is not None
    if not options.slices:
        for why in method.check(len(options.models), has_base):
            problems.append(Problem("models", why))
    for i, sl in enumerate(options.slices):
        n = len([s for s in sl.sources if s.model != options.base]) if has_base else len(sl.sources)
        for why in method.check(n, has_base):
            problems.append(Problem(f"slices[{i}].sources", why))
    problems += _check_param_table(options.parameters, "parameters", method, per_model=False)
    for spec in method.params:
        if spec.default is not None or spec.name in options.parameters:
            continue
        tables = [m.parameters for m in options.models] + [s.parameters for sl in options.slices for s in sl.sources]
        if not (spec.per_model and tables and all(spec.name in t for t in tables)) and not (
            options.slices and all(spec.name in sl.parameters for sl in options.slices)
        ):
            problems.append(
                Problem(
                    f"parameters.{spec.name}",
                    f"method {method.name} needs this parameter ({spec.description.rstrip('.')})",
                )
            )
    for i, m in enumerate(options.models):
        problems += _check_param_table(m.parameters, f"models[{i}].parameters", method, per_model=True)
    for i, sl in enumerate(options.slices):
        problems += _check_param_table(sl.parameters, f"slices[{i}].parameters", method, per_model=False)
        for j, src in enumerate(sl.sources):
            problems += _check_param_table(
                src.parameters, f"slices[{i}].sources[{j}].parameters", method, per_model=True
            )
    return problems


def _moe_only(options: MergeOptions) -> list[Problem]:
    """The keys only method moe reads, given to another method."""
    problems = []
    if options.moe is not None:
        problems.append(Problem("moe", f"only method moe reads this table (the method is {options.method})"))
    for i, m in enumerate(options.models):
        if m.positive_prompts:
            problems.append(
                Problem(
                    f"models[{i}].positive_prompts", f"only method moe reads these (the method is {options.method})"
                )
            )
    return problems


# ------------------------------------------------------------------------------------------------
# parameter resolution


def position(name: str, layer: int | None, n_layers: int) -> float:
    """Where a tensor sits for a list of values spread over the layers: layer i of n at i/(n−1);
    embeddings at 0, the other tensors outside the layers (final norm, output head) at 1."""
    if layer is None:
        return 0.0 if is_embedding(name) else 1.0
    return layer / (n_layers - 1) if n_layers > 1 else 0.0


def resolve_value(value: Any, name: str, pos: float) -> Any:
    """The value of one parameter table entry for a tensor, or None when its filters match nothing."""
    if isinstance(value, list) and value and isinstance(value[0], FilterValue):
        for entry in value:
            if entry.filter is None or entry.filter in name:
                return resolve_value(entry.value, name, pos)
        return None
    if isinstance(value, list):
        return interpolate([float(v) for v in value], pos)
    return value


def _lookup(spec: Param, tables: list[dict], name: str, pos: float) -> Any:
    for table in tables:
        if spec.name in table:
            v = resolve_value(table[spec.name], name, pos)
            if v is not None:
                return v
    return spec.default


# ------------------------------------------------------------------------------------------------
# the plan


@dataclass
class Input:
    source: Source
    name: str


@dataclass
class OutTensor:
    name: str
    dtype: str  # output dtype name
    shape: tuple[int, ...]
    layer: int | None
    models: list[Input]
    base: Input | None
    params: dict[str, Any]
    copy: bool = False  # a non-float tensor: copied from the first input

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


@dataclass
class Plan:
    options: MergeOptions
    method: MergeMethod
    tensors: list[OutTensor]
    shards: list[list[OutTensor]]
    num_layers: int
    config: dict
    config_source: Source
    sources: list[Source]
    roles: dict[str, str]  # source label -> "base", "model", "config"
    seed: int
    compute_dtype: str
    total_bytes: int
    notes: list[str] = field(default_factory=list)

    @property
    def largest_tensor_bytes(self) -> int:
        return max((t.nbytes for t in self.tensors), default=0)


def _sort_key(t: OutTensor) -> tuple:
    if t.layer is not None:
        return (1, t.layer, t.name)
    return (0 if is_embedding(t.name) else 2, 0, t.name)


def _where(source: Source) -> str:
    return source.label


def _check_configs(sources: list[Source]) -> None:
    first = sources[0]

    def arch(s: Source) -> tuple:
        archs = s.config.get("architectures") or []
        return (archs[0] if archs else None, s.config.get("model_type"))

    for s in sources[1:]:
        a, b = arch(first), arch(s)
        if a != b and not (None in (a[0], b[0]) and a[1] == b[1]):
            raise UsageError(
                f"different architectures: {_where(first)} is {a[0] or '?'} ({a[1] or '?'}), "
                f"{_where(s)} is {b[0] or '?'} ({b[1] or '?'})",
                hint="only models of the same architecture and size can be merged",
            )
    sized = [s for s in sources if isinstance(s.config.get("vocab_size"), int)]
    for s in sized[1:]:
        if s.config["vocab_size"] != sized[0].config["vocab_size"]:
            raise UsageError(
                f"vocabulary sizes differ: {_where(sized[0])} has {sized[0].config['vocab_size']} "
                f"tokens, {_where(s)} has {s.config['vocab_size']} (vocab_size in config.json)",
                hint="merge models that share a tokenizer; a model with added tokens needs the same "
                "tokens (and embedding rows) in the others",
            )


def _check_shapes(name: str, inputs: list[Input]) -> None:
    first = inputs[0]
    want = first.source.meta(first.name).shape
    for other in inputs[1:]:
        got = other.source.meta(other.name).shape
        if got != want:
            if is_embedding(name) or name.endswith("lm_head.weight"):
                raise UsageError(
                    f"vocabulary sizes differ: {name} has shape {list(want)} in {_where(first.source)} "
                    f"but {list(got)} in {_where(other.source)}",
                    hint="merge models that share a tokenizer (same tokens, same embedding rows)",
                )
            raise UsageError(
                f"tensor shapes differ: {name} has shape {list(want)} in {_where(first.source)} but "
                f"{list(got)} in {_where(other.source)}",
                hint="only models of the same architecture and size can be merged",
            )


def _missing(name: str, ref: Source, other: Source, other_name: str | None = None) -> UsageError:
    return UsageError(
        f"tensor {other_name or name} is in {_where(ref)} but not in {_where(other)}",
        hint="only models of the same architecture and size can be merged",
    )


def _layers_of(source: Source) -> dict[int, dict[str, str]]:
    """layer index -> {suffix: tensor name} (suffix: '.self_attn.q_proj.weight')."""
    out: dict[int, dict[str, str]] = {}
    for name in source.tensors:
        m = LAYER_RE.match(name)
        if m:
            out.setdefault(int(m.group(2)), {})[m.group(3)] = name
    return out


def _prefix(source: Source) -> str | None:
    for name in source.tensors:
        m = LAYER_RE.match(name)
        if m:
            return m.group(1)
    return None


class _Sources:
    """Opens each input once, whatever how often the recipe names it."""

    def __init__(self):
        self.by_key: dict[tuple, Source] = {}

    def get(self, path: str, lora_base: str | None = None) -> Source:
        key = (str(Path(path).expanduser().resolve()), str(Path(lora_base).resolve()) if lora_base else None)
        if key not in self.by_key:
            self.by_key[key] = open_source(
                Path(path).expanduser(), label=path, lora_base=Path(lora_base).expanduser() if lora_base else None
            )
        return self.by_key[key]

    def same(self, a: str, b: str | None) -> bool:
        return b is not None and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def prepare(
    options: MergeOptions, methods: dict[str, MergeMethod], out: Path | None = None, seed: int | None = None
) -> Plan:
    """Check everything and plan the merge. Raises ConfigError (recipe), UsageError or DataError (inputs)."""
    problems = static_problems(options, methods)
    if problems:
        raise ConfigError(problems, source="merge recipe")
    method = methods[options.method]
    own = getattr(method, "plan_merge", None)
    if own is not None:  # the output's tensors are not the inputs' (moe: experts and routers): its own plan
        return own(options, methods, out, seed)
    srcs = _Sources()
    base = srcs.get(options.base) if options.base else None
    seed = options.seed if options.seed is not None else (seed or 0)
    notes: list[str] = []

    # (per-model parameter tables, source) of the models, per slice (one group without slices)
    groups: list[dict] = []
    if not options.slices:
        models = [(m.parameters, srcs.get(m.model, m.lora_base)) for m in options.models]
        groups.append({"models": models, "base": base, "ranges": None, "params": {}})
    else:
        for sl in options.slices:
            models, ranges, base_range = [], [], None
            for src in sl.sources:
                if base is not None and srcs.same(src.model, options.base):
                    base_range = src.layer_range
                    continue
                models.append((src.parameters, srcs.get(src.model)))
                ranges.append(src.layer_range)
            if base is not None and base_range is None:
                base_range = ranges[0]
            groups.append(
                {"models": models, "base": base, "ranges": ranges, "base_range": base_range, "params": sl.parameters}
            )
    first_group = groups[0]
    reference = base if base is not None else first_group["models"][0][1]
    config_source = srcs.get(options.config_from) if options.config_from else reference
    all_sources = list(dict.fromkeys([reference, config_source, *(s for g in groups for _, s in g["models"])]))
    _check_configs(all_sources)

    # layer counts
    ref_layers = reference.num_layers
    if options.slices:
        for gi, g in enumerate(groups):
            for (_params, s), (start, end) in zip(g["models"], g["ranges"]):
                n = s.num_layers
                if n is None or end > n:
                    raise UsageError(
                        f"slices[{gi}]: layer_range [{start}, {end}) is outside {_where(s)}, which has "
                        f"{n if n is not None else 'no known number of'} layers"
                    )
            if base is not None:  # g["base"]: every group reads the one base
                start, end = g["base_range"]
                if base.num_layers is None or end > base.num_layers:
                    raise UsageError(
                        f"slices[{gi}]: layer_range [{start}, {end}) is outside the base "
                        f"{_where(base)}, which has {base.num_layers} layers"
                    )
        n_out_layers = sum(r[1] - r[0] for g in groups for r in g["ranges"][:1])
    else:
        n_out_layers = ref_layers or 0

    compute_dtype = options.compute_dtype
    global_tables = [options.parameters]
    tensors: list[OutTensor] = []

    def make(
        out_name: str, layer: int | None, g: dict, names: list[str], base_name: str | None, slice_params: dict
    ) -> OutTensor:
        models = [Input(s, n) for (_, s), n in zip(g["models"], names)]
        base_in = None
        if g["base"] is not None:
            assert base_name is not None  # the callers name the base's tensor whenever the group has a base
            base_in = Input(g["base"], base_name)
        every = ([base_in] if base_in else []) + models
        for inp in every:
            if not inp.source.has(inp.name):
                raise _missing(
                    inp.name, every[0].source if every[0].source.has(every[0].name) else reference, inp.source
                )
        _check_shapes(out_name, every)
        ref_in = every[0]
        meta = ref_in.source.meta(ref_in.name)
        is_float = meta.dtype in FLOAT_DTYPES
        dtype = options.dtype if (options.dtype != "auto" and is_float) else meta.dtype
        pos = position(out_name, layer, n_out_layers)
        params: dict[str, Any] = {}
        if is_float:
            tables = [slice_params, *global_tables]
            for spec in method.params:
                if spec.per_model:
                    params[spec.name] = [_lookup(spec, [mp, *tables], out_name, pos) for mp, _ in g["models"]]
                    missing = any(v is None for v in params[spec.name])
                else:
                    params[spec.name] = _lookup(spec, tables, out_name, pos)
                    missing = params[spec.name] is None
                if missing:
                    raise UsageError(
                        f"parameter {spec.name} of {method.name} has no value for tensor {out_name}",
                        hint=f"set it (--set {spec.name}=VALUE, or parameters.{spec.name} in the recipe)"
                        f"; with filters, add an entry without filter as the default",
                    )
            info = TensorInfo(out_name, layer, n_out_layers, [m.source.label for m in models], seed)
            why = method.check_tensor(params, info)
            if why:
                raise UsageError(f"{method.name}: tensor {out_name}: {why}")
        return OutTensor(out_name, dtype, tuple(meta.shape), layer, models, base_in, params, copy=not is_float)

    # tensors outside the layers (all of them, without slices): merged over the first group's models
    out_names = [n for n in reference.tensors if not options.slices or layer_of(n) is None]
    for _, s in first_group["models"]:
        extra = [
            n
            for n in s.tensors
            if n not in reference.tensors
            and (not options.slices or layer_of(n) is None)
            and not (n == "lm_head.weight" and reference.has(n))
        ]
        if extra:
            raise _missing(sorted(extra)[0], s, reference)
    # tied embeddings: when the reference does not store lm_head but another input does, the output gets one
    tie_output = reference.tied and not any("lm_head.weight" in s.tensors for _, s in first_group["models"])
    if reference.tied and not tie_output:
        out_names.append("lm_head.weight")
        notes.append(
            "lm_head: some inputs tie it to the embeddings and some do not; the output stores it "
            "(tie_word_embeddings = false)"
        )
    for name in out_names:
        layer = layer_of(name)
        tensors.append(make(name, layer, first_group, [name] * len(first_group["models"]), name, {}))

    if options.slices:
        out_prefix = _prefix(reference)
        if out_prefix is None:
            raise UsageError(
                f"{_where(reference)}: no numbered layers found in its tensor names; slices need "
                f"layers named like model.layers.N."
            )
        offset = 0
        ref_layer_shapes: dict[str, tuple] = {}
        for gi, g in enumerate(groups):
            maps = [_layers_of(s) for _, s in g["models"]]
            base_map = _layers_of(g["base"]) if g["base"] is not None else None
            length = g["ranges"][0][1] - g["ranges"][0][0]
            for j in range(length):
                src_layers = [r[0] + j for r in g["ranges"]]
                suffixes = maps[0].get(src_layers[0], {})
                for k, (mp, sl) in enumerate(zip(maps[1:], src_layers[1:]), start=1):
                    if set(mp.get(sl, {})) != set(suffixes):
                        other = sorted(set(mp.get(sl, {})) ^ set(suffixes))[0]
                        raise UsageError(
                            f"slices[{gi}]: layer {src_layers[0]} of {_where(g['models'][0][1])} and "
                            f"layer {sl} of {_where(g['models'][k][1])} differ in their tensors "
                            f"({other.lstrip('.')})"
                        )
                out_layer = offset + j
                for suffix in sorted(suffixes):
                    names = [mp[sl][suffix] for mp, sl in zip(maps, src_layers)]
                    base_name = None
                    if base_map is not None:
                        bl = g["base_range"][0] + j
                        base_name = base_map.get(bl, {}).get(suffix)
                        if base_name is None:
                            raise _missing(
                                names[0], g["models"][0][1], g["base"], other_name=f"layer {bl} {suffix.lstrip('.')}"
                            )
                    t = make(f"{out_prefix}{out_layer}{suffix}", out_layer, g, names, base_name, g["params"])
                    if suffix in ref_layer_shapes and ref_layer_shapes[suffix] != t.shape:
                        raise UsageError(
                            f"slices[{gi}]: {t.name} would have shape {list(t.shape)}, the other "
                            f"layers' {suffix.lstrip('.')} {list(ref_layer_shapes[suffix])}",
                            hint="stack layers of models of the same size",
                        )
                    ref_layer_shapes.setdefault(suffix, t.shape)
                    tensors.append(t)
            offset += length

    tensors.sort(key=_sort_key)
    shards = make_shards(tensors, options.max_shard_size)
    total = sum(t.nbytes for t in tensors)

    config = _output_config(options, config_source, reference, groups, n_out_layers, tensors, tie_output)
    roles = {}
    if base is not None:
        roles[base.label] = "base"
    for g in groups:
        for _, s in g["models"]:
            roles.setdefault(s.label, "model")
    roles.setdefault(config_source.label, "config")
    plan = Plan(
        options,
        method,
        tensors,
        shards,
        n_out_layers,
        config,
        config_source,
        all_sources,
        roles,
        seed,
        compute_dtype,
        total,
        notes,
    )
    if out is not None:
        check_disk(out, total)
    return plan


def make_shards(tensors: list[OutTensor], max_shard_size: str) -> list[list[OutTensor]]:
    """The output files: tensors in order, a new file whenever the next tensor would pass the limit."""
    shard_limit = parse_size(max_shard_size)
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > shard_limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _output_config(
    options: MergeOptions,
    config_source: Source,
    reference: Source,
    groups: list[dict],
    n_out_layers: int,
    tensors: list[OutTensor],
    tie_output: bool,
) -> dict:
    cfg = dict(config_source.config)
    if options.slices:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(cfg.get(key), int):
                cfg[key] = n_out_layers
                break
        types = cfg.get("layer_types")
        if isinstance(types, list):
            out_types = []
            for g in groups:
                start, end = g["ranges"][0]
                src_types = g["models"][0][1].config.get("layer_types") or types
                out_types += [src_types[i] if i < len(src_types) else src_types[-1] for i in range(start, end)]
            cfg["layer_types"] = out_types
    if options.dtype != "auto":
        cfg["dtype"] = options.dtype
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = options.dtype
    names = {t.name for t in tensors}
    if "lm_head.weight" in names and cfg.get("tie_word_embeddings") is not False and reference.tied:
        cfg["tie_word_embeddings"] = False
    elif tie_output and "lm_head.weight" not in names:
        cfg["tie_word_embeddings"] = True
    embed = next(
        (
            t
            for t in tensors
            if t.layer is None and is_embedding(t.name) and len(t.shape) == 2 and not t.name.endswith("wpe.weight")
        ),
        None,
    )
    if embed is not None and isinstance(cfg.get("vocab_size"), int):
        cfg["vocab_size"] = embed.shape[0]
    return cfg


def check_disk(out: Path, needed: int) -> None:
    """Refuse to start a merge whose output cannot fit on the disk (with 1% + 16 MB to spare)."""
    probe = Path(out).expanduser().resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    want = needed + needed // 100 + (16 << 20)
    if free < want:
        raise UsageError(
            f"not enough free disk for the output: it needs {fmt_bytes(want)}, {probe} has {fmt_bytes(free)} free",
            hint="free some space, or write the output elsewhere",
        )
