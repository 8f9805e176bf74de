"""Cancellation, deadlines, KV eviction and a worker restart: answers stay right and KV is released."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from conftest import wait_until, worker_config
from r2r_client import AsyncR2RClient, DeadlineExceeded
from r2r_serve.coordinator.app import start_coordinator
from r2r_serve.proto import worker_pb2, worker_pb2_grpc
from r2r_serve.worker.app import start_worker


async def worker_sessions(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        load = await worker_pb2_grpc.ModelWorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest())
    return load.active_sessions


async def all_released(services) -> bool:
    return (await worker_sessions(services.slm_target)) == 0 and (await worker_sessions(services.llm_target)) == 0


async def test_finished_requests_leave_no_kv(client, services):
    await client.generate("def add(a, b):", max_tokens=8, threshold=0.9)
    await wait_until(lambda: all_released(services))


async def test_cancel_mid_stream_releases_kv_everywhere(client, services):
    stream = client.stream("for i in range(10):", max_tokens=800, threshold=0.9, ignore_eos=True)
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 5:
            # Both workers now hold KV for the session (threshold 0.9 routes some tokens to the LLM).
            assert await worker_sessions(services.slm_target) == 1
            stream.cancel()
            break
    await wait_until(lambda: all_released(services))
    assert services.coord.servicer.active == 0


async def test_grpc_deadline_ends_request_and_releases_kv(client, services):
    with pytest.raises(DeadlineExceeded):
        await client.generate("class Stack:", max_tokens=900, threshold=0.0, ignore_eos=True, timeout=0.3)
    await wait_until(lambda: all_released(services))


async def test_request_timeout_field_gives_deadline_exceeded(client, services):
    with pytest.raises(DeadlineExceeded) as info:
        await client.generate("class Stack:", max_tokens=900, threshold=0.0, ignore_eos=True, timeout_ms=200)
    assert "timeout" in info.value.details
    await wait_until(lambda: all_released(services))


async def test_eviction_under_a_small_kv_budget_keeps_answers_exact(tiny_pair, services, hf):
    """A worker that can hold only ~2 sessions' KV serves 5 concurrent sessions: evicted sessions are
    rebuilt from the coordinator's history and every answer equals the SLM's own generate()."""
    small = await start_worker(worker_config(tiny_pair["slm"], "slm", max_total_tokens=70, max_sessions=2))
    coord = await start_coordinator(f"127.0.0.1:{small.port}", services.llm_target,
                                    f"127.0.0.1:{services.router.port}")
    prompts = ["def add(a, b):", "class Stack:", "for i in", "import os", "The quick"]
    try:
        async with AsyncR2RClient(f"127.0.0.1:{coord.port}") as c:
            results = await asyncio.gather(*(c.generate(p, max_tokens=16, threshold=1.5, ignore_eos=True)
                                             for p in prompts))
        for prompt, result in zip(prompts, results):
            ids = hf.tokenizer(prompt)["input_ids"]
            out = hf.slm.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None)
            assert result.token_ids == out[0, len(ids):].tolist()
        assert small.servicer.engine.kv.evictions > 0
    finally:
        await coord.stop(0.5)
        await small.stop(0.5)


async def test_llm_worker_restart_mid_answer_is_repaired(tiny_pair, services, hf):
    """The LLM worker goes away and comes back on the same port (empty KV) in the middle of an answer:
    the coordinator re-opens its stream, re-sends the history, and the answer is the LLM's generate()."""
    from r2r_serve.common.server import ServiceHandle

    llm = await start_worker(worker_config(tiny_pair["llm"], "llm"))
    port = llm.port
    coord = await start_coordinator(services.slm_target, f"127.0.0.1:{port}", f"127.0.0.1:{services.router.port}")
    prompt = "def add(a, b):"
    restarted: list[ServiceHandle] = []
    try:
        async with AsyncR2RClient(f"127.0.0.1:{coord.port}") as c:
            stream = c.stream(prompt, max_tokens=40, threshold=0.0, ignore_eos=True)
            tokens = []
            async for tok in stream:
                tokens.append(tok.token_id)
                if len(tokens) == 10:
                    await llm.stop(0)
                    restarted.append(await start_worker(worker_config(tiny_pair["llm"], "llm"), port=port))
        ids = hf.tokenizer(prompt)["input_ids"]
        out = hf.llm.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, eos_token_id=None)
        assert tokens == out[0, len(ids):].tolist()
        assert restarted[0].servicer.engine.batches > 1  # the new process really served the rest
    finally:
        await coord.stop(0.5)
        for h in restarted:
            await h.stop(0.5)
