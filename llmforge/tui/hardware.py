"""Live hardware figures for the Project screen's panel: CPU, RAM, free disk, NVIDIA GPUs.

psutil for the machine; NVML (the `pynvml` module, from nvidia-ml-py) for GPUs when it is installed
and a driver answers. Never torch: asking torch about CUDA would cost seconds of imports and a CUDA
context in a process that never trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Gpu:
    index: int
    name: str
    util_pct: float | None
    mem_used_gb: float
    mem_total_gb: float


@dataclass
class Usage:
    cpu_pct: float
    cpu_count: int
    ram_used_gb: float
    ram_total_gb: float
    disk_free_gb: float | None
    gpus: list[Gpu] = field(default_factory=list)
    gpu_note: str = ""  # why no GPU is listed, when none is


class HardwareMonitor:
    """Call `sample()` periodically (from a worker: NVML calls can take milliseconds)."""

    def __init__(self, disk_path: Path | None = None):
        import psutil

        self.psutil = psutil
        self.disk_path = disk_path
        psutil.cpu_percent(None)  # the first call only starts the measurement interval
        self._nvml = None
        self._nvml_note = ""
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except ImportError:
            self._nvml_note = "GPU  none seen (no nvidia-ml-py)"
        except Exception as exc:  # noqa: BLE001 - no driver, no device: not an error for a CPU machine
            self._nvml_note = f"GPU  none ({type(exc).__name__})"

    def sample(self) -> Usage:
        ps = self.psutil
        vm = ps.virtual_memory()
        usage = Usage(
            cpu_pct=ps.cpu_percent(None),
            cpu_count=ps.cpu_count() or 1,
            ram_used_gb=(vm.total - vm.available) / 2**30,
            ram_total_gb=vm.total / 2**30,
            disk_free_gb=self._disk_free(),
            gpu_note=self._nvml_note,
        )
        if self._nvml is not None:
            usage.gpus = self._gpus()
            if not usage.gpus:
                usage.gpu_note = "GPU  none found"
        return usage

    def _disk_free(self) -> float | None:
        # The runs folder may not exist yet: measure the nearest existing parent (same file system).
        path = self.disk_path
        while path is not None and not path.exists() and path.parent != path:
            path = path.parent
        try:
            return self.psutil.disk_usage(str(path or Path.cwd())).free / 2**30
        except OSError:
            return None

    def _gpus(self) -> list[Gpu]:
        nv = self._nvml
        assert nv is not None  # sample() asks for GPUs only when NVML loaded
        out = []
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                name = nv.nvmlDeviceGetName(h)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                try:
                    util = float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
                except Exception:  # noqa: BLE001 - some devices (MIG slices) do not report utilisation
                    util = None
                out.append(
                    Gpu(
                        i,
                        name.decode() if isinstance(name, bytes) else str(name),
                        util,
                        mem.used / 2**30,
                        mem.total / 2**30,
                    )
                )
        except Exception as exc:  # noqa: BLE001
            self._nvml_note = f"GPU  NVML error ({type(exc).__name__})"
        return out

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
            self._nvml = None


def render(u: Usage) -> str:
    """The panel's text, 32 columns wide: one line per device (two per GPU), bars for use."""
    lines = [
        f"CPU  {_bar(u.cpu_pct)} {u.cpu_pct:5.1f}% of {u.cpu_count}",
        f"RAM  {_bar(100 * u.ram_used_gb / max(u.ram_total_gb, 1e-9))} {u.ram_used_gb:.1f}/{u.ram_total_gb:.0f} GiB",
    ]
    lines.append(f"Disk {u.disk_free_gb:.1f} GiB free (runs)" if u.disk_free_gb is not None else "Disk unknown")
    for g in u.gpus:
        util = f"{g.util_pct:3.0f}%" if g.util_pct is not None else "   ?"
        lines.append(f"GPU{g.index} {_bar(g.util_pct or 0)} {util} {g.mem_used_gb:.1f}/{g.mem_total_gb:.0f} GiB")
        lines.append(f"     {g.name[:27]}")
    if not u.gpus and u.gpu_note:
        lines.append(u.gpu_note)
    return "\n".join(lines)


def _bar(pct: float, width: int = 8) -> str:
    filled = max(0, min(width, round(pct / 100 * width)))
    return "[" + "#" * filled + "." * (width - filled) + "]"
