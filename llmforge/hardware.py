"""What this machine has, without importing torch: recorded in each run's manifest."""

from __future__ import annotations

import os
import platform
import sys
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
