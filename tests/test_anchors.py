"""The correctness anchors: threshold > 1 is the SLM's own greedy generate(), threshold 0 the LLM's, and
anything between equals the plain reference R2R loop, token for token, also with concurrent sessions."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from conftest import TOP_K
from r2r_serve.router.strategies import EntropyStrategy
from reference import reference_r2r

PROMPTS = [
    "Write a Python function that reverses a string",
    "def add(a, b):",
    "class Stack:",
    "The quick brown fox",
    "import os\nimport sys\n",
    "for i in range(10):",
]


def hf_generate(model, ids: list[int], max_new: int, eos: int) -> list[int]:
    out = model.generate(torch.tensor([ids], device=model.device), max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                         pad_token_id=eos)
    gen = out[0, len(ids):].tolist()
    return gen[: gen.index(eos)] if eos in gen else gen


def ids_of(hf, prompt: str) -> list[int]:
    return hf.tokenizer(prompt)["input_ids"]


@pytest.mark.parametrize("prompt", PROMPTS[:3])
async def test_threshold_above_one_is_the_slm_generate(client, hf, prompt):
    result = await client.generate(prompt, max_tokens=24, threshold=1.5)
    expected = hf_generate(hf.slm, ids_of(hf, prompt), 24, hf.tokenizer.eos_token_id)
    assert result.token_ids == expected
    assert set(result.sources) <= {"slm"}
    assert result.stats.llm_tokens == 0


@pytest.mark.parametrize("prompt", PROMPTS[:3])
async def test_threshold_zero_is_the_llm_generate(client, hf, prompt):
    result = await client.generate(prompt, max_tokens=24, threshold=0.0, ignore_eos=False)
    expected = hf_generate(hf.llm, ids_of(hf, prompt), 24, hf.tokenizer.eos_token_id)
    assert result.token_ids == expected
    assert set(result.sources) <= {"llm"}


def middle_threshold(hf, prompt_ids, strategy) -> float:
    """A threshold between the scores of an SLM-only run, so both models get tokens."""
    probe = reference_r2r(hf.slm, hf.llm, prompt_ids, 16, 0.5, strategy, TOP_K, {hf.tokenizer.eos_token_id})
    return float(np.median(probe.probabilities))


async def test_intermediate_threshold_matches_reference_across_concurrent_sessions(client, services, hf):
    strategy = EntropyStrategy()
    prompts = [ids_of(hf, p) for p in PROMPTS]
    threshold = middle_threshold(hf, prompts[0], strategy)
    eos = {hf.tokenizer.eos_token_id}
    slm_batcher = services.coord.servicer.slm.replicas[0].batcher
    slm_batcher.largest_batch = 0

    results = await asyncio.gather(*(client.generate(p, max_tokens=20, threshold=threshold) for p in PROMPTS))

    routed = 0
    for prompt_ids, result in zip(prompts, results):
        ref = reference_r2r(hf.slm, hf.llm, prompt_ids, 20, threshold, strategy, TOP_K, eos)
        assert result.token_ids == ref.tokens
        assert result.sources == ref.sources
        routed += ref.sources.count("llm")
        assert result.stats.llm_tokens == ref.sources.count("llm")
    assert 0 < routed < sum(len(r.token_ids) for r in results), "the threshold should split tokens between models"
    # The sessions really shared SLM forward passes.
    assert slm_batcher.largest_batch >= 4


async def test_neural_router_matches_reference(services, hf, neural_router):
    """The same anchor with the trained MLP router (a test fixture, not the shipped router)."""
    from r2r_client import AsyncR2RClient

    strategy, target = neural_router
    prompts = [ids_of(hf, p) for p in PROMPTS[:4]]
    threshold = middle_threshold(hf, prompts[1], strategy)
    async with AsyncR2RClient(target) as client:
        results = await asyncio.gather(*(client.generate(p, max_tokens=16, threshold=threshold) for p in PROMPTS[:4]))
    routed = 0
    for prompt_ids, result in zip(prompts, results):
        ref = reference_r2r(hf.slm, hf.llm, prompt_ids, 16, threshold, strategy, TOP_K, {hf.tokenizer.eos_token_id})
        assert result.token_ids == ref.tokens
        assert result.sources == ref.sources
        routed += ref.sources.count("llm")
    assert routed > 0


async def test_complete_equals_stream(client):
    from r2r_serve.proto import coordinator_pb2, coordinator_pb2_grpc
    import grpc

    streamed = await client.generate("def add(a, b):", max_tokens=12, threshold=0.9, logprobs=True)
    async with grpc.aio.insecure_channel(client.target) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        req = coordinator_pb2.GenerateRequest(prompt="def add(a, b):", max_tokens=12, threshold=0.9, logprobs=True)
        unary = await stub.Complete(req)
    assert list(unary.token_ids) == streamed.token_ids
    assert unary.text == streamed.text
    assert len(unary.logprobs) == 12 and all(lp <= 0 for lp in unary.logprobs)
    assert unary.stats.completion_tokens == 12
