"""Prometheus metrics over HTTP: what the autoscalers and dashboards read moves with real traffic."""

from __future__ import annotations

import asyncio
import re
import urllib.request

from r2r_serve.common.metrics import start_metrics_server
from r2r_serve.launcher import free_port


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) ([-+\d.eE]+|NaN)$", line)
        if m:
            values[m.group(1)] = float(m.group(2))
    return values


async def test_metrics_follow_traffic(client):
    port = start_metrics_server(free_port(), host="127.0.0.1")
    before = await asyncio.to_thread(scrape, port)
    result = await client.generate("def add(a, b):", max_tokens=12, threshold=0.9, ignore_eos=True)
    after = await asyncio.to_thread(scrape, port)

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    llm, slm = result.sources.count("llm"), result.sources.count("slm")
    assert delta('r2r_generated_tokens_total{provenance="llm"}') == llm
    assert delta('r2r_generated_tokens_total{provenance="slm"}') == slm
    assert delta('r2r_coordinator_requests_total{outcome="finished"}') == 1
    assert delta("r2r_time_to_first_token_seconds_count") == 1
    assert delta("r2r_inter_token_latency_seconds_count") == 11
    assert delta("r2r_router_probability_count") == 12      # every step was scored
    assert delta("r2r_llm_catchup_tokens_count") == llm
    assert delta('r2r_worker_batch_size_count{role="slm"}') >= 12
    assert delta('r2r_worker_forward_seconds_count{role="llm"}') >= (1 if llm else 0)
    assert after['r2r_worker_kv_capacity_tokens{role="slm"}'] > 0
    assert 'r2r_pool_queue_depth{pool="slm"}' in after and "r2r_coordinator_active_sessions" in after
