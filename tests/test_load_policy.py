"""LLM alone under load (coordinator/load_policy.py, --llm-only-above-sessions): above N active requests,
routed requests are written by the LLM alone; at or below N they route as before. Anchors: always over the
limit, a routed request is the LLM's own greedy generate(); never over it, the plain reference loop; a request
that crosses the limit mid-answer is, token by token, the reference step where it routed and the LLM's greedy
token where the load made it LLM-only. SLM-only and verify-mode requests keep their mode."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from conftest import TOP_K, own_coordinator
from r2r_serve.cli import build_parser
from r2r_serve.coordinator.load_policy import LlmOnlyUnderLoad
from r2r_serve.coordinator.servicer import CoordinatorSettings
from r2r_serve.router.strategies import EntropyStrategy
from reference import reference_r2r, slm_features
from test_anchors import PROMPTS, hf_generate, ids_of
from test_dtype_policy import _threshold_between_scores


def _coordinator(services, above: int | None):
    return own_coordinator(services, CoordinatorSettings(llm_only_above_sessions=above))


def _switches(to: str) -> float:
    return REGISTRY.get_sample_value("r2r_load_mode_switches_total", {"to": to}) or 0.0


@torch.inference_mode()
def _check_token_by_token(hf, prompt_ids: list[int], result, threshold: float) -> int:
    """Every token is what the reference step gives at its history: a routed step (router probability
    reported) keeps the SLM's greedy token below the threshold and takes the LLM's at or above it; a load
    step (LLM-written, router not asked) is the LLM's greedy token. Returns the number of load steps."""
    strategy, ids, load_steps = EntropyStrategy(), list(prompt_ids), 0
    for tok in result.tokens:
        slm_token, feats = slm_features(hf.slm, ids, TOP_K)
        llm_token = int(torch.argmax(hf.llm(torch.tensor([ids], device=hf.llm.device)).logits[0, -1]))
        if tok.router_probability is None:
            assert tok.source == "llm", "an SLM token of a routed request without the router's score"
            assert tok.token_id == llm_token
            load_steps += 1
        else:
            p = float(np.float32(strategy.score(feats)[0]))
            assert tok.router_probability == pytest.approx(p, abs=1e-4)
            routed = tok.router_probability >= float(np.float32(threshold))
            assert tok.source == ("llm" if routed else "slm")
            assert tok.token_id == (llm_token if routed else slm_token)
        ids.append(tok.token_id)
    assert load_steps == result.stats.load_llm_only_tokens
    return load_steps


def test_the_limit_must_not_be_negative():
    with pytest.raises(ValueError, match=">= 0"):
        LlmOnlyUnderLoad(-1)


@pytest.mark.parametrize("text, value", [("off", None), ("", None), ("0", 0), ("12", 12)])
def test_the_flag_takes_a_session_count_or_off(text, value):
    """`off` and an empty value (an unset configuration variable in the Kubernetes manifests) mean off."""
    args = build_parser().parse_args(["coordinator", "--slm", "a:1", "--llm", "b:2", "--router", "c:3",
                                      "--llm-only-above-sessions", text])
    assert args.llm_only_above_sessions == value


@pytest.mark.parametrize("text", ["-1", "many"])
def test_a_bad_flag_value_is_refused_at_start(text, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["coordinator", "--slm", "a:1", "--llm", "b:2", "--router", "c:3",
                                   "--llm-only-above-sessions", text])
    assert "--llm-only-above-sessions" in capsys.readouterr().err


async def test_always_over_the_limit_a_routed_request_is_the_llm_generate(services, hf):
    eos = hf.tokenizer.eos_token_id
    threshold = _threshold_between_scores(hf, ids_of(hf, PROMPTS[0]))
    before = _switches("llm_only")
    async with _coordinator(services, 0) as (_, client):  # one active request is already over 0
        routed = await asyncio.gather(*(client.generate(p, max_tokens=16, threshold=threshold)
                                        for p in PROMPTS[:3]))
        slm_only = await client.generate(PROMPTS[0], max_tokens=16, threshold=1.5)
        verify = await client.generate(PROMPTS[0], max_tokens=16, threshold=threshold, rollback_below=1.0)
    for prompt, result in zip(PROMPTS, routed):
        assert result.token_ids == hf_generate(hf.llm, ids_of(hf, prompt), 16, eos)
        assert set(result.sources) == {"llm"}
        assert result.stats.load_llm_only_tokens == result.stats.completion_tokens > 0
    assert _switches("llm_only") - before == 3
    # An explicit SLM-only request keeps its mode (and its speed); verify mode keeps judging SLM tokens.
    assert slm_only.token_ids == hf_generate(hf.slm, ids_of(hf, PROMPTS[0]), 16, eos)
    assert slm_only.stats.load_llm_only_tokens == 0
    assert verify.stats.verify_passes > 0 and verify.stats.load_llm_only_tokens == 0


async def test_below_the_limit_nothing_changes(services, hf):
    eos = {hf.tokenizer.eos_token_id}
    threshold = _threshold_between_scores(hf, ids_of(hf, PROMPTS[0]))
    async with _coordinator(services, 8) as (_, client):
        results = await asyncio.gather(*(client.generate(p, max_tokens=16, threshold=threshold)
                                         for p in PROMPTS[:3]))
    for prompt, result in zip(PROMPTS, results):
        ref = reference_r2r(hf.slm, hf.llm, ids_of(hf, prompt), 16, threshold, EntropyStrategy(), TOP_K, eos)
        assert result.token_ids == ref.tokens and result.sources == ref.sources
        assert result.stats.load_llm_only_tokens == 0


async def test_an_answer_switches_to_the_llm_while_the_load_is_high_and_back_after(services, hf):
    """A long answer runs alone (routing); two more requests join (3 > 2: all LLM-only); they end (1 <= 2 // 2:
    routing again). Each pool catches the session up over the other mode's tokens: every token must still
    be the reference's choice at its history."""
    threshold = _threshold_between_scores(hf, ids_of(hf, PROMPTS[0]))
    back_before = _switches("routed")
    async with _coordinator(services, 2) as (_, client):
        long_answer = client.stream(PROMPTS[0], max_tokens=160, threshold=threshold, ignore_eos=True)
        tokens, joined = [], None
        async for tok in long_answer:
            tokens.append(tok)
            if len(tokens) == 8:  # the long answer is under way: two requests join, and end
                joined = await asyncio.gather(*(client.generate(p, max_tokens=24, threshold=threshold,
                                                                ignore_eos=True) for p in PROMPTS[1:3]))
    long_result = type(joined[0])(request_id=long_answer.request_id, text=long_answer.text, tokens=tokens,
                                  stats=long_answer.stats)
    load_steps = _check_token_by_token(hf, ids_of(hf, PROMPTS[0]), long_result, threshold)
    assert 0 < load_steps < len(tokens), "the long answer never switched, or never came back"
    load_positions = [i for i, t in enumerate(tokens) if t.router_probability is None]
    assert load_positions[0] >= 1 and any(t.router_probability is not None for t in tokens[load_positions[-1] + 1:]), \
        "expected routed steps before the load came and after it went"
    assert sum(_check_token_by_token(hf, ids_of(hf, p), r, threshold) for p, r in zip(PROMPTS[1:3], joined)) > 0
    assert _switches("routed") - back_before >= 1


def test_a_session_goes_back_to_routing_only_well_below_the_limit():
    """Hysteresis: above 2 a session goes to the LLM; at 2 it stays there (2 > 2 // 2), at 1 it routes again.
    Requests that do not route (SLM-only, LLM-only) and verify mode never switch."""
    from r2r_serve.coordinator.session import Session

    policy = LlmOnlyUnderLoad(2)

    def session(**kw) -> Session:
        return Session(session_id="s", history=[1, 2], prompt_len=2, sampling=None, **kw)

    s, seen = session(threshold=0.5), []
    for active in (1, 2, 3, 2, 1, 2):
        s.llm_only_by_load = policy.wants_llm_only(s, active)
        seen.append(s.llm_only_by_load)
    assert seen == [False, False, True, True, False, False]
    for other in (session(threshold=1.5), session(threshold=0.0), session(threshold=0.5, rollback_below=0.1)):
        assert not policy.wants_llm_only(other, 10)
    assert not LlmOnlyUnderLoad(None).wants_llm_only(session(threshold=0.5), 10)
