"""Endpoint lists: `host:port[,host:port...]` or `dns:///name:port`, a name that resolves to many
addresses (a Kubernetes headless Service), re-resolved periodically by the pool."""

from __future__ import annotations

import asyncio
import socket


def is_dns(spec: str) -> bool:
    return spec.startswith("dns:")


def split_endpoints(spec: str | list[str]) -> list[str]:
    if isinstance(spec, list):
        return [e for s in spec for e in split_endpoints(s)]
    return [e.strip() for e in spec.split(",") if e.strip()]


def _host_port(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"endpoint {target!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


async def resolve(spec: str) -> list[str]:
    """The endpoints `spec` stands for now. `dns:///name:port` (or `dns:name:port`) resolves every
    address of name; a plain HOST:PORT is returned as is (gRPC resolves it per connection)."""
    if not is_dns(spec):
        _host_port(spec)
        return [spec]
    host, port = _host_port(spec.removeprefix("dns:").lstrip("/"))
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out = []
    for family, *_rest, addr in infos:
        ep = f"[{addr[0]}]:{addr[1]}" if family == socket.AF_INET6 else f"{addr[0]}:{addr[1]}"
        if ep not in out:
            out.append(ep)
    return sorted(out)


async def resolve_all(specs: list[str]) -> list[str]:
    found: list[str] = []
    for spec in specs:
        try:
            eps = await resolve(spec)
        except OSError:
            continue  # a name without addresses right now (pods starting): try again later
        found.extend(e for e in eps if e not in found)
    return found
