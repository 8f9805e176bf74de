"""The blocking SDK client (used by the CLI) against the same services, from a worker thread."""

from __future__ import annotations

import asyncio

import pytest

from r2r_client import InvalidRequest, R2RClient


async def test_sync_client_generate_stream_and_errors(services, client):
    expected = await client.generate("def add(a, b):", max_tokens=10, threshold=0.9)

    def blocking():
        with R2RClient(services.target) as c:
            result = c.generate("def add(a, b):", max_tokens=10, threshold=0.9)
            stream = c.stream("def add(a, b):", max_tokens=10, threshold=0.9)
            streamed = [t.token_id for t in stream]
            with pytest.raises(InvalidRequest):
                c.generate("", max_tokens=3)
            return result, streamed, stream.stats, c.server_info()

    result, streamed, stats, info = await asyncio.to_thread(blocking)
    assert result.token_ids == streamed == expected.token_ids
    assert result.sources == expected.sources
    assert stats.completion_tokens == len(streamed)
    assert info.slm_endpoints == [services.slm_target]
