"""Every service speaks grpc.health.v1 (SERVING once loaded and warmed) and server reflection."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc


@pytest.mark.parametrize("which,service", [("slm_target", "r2r.v1.ModelWorker"), ("llm_target", "r2r.v1.ModelWorker"),
                                           ("target", "r2r.v1.Coordinator"), ("router", "r2r.v1.Router")])
async def test_health_and_reflection(services, which, service):
    target = f"127.0.0.1:{services.router.port}" if which == "router" else getattr(services, which)
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", service):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = [s.name async for r in responses for s in r.list_services_response.service]
        assert service in names and "grpc.health.v1.Health" in names


async def test_draining_service_reports_not_serving(tiny_pair):
    from conftest import worker_config
    from r2r_serve.worker.app import start_worker

    handle = await start_worker(worker_config(tiny_pair["slm"], "slm"))
    target = f"127.0.0.1:{handle.port}"
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
        await handle.set_serving(False)  # what stop() does first, before in-flight RPCs finish
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
    await handle.stop(0.5)
