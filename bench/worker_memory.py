"""Drive a worker's engine in-process the way 16 R2R sessions do and print its resident memory over time.

Prompt prefills of 120-400 tokens, decode steps in which a random ~15% of sessions sit out (waiting on the
LLM), a short catch-up now and then, router features on every step, and sessions that end and are replaced.
Every 30 s the heap is trimmed (as a serving worker does) and the resident set printed, with the engine's
phase timers per step (kv: building/regrouping the batch's KV, which a change of the decoding set costs;
forward; head; features). For chasing memory growth: run it under different allocator settings
(MALLOC_MMAP_THRESHOLD_, LRU_CACHE_CAPACITY, ONEDNN_PRIMITIVE_CACHE_CAPACITY, an LD_PRELOADed allocator) and
compare.

    python -m bench.worker_memory --model qwen2.5-coder-0.5b-instruct --seconds 300
"""

from __future__ import annotations

import argparse
import os
import random
import time

from r2r_serve.common.memory import trim_heap
from r2r_serve.models.pair_config import auto_dtype
from r2r_serve.models.registry import resolve_model
from r2r_serve.worker.engine import EngineConfig, ExtendWork, ModelEngine

ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX", "LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY",
                 "LD_PRELOAD")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="local folder or default-pair name")
    p.add_argument("--seconds", type=float, default=300)
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--every-s", type=float, default=30)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    engine = ModelEngine(EngineConfig(model=resolve_model(args.model), role="slm", dtype=auto_dtype("cpu"),
                                      prefill_from_tokens=2, forward_fixed_rows=32))
    engine.load()
    engine.warmup()
    _, resident = trim_heap()
    settings = {k: os.environ[k] for k in ALLOCATOR_ENV if k in os.environ}
    print(f"loaded: {resident:.2f} GiB resident; allocator settings: {settings or 'defaults'}", flush=True)

    rng = random.Random(args.seed)
    held: dict[str, int] = {}  # session -> tokens the engine holds
    started = 0

    def start_session() -> None:
        nonlocal started
        started += 1
        held[f"s{started}"] = 0

    def some_tokens(n: int) -> list[int]:
        return [rng.randrange(1000, 30000) for _ in range(n)]

    for _ in range(args.sessions):
        start_session()
    t0 = last = time.monotonic()
    steps = interval_steps = 0
    engine.phase_times = {}
    while time.monotonic() - t0 < args.seconds:
        works = []
        for sid, pos in held.items():
            if pos == 0:
                works.append(ExtendWork(sid, 0, some_tokens(rng.randint(120, 400)), want_features=True))
            elif rng.random() < 0.85:
                n = 1 if rng.random() < 0.9 else rng.randint(2, 12)
                works.append(ExtendWork(sid, pos, some_tokens(n), want_features=True))
        engine.extend(works)
        for w in works:
            held[w.session_id] = w.position + len(w.tokens)
        for sid in [s for s, pos in held.items() if pos > 250 and rng.random() < 0.02]:
            engine.release([sid])
            del held[sid]
            start_session()
        steps += 1
        interval_steps += 1
        if time.monotonic() - last >= args.every_s:
            _, resident = trim_heap()
            last = time.monotonic()
            phases = "  ".join(f"{k} {v / interval_steps * 1e3:.1f}" for k, v in sorted(engine.phase_times.items()))
            print(f"{last - t0:6.0f} s  {steps} steps  {started} sessions started  "
                  f"{resident:.2f} GiB resident  ms/step: {phases}", flush=True)
            engine.phase_times, interval_steps = {}, 0


if __name__ == "__main__":
    main()
