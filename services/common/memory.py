"""Resident memory after a model load.

Loading a worker frees gigabytes of temporaries: the dtype conversions of a second copy of the weights,
prepacking, int8 quantization's fp32 scratch. glibc keeps those pages mapped for reuse, so the process's
resident memory stays far above what it holds (0.5B split worker on a 2-core EPYC: 4.18 GiB resident, 2.83
GiB after a trim; with int8-weight 6.63 -> 4.23 GiB). One malloc_trim after the load gives them back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time


def resident_gib() -> float | None:
    """This process's resident set in GiB (Linux), else None."""
    try:
        pages = int(open("/proc/self/statm").read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def release_free_heap() -> bool:
    """Return the heap's free pages to the OS (glibc's malloc_trim); False where there is no glibc."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):  # no libc found, or one without malloc_trim (musl, macOS)
        return False
    trim(0)
    return True


def trim_heap() -> tuple[float | None, float | None]:
    """Trim the heap; (resident GiB before, after), None where /proc cannot tell."""
    before = resident_gib()
    release_free_heap()
    return before, resident_gib()


class PeriodicHeapTrim:
    """Trims the heap at most every `interval_s` seconds and reports what it gave back.

    A serving worker allocates activations of ever-changing shapes (prefills of any length, ragged decode
    batches, verify logits); glibc keeps the freed pages mapped in per-thread arenas, so resident memory
    creeps above the weights + KV the worker holds (the 1.5B LLM worker of the CPU split, ~10.2 GiB of
    weights in two dtypes, reached 13.3 GiB in an hour of 16-session R2R and was OOM-killed on a 23 GiB
    machine; each trim gives back 0.3-0.7 GiB). A trim costs milliseconds.
    """

    def __init__(self, interval_s: float, clock=None):
        self.interval_s = interval_s
        self._clock = clock or time.monotonic
        self._last = self._clock()

    def due(self) -> bool:
        return self.interval_s > 0 and self._clock() - self._last >= self.interval_s

    def maybe_trim(self) -> tuple[float, float] | None:
        """(resident GiB before, after) when a trim ran now, else None."""
        if not self.due():
            return None
        self._last = self._clock()
        before, after = trim_heap()
        return None if before is None or after is None else (before, after)
