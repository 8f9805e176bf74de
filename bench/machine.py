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
    desc = f"{platform.machine()} {cpu} ({instruction_set()}), {os.cpu_count()} cores"
    if device.startswith("cuda"):
        import torch

        desc = f"{torch.cuda.get_device_name(0)} + {desc}"
    return desc


def instruction_set() -> str:
    """The widest matrix/vector level of this CPU: one model name ("Intel Xeon Processor @ 2.60GHz") covers
    VMs with and without AMX, and which of them ran a benchmark decides its speed and its bf16 numerics."""
    from r2r_serve.common.cpu import cpu_flags

    flags = cpu_flags()
    for level, needs in (("AMX", {"amx_bf16"}), ("AVX512-BF16", {"avx512_bf16"}), ("AVX512", {"avx512f"}),
                         ("AVX2", {"avx2"})):
        if needs <= flags:
            return level
    return "no AVX2"


def software_versions() -> dict[str, str]:
    """The versions a run's speed depends on besides the machine (a transformers release can change a small
    model's step cost as much as a CPU can)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for package in ("torch", "transformers", "grpcio", "r2r-serve"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


def write_stamped(out_dir: str | Path, prefix: str, payload: dict, device: str = "cpu") -> Path:
    """`payload` with the machine and the UTC date, as OUT_DIR/PREFIX-<UTC stamp>.json; returns the path."""
    import datetime as dt
    import json

    now = dt.datetime.now(dt.timezone.utc)
    record = dict(machine=machine_description(device), date=now.isoformat(timespec="seconds"), **payload)
    path = Path(out_dir) / f"{prefix}-{now:%Y%m%dT%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return path
