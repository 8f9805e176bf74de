"""The SDK repeats only what is safe: UNAVAILABLE before any token arrived; never after tokens were
delivered; RESOURCE_EXHAUSTED only when asked."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from r2r_client import NO_RETRY, AsyncR2RClient, Overloaded, RetryPolicy, Unavailable
from r2r_serve.coordinator.app import start_coordinator
from r2r_serve.coordinator.servicer import CoordinatorSettings
from r2r_serve.launcher import free_port


def test_policy_decisions():
    p = RetryPolicy(attempts=3)
    assert p.should_retry(grpc.StatusCode.UNAVAILABLE, 1, delivered_tokens=False)
    assert not p.should_retry(grpc.StatusCode.UNAVAILABLE, 1, delivered_tokens=True)
    assert not p.should_retry(grpc.StatusCode.UNAVAILABLE, 3, delivered_tokens=False)
    assert not p.should_retry(grpc.StatusCode.INVALID_ARGUMENT, 1, delivered_tokens=False)
    assert not p.should_retry(grpc.StatusCode.RESOURCE_EXHAUSTED, 1, delivered_tokens=False)
    assert RetryPolicy(retry_overloaded=True).should_retry(grpc.StatusCode.RESOURCE_EXHAUSTED, 1, False)
    assert [p.delay_s(i) for i in (1, 2, 3)] == [0.2, 0.4, 0.8]


async def test_coordinator_down_fails_fast_without_retries_and_recovers_with_them(services, client):
    port = free_port()
    target = f"127.0.0.1:{port}"
    async with AsyncR2RClient(target, retry=NO_RETRY) as c:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await c.generate("def add(a, b):", max_tokens=4)
        assert time.monotonic() - started < 3.0, "UNAVAILABLE must come promptly, not hang"

    # With retries, a coordinator that comes up during the backoff serves the request.
    expected = await client.generate("def add(a, b):", max_tokens=6, threshold=0.9)
    later: list = []

    async def start_later():
        await asyncio.sleep(0.4)
        later.append(await start_coordinator(services.slm_target, services.llm_target,
                                             f"127.0.0.1:{services.router.port}", port=port))

    starter = asyncio.create_task(start_later())
    try:
        async with AsyncR2RClient(target, retry=RetryPolicy(attempts=6, backoff_s=0.2)) as c:
            result = await c.generate("def add(a, b):", max_tokens=6, threshold=0.9)
        assert result.token_ids == expected.token_ids
    finally:
        await starter
        for h in later:
            await h.stop(0.5)


async def test_overloaded_is_retried_only_when_asked(services):
    coord = await start_coordinator(services.slm_target, services.llm_target, f"127.0.0.1:{services.router.port}",
                                    CoordinatorSettings(max_concurrent_sessions=1))
    target = f"127.0.0.1:{coord.port}"
    try:
        async with AsyncR2RClient(target) as c:
            long = c.stream("class Stack:", max_tokens=60, threshold=0.9, ignore_eos=True)
            it = long.__aiter__()
            await it.__anext__()
            with pytest.raises(Overloaded):  # default policy: the caller decides about load
                await c.generate("def add(a, b):", max_tokens=3)
            patient = AsyncR2RClient(target, retry=RetryPolicy(attempts=50, backoff_s=0.1, max_backoff_s=0.2,
                                                               retry_overloaded=True))
            waiting = asyncio.create_task(patient.generate("def add(a, b):", max_tokens=3, threshold=0.9))
            async for _ in it:  # the first request finishes, freeing the slot
                pass
            result = await asyncio.wait_for(waiting, 30)
            assert result.stats.completion_tokens >= 1
            await patient.close()
    finally:
        await coord.stop(0.5)
