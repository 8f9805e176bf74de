"""Prometheus metrics: one definition per metric, shared by every service in the process.

Names follow vLLM's style with an `r2r_` prefix. Each service serves them over HTTP with
`start_metrics_server(port)` (`--metrics-port`; 0 = off). Metrics are process-global: tests that run
several services in one process share them (worker metrics carry a `role` label).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)

# ---- model workers -------------------------------------------------------------------------------
WORKER_ACTIVE_SESSIONS = Gauge("r2r_worker_active_sessions", "Sessions holding KV on this worker", ["role"])
WORKER_KV_TOKENS = Gauge("r2r_worker_kv_tokens", "Tokens of KV held", ["role"])
WORKER_KV_CAPACITY = Gauge("r2r_worker_kv_capacity_tokens", "KV budget in tokens", ["role"])
WORKER_RESIDENT_BYTES = Gauge("r2r_worker_resident_bytes", "Resident memory of the worker process (after heap trims)",
                              ["role"])
WORKER_QUEUE_ITEMS = Gauge("r2r_worker_queue_items", "Extend items waiting for or in a forward pass", ["role"])
WORKER_BATCH_SIZE = Histogram("r2r_worker_batch_size", "Sessions per forward pass", ["role"], buckets=_BATCH)
WORKER_FORWARD_SECONDS = Histogram("r2r_worker_forward_seconds", "Time of one batched forward pass", ["role"],
                                   buckets=_LATENCY)
WORKER_NEW_TOKENS = Counter("r2r_worker_consumed_tokens", "Tokens fed to the model (prefill + decode)", ["role"])
WORKER_EVICTIONS = Counter("r2r_worker_evictions", "Sessions evicted to make KV room", ["role"])
WORKER_ITEMS = Counter("r2r_worker_extend_items", "Extend items by outcome", ["role", "status"])

# ---- router --------------------------------------------------------------------------------------
ROUTER_BATCH_SIZE = Histogram("r2r_router_batch_size", "Feature rows per scoring call", buckets=_BATCH)
ROUTER_SCORE_SECONDS = Histogram("r2r_router_score_seconds", "Time to decode and score one batch",
                                 buckets=_LATENCY)

# ---- coordinator ---------------------------------------------------------------------------------
REQUESTS = Counter("r2r_coordinator_requests", "Finished requests by outcome", ["outcome"])
ACTIVE_SESSIONS = Gauge("r2r_coordinator_active_sessions", "Requests being generated")
TTFT = Histogram("r2r_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY)
ITL = Histogram("r2r_inter_token_latency_seconds", "Time between streamed tokens", buckets=_LATENCY)
REQUEST_SECONDS = Histogram("r2r_request_duration_seconds", "Whole-request latency", buckets=_LATENCY)
TOKENS = Counter("r2r_generated_tokens", "Generated tokens by the model that wrote them", ["provenance"])
ROUTER_PROBABILITY = Histogram("r2r_router_probability", "P(divergent) the router returned",
                               buckets=tuple(i / 20 for i in range(1, 21)))
LLM_CATCHUP_TOKENS = Histogram("r2r_llm_catchup_tokens", "Tokens the LLM consumed per routed token",
                               buckets=_TOKENS)
LLM_PREFETCH_TOKENS = Counter("r2r_llm_prefetch_tokens", "Tokens the LLM caught up eagerly while idle (prefetch)")
LOOKAHEAD_STEPS = Counter("r2r_lookahead_steps", "Extends sent before their token was final, by whether the "
                          "step used them or discarded them (the LLM changed the token, the answer ended)",
                          ["pool", "outcome"])
VERIFY_JUDGED_TOKENS = Counter("r2r_verify_judged_tokens", "SLM tokens the LLM judged in verify mode")
VERIFY_ROLLBACKS = Counter("r2r_verify_rollbacks", "Rollbacks in verify mode: an SLM token the LLM rejected")
VERIFY_DISCARDED_TOKENS = Counter("r2r_verify_discarded_tokens", "Tokens dropped by verify-mode rollbacks (the "
                                  "rejected one and those after it)")
POOL_QUEUE_DEPTH = Gauge("r2r_pool_queue_depth", "Items waiting for the next batch, per pool", ["pool"])
POOL_BATCH_SIZE = Histogram("r2r_pool_batch_size", "Items per batch sent to a pool", ["pool"], buckets=_BATCH)
POOL_COALESCE_TIMEOUTS = Counter("r2r_pool_coalesce_timeouts", "Batches cut after waiting the whole coalesce "
                                 "window for a caller of the last batch that did not come back", ["pool"])
POOL_REPLICA_SESSIONS = Gauge("r2r_pool_replica_sessions", "Sessions placed on each replica", ["pool", "replica"])
POOL_REPLICAS = Gauge("r2r_pool_replicas", "Reachable replicas per pool", ["pool"])
LOAD_MODE_SWITCHES = Counter("r2r_load_mode_switches", "Sessions switched to the LLM alone by load "
                             "(--llm-only-above-sessions) or back to routing", ["to"])
LOAD_LLM_ONLY_TOKENS = Counter("r2r_load_llm_only_tokens", "Tokens the LLM wrote alone because the coordinator "
                               "was above --llm-only-above-sessions")
ROUTER_FALLBACKS = Counter("r2r_router_fallbacks", "Steps decided without the router (router unavailable)",
                           ["fallback"])


def start_metrics_server(port: int, host: str = "0.0.0.0") -> int | None:
    """Serve /metrics on port (0 = off). Returns the port."""
    if not port:
        return None
    start_http_server(port, addr=host)
    return port
