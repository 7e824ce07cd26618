"""Running a merge plan: tensor by tensor into streamed safetensors shards, then the rest of a complete
Hugging Face model directory (config, generation config, tokenizer and chat template, model card).

Memory: for each output tensor the engine holds its inputs (one tensor per model, and the base's),
the method's chunk-sized temporaries and the result; the shard being written is never held (see
writer.py). Inputs are read from memory-mapped files that are closed after each read.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmforge.errors import UsageError
from llmforge.formatting import fmt_bytes
from llmforge_plugins.merge.api import TensorInfo
from llmforge_plugins.merge.plan import OutTensor, Plan, prepare
from llmforge_plugins.merge.sources import TOKENIZER_FILES, LoraSource, Source
from llmforge_plugins.merge.writer import write_safetensors

INDEX = "model.safetensors.index.json"
#: Written into every merge output: how `--force` recognises a folder it may replace (an earlier merge's).
MARKER = "llmforge-merge.json"


@dataclass
class Reporter:
    """Where a merge reports: a stage passes its context's methods, the command line its printer."""

    log: Callable[..., None] = lambda message, level="info": None
    progress: Callable[..., None] = lambda done, total=None, unit="tensor", **extra: None
    should_stop: Callable[[], bool] = lambda: False


def _shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _compute(plan: Plan, t: OutTensor, torch) -> Any:
    if t.copy:
        first = t.models[0] if t.models else t.base
        assert first is not None  # the plan gives every tensor a model or a base to read
        return first.source.load(first.name)
    cdtype = getattr(torch, plan.compute_dtype)
    loaded: dict[tuple[int, str], Any] = {}

    def get(inp):
        key = (id(inp.source), inp.name)
        if key in loaded:  # the same tensor used twice: a copy, since methods work in place
            return loaded[key].clone()
        loaded[key] = inp.source.load(inp.name, cdtype)
        return loaded[key]

    models = [get(i) for i in t.models]
    base = get(t.base) if t.base is not None else None
    loaded.clear()
    info = TensorInfo(t.name, t.layer, plan.num_layers, [i.source.label for i in t.models], plan.seed)
    result = plan.method.merge(models, base, t.params, info)
    del models, base
    if tuple(result.shape) != t.shape:
        raise RuntimeError(
            f"merge method {plan.method.name} returned shape {list(result.shape)} for {t.name}, "
            f"expected {list(t.shape)}"
        )
    return result.to(getattr(torch, t.dtype))


def execute(plan: Plan, out_dir: Path, report: Reporter | None = None) -> dict | None:
    """Write the merged model into the existing, empty folder `out_dir`. Returns a summary, or None when
    a stop was requested (the folder then holds an incomplete model: the caller discards it)."""
    import torch

    report = report or Reporter()
    out_dir = Path(out_dir)
    started = time.monotonic()
    n = len(plan.tensors)
    report.log(
        f"{plan.method.name}: {n} tensors, {fmt_bytes(plan.total_bytes)} in {len(plan.shards)} shard"
        f"{'s' if len(plan.shards) != 1 else ''}, from {len(plan.sources)} input"
        f"{'s' if len(plan.sources) != 1 else ''}; largest tensor {fmt_bytes(plan.largest_tensor_bytes)}; "
        f"compute in {plan.compute_dtype}"
    )
    for note in plan.notes:
        report.log(note, level="warning")
    done = 0
    weight_map: dict[str, str] = {}
    stopped = False
    with torch.no_grad():
        for i, shard in enumerate(plan.shards):
            fname = _shard_name(i, len(plan.shards))
            by_name = {t.name: t for t in shard}

            def produce(name: str) -> Any:
                nonlocal done, stopped
                if report.should_stop():
                    stopped = True
                    raise _Stop()
                result = _compute(plan, by_name[name], torch)  # noqa: B023 - called in this same loop turn
                done += 1
                report.progress(done, n, unit="tensor")
                return result

            try:
                write_safetensors(out_dir / fname, [(t.name, t.dtype, t.shape) for t in shard], produce)
            except _Stop:
                return None
            weight_map.update({t.name: fname for t in shard})
    run_notes = getattr(plan.method, "run_notes", None)  # what a method that plans itself (moe) learnt running
    for note in run_notes() if run_notes else []:
        report.log(note)
    if len(plan.shards) > 1:
        index = {"metadata": {"total_size": plan.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    write_model_files(plan, out_dir)
    seconds = time.monotonic() - started
    report.log(f"wrote {n} tensors ({fmt_bytes(plan.total_bytes)}) in {seconds:.1f}s")
    return {
        "method": plan.method.name,
        "tensors": n,
        "bytes": plan.total_bytes,
        "shards": len(plan.shards),
        "layers": plan.num_layers,
        "seconds": round(seconds, 3),
    }


class _Stop(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# the rest of the model directory


def _dirs(source: Source) -> list[Path]:
    """Folders to look in for a source's side files: the adapter's own first, then its base's."""
    if isinstance(source, LoraSource):
        return [source.path, source.base.path]
    return [source.path]


def write_model_files(plan: Plan, out_dir: Path) -> None:
    src = plan.config_source
    (out_dir / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    gen = next((d / "generation_config.json" for d in _dirs(src) if (d / "generation_config.json").exists()), None)
    if gen is not None:
        shutil.copyfile(gen, out_dir / "generation_config.json")
    else:
        keys = {
            k: plan.config[k]
            for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if plan.config.get(k) is not None
        }
        (out_dir / "generation_config.json").write_text(
            json.dumps({**keys, "_from_model_config": True}, indent=2) + "\n", encoding="utf-8"
        )
    tok_dir = src.tokenizer_dir
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copyfile(tok_dir / name, out_dir / name)
    for d in [tok_dir, *_dirs(src)]:
        if (d / "llmforge.json").is_file():  # the chat template record the training stages write
            shutil.copyfile(d / "llmforge.json", out_dir / "llmforge.json")
            break
    (out_dir / "README.md").write_text(model_card(plan), encoding="utf-8")
    from llmforge import __version__

    marker = {
        "written_by": f"llmforge {__version__}",
        "method": plan.method.name,
        "inputs": [s.label for s in plan.sources],
    }
    (out_dir / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    raise TypeError(f"cannot write {value!r} as TOML")


def recipe_toml(options) -> str:
    """The recipe as a merge.toml (`llmforge merge OUT -c merge.toml` reproduces the merge)."""
    data = options.model_dump(mode="python", exclude_defaults=True, exclude_none=True)
    data["method"] = options.method
    lines = [
        f"{_toml_key(k)} = {toml_value(v)}" for k, v in data.items() if k not in ("parameters", "models", "slices")
    ]
    if data.get("parameters"):
        lines += ["", "[parameters]"] + [f"{_toml_key(k)} = {toml_value(v)}" for k, v in data["parameters"].items()]
    for table in ("models", "slices"):
        for entry in data.get(table, []):
            lines += ["", f"[[{table}]]"] + [f"{_toml_key(k)} = {toml_value(v)}" for k, v in entry.items()]
    return "\n".join(lines) + "\n"


def absolute_paths(options):
    """The recipe with every model path made absolute (relative ones are relative to the current folder),
    so that the merge.toml in a model card works from anywhere."""
    data = options.model_dump(mode="python")

    def fix(container, key):
        value = container.get(key)
        if isinstance(value, str) and not value.startswith("@"):
            container[key] = str(Path(value).expanduser().absolute())

    fix(data, "base")
    fix(data, "config_from")
    for m in data["models"]:
        fix(m, "model")
        fix(m, "lora_base")
    for sl in data["slices"]:
        for src in sl["sources"]:
            fix(src, "model")
    return type(options).model_validate(data)


def model_card(plan: Plan) -> str:
    from llmforge import __version__

    o = plan.options
    bases = [label for label, role in plan.roles.items() if role == "base"]
    front = ["---", "library_name: transformers", "tags:", "- merge", "- llmforge"]
    if bases:
        front += ["base_model:"] + [f"- {json.dumps(b)}" for b in bases]
    front.append("---")
    rows = ["| role | model | architecture |", "|---|---|---|"]
    for s in plan.sources:
        arch = (s.config.get("architectures") or ["?"])[0]
        role = plan.roles.get(s.label, "input")
        kind = " (LoRA adapter, merged into its base first)" if s.is_adapter else ""
        rows.append(f"| {role} | `{s.label}`{kind} | {arch} |")
    body = [
        "",
        f"# Merged model ({plan.method.name})",
        "",
        f"Merged with llmforge {__version__} using the **{plan.method.name}** method: {plan.method.summary}",
        "",
        f"{len(plan.tensors)} tensors, {plan.num_layers} layers, {fmt_bytes(plan.total_bytes)}; computed in "
        f"{plan.compute_dtype}, seed {plan.seed}. Config, tokenizer and chat template come from "
        f"`{plan.config_source.label}`.",
        "",
        "## Inputs",
        "",
        *rows,
        "",
        *([section()] if (section := getattr(plan.method, "card_section", None)) else []),
        "## Recipe",
        "",
        "Run again with `llmforge merge OUT -c merge.toml`, this being merge.toml:",
        "",
        "```toml",
        recipe_toml(absolute_paths(o)).rstrip(),
        "```",
        "",
    ]
    return "\n".join(front + body)


# ------------------------------------------------------------------------------------------------
# standalone: into a folder of its own, atomically


def _input_dirs(plan: Plan) -> list[Path]:
    dirs = []
    for src in plan.sources:
        dirs.append(Path(src.path))
        if isinstance(src, LoraSource):
            dirs.append(Path(src.base.path))
    return dirs


def _check_replace(plan: Plan, out: Path, replace: Path | None) -> None:
    """May `out`, a non-empty folder, be replaced? `--force` replaces only an earlier merge's output (it
    carries MARKER) that holds none of this merge's inputs; anything else only when named with `--replace`."""
    if replace is not None:
        return
    hint = f"write to another folder, or name it again to replace it anyway: --replace {out}"
    real = out.resolve()
    for d in _input_dirs(plan):
        d = d.resolve()
        if d == real or real in d.parents:
            what = "is" if d == real else "holds"
            raise UsageError(f"{out} {what} an input of this merge ({d}): --force would delete it", hint=hint)
    if not (out / MARKER).is_file():
        raise UsageError(
            f"{out} is not the output of an earlier merge (it has no {MARKER}): --force replaces only those", hint=hint
        )


def merge_to(
    options,
    out: Path,
    methods: dict,
    *,
    force: bool = False,
    report: Reporter | None = None,
    seed: int | None = None,
    replace: Path | None = None,
) -> dict | None:
    """Check, plan and run a merge into `out`. Nothing is written to `out` unless the merge completes:
    it is built in a temporary sibling folder and renamed into place.

    A non-empty `out` is replaced with `force` when it is an earlier merge's output and none of the inputs,
    and with `replace` (the same folder as `out`, named a second time by the user) whatever it holds."""
    from llmforge.stage import replace_dir

    out = Path(out).expanduser().absolute()
    if replace is not None and Path(replace).expanduser().resolve() != out.resolve():
        raise UsageError(
            f"--replace {replace} is not the output folder {out}",
            hint="--replace names OUT a second time, to replace it whatever it holds",
        )
    occupied = False
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"{out} exists and is a file; the output is a model directory")
        occupied = any(out.iterdir())
        if occupied and not (force or replace is not None):
            raise UsageError(
                f"{out} exists and is not empty",
                hint="choose another folder, or add --force to replace an earlier merge's output",
            )
    plan = prepare(options, methods, out=out, seed=seed)
    if occupied:
        _check_replace(plan, out, replace)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        summary = execute(plan, tmp, report)
        if summary is None:
            shutil.rmtree(tmp, ignore_errors=True)
            return None
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def merge_lora(
    adapter: Path,
    out: Path,
    *,
    base: Path | None = None,
    dtype: str = "auto",
    compute_dtype: str = "float32",
    force: bool = False,
    report: Reporter | None = None,
    replace: Path | None = None,
) -> dict | None:
    """Merge a LoRA adapter into its base model (base + scale·B·A for every adapted weight) and write a
    complete model directory to `out`. `base` defaults to the model named in adapter_config.json."""
    from llmforge_plugins.merge.methods import Passthrough
    from llmforge_plugins.merge.options import MergeOptions, ModelEntry

    if not (Path(adapter) / "adapter_config.json").exists():
        if not Path(adapter).exists():
            raise UsageError(f"adapter directory not found: {adapter}")
        raise UsageError(f"{adapter}: not a LoRA adapter directory (no adapter_config.json)")
    options = MergeOptions(
        method="passthrough",
        dtype=dtype,
        compute_dtype=compute_dtype,
        models=[ModelEntry(model=str(adapter), lora_base=str(base) if base else None)],
    )
    return merge_to(options, out, {"passthrough": Passthrough()}, force=force, report=report, replace=replace)
