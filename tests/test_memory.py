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


def test_an_engine_step_leaves_no_cyclic_garbage(tiny_pair, monkeypatch):
    """Everything a worker allocates per step must be freed by reference counting. KV buffers kept alive by
    a reference cycle wait for Python's cyclic GC, whose full passes are rare in a process with a large
    long-lived heap; a regrouped decode batch's buffers (rebuilt whenever the set of decoding sessions
    changes) then piled up, and the SLM worker grew by gigabytes in half an hour of 16-session R2R."""
    import gc
    import weakref

    from conftest import worker_config
    from r2r_serve.worker import kv_store
    from r2r_serve.worker.engine import ExtendWork, ModelEngine

    groups = []  # every decode group built, weakly
    make_group = kv_store.DecodeGroup.__init__

    def tracked(self, *args, **kwargs):
        make_group(self, *args, **kwargs)
        groups.append(weakref.ref(self))

    monkeypatch.setattr(kv_store.DecodeGroup, "__init__", tracked)
    for role in ("slm", "llm"):
        engine = ModelEngine(worker_config(tiny_pair[role], role))
        engine.load()
        groups.clear()
        sessions = [f"s{i}" for i in range(6)]
        held = dict.fromkeys(sessions, 0)
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds stays in gc.garbage, for the assertion
        try:
            for s in sessions:
                engine.extend([ExtendWork(s, 0, list(range(5, 15)), want_features=True)])
                held[s] = 10
            for step in range(30):
                decoding = [s for i, s in enumerate(sessions) if (i + step) % 3]  # a new batch every step
                works = [ExtendWork(s, held[s], [7] if step % 5 else [7, 8, 9], want_features=True)
                         for s in decoding]
                engine.extend(works)
                for w in works:
                    held[w.session_id] += len(w.tokens)
            engine.release(sessions[:3])
            alive = sum(ref() is not None for ref in groups)
            gc.collect()
            cyclic = sorted({type(o).__name__ for o in gc.garbage})
        finally:
            gc.garbage.clear()
            gc.set_debug(0)
            gc.enable()
        assert len(groups) > 10, "the test should have rebuilt the decode batch many times"
        assert alive == len(engine._groups), f"{role}: {alive} decode groups alive, the engine holds {len(engine._groups)}"
        assert not cyclic, f"{role}: a step left reference cycles of {cyclic}"
