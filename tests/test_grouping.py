"""Forward grouping (worker/grouping.py): a long chunk does not pad a batch of decode steps to its length, small
catch-ups stay with them, and the engine's outputs do not depend on how a batch was split."""

from __future__ import annotations

import pytest

from conftest import worker_config
from r2r_serve.worker.engine import ExtendWork, ModelEngine
from r2r_serve.worker.grouping import forward_groups


def cost(lengths, groups, fixed):
    return sum(fixed + len(g) * max(lengths[i] for i in g) for g in groups)


def test_a_prompt_gets_its_own_forward_and_decode_steps_share_one():
    lengths = [1] * 15 + [300]
    groups = forward_groups(lengths, fixed_rows=32, max_tokens=4096)
    assert groups == [[15], list(range(15))]
    assert cost(lengths, groups, 32) < cost(lengths, [list(range(16))], 32) / 10


def test_small_catch_ups_stay_with_the_decode_steps():
    assert forward_groups([1, 2, 1, 1, 3], fixed_rows=32, max_tokens=4096) == [[0, 1, 2, 3, 4]]
    assert forward_groups([1] * 8, fixed_rows=32, max_tokens=4096) == [list(range(8))]
    # a GPU-like fixed cost keeps even a long chunk with them
    assert forward_groups([1] * 15 + [300], fixed_rows=10_000, max_tokens=4096) == [list(range(16))]


def test_the_partition_is_the_cheapest_and_respects_the_token_budget():
    import itertools

    lengths = [40, 1, 7, 1, 120, 9, 1, 33]
    best = forward_groups(lengths, fixed_rows=16, max_tokens=4096)
    assert sorted(i for g in best for i in g) == list(range(len(lengths)))

    def partitions(items):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for p in partitions(rest):
            yield [[first], *p]
            for k in range(len(p)):
                yield [*p[:k], [first, *p[k]], *p[k + 1:]]

    cheapest = min(cost(lengths, p, 16) for p in partitions(list(range(len(lengths)))))
    assert cost(lengths, best, 16) == cheapest
    for g in forward_groups([50, 50, 50, 1], fixed_rows=1000, max_tokens=100):
        assert sum([50, 50, 50, 1][i] for i in g) <= 100
    assert forward_groups([500, 1], fixed_rows=1000, max_tokens=100) == [[0], [1]]  # too long: alone
    assert list(itertools.chain(*forward_groups([], 32, 4096))) == []


def test_a_split_batch_gives_what_each_row_gives_alone(tiny_pair):
    """Engine level: decode steps batched with a new session's prompt run as two forwards (fewer token rows)
    and answer exactly what each session answers alone."""
    engine = ModelEngine(worker_config(tiny_pair["llm"], "llm"))
    engine.load()
    prompts = [[5, 9, 11, 3], [7, 2, 8], [4, 4, 1, 6, 2]]
    for k, p in enumerate(prompts):
        engine.extend([ExtendWork(f"s{k}", 0, p)])
    long_prompt = list(range(3, 60))
    batch = [ExtendWork(f"s{k}", len(p), [10 + k]) for k, p in enumerate(prompts)] + [ExtendWork("new", 0, long_prompt)]
    forwards = engine.batches
    together = engine.extend(batch)
    assert engine.batches - forwards == 2, "the prompt should run apart from the decode steps"
    alone = ModelEngine(worker_config(tiny_pair["llm"], "llm"))
    alone.load()
    for k, p in enumerate(prompts):
        alone.extend([ExtendWork(f"s{k}", 0, p)])
        out = alone.extend([ExtendWork(f"s{k}", len(p), [10 + k])])[0]
        assert (out.token, out.logprob) == (together[k].token, pytest.approx(together[k].logprob, abs=1e-12))
    out = alone.extend([ExtendWork("new", 0, long_prompt)])[0]
    assert out.token == together[-1].token
