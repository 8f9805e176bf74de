"""Verify mode (coordinator/verify.py): at routed tokens the LLM judges the SLM tokens it reads and rolls back
the first it rejects. Anchors: rollback_below = 1 is the LLM's own greedy generate() at any threshold; any
other value equals the plain reference loop (tests/reference.py), rollbacks and all; clients never see a token
taken back; nothing leaks."""

from __future__ import annotations

import asyncio
import statistics

import grpc
import pytest
import torch

from conftest import TOP_K, active_sessions, own_coordinator, wait_until
from r2r_serve.coordinator.servicer import CoordinatorSettings
from r2r_serve.proto import worker_pb2, worker_pb2_grpc
from r2r_serve.router.strategies import EntropyStrategy
from reference import reference_r2r_verify, slm_features
from test_anchors import PROMPTS, hf_generate, ids_of, middle_threshold


@pytest.fixture(scope="module")
def verify_setup(hf):
    """A router threshold that routes some tokens, and a rollback_below between the probabilities the LLM gives
    the SLM tokens it would not have written (so some are rolled back and some stay)."""
    strategy = EntropyStrategy()
    prompts = [ids_of(hf, p) for p in PROMPTS]
    threshold = middle_threshold(hf, prompts[0], strategy)
    eos = {hf.tokenizer.eos_token_id}
    probe = [reference_r2r_verify(hf.slm, hf.llm, p, 16, threshold, strategy, TOP_K, eos, 1e-30) for p in prompts]
    rejected = [q for run in probe for q in run.judged_disagreements]
    assert rejected, "the probe judged no disagreement: the fixture models agree everywhere"
    return strategy, prompts, threshold, eos, float(statistics.median(rejected))


@pytest.fixture(scope="module")
def doubt_prob(hf, verify_setup):
    """A min_draft_probability the SLM's greedy proposals fall below about half the time."""
    _, prompts, _, _, _ = verify_setup
    ids, probs = list(prompts[0]), []
    with torch.inference_mode():
        for _ in range(16):
            token, feats = slm_features(hf.slm, ids, TOP_K)
            probs.append(float(feats.top1_prob[0]))
            ids.append(token)
    return float(statistics.median(probs))


async def test_the_llm_judges_fed_tokens_like_a_plain_forward(services, hf):
    """Worker level: verify_from makes the LLM return, for each fed token from there on, its own greedy choice
    and the log-probability it gives the fed token, as one plain forward over the whole sequence says."""
    ids = ids_of(hf, PROMPTS[0]) + [5, 17, 23, 42, 7]
    async with grpc.aio.insecure_channel(services.llm_target) as channel:
        stub = worker_pb2_grpc.ModelWorkerStub(channel)
        first = worker_pb2.ExtendItem(session_id="verify-probe", position=0, tokens=ids[:4])
        await stub.Extend(worker_pb2.ExtendRequest(items=[first]))
        item = worker_pb2.ExtendItem(session_id="verify-probe", position=4, tokens=ids[4:], verify_from=len(ids) - 5)
        result = (await stub.Extend(worker_pb2.ExtendRequest(items=[item]))).results[0]
        await stub.Release(worker_pb2.ReleaseRequest(session_ids=["verify-probe"]))
    with torch.inference_mode():
        logits = hf.llm(torch.tensor([ids], device=hf.llm.device)).logits[0].double()
    start = len(ids) - 5
    assert result.verify_start == start and len(result.verify_tokens) == 5
    for i, j in enumerate(range(start, len(ids))):
        logp = torch.log_softmax(logits[j - 1], -1)
        assert result.verify_tokens[i] == int(torch.argmax(logits[j - 1]))
        assert result.verify_logprobs[i] == pytest.approx(float(logp[ids[j]]), abs=1e-5)
        assert result.verify_choice_logprobs[i] == pytest.approx(float(logp.max()), abs=1e-5)
    assert result.token == int(torch.argmax(logits[-1]))
    # The first fed token of an extend has no prediction in it: verify_from before it judges from the next one.
    async with grpc.aio.insecure_channel(services.llm_target) as channel:
        stub = worker_pb2_grpc.ModelWorkerStub(channel)
        item = worker_pb2.ExtendItem(session_id="verify-probe-2", position=0, tokens=ids, verify_from=1)
        whole = (await stub.Extend(worker_pb2.ExtendRequest(items=[item]))).results[0]
        await stub.Release(worker_pb2.ReleaseRequest(session_ids=["verify-probe-2"]))
    assert whole.verify_start == 1 and len(whole.verify_tokens) == len(ids) - 1


@pytest.mark.parametrize("threshold,max_draft,doubt", [("middle", None, False), (1.5, None, False), (1.5, 3, False),
                                                       (1.5, 3, True)])
async def test_rolling_back_every_disagreement_is_the_llm_generate(client, hf, verify_setup, doubt_prob, threshold,
                                                                   max_draft, doubt):
    """rollback_below = 1: whatever the router routes (some tokens, or none until the end), the answer is the
    LLM's own greedy answer, reached through rollbacks. With a draft length and a router that never routes,
    this is plain speculative decoding; with a min_draft_probability too, with HF's draft schedule."""
    _, prompts, middle, _, _ = verify_setup
    t = middle if threshold == "middle" else threshold
    results = await asyncio.gather(*(client.generate(p, max_tokens=16, threshold=t, rollback_below=1.0,
                                                     max_draft_tokens=max_draft,
                                                     min_draft_probability=doubt_prob if doubt else None)
                                     for p in PROMPTS[:3]))
    for prompt_ids, result in zip(prompts, results):
        assert result.token_ids == hf_generate(hf.llm, prompt_ids, 16, hf.tokenizer.eos_token_id)
        assert result.stats.rollbacks > 0 and result.stats.verify_passes >= 1
        assert result.stats.completion_tokens == len(result.token_ids)


async def test_intermediate_rollback_equals_the_reference_loop(client, hf, verify_setup):
    strategy, prompts, threshold, eos, below = verify_setup
    results = await asyncio.gather(*(client.generate(p, max_tokens=16, threshold=threshold, rollback_below=below)
                                     for p in PROMPTS))
    kept_slm = rollbacks = 0
    for prompt_ids, result in zip(prompts, results):
        ref = reference_r2r_verify(hf.slm, hf.llm, prompt_ids, 16, threshold, strategy, TOP_K, eos, below)
        assert result.token_ids == ref.tokens
        assert result.sources == ref.sources
        assert [t.router_probability if t.router_probability is not None else -1.0 for t in result.tokens] == \
            pytest.approx(ref.probabilities, abs=1e-6)
        s = result.stats
        assert (s.verify_passes, s.rollbacks, s.discarded_tokens) == (ref.verify_passes, ref.rollbacks,
                                                                     ref.discarded_tokens)
        assert s.llm_tokens == ref.sources.count("llm")
        kept_slm += ref.sources.count("slm")
        rollbacks += ref.rollbacks
    assert rollbacks > 0 and kept_slm > 0, "the setting should both roll back and keep SLM tokens"


def longest_slm_run(sources: list[str]) -> int:
    longest = run = 0
    for source in sources:
        run = run + 1 if source == "slm" else 0
        longest = max(longest, run)
    return longest


async def expect_reference_answers(client, hf, prompts, threshold, below, max_draft, send_draft=True,
                                   min_draft_prob=0.0, send_doubt=True):
    """Verify-mode answers with draft length `max_draft` (and draft stop `min_draft_prob`) equal the reference
    loop's, stats included, and no more than `max_draft` SLM tokens in a row stand unjudged. `send_draft` /
    `send_doubt` False: the request leaves the draft length / stop to the coordinator."""
    strategy = EntropyStrategy()
    eos = {hf.tokenizer.eos_token_id}
    results = await asyncio.gather(*(client.generate(p, max_tokens=16, threshold=threshold, rollback_below=below,
                                                     max_draft_tokens=max_draft if send_draft else None,
                                                     min_draft_probability=min_draft_prob if send_doubt else None)
                                     for p in prompts))
    for prompt_ids, result in zip(prompts, results):
        ref = reference_r2r_verify(hf.slm, hf.llm, prompt_ids, 16, threshold, strategy, TOP_K, eos, below, max_draft,
                                   min_draft_prob)
        assert result.token_ids == ref.tokens and result.sources == ref.sources
        assert [t.router_probability if t.router_probability is not None else -1.0 for t in result.tokens] == \
            pytest.approx(ref.probabilities, abs=1e-6)
        s = result.stats
        assert (s.verify_passes, s.rollbacks, s.discarded_tokens, s.llm_tokens) == (
            ref.verify_passes, ref.rollbacks, ref.discarded_tokens, ref.sources.count("llm"))
        if max_draft:
            assert longest_slm_run(result.sources) <= max_draft
    return results


@pytest.mark.parametrize("max_draft", [1, 3])
@pytest.mark.parametrize("threshold", ["middle", 1.5])
async def test_a_full_draft_calls_the_llm_like_the_reference_loop(client, hf, verify_setup, max_draft, threshold):
    """max_draft_tokens: once that many SLM tokens wait unjudged, the LLM writes the next token (no SLM
    proposal, no router) and judges them, with the router routing too ("middle") or never (1.5)."""
    _, prompts, middle, _, below = verify_setup
    t = middle if threshold == "middle" else threshold
    results = await expect_reference_answers(client, hf, prompts, t, below, max_draft)
    assert sum(r.stats.verify_passes for r in results) >= len(prompts) * 16 // (max_draft + 1) // 2


@pytest.mark.parametrize("threshold", ["middle", 1.5])
async def test_a_doubted_proposal_ends_the_draft_like_the_reference_loop(client, hf, verify_setup, doubt_prob,
                                                                         threshold):
    """min_draft_probability: where the SLM gives its proposal less, the LLM writes that position and judges the
    draft, without the router ("middle": the router ends drafts too; 1.5: only the doubt does)."""
    _, prompts, middle, _, below = verify_setup
    t = middle if threshold == "middle" else threshold
    results = await expect_reference_answers(client, hf, prompts, t, below, 0, min_draft_prob=doubt_prob)
    # About half the proposals are doubted: the LLM writes a good share, the SLM keeps some.
    llm = sum(r.stats.llm_tokens for r in results)
    total = sum(r.stats.completion_tokens for r in results)
    assert 0 < llm < total
    if threshold == 1.5:  # the router was never asked
        assert all(t.router_probability is None for r in results for t in r.tokens)


async def test_the_coordinator_default_draft_stop_and_a_request_override(services, hf, verify_setup, doubt_prob):
    """--verify-min-draft-probability applies to verify requests that set no min_draft_probability; a
    request's 0 turns it off."""
    _, prompts, _, _, below = verify_setup
    settings = CoordinatorSettings(verify_min_draft_probability=doubt_prob)
    async with own_coordinator(services, settings) as (_, client):
        doubted = await expect_reference_answers(client, hf, prompts[:2], 1.5, below, 0, min_draft_prob=doubt_prob,
                                                 send_doubt=False)
        off = await expect_reference_answers(client, hf, prompts[:2], 1.5, below, 0, min_draft_prob=0.0)
    # Each matched its own reference loop; the two settings must also differ, or this proved nothing.
    assert [r.sources for r in doubted] != [r.sources for r in off]


async def test_the_coordinator_default_draft_length_and_a_request_override(services, hf, verify_setup):
    """--verify-max-draft applies to verify requests that set no max_draft_tokens; a request's 0 turns it off
    (drafts end only where the router routes)."""
    _, prompts, _, _, below = verify_setup
    async with own_coordinator(services, CoordinatorSettings(verify_max_draft=2)) as (_, client):
        await expect_reference_answers(client, hf, prompts[:2], 1.5, below, max_draft=2, send_draft=False)
        unbounded = await expect_reference_answers(client, hf, prompts[:2], 1.5, below, max_draft=0)
    assert max(longest_slm_run(r.sources) for r in unbounded) > 2, "the override should lift the bound"


async def test_streamed_tokens_are_final_and_cut_at_a_stop_string(client, hf, verify_setup):
    """Tokens reach the client only once judged, so the stream is the answer (indices 0..n-1, no token
    taken back), and a stop string in the verified text ends it where the LLM's own answer would."""
    _, prompts, threshold, _, _ = verify_setup
    whole = await client.generate(PROMPTS[0], max_tokens=16, threshold=threshold, rollback_below=1.0)
    assert [t.index for t in whole.tokens] == list(range(len(whole.tokens)))
    assert "".join(t.text for t in whole.tokens) + whole.stats.text_tail == whole.text
    stop = whole.text[len(whole.text) // 2: len(whole.text) // 2 + 3]
    assert stop.strip(), "pick a visible stop string"
    cut = await client.generate(PROMPTS[0], max_tokens=16, threshold=threshold, rollback_below=1.0, stop=[stop])
    assert cut.text == whole.text[: whole.text.index(stop)]
    assert cut.stats.finish_reason == "stop" and cut.stats.stop_sequence == stop


async def test_a_stop_token_ends_a_verified_answer(client, verify_setup):
    """A stop token id the LLM confirms (or writes) ends the answer there: no token after it, finish "stop"."""
    _, _, threshold, _, _ = verify_setup
    whole = await client.generate(PROMPTS[1], max_tokens=16, threshold=threshold, rollback_below=1.0)
    stop_id = whole.token_ids[len(whole.token_ids) // 2]
    cut = await client.generate(PROMPTS[1], max_tokens=16, threshold=threshold, rollback_below=1.0,
                                stop_token_ids=[stop_id])
    assert cut.token_ids == whole.token_ids[: whole.token_ids.index(stop_id)]
    assert cut.stats.finish_reason == "stop"


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
async def test_a_bad_rollback_below_is_invalid_argument(client, value):
    from r2r_client import InvalidRequest

    with pytest.raises(InvalidRequest, match="rollback_below must be in"):
        await client.generate("def add(a, b):", max_tokens=4, rollback_below=value)


async def test_a_draft_length_or_stop_without_verify_mode_is_invalid_argument(client):
    from r2r_client import InvalidRequest

    with pytest.raises(InvalidRequest, match="max_draft_tokens applies to verify mode only"):
        await client.generate("def add(a, b):", max_tokens=4, max_draft_tokens=4)
    with pytest.raises(InvalidRequest, match="min_draft_probability applies to verify mode only"):
        await client.generate("def add(a, b):", max_tokens=4, min_draft_probability=0.4)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
async def test_a_bad_min_draft_probability_is_invalid_argument(client, value):
    from r2r_client import InvalidRequest

    with pytest.raises(InvalidRequest, match="min_draft_probability must be in"):
        await client.generate("def add(a, b):", max_tokens=4, rollback_below=1.0, min_draft_probability=value)


async def test_verify_mode_leaves_no_kv_behind(services, client):
    """Rollbacks crop both workers' KV and finished answers release it: no session stays on either worker."""
    await asyncio.gather(*(client.generate(p, max_tokens=12, threshold=0.5, rollback_below=1.0) for p in PROMPTS))
    async with grpc.aio.insecure_channel(services.slm_target) as a, grpc.aio.insecure_channel(services.llm_target) as b:
        for stub in (worker_pb2_grpc.ModelWorkerStub(a), worker_pb2_grpc.ModelWorkerStub(b)):
            async def none_left(stub=stub):
                return await active_sessions(stub) == 0
            await wait_until(none_left)
