"""What this CPU's instruction set makes cheap, read once from /proc/cpuinfo's flags (none elsewhere).

Which kernels win hangs on whether the CPU has bf16 matrix instructions (`avx512_bf16`, `amx_bf16`):
with them bf16 GEMMs are fast at every forward length; without them (AVX2 only) a bf16 GEMM is converted in
software and costs about one decode step per token row, so multi-token forwards belong in prepacked fp32
or int8 weights (common/dtypes.py, worker/int8_weights.py).
"""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    flags = next((line for line in lines if line.startswith("flags")), "")
    return frozenset(flags.partition(":")[2].split())


def has_bf16_units() -> bool:
    """AVX512-BF16 or AMX: bf16 forwards beat fp32 at every length there."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def has_avx2() -> bool:
    return "avx2" in cpu_flags()
