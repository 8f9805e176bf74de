"""Lookahead (coordinator/lookahead.py): each step's next extend is sent before the router has judged the
token. Outputs must be exactly those of the step-by-step loop, discarded lookaheads (the LLM changed the
token) must leave the SLM's KV consistent, and nothing may leak when an answer ends or is cancelled.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import REGISTRY

from conftest import TOP_K, worker_with_stub
from r2r_serve.coordinator.app import start_coordinator
from r2r_serve.coordinator.servicer import CoordinatorSettings
from r2r_serve.router.strategies import EntropyStrategy
from reference import reference_r2r
from test_anchors import PROMPTS, hf_generate, ids_of
from test_dtype_policy import _threshold_between_scores
from test_prefetch import _no_sessions_left, cancel_mid_answer


def _steps(pool: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("r2r_lookahead_steps_total", {"pool": pool, "outcome": outcome}) or 0.0


def _counts() -> dict[str, float]:
    return {f"{pool}/{outcome}": _steps(pool, outcome) for pool in ("slm", "llm") for outcome in ("used", "discarded")}


async def _run(services, slm_target: str, lookahead: bool, requests: list[dict], min_prob: float = 0.0):
    """The requests, concurrently, through a coordinator of their own; the lookahead counters they moved."""
    from r2r_client import AsyncR2RClient

    coord = await start_coordinator(slm_target, services.llm_target, services.coord.servicer.router.endpoint,
                                    CoordinatorSettings(lookahead=lookahead, lookahead_min_probability=min_prob))
    before = _counts()
    try:
        async with AsyncR2RClient(f"127.0.0.1:{coord.port}") as client:
            results = await asyncio.gather(*(client.generate(**r) for r in requests))
    finally:
        await coord.stop(0.5)
    after = _counts()
    return results, {k: after[k] - before[k] for k in after}


@pytest.mark.parametrize("lookahead,min_prob", [(True, 0.0), (False, 0.0), (True, 1.0)])
async def test_routed_outputs_equal_the_reference_loop(services, hf, lookahead, min_prob):
    """min_prob 1: no proposal is sure enough for an early extend; only final tokens (the LLM's) get one."""
    threshold = _threshold_between_scores(hf, ids_of(hf, PROMPTS[0]))
    eos = {hf.tokenizer.eos_token_id}
    requests = [dict(prompt=p, max_tokens=20, threshold=threshold) for p in PROMPTS]
    results, moved = await _run(services, services.slm_target, lookahead, requests, min_prob)
    changed = 0
    for prompt, result in zip(PROMPTS, results):
        ref = reference_r2r(hf.slm, hf.llm, ids_of(hf, prompt), 20, threshold, EntropyStrategy(), TOP_K, eos)
        assert result.token_ids == ref.tokens
        assert result.sources == ref.sources
        slm_would_have = reference_r2r(hf.slm, hf.llm, ids_of(hf, prompt), 20, 2.0, EntropyStrategy(), TOP_K, eos)
        changed += result.token_ids != slm_would_have.tokens
    assert changed, "the LLM should change some tokens, or no lookahead is ever discarded"
    if lookahead and min_prob >= 1.0:
        assert moved["slm/used"] > 0, "the LLM's tokens are final: their lookaheads are sent and used"
        assert moved["slm/discarded"] == 0, "no early extend on an unjudged proposal, so none is discarded"
    elif lookahead:
        assert moved["slm/used"] > 0
        assert moved["slm/discarded"] > 0, "a routed token the LLM changed must discard the SLM's lookahead"
    else:
        assert all(v == 0 for v in moved.values()), moved


async def test_anchors_hold_with_lookahead_on_either_model(services, hf):
    eos = hf.tokenizer.eos_token_id
    prompt = PROMPTS[1]
    requests = [dict(prompt=prompt, max_tokens=16, threshold=1.5), dict(prompt=prompt, max_tokens=16, threshold=0.0)]
    (slm_only, llm_only), moved = await _run(services, services.slm_target, True, requests)
    assert slm_only.token_ids == hf_generate(hf.slm, ids_of(hf, prompt), 16, eos)
    assert llm_only.token_ids == hf_generate(hf.llm, ids_of(hf, prompt), 16, eos)
    # Every step after the first used the extend sent by the one before (none is sent past the budget).
    assert moved["slm/used"] == len(slm_only.token_ids) - 1
    assert moved["llm/used"] == len(llm_only.token_ids) - 1


async def test_an_answer_cancelled_with_a_lookahead_in_flight_leaks_no_kv(services, tiny_pair):
    async with worker_with_stub(tiny_pair["slm"], "slm") as (handle, stub):
        engine = handle.servicer.engine
        plain = engine.extend
        loop = asyncio.get_running_loop()
        calls = 0
        slow = asyncio.Event()

        def slow_extend(works):  # from the fourth forward on, slow: the client gives up mid-lookahead
            nonlocal calls
            calls += 1
            if calls >= 4:
                loop.call_soon_threadsafe(slow.set)
                time.sleep(0.5)
            return plain(works)

        engine.extend = slow_extend
        try:
            await cancel_mid_answer(await start_coordinator(
                f"127.0.0.1:{handle.port}", services.llm_target, services.coord.servicer.router.endpoint,
                CoordinatorSettings()), slow, threshold=1.5)
        finally:
            engine.extend = plain
        await _no_sessions_left(stub)
