"""`r2r serve`: the four services as separate local processes on loopback.

Each service is the same program a cluster runs (`r2r worker`, `r2r router`, `r2r coordinator`); the
launcher only picks ports, starts them in dependency order, waits for grpc.health SERVING, and stops them
(coordinator first) on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from r2r_serve.common.health import wait_serving
from r2r_serve.common.security import ENV as SECURITY_ENV
from r2r_serve.common.security import ClientTLS


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Child:
    name: str
    endpoint: str
    process: subprocess.Popen
    log_path: Path


class LocalCluster:
    """`tls`: how the launcher's own health checks reach the services (a client certificate for mTLS ones)."""

    def __init__(self, log_dir: str | None = None, host: str = "127.0.0.1", tls: ClientTLS | None = None):
        self.host = host
        self.tls = tls
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="r2r-serve-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []

    def start(self, name: str, args: list[str], port: int | None = None, ready_timeout_s: float = 900.0,
              ready=None, env: dict[str, str] | None = None) -> str:
        """Start `r2r ARGS --host H --port P`; return HOST:PORT once `ready(endpoint, timeout, alive)` passes
        (by default grpc.health SERVING, over TLS with the cluster's `tls`). `env`: extra environment for this
        child only (secrets go here, not in ARGS, which any user can read in ps)."""
        if ready is None:
            ready = lambda ep, timeout, alive: wait_serving(ep, timeout, alive, tls=self.tls)  # noqa: E731
        port = port or free_port(self.host)
        endpoint = f"{self.host}:{port}"
        log_path = self.log_dir / f"{name}.log"
        # TLS and token settings reach a child only through its flags or `env`, never inherited by accident.
        inherited = {k: v for k, v in os.environ.items() if k not in SECURITY_ENV.values()}
        env = {**inherited, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), **(env or {})}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "r2r_serve.cli", *args, "--host", self.host,
                                     "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)  # Ctrl-C goes to the launcher, which stops us in order
        child = Child(name, endpoint, proc, log_path)
        self.children.append(child)
        try:
            ready(endpoint, ready_timeout_s, alive=lambda: proc.poll() is None)
        except (RuntimeError, TimeoutError) as exc:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{name} failed to start: {exc}\n--- last lines of {log_path} ---\n{tail}") from None
        return endpoint

    def stop(self, timeout_s: float = 30.0) -> None:
        for child in reversed(self.children):  # coordinator first: it drains its requests
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in reversed(self.children):
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        self.children.clear()

    def check_alive(self) -> Child | None:
        return next((c for c in self.children if c.process.poll() is not None), None)
