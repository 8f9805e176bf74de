"""A worker gives the load's freed temporaries back to the OS (common/memory.py)."""

from __future__ import annotations

import sys

import pytest
import torch

from r2r_serve.common.memory import release_free_heap, resident_gib


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
