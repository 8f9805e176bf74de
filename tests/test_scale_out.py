"""Several replicas per pool: least-loaded placement with KV affinity, replicas coming and going, and a
multi-process deployment whose answers equal a single-replica run."""

from __future__ import annotations

import asyncio
import sys

import grpc
import pytest

from conftest import worker_config
from r2r_client import AsyncR2RClient
from r2r_serve.coordinator.app import start_coordinator
from r2r_serve.coordinator.endpoints import resolve
from r2r_serve.proto import worker_pb2, worker_pb2_grpc
from r2r_serve.worker.app import start_worker

PROMPTS = ["def add(a, b):", "class Stack:", "for i in range(10):", "import os", "The quick brown fox",
           "Write a Python function", "while True:", "Hello, world!"]


async def worker_batches(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        return (await worker_pb2_grpc.ModelWorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest())).batches


async def test_dns_endpoints_resolve_every_address():
    assert "127.0.0.1:4321" in await resolve("dns:///localhost:4321")
    assert await resolve("10.1.2.3:50052") == ["10.1.2.3:50052"]
    with pytest.raises(ValueError):
        await resolve("dns:///no-port")


async def test_replicas_share_sessions_and_a_vanishing_replica_costs_only_a_reprefill(tiny_pair, services, client):
    second = await start_worker(worker_config(tiny_pair["slm"], "slm"))
    a, b = services.slm_target, f"127.0.0.1:{second.port}"
    coord = await start_coordinator([a, b], services.llm_target, f"127.0.0.1:{services.router.port}")
    pool = coord.servicer.slm
    try:
        expected = await asyncio.gather(*(client.generate(p, max_tokens=12, threshold=0.9) for p in PROMPTS))
        async with AsyncR2RClient(f"127.0.0.1:{coord.port}") as c:
            got = await asyncio.gather(*(c.generate(p, max_tokens=12, threshold=0.9) for p in PROMPTS))
            assert [g.token_ids for g in got] == [e.token_ids for e in expected]
            assert all(r.batcher.items_sent > 0 for r in pool.replicas), "both replicas should get sessions"

            # Replica b leaves the pool (as a pod leaving a headless Service) in the middle of answers.
            streams = [c.stream(p, max_tokens=30, threshold=0.9, ignore_eos=True) for p in PROMPTS[:4]]
            iters = [s.__aiter__() for s in streams]
            firsts = [[(await it.__anext__()).token_id] for it in iters]
            pool.specs = [a]
            await pool.refresh()
            assert [r.endpoint for r in pool.replicas] == [a]
            async def drain(it):
                return [t.token_id async for t in it]

            rest = await asyncio.gather(*(drain(it) for it in iters))
            reference = await asyncio.gather(*(client.generate(p, max_tokens=30, threshold=0.9, ignore_eos=True)
                                               for p in PROMPTS[:4]))
            assert [f + r for f, r in zip(firsts, rest)] == [r.token_ids for r in reference]

            # ... and comes back.
            pool.specs = [a, b]
            await pool.refresh()
            assert sorted(r.endpoint for r in pool.replicas) == sorted([a, b])
    finally:
        await coord.stop(0.5)
        await second.stop(0.5)


async def test_two_replicas_per_pool_as_processes_equal_one_replica(tiny_pair, services, client, tmp_path):
    """2 SLM + 2 LLM worker processes, router and coordinator (`r2r serve --slm-replicas 2 ...`):
    8 concurrent sessions spread over both replicas of each pool, answers equal the single-replica run."""
    from r2r_serve.launcher import free_port

    port = free_port()
    serve = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "r2r_serve.cli", "serve", "--tiny", str(tiny_pair["slm"].parent), "--port", str(port),
        "--slm-replicas", "2", "--llm-replicas", "2", "--slm-dtype", "float64", "--llm-dtype", "float64",
        "--threads", "1", "--log-dir", str(tmp_path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        line = b""
        while b"R2R coordinator listening" not in line:
            line = await asyncio.wait_for(serve.stdout.readline(), timeout=240)
            assert line, "r2r serve exited early"
        async with AsyncR2RClient(f"127.0.0.1:{port}") as c:
            info = await c.server_info()
            assert len(info.slm_endpoints) == 2 and len(info.llm_endpoints) == 2
            before = {ep: await worker_batches(ep) for ep in [*info.slm_endpoints, *info.llm_endpoints]}
            got = await asyncio.gather(*(c.generate(p, max_tokens=16, threshold=0.9) for p in PROMPTS))
        expected = await asyncio.gather(*(client.generate(p, max_tokens=16, threshold=0.9) for p in PROMPTS))
        assert [g.token_ids for g in got] == [e.token_ids for e in expected]
        assert [g.sources for g in got] == [e.sources for e in expected]
        for ep, n in before.items():
            assert await worker_batches(ep) > n, f"replica {ep} got no work"
    finally:
        serve.send_signal(2)
        await asyncio.wait_for(serve.wait(), 60)
