"""Eager LLM catch-up (coordinator/prefetch.py): while the LLM is idle the coordinator brings sessions'
LLM KV up to their history, so routed tokens need short extends. Outputs must not change, the catch-ups at
routed steps must get shorter, and a session that ends (or is cancelled) with a prefetch in flight must
leave no KV behind.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from conftest import TOP_K, active_sessions, own_coordinator, wait_until, worker_with_stub
from r2r_serve.coordinator.app import start_coordinator
from r2r_serve.coordinator.servicer import CoordinatorSettings
from r2r_serve.router.strategies import EntropyStrategy
from reference import reference_r2r
from test_anchors import PROMPTS, hf_generate, ids_of
from test_dtype_policy import _threshold_between_scores


def _sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest_asyncio.fixture
async def llm_worker(tiny_pair):
    async with worker_with_stub(tiny_pair["llm"], "llm") as handle_and_stub:
        yield handle_and_stub


def _settings(min_tokens: int) -> CoordinatorSettings:
    return CoordinatorSettings(llm_prefetch_min_tokens=min_tokens)


async def _coordinator(services, llm_handle, min_tokens: int):
    return await start_coordinator(services.slm_target, f"127.0.0.1:{llm_handle.port}",
                                   services.coord.servicer.router.endpoint, _settings(min_tokens))


def _own_coordinator(services, llm_handle, min_tokens: int):
    return own_coordinator(services, _settings(min_tokens), llm_target=f"127.0.0.1:{llm_handle.port}")


async def _no_sessions_left(stub) -> None:
    async def empty():
        return await active_sessions(stub) == 0
    await wait_until(empty, timeout_s=10.0)


async def cancel_mid_answer(coord, started: asyncio.Event, threshold: float, settle_s: float = 0.0,
                            start_within_s: float = 10.0) -> None:
    """Start a long answer, wait until `started` (a slow forward has begun) and `settle_s` more, then cancel
    it as a client giving up would; the coordinator is stopped after."""
    from r2r_client import AsyncR2RClient

    try:
        async with AsyncR2RClient(f"127.0.0.1:{coord.port}") as client:
            task = asyncio.ensure_future(client.generate(PROMPTS[0], max_tokens=200, threshold=threshold))
            await asyncio.wait_for(started.wait(), start_within_s)
            await asyncio.sleep(settle_s)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    finally:
        await coord.stop(0.5)


async def test_prefetch_keeps_outputs_and_shortens_catch_ups(services, hf, llm_worker):
    handle, stub = llm_worker
    threshold = _threshold_between_scores(hf, ids_of(hf, PROMPTS[0]))
    eos = {hf.tokenizer.eos_token_id}
    caught_up = {}
    for min_tokens in (0, 4):
        before = (_sample("r2r_llm_catchup_tokens_sum"), _sample("r2r_llm_prefetch_tokens_total"))
        async with _own_coordinator(services, handle, min_tokens) as (_, client):
            results = await asyncio.gather(*(client.generate(p, max_tokens=20, threshold=threshold)
                                             for p in PROMPTS))
        caught_up[min_tokens] = (_sample("r2r_llm_catchup_tokens_sum") - before[0],
                                 _sample("r2r_llm_prefetch_tokens_total") - before[1])
        routed = 0
        for prompt, result in zip(PROMPTS, results):
            ref = reference_r2r(hf.slm, hf.llm, ids_of(hf, prompt), 20, threshold, EntropyStrategy(), TOP_K, eos)
            assert result.token_ids == ref.tokens, f"prefetch min_tokens={min_tokens} changed the output"
            assert result.sources == ref.sources
            routed += result.stats.llm_tokens
        assert routed > 0, "the threshold should route some tokens"
        await _no_sessions_left(stub)
    assert caught_up[0][1] == 0, "prefetch off must not prefetch"
    assert caught_up[4][1] > 0, "prefetch on never caught a session up"
    # Lags the routed steps had to read themselves: shorter once the prompts were read ahead of need.
    assert caught_up[4][0] < caught_up[0][0]


async def test_a_session_that_never_routes_still_has_its_prompt_read_ahead(services, hf, llm_worker):
    handle, stub = llm_worker

    def consumed() -> float:
        return _sample("r2r_worker_consumed_tokens_total", role="llm")

    async with _own_coordinator(services, handle, 4) as (_, client):
        before = consumed()
        result = await client.generate(PROMPTS[0], max_tokens=12, threshold=1.0)  # may route; never does
        read_ahead = consumed() - before
        await _no_sessions_left(stub)
        before = consumed()
        slm_only = await client.generate(PROMPTS[1], max_tokens=12, threshold=1.5)  # never routes
        slm_only_read = consumed() - before
    assert result.token_ids == hf_generate(hf.slm, ids_of(hf, PROMPTS[0]), 12, hf.tokenizer.eos_token_id)
    assert result.stats.llm_tokens == 0 and slm_only.stats.llm_tokens == 0
    prompt_len = len(ids_of(hf, PROMPTS[0]))
    # The prompt, then the answer in chunks of >= 4 as it grew (all but the last token).
    assert prompt_len - 1 <= read_ahead <= prompt_len + len(result.token_ids) - 1
    assert read_ahead > prompt_len, "the LLM should keep catching up while the answer grows"
    assert slm_only_read == 0, "a session that can never route made the LLM read its tokens"
    await _no_sessions_left(stub)


async def test_cancelling_a_request_while_its_prefetch_runs_leaks_no_kv(services, hf, llm_worker):
    handle, stub = llm_worker
    engine = handle.servicer.engine
    plain = engine.extend
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_extend(works):  # a long CPU prefill: the prefetch stays in flight while the client gives up
        loop.call_soon_threadsafe(started.set)
        time.sleep(1.0)
        return plain(works)

    engine.extend = slow_extend
    try:  # 0.1 s after the slow forward began: the prefetch's forward is running on the worker now
        await cancel_mid_answer(await _coordinator(services, handle, 4), started, threshold=1.0, settle_s=0.1,
                                start_within_s=5.0)
    finally:
        engine.extend = plain
    await _no_sessions_left(stub)
