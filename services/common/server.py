"""Shared gRPC server bootstrap: grpc.health.v1, reflection, message limits, graceful drain on SIGTERM.

Every service builds its servicers, then calls `run_server` (or `start_server` in tests): health reports
NOT_SERVING until the service says it is ready (model loaded and warmed), and NOT_SERVING again while
draining, so load balancers stop sending new work before the process exits.
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from r2r_serve.common.decode_guard import DecodeGuard
from r2r_serve.common.logging import get_logger
from r2r_serve.common.security import ServerTLS

log = get_logger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options shared by servers and the channels between services."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Long-lived streams between services: notice a dead peer within seconds, not minutes.
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # ... and let peers ping that often: by default a server answers a 10 s keepalive with GOAWAY
        # ("too_many_pings") after a few minutes idle, which would end every stream at once.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_ping_strikes", 0),
    ]


@dataclass
class ServiceHandle:
    """A started server: its bound port, its health servicer, and how to stop it."""

    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    service_names: list[str]
    before_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)  # e.g. drain
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)      # e.g. close clients
    servicer: object | None = None

    async def set_serving(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.set_serving(False)
        for hook in self.before_stop:
            await hook()
        await self.server.stop(grace_s)
        for hook in self.on_stop:
            await hook()


async def start_server(
    register: Callable[[grpc.aio.Server], Iterable[str]],
    host: str = "127.0.0.1",
    port: int = 0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
    tls: ServerTLS | None = None,
) -> ServiceHandle:
    """Create, register and start an aio server. `register(server)` adds servicers and returns their
    full service names (for health and reflection). Health starts NOT_SERVING. With `tls` the port serves
    TLS only (mutual TLS when it names a client CA); without, plain."""
    server = grpc.aio.server(options=channel_options(max_message_bytes),
                             interceptors=[*interceptors, DecodeGuard()])
    names = list(register(server))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection([*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                         reflection.SERVICE_NAME], server)
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, tls.credentials())
    if bound == 0:
        raise OSError(f"could not bind {address}")
    if tls is not None:
        log.info("tls_enabled", port=bound, **tls.describe())
    await server.start()
    handle = ServiceHandle(server=server, port=bound, health=health, service_names=names)
    await handle.set_serving(False)
    return handle


async def serve_until_signal(handle: ServiceHandle, grace_s: float = 30.0) -> None:
    """Block until SIGTERM/SIGINT, then drain: NOT_SERVING first, finish in-flight RPCs within grace_s."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(handle.server.wait_for_termination())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        log.info("draining", grace_s=grace_s)
        await handle.stop(grace_s)
    waiter.cancel()
    stopper.cancel()
    log.info("stopped")
