"""The coordinator's batchers wait briefly for the callers of their last batch (so sessions that shared a
forward keep sharing it), and never for a session that went elsewhere.

A session that goes to the LLM leaves the SLM's and the router's next batches, one that got its LLM token
leaves the LLM's, and one that finishes leaves all three. With a long coalescing window (0.3 s) and several
sessions routing between the pools, no batch may be cut by the window running out: each would have cost
every session waiting in it that long.
"""

from __future__ import annotations

import asyncio

from conftest import own_coordinator
from test_anchors import PROMPTS, ids_of
from test_dtype_policy import _threshold_between_scores


async def test_batchers_never_wait_for_a_session_that_left(services, hf):
    threshold = _threshold_between_scores(hf, ids_of(hf, PROMPTS[0]))
    async with own_coordinator(services) as (coord, client):
        servicer = coord.servicer
        batchers = {"slm": servicer.slm.replicas[0].batcher, "llm": servicer.llm.replicas[0].batcher,
                    "router": servicer.router.batcher}
        for b in batchers.values():
            b.coalesce_s = 0.3
        results = await asyncio.gather(*(client.generate(p, max_tokens=16, threshold=threshold)
                                         for p in PROMPTS[:4]))
    routed = sum(r.stats.llm_tokens for r in results)
    assert 0 < routed < sum(len(r.token_ids) for r in results), "both models should write tokens"
    assert batchers["slm"].largest_batch >= 3  # the sessions really shared SLM forwards
    assert {name: b.coalesce_timeouts for name, b in batchers.items()} == {"slm": 0, "llm": 0, "router": 0}
