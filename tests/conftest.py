"""Shared fixtures: a tiny random SLM/LLM pair built offline, and real services on loopback.

The models run in float64 so that batched, padded forwards and the plain reference agree to ~1e-15:
kernel-order rounding cannot flip a greedy choice, and comparisons stay exact.

`R2R_TEST_DEVICE=cuda` runs the workers and the reference models on a GPU (still float64), to check the
CUDA code path with the same anchors.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import types

import grpc

import pytest
import pytest_asyncio
import torch

from r2r_serve.coordinator.app import start_coordinator
from r2r_serve.coordinator.servicer import CoordinatorSettings
from r2r_serve.proto import worker_pb2, worker_pb2_grpc
from r2r_serve.router.app import start_router
from r2r_serve.testing.tiny import build_tiny_pair
from r2r_serve.worker.app import start_worker
from r2r_serve.worker.engine import EngineConfig

TOP_K = 8
DEVICE = os.environ.get("R2R_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny tensors: extra intra-op threads only spin against other work on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    return build_tiny_pair(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def hf(tiny_pair):
    """The same models loaded plainly with transformers, for reference runs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(name):
        return AutoModelForCausalLM.from_pretrained(str(tiny_pair[name]), dtype=torch.float64).to(DEVICE).eval()

    return types.SimpleNamespace(slm=load("slm"), llm=load("llm"),
                                 tokenizer=AutoTokenizer.from_pretrained(str(tiny_pair["slm"])))


def worker_config(path, role: str, **kw) -> EngineConfig:
    return EngineConfig(model=str(path), role=role, dtype="float64", features_top_k=TOP_K, device=DEVICE, **kw)


@contextlib.asynccontextmanager
async def worker_with_stub(path, role: str):
    """A fresh worker of its own (its session count and work are one test's alone) and a stub to it."""
    handle = await start_worker(worker_config(path, role))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}")
    try:
        yield handle, worker_pb2_grpc.ModelWorkerStub(channel)
    finally:
        await channel.close()
        await handle.stop(0.5)


@contextlib.asynccontextmanager
async def own_coordinator(services, settings: CoordinatorSettings | None = None, *, llm_target: str | None = None):
    """A coordinator of one test's own (its settings, its batchers) on the shared workers and router, and a
    client to it: yields (coordinator handle, AsyncR2RClient); the coordinator is stopped after."""
    from r2r_client import AsyncR2RClient

    coord = await start_coordinator(services.slm_target, llm_target or services.llm_target,
                                    services.coord.servicer.router.endpoint, settings or CoordinatorSettings())
    try:
        async with AsyncR2RClient(f"127.0.0.1:{coord.port}") as client:
            yield coord, client
    finally:
        await coord.stop(0.5)


async def active_sessions(stub) -> int:
    """Sessions the worker holds KV for."""
    return (await stub.GetLoad(worker_pb2.GetLoadRequest())).active_sessions


@pytest_asyncio.fixture(scope="session")
async def services(tiny_pair):
    """SLM worker + LLM worker + entropy router + coordinator, all real gRPC servers on 127.0.0.1."""
    slm = await start_worker(worker_config(tiny_pair["slm"], "slm"))
    llm = await start_worker(worker_config(tiny_pair["llm"], "llm"))
    router = await start_router("entropy")
    coord = await start_coordinator(f"127.0.0.1:{slm.port}", f"127.0.0.1:{llm.port}", f"127.0.0.1:{router.port}",
                                    CoordinatorSettings(max_concurrent_sessions=32))
    ns = types.SimpleNamespace(slm=slm, llm=llm, router=router, coord=coord, target=f"127.0.0.1:{coord.port}",
                               slm_target=f"127.0.0.1:{slm.port}", llm_target=f"127.0.0.1:{llm.port}")
    yield ns
    for handle in (coord, router, slm, llm):
        await handle.stop(0.5)


@pytest_asyncio.fixture
async def client(services):
    from r2r_client import AsyncR2RClient

    async with AsyncR2RClient(services.target) as c:
        yield c


async def wait_until(predicate, timeout_s: float = 10.0, interval_s: float = 0.05):
    """Poll an async predicate until true; fail the test with a clear message otherwise."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while True:
        if await predicate():
            return
        if loop.time() > end:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(interval_s)


@pytest_asyncio.fixture(scope="session")
async def neural_router(services, hf, tmp_path_factory):
    """A neural router trained briefly on the tiny SLM's real features (a fixture for the serving path, not
    the shipped router). Random tiny models never agree on a token, so the label is how far down the SLM's
    ranking the LLM's greedy token sits (above the median = divergent). Yields the in-process strategy and
    the address of a coordinator that uses it, sharing the session's workers."""
    from reference import slm_features
    from r2r_serve.router.checkpoint import CheckpointMeta, fit_router, save_checkpoint
    from r2r_serve.router.features import FeatureBatch
    from r2r_serve.router.strategies import NeuralStrategy

    rows, ranks = [], []
    with torch.inference_mode():
        for text in ("def add(a, b):\n    return a + b", "The quick brown fox jumps over the lazy dog.",
                     "for i in range(10):\n    print(i)", "class Stack:\n    def push(self, x):"):
            ids = hf.tokenizer(text)["input_ids"]
            for n in range(2, len(ids) + 1):
                _, feats = slm_features(hf.slm, ids[:n], TOP_K)
                rows.append(feats)
                x = torch.tensor([ids[:n]], device=hf.slm.device)
                slm_logits = hf.slm(x).logits[0, -1]
                llm_token = int(torch.argmax(hf.llm(x).logits[0, -1]))
                ranks.append(int((slm_logits > slm_logits[llm_token]).sum()))
    labels = (torch.tensor(ranks) > torch.tensor(ranks).float().median()).float()
    batch = FeatureBatch(*(torch.cat([getattr(r, f) for r in rows]) for f in
                           ("hidden", "topk_logits", "token_embedding", "token_ids", "entropy", "top1_prob",
                            "vocab_size")))
    model = fit_router(batch, labels, steps=30, seed=0)
    path = save_checkpoint(tmp_path_factory.mktemp("router") / "router.safetensors", model,
                           CheckpointMeta.for_model(model, slm_name="tiny-slm", llm_name="tiny-llm",
                                                    default_threshold=0.5))
    router = await start_router("neural", str(path))
    coord = await start_coordinator(services.slm_target, services.llm_target, f"127.0.0.1:{router.port}")
    yield NeuralStrategy.from_checkpoint(str(path)), f"127.0.0.1:{coord.port}"
    await coord.stop(0.5)
    await router.stop(0.5)
