"""Waiting on a peer's grpc.health.v1 status (used by the local launcher and tests)."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from r2r_serve.common.security import ClientTLS, sync_channel


def wait_serving(endpoint: str, timeout_s: float, alive=lambda: True, service: str = "",
                 tls: ClientTLS | None = None) -> None:
    """Block until `endpoint` reports SERVING; raise TimeoutError, or RuntimeError when alive() turns false.
    With `tls` the check goes over TLS (presenting its client certificate, if any, to an mTLS server)."""
    deadline = time.monotonic() + timeout_s
    last_error = ""
    with sync_channel(endpoint, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if not alive():
                raise RuntimeError(f"the process serving {endpoint} exited before it was ready")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last_error = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as exc:
                last_error = f"{exc.code().name}: {exc.details()}"
            if time.monotonic() > deadline:
                raise TimeoutError(f"{endpoint} was not SERVING after {timeout_s:.0f}s (last: {last_error})")
            time.sleep(0.25)
