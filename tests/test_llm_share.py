"""A request can ask for a share of tokens for the LLM instead of a raw threshold (issue #3): the router's
calibration curve (from its checkpoint) maps the share to a threshold in the coordinator."""

from __future__ import annotations

import types

import grpc
import pytest

from r2r_serve.coordinator.app import start_coordinator
from r2r_serve.coordinator.shares import threshold_for_share
from r2r_serve.models.pair_config import load_pair_config
from r2r_serve.router.app import start_router
from r2r_serve.router.strategies import NeuralStrategy, RandomStrategy

PROMPT = "def add(a, b):"


def point(threshold, share):
    return types.SimpleNamespace(threshold=threshold, llm_share=share, recall=0.0)


CURVE = [point(0.9, 0.05), point(0.5, 0.2), point(0.2, 0.5)]


def test_threshold_for_share_interpolates_between_calibrated_points():
    assert threshold_for_share(CURVE, 0.05) == pytest.approx(0.9)
    assert threshold_for_share(CURVE, 0.125) == pytest.approx(0.7)
    assert threshold_for_share(CURVE, 0.35) == pytest.approx(0.35)
    assert threshold_for_share(CURVE, 0.01) == pytest.approx(0.9)   # below the curve: its highest threshold
    assert threshold_for_share(CURVE, 0.9) == pytest.approx(0.2)    # above it: its lowest
    assert threshold_for_share(CURVE, 0.0) > 1 and threshold_for_share(CURVE, 1.0) == 0.0


@pytest.mark.parametrize("share", [-0.1, 1.5, float("nan")])
def test_a_share_outside_zero_one_is_refused(share):
    with pytest.raises(ValueError, match="between 0 and 1"):
        threshold_for_share(CURVE, share)


def test_no_curve_says_what_to_do():
    with pytest.raises(ValueError, match="entropy.*send a threshold"):
        threshold_for_share([], 0.1, "entropy")


def test_the_shipped_router_maps_its_calibrated_share_back_to_its_default_threshold():
    strategy = NeuralStrategy.from_checkpoint(load_pair_config().router_checkpoint)
    curve = [point(t, s) for t, _, s in strategy.threshold_curve()]
    assert len(curve) > 10
    assert threshold_for_share(curve, 0.12) == pytest.approx(strategy.default_threshold, abs=0.01)


@pytest.fixture(scope="module")
async def random_target(services):
    router = await start_router("random", seed=3)
    coord = await start_coordinator(services.slm_target, services.llm_target, f"127.0.0.1:{router.port}")
    yield f"127.0.0.1:{coord.port}"
    await coord.stop(0.5)
    await router.stop(0.5)


async def test_a_share_request_equals_the_request_with_its_threshold(random_target):
    from r2r_client import AsyncR2RClient

    assert RandomStrategy().threshold_curve()[6] == pytest.approx((0.3, 0.7, 0.7))
    async with AsyncR2RClient(random_target) as client:
        by_share = await client.generate(PROMPT, max_tokens=24, llm_share=0.3, ignore_eos=True)
        by_threshold = await client.generate(PROMPT, max_tokens=24, threshold=0.7, ignore_eos=True)
        none = await client.generate(PROMPT, max_tokens=12, llm_share=0.0, ignore_eos=True)
        every = await client.generate(PROMPT, max_tokens=12, llm_share=1.0, ignore_eos=True)
    assert by_share.token_ids == by_threshold.token_ids and by_share.sources == by_threshold.sources
    assert 0 < by_share.sources.count("llm") < 24
    assert set(none.sources) == {"slm"} and set(every.sources) == {"llm"}


async def test_bad_share_requests_get_invalid_argument(client, random_target):
    from r2r_client import AsyncR2RClient, R2RError

    with pytest.raises(R2RError) as err:  # the session's coordinator serves the entropy router: no curve
        await client.generate(PROMPT, max_tokens=4, llm_share=0.1)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "calibration curve" in str(err.value)
    async with AsyncR2RClient(random_target) as c:
        for kw, words in ((dict(llm_share=0.1, threshold=0.5), "not both"), (dict(llm_share=2.0), "between 0 and 1")):
            with pytest.raises(R2RError) as err:
                await c.generate(PROMPT, max_tokens=4, **kw)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and words in str(err.value)
        assert (await c.generate(PROMPT, max_tokens=4, llm_share=0.5)).stats.completion_tokens == 4  # still serving
