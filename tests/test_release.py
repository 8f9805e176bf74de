"""Releasing a session's KV never waits behind forwards and survives a slow answer.

A worker answers Release at once, even while a long forward holds its engine thread, refuses the session
from then on and frees its KV right after that forward; the coordinator retries a release that timed out,
so a busy worker never keeps a finished session's KV until LRU eviction.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest_asyncio

from conftest import active_sessions, wait_until, worker_with_stub
from r2r_serve.coordinator.pool import WorkerReplica
from r2r_serve.proto import worker_pb2


@pytest_asyncio.fixture
async def worker(tiny_pair):
    async with worker_with_stub(tiny_pair["slm"], "slm") as handle_and_stub:
        yield handle_and_stub


def _extend(session_id: str, position: int, tokens: list[int]) -> worker_pb2.ExtendRequest:
    req = worker_pb2.ExtendRequest(batch_id=1)
    req.items.add(session_id=session_id, position=position, tokens=tokens)
    return req


async def test_release_is_answered_during_a_long_forward(worker, monkeypatch):
    handle, stub = worker
    engine = handle.servicer.engine
    done = await stub.Extend(_extend("done", 0, [5, 6, 7]))
    assert done.results[0].status == worker_pb2.EXTEND_OK

    plain = engine.extend

    def slow_extend(works):  # the engine thread is busy for 2 s, as with a long prefill on a CPU
        time.sleep(2.0)
        return plain(works)

    monkeypatch.setattr(engine, "extend", slow_extend)
    busy = asyncio.ensure_future(stub.Extend(_extend("busy", 0, [8, 9]), timeout=30))
    await asyncio.sleep(0.3)  # the slow forward has started
    started = time.perf_counter()
    reply = await stub.Release(worker_pb2.ReleaseRequest(session_ids=["done"]), timeout=0.5)
    assert reply.released == 1 and time.perf_counter() - started < 0.5
    assert not busy.done()
    assert (await busy).results[0].status == worker_pb2.EXTEND_OK
    monkeypatch.setattr(engine, "extend", plain)

    async def only_busy_left() -> bool:
        return await active_sessions(stub) == 1
    await wait_until(only_busy_left, timeout_s=5)
    late = await stub.Extend(_extend("done", 3, [1]))  # a step that was still on its way: refused, not revived
    assert late.results[0].status == worker_pb2.EXTEND_INVALID and "released" in late.results[0].error
    assert await active_sessions(stub) == 1


async def test_coordinator_retries_a_release_that_timed_out(worker):
    """The first answer comes too late (this event loop, which serves the worker too, is blocked past the
    call's deadline, as a busy test or host would): the release is tried again and the KV freed."""
    handle, stub = worker
    await stub.Extend(_extend("s", 0, [5, 6, 7]))
    replica = WorkerReplica(f"127.0.0.1:{handle.port}", "slm", 1 << 20, reconnect_timeout_s=5.0)
    send, codes = replica.stub.Release, []

    async def counted(request, timeout=None):
        try:
            reply = await send(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            codes.append(exc.code())
            raise
        codes.append(grpc.StatusCode.OK)
        return reply

    replica.stub.Release = counted
    try:
        releasing = asyncio.ensure_future(replica.release(["s"], timeout_s=0.3))
        await asyncio.sleep(0)     # the first call goes on the wire
        time.sleep(0.8)            # ... and nobody answers it before its deadline
        await releasing
    finally:
        await replica.close()
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OK]

    async def freed() -> bool:
        return await active_sessions(stub) == 0
    await wait_until(freed, timeout_s=5)
