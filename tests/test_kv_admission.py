"""KV admission under a tiny budget, at the engine: whatever sessions share a batch and whatever gets
evicted to make room, every answer equals the model's own greedy generate().

Regression: a batch whose first item needed room evicted a session that came later in the same batch,
which then ran its next token on an empty cache (a wrong answer reported as OK). Found when the
coordinator started batching all of a replica's sessions together."""

from __future__ import annotations

import random

import pytest
import torch

from r2r_serve.worker.engine import OK, RESYNC, EngineConfig, ExtendWork, ModelEngine

PROMPTS = ["def add(a, b):", "class Stack:", "for i in", "import os", "The quick"]
NEW = 10


@pytest.fixture(scope="module")
def expected(hf):
    out = {}
    for i, prompt in enumerate(PROMPTS):
        ids = hf.tokenizer(prompt)["input_ids"]
        gen = hf.slm.generate(torch.tensor([ids], device=hf.slm.device), max_new_tokens=NEW, do_sample=False,
                              eos_token_id=None)
        out[i] = gen[0, len(ids):].tolist()
    return out


@pytest.mark.parametrize("fast_paths", [True, False])
def test_random_batches_under_a_tiny_budget_keep_answers_exact(tiny_pair, hf, expected, fast_paths):
    engine = ModelEngine(EngineConfig(model=str(tiny_pair["slm"]), role="slm", dtype="float64", features_top_k=8,
                                      max_total_tokens=60, max_sessions=2, fast_paths=fast_paths))
    engine.load()
    resyncs = 0
    for seed in range(4):
        rng = random.Random(seed)
        history = {i: hf.tokenizer(p)["input_ids"] for i, p in enumerate(PROMPTS)}
        cursor, answer = {i: 0 for i in history}, {i: [] for i in history}
        for _ in range(400):
            active = [i for i in history if len(answer[i]) < NEW]
            if not active:
                break
            group = rng.sample(active, rng.randint(1, len(active)))
            works = [ExtendWork(f"{seed}-{i}", cursor[i], history[i][cursor[i]:], want_features=True) for i in group]
            for i, outcome in zip(group, engine.extend(works)):
                if outcome.status == OK:   # what the coordinator does with each outcome
                    cursor[i] = outcome.held_tokens
                    history[i].append(outcome.token)
                    answer[i].append(outcome.token)
                else:
                    assert outcome.status == RESYNC, outcome
                    resyncs += 1
                    cursor[i] = min(outcome.held_tokens, cursor[i])
        assert answer == expected, f"seed {seed}"
        for i in history:
            engine.release([f"{seed}-{i}"])
    assert resyncs > 0 and engine.kv.evictions > 0  # the budget really forced evictions


def test_an_extend_arriving_after_its_release_does_not_bring_the_session_back(tiny_pair):
    """A request cancelled mid-step: its release can reach the worker before the step already in flight.
    That late step must not recreate a KV that nobody will ever free again."""
    from r2r_serve.worker.engine import INVALID

    engine = ModelEngine(EngineConfig(model=str(tiny_pair["slm"]), role="slm", dtype="float64", features_top_k=8))
    engine.load()
    assert engine.extend([ExtendWork("late", 0, [1, 2, 3])])[0].status == OK
    engine.release(["late"])
    outcome = engine.extend([ExtendWork("late", 0, [1, 2, 3])])[0]
    assert outcome.status == INVALID and "was released" in outcome.error
    assert not engine.kv.held("late") and len(engine.kv) == 0
    assert engine.extend([ExtendWork("fresh", 0, [1, 2, 3])])[0].status == OK  # others are unaffected
