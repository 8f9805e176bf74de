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


@dataclass
class Deployment:
    coordinator: str
    slm: str      # comma-separated replica endpoints
    llm: str
    router: str


def _internal_tls(certs) -> list[str]:
    """Server flags of an internal service: TLS that requires the CA-signed client certificate (mTLS)."""
    return (["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key), "--tls-client-ca", str(certs.ca)]
            if certs else [])


def start_deployment(cluster: LocalCluster, *, slm: str, llm: str, slm_dtype: str, llm_dtype: str,
                     device: str = "cpu", threads: int = 0, slm_replicas: int = 1, llm_replicas: int = 1,
                     router_strategy: str = "auto", router_checkpoint: str | None = None,
                     threshold: float | None = None, port: int | None = None, certs=None,
                     token: str | None = None, slm_quantize: str = "none", llm_quantize: str = "none",
                     coordinator_args: list[str] | tuple[str, ...] = (), worker_args: list[str] | tuple[str, ...] = (),
                     slm_draft_vocab: int = 0, say=print) -> Deployment:
    """Start SLM worker(s), LLM worker(s), the router and the coordinator, in dependency order.

    With `certs` (security.generate_dev_certs) every internal service requires the CA-signed client
    certificate (mutual TLS) that only the coordinator (and the launcher's health checks) holds; the
    coordinator's public port serves TLS with the same CA. The token reaches the coordinator by environment,
    never on its command line. `slm_quantize`/`llm_quantize`: the workers' --quantize ("none", "int8" or "int8-weight");
    `coordinator_args`: more coordinator flags (a pair's chat options); `worker_args`: more flags for every worker;
    `slm_draft_vocab`: the SLM workers' --draft-vocab (0 = off)."""
    internal_tls = _internal_tls(certs)
    common = ["--device", device] + (["--threads", str(threads)] if threads else []) + internal_tls
    endpoints: dict[str, list[str]] = {"slm": [], "llm": []}
    for role, model, dtype, quantize, count in (("slm", slm, slm_dtype, slm_quantize, slm_replicas),
                                                ("llm", llm, llm_dtype, llm_quantize, llm_replicas)):
        quant = ["--quantize", quantize] if quantize != "none" else []
        draft = ["--draft-vocab", str(slm_draft_vocab)] if role == "slm" and slm_draft_vocab else []
        for i in range(count):
            name = role if count == 1 else f"{role}-{i}"
            say(f"starting {name} worker ({model}, {dtype}{', ' + quantize if quant else ''}"
                f"{f', drafting head {slm_draft_vocab}' if draft else ''}) ...", flush=True)
            endpoints[role].append(cluster.start(name, ["worker", "--role", role, "--model", model,
                                                        "--dtype", dtype, *quant, *draft, *common, *worker_args]))
    slm_ep, llm_ep = ",".join(endpoints["slm"]), ",".join(endpoints["llm"])
    router_ep, coord_ep = start_router_and_coordinator(
        cluster, slm_ep, llm_ep, router_strategy=router_strategy, router_checkpoint=router_checkpoint,
        threshold=threshold, port=port, certs=certs, token=token, coordinator_args=coordinator_args)
    return Deployment(coordinator=coord_ep, slm=slm_ep, llm=llm_ep, router=router_ep)


def start_router_and_coordinator(cluster: LocalCluster, slm_ep: str, llm_ep: str, *, router_strategy: str = "auto",
                                 router_checkpoint: str | None = None, threshold: float | None = None,
                                 port: int | None = None, certs=None, token: str | None = None,
                                 coordinator_args: list[str] | tuple[str, ...] = (), suffix: str = "") -> tuple[str, str]:
    """A router and a coordinator in front of running workers; returns their endpoints. Several can share
    the same workers (`suffix` names their logs apart), e.g. one per router strategy in the bench."""
    internal_tls = _internal_tls(certs)
    router_args = ["router", "--strategy", router_strategy, *internal_tls]
    if router_checkpoint:
        router_args += ["--checkpoint", router_checkpoint]
    router_ep = cluster.start(f"router{suffix}", router_args)
    coord_args = ["coordinator", "--slm", slm_ep, "--llm", llm_ep, "--router", router_ep, *coordinator_args]
    if threshold is not None:
        coord_args += ["--threshold", str(threshold)]
    if certs:
        coord_args += ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
                       "--tls-ca", str(certs.ca), "--tls-client-cert", str(certs.client_cert),
                       "--tls-client-key", str(certs.client_key)]
    coord_ep = cluster.start(f"coordinator{suffix}", coord_args, port=port,
                             env={"R2R_AUTH_TOKEN": token} if token else None)
    return router_ep, coord_ep
