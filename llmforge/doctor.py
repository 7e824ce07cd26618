"""`llmforge doctor`: what this machine and environment can do, and what stands in the way.

Collects the OS, Python, the versions of the training stack, known incompatible combinations, CPU
features, RAM, free disk, GPUs, the collective backends and whether llama.cpp's AMX kernels run here (the
probe of llmforge.native), into one JSON-ready dict. Problems are
warnings inside the report, never exceptions: a doctor that crashes on a broken environment is useless.
UI-free; `llmforge/cli/scale_cmd.py` renders it.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

# What the report lists; the first seven are the ones training depends on.
PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "deepspeed",
    "llama-cpp-python",
    "bitsandbytes",
    "datasets",
    "nvidia-ml-py",
)

# Combinations known to break that the packages do not declare themselves (declared requirements are
# checked separately, from each package's metadata). Each entry: (package, its versions, other package,
# the other's bad versions, why). Only what was seen in the libraries' own code.
KNOWN_INCOMPATIBLE: tuple[tuple[str, str, str, str, str], ...] = (
    (
        "transformers",
        ">=5",
        "torch",
        "<2.6",
        "transformers 5 treats torch older than 2.6 as absent (is_torch_available() is False): no model can train",
    ),
    ("transformers", ">=5", "accelerate", "<1.1.0", "the transformers 5 Trainer requires accelerate 1.1.0 or newer"),
    (
        "transformers",
        ">=5",
        "bitsandbytes",
        "<0.46.1",
        "transformers 5 loads 4-bit models (QLoRA) only with bitsandbytes 0.46.1 or newer",
    ),
    (
        "transformers",
        ">=5.24",
        "peft",
        "<0.22.0",
        "transformers 5.24's own adapter methods (model.add_adapter, set_adapter, ...) require peft 0.22; llmforge "
        "trains and loads adapters through peft directly, so its stages still work",
    ),
    (
        "llmforge",
        ">=0",
        "llama-cpp-python",
        "!=0.3.36",
        "llmforge calls llama_model_quantize with the parameter struct of llama-cpp-python 0.3.36, which changes "
        "between releases: GGUF quantization may crash or write wrong files",
    ),
)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _matches(version: str, spec: str) -> bool:
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        v = Version(version)
        return SpecifierSet(spec).contains(Version(v.base_version), prereleases=True)
    except (InvalidVersion, InvalidSpecifier):
        return False


def declared_conflicts(names: tuple[str, ...] = (*PACKAGES, "llmforge")) -> list[dict]:
    """Requirements the installed packages declare on each other (pip's own metadata) and that fail."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    installed = {canonicalize_name(n): _version(n) for n in names}
    out = []
    for name in names:
        if installed.get(canonicalize_name(name)) is None:
            continue
        for line in metadata.requires(name) or []:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue  # an optional extra, or another platform
            other = installed.get(canonicalize_name(req.name))
            if other is None or not str(req.specifier):
                continue
            if not _matches(other, str(req.specifier)):
                out.append(
                    {
                        "package": name,
                        "version": installed[canonicalize_name(name)],
                        "requires": str(req),
                        "installed": f"{req.name} {other}",
                        "reason": f"{name} declares {req}",
                    }
                )
    return out


def known_conflicts() -> list[dict]:
    out = []
    for pkg, spec, other, bad, why in KNOWN_INCOMPATIBLE:
        v, ov = _version(pkg), _version(other)
        if v and ov and _matches(v, spec) and _matches(ov, bad):
            out.append(
                {
                    "package": pkg,
                    "version": v,
                    "requires": f"{other} not {bad}",
                    "installed": f"{other} {ov}",
                    "reason": why,
                }
            )
    return out


def _torch_facts() -> dict:
    """torch's view: its build, CUDA/MPS, and which collective backends it was built with."""
    try:
        import torch
        import torch.distributed as dist
    except Exception as exc:  # noqa: BLE001 - a broken torch install is a finding, not a crash
        return {"error": f"{type(exc).__name__}: {exc}"}
    facts: dict[str, Any] = {
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": False,
        "mps_available": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
    }
    try:
        facts["cuda_available"] = bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        pass
    avail = dist.is_available()
    facts["distributed"] = {
        "available": avail,
        "nccl": bool(avail and dist.is_nccl_available()),
        "gloo": bool(avail and dist.is_gloo_available()),
    }
    return facts


def llama_cpp_facts() -> dict:
    """Whether llama.cpp's AMX/repacked kernels run here (llmforge.native's probe: cached per machine and
    llama-cpp-python build, run once in a child process when not cached), and so how models are loaded."""
    if _version("llama-cpp-python") is None:
        return {"result": "unavailable", "extra_bufts": None, "line": "not installed"}
    from llmforge.errors import ForgeError
    from llmforge.native import probe

    try:
        answer = probe()
    except ForgeError as exc:  # a bad LLMFORGE_LLAMA_EXTRA_BUFTS value: a finding, not a crash
        return {"result": "error", "extra_bufts": None, "line": exc.message}
    except Exception as exc:  # noqa: BLE001 - the doctor reports, never crashes
        return {"result": "error", "extra_bufts": None, "line": f"the probe failed: {type(exc).__name__}: {exc}"}
    line = {
        "ok": "ok (extra buffer types on)",
        "fault": f"fault here ({answer.get('signal')}), extra buffer types off",
        "broken": answer.get("message", "broken"),
        "forced": answer.get("message", "forced"),
    }.get(answer["result"], answer.get("message", "unknown"))
    keep = ("result", "extra_bufts", "signal", "source", "cache_file", "checked_at", "message")
    return {**{k: answer[k] for k in keep if k in answer}, "line": line}


def collect(runs_dir: Path | None = None) -> dict:
    """Everything `llmforge doctor` shows. Importing torch here is fine: doctor is asked for explicitly."""
    import psutil

    from llmforge import __version__, hardware

    runs_dir = Path(runs_dir or "runs").absolute()
    feats = hardware.cpu_features()
    vm = psutil.virtual_memory()
    torch_facts = _torch_facts() if _version("torch") else {"error": "not installed"}
    gpus, source = hardware.gpus(allow_torch=bool(torch_facts.get("cuda_available")))
    free = hardware.disk_free(runs_dir)
    report: dict[str, Any] = {
        "llmforge": __version__,
        "os": {
            "system": platform.system(),
            "release": platform.release(),
            "machine": platform.machine(),
            "platform": platform.platform(),
        },
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "packages": {name: _version(name) or "not installed" for name in PACKAGES},
        "conflicts": declared_conflicts() + known_conflicts(),
        "cpu": {
            "model": hardware.cpu_model(),
            "logical_cores": os.cpu_count(),
            "physical_cores": psutil.cpu_count(logical=False),
            "features": feats,
        },
        "memory": {"total_gib": round(vm.total / 2**30, 2), "available_gib": round(vm.available / 2**30, 2)},
        "disk": {"path": str(runs_dir), "free_gib": None if free is None else round(free / 2**30, 2)},
        "gpus": [{**g, "memory_total_gib": round(g["memory_total_bytes"] / 2**30, 2)} for g in gpus],
        "gpu_source": source,
        "torch": torch_facts,
        "llama_cpp": llama_cpp_facts(),
    }
    report["warnings"] = warnings_for(report)
    return report


def warnings_for(r: dict) -> list[str]:
    """What stands in the way, in plain words."""
    out = [f"{c['package']} {c['version']} with {c['installed']}: {c['reason']}" for c in r["conflicts"]]
    pk = r["packages"]
    for name in PACKAGES[:5]:
        if pk[name] == "not installed":
            out.append(f"{name} is not installed: training stages cannot run (pip install {name})")
    t = r["torch"]
    if r["gpus"] and t.get("version") and not t.get("cuda_available"):
        out.append(
            f"{len(r['gpus'])} NVIDIA GPU(s) found but torch {t['version']} cannot use CUDA "
            f"({'a CPU-only build' if not t.get('cuda_build') else 'driver or runtime mismatch'}): "
            "install a CUDA build of torch"
        )
    if r["gpus"] and t.get("distributed") and not t["distributed"].get("nccl"):
        out.append("torch has no NCCL: multi-GPU training falls back to gloo (slow) or fails")
    if t.get("distributed") and not t["distributed"].get("available"):
        out.append("torch.distributed is unavailable: the accelerate and deepspeed backends cannot run")
    if pk["deepspeed"] != "not installed" and not t.get("cuda_available"):
        out.append(
            "deepspeed is installed but no CUDA device is usable: its configs validate here, "
            "but ZeRO training needs a GPU"
        )
    if not t.get("cuda_available") or pk["bitsandbytes"] == "not installed":
        why = "no CUDA device" if not t.get("cuda_available") else "bitsandbytes is not installed"
        out.append(f"QLoRA (lora.qlora) is unavailable: {why}; plain LoRA works")
    if not r["gpus"] and not r["cpu"]["features"]["bf16_fast"]:
        out.append('this CPU has no native bf16 (AVX512-BF16 or AMX): precision "auto" trains in fp32 here')
    if any(g.get("bf16") is False for g in r["gpus"]):
        out.append('a GPU without bf16 (compute capability < 8.0): precision "auto" uses fp16 with loss scaling')
    if r.get("llama_cpp", {}).get("result") in ("broken", "error"):
        out.append(f"llama.cpp: {r['llama_cpp']['line']}: GGUF checks and chat cannot run here")
    free = r["disk"]["free_gib"]
    if free is not None and free < 10:
        out.append(f"only {free} GiB free for runs in {r['disk']['path']}: checkpoints of even small models fill it")
    return out
