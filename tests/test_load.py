"""Overload: 64 concurrent streaming requests against one set of services, some cancelled mid-way, some with
short deadlines, more than the coordinator's concurrency bound. Every request ends with a complete answer
(equal to the same request served alone) or a clean RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED / CANCELLED —
none lost, none hung; afterwards the workers hold no sessions, the coordinator none, and the process's
memory is back near its level after a warm-up round."""

from __future__ import annotations

import asyncio
import gc
from collections import Counter

import grpc
import psutil
import pytest

from conftest import wait_until
from r2r_client import AsyncR2RClient, Cancelled, DeadlineExceeded, Overloaded
from r2r_serve.coordinator.app import start_coordinator
from r2r_serve.coordinator.servicer import CoordinatorSettings
from r2r_serve.proto import worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.timeout(300)

REQUESTS = 64
LIMIT = 40                 # the coordinator's max_concurrent_sessions: the rest are refused at once
ROUND_TIMEOUT_S = 120.0    # a request still running after this is "hung" and fails the test
RSS_MARGIN_MB = 96         # allowed growth of the process's RSS from round 1 to round 2
PROMPTS = ["def add(a, b):", "class Stack:", "for i in range(10):", "import os", "The quick brown fox",
           "while True:", "Hello, world!", "Write a Python function"]
THRESHOLDS = [0.0, 0.05, 0.5, 2.0]


def plan(i: int) -> tuple[str, dict]:
    """What request i does: 'cancel' after a few tokens, 'deadline' (too short to finish) or 'complete'."""
    params = dict(max_tokens=12 + i % 5 * 4, threshold=THRESHOLDS[i % 4], ignore_eos=True)
    if i % 5 == 1:
        return "cancel", {**params, "max_tokens": 400}
    if i % 5 == 3:
        return "deadline", {**params, "max_tokens": 900}
    return "complete", params


async def one(c: AsyncR2RClient, i: int) -> tuple[str, list[int] | None]:
    kind, params = plan(i)
    prompt = PROMPTS[i % len(PROMPTS)]
    stream = c.stream(prompt, timeout=0.4 if kind == "deadline" else 60, **params)
    tokens = []
    try:
        async for tok in stream:
            tokens.append(tok.token_id)
            if kind == "cancel" and len(tokens) == 3 + i % 4:
                stream.cancel()
        if kind == "complete":
            assert stream.stats is not None and stream.stats.completion_tokens == params["max_tokens"]
            return "complete", tokens
        return "unexpected-end", None
    except Overloaded as exc:
        assert "concurrent" in exc.details
        return "RESOURCE_EXHAUSTED", None
    except DeadlineExceeded:
        return "DEADLINE_EXCEEDED", None
    except Cancelled:
        return "CANCELLED", None


async def worker_sessions(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        return (await worker_pb2_grpc.ModelWorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest())).active_sessions


async def test_64_concurrent_streams_none_lost(services, client):
    coord = await start_coordinator(services.slm_target, services.llm_target, f"127.0.0.1:{services.router.port}",
                                    CoordinatorSettings(max_concurrent_sessions=LIMIT))
    process = psutil.Process()
    # Each distinct "complete" request served alone, through the shared services: the expected answers.
    expected = {}
    for i in range(REQUESTS):
        kind, params = plan(i)
        key = (PROMPTS[i % len(PROMPTS)], params["max_tokens"], params["threshold"])
        if kind == "complete" and key not in expected:
            expected[key] = (await client.generate(key[0], max_tokens=key[1], threshold=key[2],
                                                   ignore_eos=True)).token_ids
    try:
        async with AsyncR2RClient(f"127.0.0.1:{coord.port}") as c:
            rss = []
            for round_no in (1, 2):
                tasks = [asyncio.ensure_future(one(c, i)) for i in range(REQUESTS)]
                done, pending = await asyncio.wait(tasks, timeout=ROUND_TIMEOUT_S)
                for t in pending:
                    t.cancel()
                assert not pending, f"{len(pending)} requests hung for {ROUND_TIMEOUT_S}s"
                results = [t.result() for t in tasks]
                outcomes = Counter(kind for kind, _ in results)
                print(f"\nload round {round_no}: {REQUESTS} requests, limit {LIMIT} concurrent -> "
                      + ", ".join(f"{k}={v}" for k, v in sorted(outcomes.items())) + ", lost=0, hung=0")
                assert sum(outcomes.values()) == REQUESTS
                assert set(outcomes) <= {"complete", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED"}, outcomes
                assert outcomes["RESOURCE_EXHAUSTED"] >= 1, "nothing went over the concurrency bound"
                assert outcomes["complete"] >= 1 and outcomes["CANCELLED"] >= 1 and outcomes["DEADLINE_EXCEEDED"] >= 1
                for i, (kind, tokens) in enumerate(results):
                    plan_kind, params = plan(i)
                    allowed = {"cancel": "CANCELLED", "deadline": "DEADLINE_EXCEEDED", "complete": "complete"}
                    assert kind in (allowed[plan_kind], "RESOURCE_EXHAUSTED"), (i, plan_kind, kind)
                    if kind == "complete":  # batched with 40 others, still the answer it gets alone
                        assert tokens == expected[(PROMPTS[i % len(PROMPTS)], params["max_tokens"],
                                                   params["threshold"])], i

                async def idle() -> bool:
                    return (coord.servicer.active == 0 and await worker_sessions(services.slm_target) == 0
                            and await worker_sessions(services.llm_target) == 0)

                await wait_until(idle, timeout_s=15)
                assert (await c.server_info()).active_sessions == 0
                gc.collect()
                rss.append(process.memory_info().rss / 2**20)
                print(f"load round {round_no}: RSS {rss[-1]:.0f} MiB after; workers hold 0 sessions")
            assert rss[1] - rss[0] < RSS_MARGIN_MB, f"RSS grew from {rss[0]:.0f} to {rss[1]:.0f} MiB"
    finally:
        await coord.stop(0.5)
