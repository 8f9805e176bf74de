"""A worker runs all of its model's torch work on one thread, and its OpenMP helpers do not busy-wait for long.

Each thread that enters a parallel torch region gets its own OpenMP pool; with more pooled threads than
cores, libgomp stops spinning between regions and a CPU decode step slowed ~12% (measured on 2 cores). So
the load, the warm-up, every extend and every release must happen on the same engine thread.
"""

from __future__ import annotations

import threading

import grpc

from conftest import worker_config
from r2r_serve.proto import worker_pb2, worker_pb2_grpc
from r2r_serve.worker.app import start_worker
from r2r_serve.worker.engine import ModelEngine


async def test_load_warmup_extend_and_release_share_one_thread(tiny_pair, monkeypatch):
    seen: dict[str, set[int]] = {}

    def recorded(name):
        original = getattr(ModelEngine, name)

        def wrapper(self, *args, **kwargs):
            seen.setdefault(name, set()).add(threading.get_ident())
            return original(self, *args, **kwargs)
        monkeypatch.setattr(ModelEngine, name, wrapper)

    for name in ("load", "warmup", "extend", "free_released"):
        recorded(name)

    handle = await start_worker(worker_config(tiny_pair["slm"], "slm"))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            stub = worker_pb2_grpc.ModelWorkerStub(channel)
            item = worker_pb2.ExtendItem(session_id="s", position=0, tokens=[5, 6, 7], want_features=True)
            reply = await stub.Extend(worker_pb2.ExtendRequest(batch_id=1, items=[item]))
            assert reply.results[0].status == worker_pb2.EXTEND_OK
            await stub.Release(worker_pb2.ReleaseRequest(session_ids=["s"]))
            await stub.Extend(worker_pb2.ExtendRequest(batch_id=2, items=[  # after the release's cleanup
                worker_pb2.ExtendItem(session_id="t", position=0, tokens=[5])]))
    finally:
        await handle.stop(0.5)

    assert set(seen) == {"load", "warmup", "extend", "free_released"}
    threads = set().union(*seen.values())
    assert len(threads) == 1, f"engine work ran on {len(threads)} threads: {seen}"
    assert threads != {threading.get_ident()}, "engine work ran on the event loop's thread"


def test_r2r_processes_cap_openmp_busy_waiting_before_torch_loads():
    """The `r2r` entry point sets GOMP_SPINCOUNT before anything imports torch (libgomp reads it once, when it
    loads), and a value the user set wins."""
    import os
    import subprocess
    import sys

    probe = "import os, sys, r2r_serve.cli; print(os.environ['GOMP_SPINCOUNT'], 'torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["10000", "False"]
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "GOMP_SPINCOUNT": "5"}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split()[0] == "5"
