"""A worker gives the load's freed temporaries back to the OS (common/memory.py)."""

from __future__ import annotations

import sys

import pytest
import torch

from r2r_serve.common.memory import PeriodicHeapTrim, release_free_heap, resident_gib


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc are Linux's")
def test_freed_small_allocations_leave_the_resident_set_after_a_trim():
    release_free_heap()
    baseline = resident_gib()
    # ~1 GiB in 64 KiB tensors: below glibc's mmap threshold, so freeing them leaves the pages on the heap
    chunks = [torch.ones(16384) for _ in range(16384)]
    grown = resident_gib()
    del chunks
    assert release_free_heap()
    trimmed = resident_gib()
    assert grown - baseline > 0.5, (baseline, grown)
    assert grown - trimmed > 0.5, f"the trim gave back only {grown - trimmed:.2f} GiB of {grown - baseline:.2f}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc are Linux's")
def test_a_serving_worker_trims_at_most_once_per_interval():
    now = [0.0]
    trim = PeriodicHeapTrim(30.0, clock=lambda: now[0])
    now[0] = 29.0
    assert trim.maybe_trim() is None  # too soon after start
    chunks = [torch.ones(16384) for _ in range(8192)]  # ~0.5 GiB of small blocks, then freed
    del chunks
    now[0] = 31.0
    before, after = trim.maybe_trim()
    assert before - after > 0.25, (before, after)
    now[0] = 40.0
    assert trim.maybe_trim() is None  # the next one waits a whole interval
    assert PeriodicHeapTrim(0, clock=lambda: 1e9).maybe_trim() is None  # 0 = never
