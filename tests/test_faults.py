"""Faults with real processes on loopback (`python -m r2r_serve.cli worker|router|coordinator`, as a cluster
runs them): kill -9 of the LLM or SLM worker in the middle of a streamed answer (restarted on the same port:
the coordinator re-opens its stream, rebuilds the session's KV from the token history, and the greedy answer
equals an undisturbed run), the router killed (each `--router-fallback`: llm, slm, fail; the fallback metric
counts), and the coordinator gone (the SDK gets UNAVAILABLE promptly, not a hang) and back.

Tiny models in float64, so greedy comparisons with plain `generate()` are exact.
"""

from __future__ import annotations

import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import pytest
import torch

from conftest import TOP_K
from r2r_client import R2RClient, Unavailable
from r2r_serve.launcher import LocalCluster, free_port
from r2r_serve.proto import worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.timeout(300)

PROMPT = "def add(a, b):"
FALLBACKS = ("llm", "slm", "fail")
FAULTS: list[str] = []  # injected faults, printed at the end (README figures)


@pytest.fixture(scope="module")
def cluster(tiny_pair, tmp_path_factory):
    """SLM worker, LLM worker, entropy router, and one coordinator per router fallback, as processes."""
    local = LocalCluster(str(tmp_path_factory.mktemp("fault-logs")))
    ports = {name: free_port() for name in ("slm", "llm", "router", *(f"coord-{f}" for f in FALLBACKS))}
    metrics_ports = {f: free_port() for f in FALLBACKS}
    args = {role: ["worker", "--role", role, "--model", str(tiny_pair[role]), "--dtype", "float64", "--threads", "1",
                   "--features-top-k", str(TOP_K)] for role in ("slm", "llm")}
    args["router"] = ["router", "--strategy", "entropy"]
    eps = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    for f in FALLBACKS:
        args[f"coord-{f}"] = ["coordinator", "--slm", eps["slm"], "--llm", eps["llm"], "--router", eps["router"],
                              "--router-fallback", f, "--metrics-port", str(metrics_ports[f]), "--drain-s", "1"]
    ns = SimpleNamespace(local=local, ports=ports, eps=eps, args=args, metrics_ports=metrics_ports)

    def start(name):
        return local.start(name, args[name], port=ports[name], ready_timeout_s=180)

    def kill(name):
        child = next(c for c in reversed(local.children) if c.name == name)
        child.process.kill()  # SIGKILL: no drain, no goodbye
        child.process.wait()
        FAULTS.append(f"kill -9 {name}")

    ns.start, ns.kill = start, kill
    try:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(start, ["slm", "llm", "router"]))
            list(pool.map(start, [f"coord-{f}" for f in FALLBACKS]))
        yield ns
    finally:
        local.stop(timeout_s=10)
        print(f"\nfaults injected: {len(FAULTS)} ({', '.join(FAULTS)})")


def greedy(model, tokenizer, prompt: str, n: int) -> list[int]:
    ids = tokenizer(prompt)["input_ids"]
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None)
    return out[0, len(ids):].tolist()


def worker_batches(endpoint: str) -> int:
    with grpc.insecure_channel(endpoint) as channel:
        return worker_pb2_grpc.ModelWorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=5).batches


def fallbacks_total(cluster, fallback: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{cluster.metrics_ports[fallback]}/metrics", timeout=5).read()
    m = re.search(rf'^r2r_router_fallbacks_total{{fallback="{fallback}"}} (\S+)$', text.decode(), re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize("role,threshold", [("llm", 0.0), ("slm", 2.0)])
def test_worker_killed_mid_answer_is_rebuilt(cluster, hf, role, threshold):
    """threshold 0: the LLM writes every token; > 1: the SLM does. Its worker is killed after 10 tokens and
    restarted on the same port with empty KV; the answer still equals that model's own greedy generate().
    The answer is long and the kill comes at its 2nd token: the coordinator generates ahead of a slow reader,
    and a short answer could be complete before the kill."""
    n = 300
    tokens = []
    with R2RClient(cluster.eps["coord-llm"]) as c:
        stream = c.stream(PROMPT, max_tokens=n, threshold=threshold, ignore_eos=True, timeout=120)
        for tok in stream:
            tokens.append(tok.token_id)
            if len(tokens) == 2:
                cluster.kill(role)
                cluster.start(role)  # same port; the coordinator's stream batcher keeps retrying meanwhile
        assert stream.stats.completion_tokens == n and stream.stats.finish_reason == "length"
    assert tokens == greedy(getattr(hf, role), hf.tokenizer, PROMPT, n)
    assert worker_batches(cluster.eps[role]) > 1, "the restarted worker served the rest of the answer"


def test_router_killed_each_fallback(cluster, hf):
    n = 16
    llm_answer = greedy(hf.llm, hf.tokenizer, PROMPT, n)
    slm_answer = greedy(hf.slm, hf.tokenizer, PROMPT, n)
    before = {f: fallbacks_total(cluster, f) for f in ("llm", "slm")}
    cluster.kill("router")

    # llm: every step goes to the LLM, whatever the threshold in (0, 1].
    with R2RClient(cluster.eps["coord-llm"]) as c:
        for threshold in (0.5, 1.0, 1e-6):
            r = c.generate(PROMPT, max_tokens=n, threshold=threshold, ignore_eos=True, timeout=60)
            assert r.token_ids == llm_answer, threshold
    # slm: the SLM's proposal stands.
    with R2RClient(cluster.eps["coord-slm"]) as c:
        r = c.generate(PROMPT, max_tokens=n, threshold=0.5, ignore_eos=True, timeout=60)
        assert r.token_ids == slm_answer
    # fail: a clear UNAVAILABLE naming the router.
    with R2RClient(cluster.eps["coord-fail"]) as c:
        with pytest.raises(Unavailable) as info:
            c.generate(PROMPT, max_tokens=n, threshold=0.5, ignore_eos=True, timeout=60)
        assert "router" in info.value.details and cluster.eps["router"] in info.value.details, info.value.details
        # ... while requests that never need the router still run.
        assert c.generate(PROMPT, max_tokens=n, threshold=2.0, ignore_eos=True, timeout=60).token_ids == slm_answer
    assert fallbacks_total(cluster, "llm") >= before["llm"] + 1
    assert fallbacks_total(cluster, "slm") >= before["slm"] + 1
    cluster.start("router")


def test_coordinator_down_gives_unavailable_promptly_then_back(cluster, hf):
    name = "coord-fail"
    cluster.kill(name)
    with R2RClient(cluster.eps[name], wait_for_ready=False) as c:
        for call in (lambda: c.generate(PROMPT, max_tokens=4, timeout=30), lambda: c.server_info(timeout=30)):
            started = time.monotonic()
            with pytest.raises(Unavailable):
                call()
            assert time.monotonic() - started < 2.0, "UNAVAILABLE should come at once, not after a hang"
    cluster.start(name)  # the same port: clients reconnect
    with R2RClient(cluster.eps[name]) as c:
        r = c.generate(PROMPT, max_tokens=12, threshold=2.0, ignore_eos=True, timeout=60)
    assert r.token_ids == greedy(hf.slm, hf.tokenizer, PROMPT, 12)
