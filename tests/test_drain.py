"""Graceful drain (what SIGTERM triggers): NOT_SERVING, no new sessions, running ones finish."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from r2r_client import AsyncR2RClient, Unavailable
from r2r_serve.coordinator.app import start_coordinator


async def test_coordinator_drain_finishes_running_requests_and_refuses_new_ones(services, client):
    coord = await start_coordinator(services.slm_target, services.llm_target, f"127.0.0.1:{services.router.port}")
    target = f"127.0.0.1:{coord.port}"
    expected = await client.generate("class Stack:", max_tokens=40, threshold=0.9, ignore_eos=True)
    try:
        async with AsyncR2RClient(target) as c:
            stream = c.stream("class Stack:", max_tokens=40, threshold=0.9, ignore_eos=True)
            it = stream.__aiter__()
            first = await it.__anext__()
            await coord.set_serving(False)
            drain = asyncio.create_task(coord.servicer.drain(grace_s=30))
            await asyncio.sleep(0)
            with pytest.raises(Unavailable) as info:
                await c.generate("def add(a, b):", max_tokens=3)
            assert "draining" in info.value.details
            async with grpc.aio.insecure_channel(target) as channel:
                status = (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            rest = [t.token_id async for t in it]
            assert [first.token_id, *rest] == expected.token_ids  # the running answer finished, unchanged
            await asyncio.wait_for(drain, 10)
    finally:
        await coord.stop(0.5)
