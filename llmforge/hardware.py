"""What this machine has, without importing torch: the snapshot recorded in each run's manifest, and the
details `llmforge doctor` reports and `llmforge plan` compares its estimates against."""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path


def snapshot(path: Path | None = None) -> dict:
    import psutil

    info = {
        "host": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "ram_total_gb": round(psutil.virtual_memory().total / 2**30, 2),
        "ram_available_gb": round(psutil.virtual_memory().available / 2**30, 2),
    }
    if path is not None:
        try:
            info["disk_free_gb"] = round(psutil.disk_usage(str(path)).free / 2**30, 2)
        except OSError:
            pass
    # GPUs are reported only when torch is already loaded: start-up never pays for a torch import.
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


# ----------------------------------------------------------------------------------------------
# What `llmforge doctor` reports and `llmforge plan` compares against. Nothing here imports torch
# unless asked to (allow_torch): the plan must stay fast, and NVML or nvidia-smi answer without it.

GIB = 2**30


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.partition(":")[2].split())
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features(flags: set[str] | None = None) -> dict:
    """The features that decide CPU training speed. bf16 autocast is only fast with native bf16 dot
    products (AVX512-BF16) or AMX tiles; elsewhere it is emulated, and training uses fp32."""
    flags = cpu_flags() if flags is None else flags
    amx = any(f.startswith("amx") for f in flags)
    feats = {"avx2": "avx2" in flags, "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags, "amx": amx}
    feats["bf16_fast"] = feats["avx512_bf16"] or "amx_bf16" in flags
    return feats


def memory() -> dict:
    import psutil

    vm = psutil.virtual_memory()
    return {"total_bytes": vm.total, "available_bytes": vm.available}


def disk_free(path: Path) -> int | None:
    """Free bytes on the file system of `path`, or of its nearest existing parent (runs/ may not exist yet)."""
    import psutil

    path = Path(path).absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    try:
        return psutil.disk_usage(str(path)).free
    except OSError:
        return None


def _bf16_capable(cc: tuple[int, int] | None) -> bool | None:
    return None if cc is None else cc >= (8, 0)  # Ampere and later have bf16 tensor cores


def gpus(allow_torch: bool = False) -> tuple[list[dict], str]:
    """NVIDIA GPUs: (name, memory, compute capability, bf16, driver) and where the answer came from.

    NVML (the `pynvml` module of nvidia-ml-py) first, then `nvidia-smi`, then torch.cuda, the last
    only when torch is already imported or `allow_torch` (importing torch costs seconds)."""
    found = _gpus_nvml()
    if found is not None:
        return found, "nvml"
    found = _gpus_smi()
    if found is not None:
        return found, "nvidia-smi"
    if allow_torch or "torch" in sys.modules:
        found = _gpus_torch()
        if found is not None:
            return found, "torch"
    return [], "none"


def _gpus_nvml() -> list[dict] | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver: not an error on a CPU machine
        return None
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                cc = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(h))
            except Exception:  # noqa: BLE001 - old drivers lack the call
                cc = None
            label = name.decode() if isinstance(name, bytes) else str(name)
            out.append(_gpu(i, label, mem.total, mem.free, cc, driver))
        return out
    except Exception:  # noqa: BLE001
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def _gpus_smi() -> list[dict] | None:
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        res = subprocess.run(
            [
                exe,
                "--query-gpu=index,name,memory.total,memory.free,compute_cap,driver_version",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    out = []
    for line in res.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 6:
            continue
        try:
            major, _, minor = parts[4].partition(".")
            cc = (int(major), int(minor or 0))
        except ValueError:
            cc = None
        try:
            out.append(
                _gpu(int(parts[0]), parts[1], int(float(parts[2])) * 2**20, int(float(parts[3])) * 2**20, cc, parts[5])
            )
        except ValueError:
            continue
    return out


def _gpus_torch() -> list[dict] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        try:
            free, total = torch.cuda.mem_get_info(i)
        except Exception:  # noqa: BLE001
            free, total = None, props.total_memory
        out.append(_gpu(i, props.name, total, free, (props.major, props.minor), None))
    return out


def _gpu(index: int, name: str, total: int, free: int | None, cc: tuple[int, int] | None, driver: str | None) -> dict:
    return {
        "index": index,
        "name": name,
        "memory_total_bytes": int(total),
        "memory_free_bytes": None if free is None else int(free),
        "compute_capability": f"{cc[0]}.{cc[1]}" if cc else None,
        "bf16": _bf16_capable(cc),
        "driver": driver,
    }


@dataclass
class Machine:
    """What the planner compares an estimate against."""

    ram_total: int
    ram_available: int
    disk_free: int | None
    gpus: list[dict] = field(default_factory=list)
    cpu_bf16_fast: bool = False

    @property
    def vram_per_gpu(self) -> int | None:
        """The smallest GPU's memory: with several processes, each gets one GPU."""
        return min((g["memory_total_bytes"] for g in self.gpus), default=None)

    @property
    def gpu_bf16(self) -> bool:
        return bool(self.gpus) and all(g.get("bf16") for g in self.gpus)


def machine(runs_dir: Path | None = None, allow_torch: bool = False) -> Machine:
    mem = memory()
    found, _ = gpus(allow_torch=allow_torch)
    return Machine(
        ram_total=mem["total_bytes"],
        ram_available=mem["available_bytes"],
        disk_free=disk_free(runs_dir) if runs_dir is not None else None,
        gpus=found,
        cpu_bf16_fast=cpu_features()["bf16_fast"],
    )
