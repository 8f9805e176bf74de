"""Bad requests get INVALID_ARGUMENT / RESOURCE_EXHAUSTED with a readable message, and the service keeps
serving; the workers refuse malformed items without disturbing other sessions."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from r2r_client import AsyncR2RClient, Cancelled, InvalidRequest, Overloaded
from r2r_serve.coordinator.app import PairMismatch, start_coordinator
from r2r_serve.coordinator.servicer import CoordinatorSettings
from r2r_serve.proto import worker_pb2, worker_pb2_grpc

BAD_REQUESTS = [
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt="   "), "prompt is empty"),
    (dict(prompt="hi", max_tokens=-1), "max_tokens must be >= 0"),
    (dict(prompt="hi", max_tokens=100_000), "at most"),
    (dict(prompt="hi", top_p=1.5, temperature=1.0), "top_p must be in (0, 1]"),
    (dict(prompt="hi", temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(prompt="hi", temperature=float("inf")), "temperature must be a finite number >= 0"),
    (dict(prompt="hi", top_k=-3, temperature=1.0), "top_k must be >= 0"),
    (dict(prompt=[5, 99_999]), "outside the vocabulary"),
    (dict(prompt=[-1]), "outside the vocabulary"),
    (dict(prompt=[7] * 1100), "context is 1024 tokens"),
    (dict(prompt=[7] * 1000, max_tokens=100), "exceeds the model's context"),
    (dict(prompt="hi", threshold=-0.1), "threshold must be >= 0"),
    (dict(prompt="hi", stop=[""]), "must not be empty"),
    (dict(prompt="hi", stop_token_ids=[10**6]), "outside the vocabulary"),
    (dict(prompt=[{"role": "wizard", "content": "x"}]), "has role 'wizard'"),
]


@pytest.mark.parametrize("params,message", BAD_REQUESTS, ids=[m for _, m in BAD_REQUESTS])
async def test_bad_request_is_invalid_argument(client, params, message):
    params = dict(params)
    prompt = params.pop("prompt")
    with pytest.raises(InvalidRequest) as info:
        await client.generate(prompt, **params)
    assert message in info.value.details
    # ... and the service still answers.
    ok = await client.generate("def add(a, b):", max_tokens=3, threshold=0.9)
    assert ok.stats.completion_tokens == 3 or ok.stats.finish_reason == "eos"


async def test_request_without_input(services):
    from r2r_serve.proto import coordinator_pb2, coordinator_pb2_grpc

    async with grpc.aio.insecure_channel(services.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await coordinator_pb2_grpc.CoordinatorStub(channel).Complete(coordinator_pb2.GenerateRequest(max_tokens=3))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no input" in info.value.details()


async def test_over_the_concurrency_bound_is_resource_exhausted(services):
    coord = await start_coordinator(services.slm_target, services.llm_target, f"127.0.0.1:{services.router.port}",
                                    CoordinatorSettings(max_concurrent_sessions=1))
    try:
        async with AsyncR2RClient(f"127.0.0.1:{coord.port}") as c:
            long = c.stream("class Stack:", max_tokens=600, threshold=0.9, ignore_eos=True)
            it = long.__aiter__()
            await it.__anext__()  # the first request is running
            with pytest.raises(Overloaded) as info:
                await c.generate("def add(a, b):", max_tokens=3)
            assert "limit of 1 concurrent" in info.value.details
            long.cancel()
            with pytest.raises(Cancelled):
                async for _ in it:
                    pass
            await asyncio.sleep(0.2)
            r = await c.generate("def add(a, b):", max_tokens=3, threshold=0.9)  # room again
            assert r.stats is not None
    finally:
        await coord.stop(0.5)


async def test_worker_refuses_bad_items_but_serves_the_rest_of_the_batch(services):
    async with grpc.aio.insecure_channel(services.slm_target) as channel:
        stub = worker_pb2_grpc.ModelWorkerStub(channel)
        req = worker_pb2.ExtendRequest(batch_id=1)
        req.items.add(session_id="good", position=0, tokens=[5, 6, 7])
        req.items.add(session_id="bad-token", position=0, tokens=[5, 10**7])
        req.items.add(session_id="empty", position=0, tokens=[])
        req.items.add(session_id="good", position=3, tokens=[8])  # duplicate in one batch
        req.items.add(session_id="ahead", position=5, tokens=[1])  # unknown session, claims 5 tokens
        resp = await stub.Extend(req)
        status = [r.status for r in resp.results]
        assert status == [worker_pb2.EXTEND_OK, worker_pb2.EXTEND_INVALID, worker_pb2.EXTEND_INVALID,
                          worker_pb2.EXTEND_INVALID, worker_pb2.EXTEND_RESYNC]
        assert "outside the vocabulary" in resp.results[1].error
        assert "appears twice" in resp.results[3].error
        assert resp.results[4].held_tokens == 0
        assert resp.results[0].held_tokens == 3
        # A resend from an older position (a lost response) is repaired, not refused.
        again = await stub.Extend(worker_pb2.ExtendRequest(items=[worker_pb2.ExtendItem(
            session_id="good", position=2, tokens=[7])]))
        assert again.results[0].status == worker_pb2.EXTEND_OK and again.results[0].token == resp.results[0].token
        too_many = worker_pb2.ExtendRequest(items=[worker_pb2.ExtendItem(session_id=f"s{i}", tokens=[1])
                                                   for i in range(2000)])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Extend(too_many)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        released = await stub.Release(worker_pb2.ReleaseRequest(session_ids=["good", "never-existed"]))
        assert released.released == 1


async def test_coordinator_refuses_a_pair_with_different_tokenizers(tmp_path, services):
    from r2r_serve.testing.tiny import LLM_SHAPE, build_model, build_tokenizer
    from r2r_serve.worker.app import start_worker
    from conftest import worker_config

    other_tok = build_tokenizer(vocab_size=320)
    folder = tmp_path / "other-llm"
    build_model(other_tok, LLM_SHAPE, seed=5).save_pretrained(folder)
    other_tok.save_pretrained(folder)
    other = await start_worker(worker_config(folder, "llm"))
    try:
        with pytest.raises(PairMismatch) as info:
            await start_coordinator(services.slm_target, f"127.0.0.1:{other.port}",
                                    f"127.0.0.1:{services.router.port}")
        message = str(info.value)
        assert "tokenizers differ" in message and "other-llm" in message and "slm" in message
    finally:
        await other.stop(0.5)
