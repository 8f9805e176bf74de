"""One line describing the machine a benchmark ran on (results are only comparable on the same one)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine_description(device: str = "cpu") -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{platform.machine()} {cpu}, {os.cpu_count()} cores"
    if device.startswith("cuda"):
        import torch

        desc = f"{torch.cuda.get_device_name(0)} + {desc}"
    return desc
