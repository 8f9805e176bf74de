"""Router service: features decoding, baselines, neural router + checkpoints, served over real gRPC."""

from __future__ import annotations

import json
import math

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import save_file

from r2r_serve.common.tensors import to_proto
from r2r_serve.proto import router_pb2, router_pb2_grpc
from r2r_serve.router.app import add_router_args, start_router
from r2r_serve.router.checkpoint import (CheckpointError, CheckpointMeta, ThresholdPoint, fit_router,
                                         load_checkpoint, read_metadata, save_checkpoint)
from r2r_serve.router.features import FeatureBatch
from r2r_serve.router.mlp import RouterConfig, RouterMLP
from r2r_serve.router.servicer import SERVICE_NAME
from r2r_serve.router.strategies import (EntropyStrategy, NeuralStrategy, RandomStrategy, Top1Strategy,
                                         load_strategy)

H, K, V = 32, 8, 384


def random_batch(n: int, seed: int, hidden: int = H, top_k: int = K) -> FeatureBatch:
    return FeatureBatch.random(n, hidden, top_k, vocab_size=V, generator=torch.Generator().manual_seed(seed))


def separable(n: int, seed: int) -> tuple[FeatureBatch, torch.Tensor]:
    """Synthetic features whose label is a linear function of the hidden state (~25% positive)."""
    batch = random_batch(n, seed)
    direction = torch.Generator().manual_seed(1234)
    w = torch.randn(H, generator=direction)
    score = batch.hidden @ w / math.sqrt(H)
    return batch, (score > 0.67).float()


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    ranks = scores.double().argsort().argsort().double() + 1
    pos = labels.bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: see conftest


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_torch_thread):
    feats, labels = separable(2000, seed=0)
    model = fit_router(feats, labels, steps=60, lr=3e-3, seed=0,
                       config=RouterConfig(hidden_size=H, top_k=K, width=32, depth=2, dropout=0.0))
    meta = CheckpointMeta.for_model(model, slm_name="tiny-slm", llm_name="tiny-llm",
                                    slm_tokenizer_fingerprint="sha256:abc", default_threshold=0.42,
                                    threshold_curve=[ThresholdPoint(0.42, 0.9, 0.12)], training={"steps": 60})
    path = save_checkpoint(tmp_path_factory.mktemp("router") / "router.safetensors", model, meta)
    return model, path


@pytest.fixture(scope="module")
async def entropy_server():
    handle = await start_router("entropy")
    yield handle
    await handle.stop(0)


@pytest.fixture(scope="module")
async def neural_server(trained):
    handle = await start_router("auto", str(trained[1]))
    yield handle
    await handle.stop(0)


@pytest.fixture(scope="module")
async def top1_server():
    handle = await start_router("top1")
    yield handle
    await handle.stop(0)


def stub_for(handle) -> tuple[grpc.aio.Channel, router_pb2_grpc.RouterStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}")
    return channel, router_pb2_grpc.RouterStub(channel)


# ---- features ---------------------------------------------------------------------------------------
def test_from_protos_roundtrip_and_dtypes():
    batch = random_batch(16, seed=1)
    back = FeatureBatch.from_protos(batch.to_protos(), expect_hidden=H, expect_top_k=K)
    for name in ("hidden", "topk_logits", "token_embedding", "token_ids", "entropy", "top1_prob", "vocab_size"):
        assert torch.equal(getattr(back, name), getattr(batch, name)), name
    assert back.hidden.dtype == torch.float32 and back.entropy.dtype == torch.float64
    assert back.token_ids.dtype == torch.long
    half = FeatureBatch.from_protos(batch.to_protos(torch.bfloat16))
    assert half.hidden.dtype == torch.float32 and torch.allclose(half.hidden, batch.hidden, atol=0.05)
    assert len(FeatureBatch.from_protos([], expect_hidden=H)) == 0


def test_direct_construction_coerces():
    b = FeatureBatch(hidden=torch.zeros(2, 4, dtype=torch.bfloat16), topk_logits=[[3.0, 1.0], [2.0, 2.0]],
                     token_embedding=torch.zeros(2, 4), token_ids=[5, 6], entropy=[0.1, 0.2],
                     top1_prob=torch.tensor([0.9, 0.5]), vocab_size=10)
    assert b.hidden.dtype == torch.float32 and b.entropy.dtype == torch.float64
    assert b.vocab_size.tolist() == [10, 10] and (b.hidden_size, b.top_k, len(b)) == (4, 2, 2)
    with pytest.raises(ValueError, match="token_ids must have shape"):
        FeatureBatch(torch.zeros(2, 4), torch.zeros(2, 2), torch.zeros(2, 4), [1], [0.1, 0.1], [0.5, 0.5], 10)


def _set(field, value):
    return lambda fs, i: setattr(fs[i], field, value)


@pytest.mark.parametrize("row, corrupt, message", [
    (3, lambda fs, i: to_proto(torch.zeros(64), fs[i].hidden_state), "hidden_state has 64 values, the router expects 32"),
    (2, lambda fs, i: fs[i].ClearField("token_embedding"), "token_embedding is missing"),
    (1, lambda fs, i: setattr(fs[i].hidden_state, "data", fs[i].hidden_state.data[:-2]),
     "hidden_state: tensor of shape [32] and dtype DTYPE_FLOAT32 needs 128 bytes, got 126"),
    (4, _set("entropy", -1.0), "entropy is -1.0; it must be a finite number >= 0 (nats)"),
    (0, _set("top1_prob", 1.5), "top1_prob is 1.5; it must be in [0, 1]"),
    (5, _set("vocab_size", 0), "vocab_size is 0; it must be at least 2 (is it set?)"),
    (6, _set("token_id", V), "token_id 384 is outside the vocabulary"),
])
def test_from_protos_errors_name_the_row(row, corrupt, message):
    feats = random_batch(8, seed=2).to_protos()
    corrupt(feats, row)
    with pytest.raises(ValueError) as err:
        FeatureBatch.from_protos(feats, expect_hidden=H, expect_top_k=K)
    assert str(err.value) == f"features[{row}]: {message}"


def test_from_protos_nonfinite_unsorted_and_mismatch():
    batch = random_batch(6, seed=3)
    hidden = batch.hidden.clone()
    hidden[2, 5] = float("nan")
    bad = FeatureBatch(hidden, batch.topk_logits, batch.token_embedding, batch.token_ids, batch.entropy,
                       batch.top1_prob, batch.vocab_size)
    with pytest.raises(ValueError, match=r"features\[2\]: hidden_state contains NaN"):
        FeatureBatch.from_protos(bad.to_protos())
    feats = batch.to_protos()
    to_proto(batch.topk_logits[1].flip(0), feats[1].topk_logits)
    with pytest.raises(ValueError, match=r"features\[1\]: topk_logits must be sorted"):
        FeatureBatch.from_protos(feats)
    mixed = batch.to_protos() + random_batch(1, seed=4, hidden=16).to_protos()
    with pytest.raises(ValueError, match=r"features\[6\]: hidden_state has 16 values but features\[0\] has 32"):
        FeatureBatch.from_protos(mixed)


def test_tensors_optional_only_when_not_read():
    feats = random_batch(4, seed=5, hidden=0).to_protos()
    assert not feats[0].HasField("hidden_state")
    assert FeatureBatch.from_protos(feats, require_tensors=False).hidden.shape == (4, 0)
    with pytest.raises(ValueError, match=r"features\[0\]: hidden_state is missing"):
        FeatureBatch.from_protos(feats)


# ---- strategies -------------------------------------------------------------------------------------
def test_baseline_formulas():
    batch = random_batch(50, seed=6)
    np.testing.assert_allclose(EntropyStrategy().score(batch).numpy(),
                               np.clip(batch.entropy.numpy() / np.log(V), 0, 1), rtol=1e-12)
    np.testing.assert_allclose(Top1Strategy().score(batch).numpy(), 1 - batch.top1_prob.numpy(), rtol=1e-12)
    assert EntropyStrategy().score(batch).dtype == torch.float64


def test_load_strategy_choices(trained):
    assert load_strategy("auto", None).name == "entropy"
    assert load_strategy("auto", str(trained[1])).name == "neural"
    with pytest.raises(ValueError, match="needs a checkpoint"):
        load_strategy("neural", None)
    with pytest.raises(ValueError, match="unknown router strategy"):
        load_strategy("magic", None)
    args = add_router_args(__import__("argparse").ArgumentParser()).parse_args(["--strategy", "top1", "--port", "0"])
    assert (args.strategy, args.port, args.checkpoint) == ("top1", 0, None)


# ---- neural router + checkpoints --------------------------------------------------------------------
def test_neural_router_learns_and_roundtrips(trained):
    model, path = trained
    assert model.num_parameters() < 20_000
    test_feats, test_labels = separable(1000, seed=99)
    probs = model.predict_proba(test_feats)
    assert auc(probs, test_labels) > 0.9
    pos_rate = float(test_labels.mean())
    accuracy = float(((probs >= 0.5).float() == test_labels).float().mean())
    assert accuracy > max(pos_rate, 1 - pos_rate) + 0.05
    loaded = load_checkpoint(path)
    assert torch.equal(loaded.model.predict_proba(test_feats), probs)
    assert loaded.meta.slm_name == "tiny-slm" and loaded.meta.default_threshold == pytest.approx(0.42)
    assert loaded.meta.threshold_curve == [ThresholdPoint(0.42, 0.9, 0.12)]
    assert read_metadata(path.parent).model == model.config  # a directory resolves to router.safetensors


def test_default_width_is_small():
    assert 200_000 < RouterMLP(RouterConfig(hidden_size=896, top_k=100)).num_parameters() < 500_000


def test_fit_router_is_deterministic():
    feats, labels = separable(300, seed=7)
    cfg = RouterConfig(hidden_size=H, top_k=K, width=16, depth=1)
    a, b = (fit_router(feats, labels, steps=5, seed=3, config=cfg) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="needs both"):
        fit_router(feats, torch.zeros(300), steps=1)


def test_load_errors_are_clear(trained, tmp_path):
    model, path = trained
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(junk)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    bare = tmp_path / "bare.safetensors"
    save_file(weights, str(bare))
    with pytest.raises(CheckpointError, match="no router metadata"):
        load_checkpoint(bare)
    meta = json.loads(CheckpointMeta.for_model(model).to_json())
    future = tmp_path / "future.safetensors"
    save_file(weights, str(future), metadata={"r2r_router": json.dumps({**meta, "format_version": 99})})
    with pytest.raises(CheckpointError, match="format version 99 is not supported"):
        load_checkpoint(future)
    wrong = tmp_path / "wrong.safetensors"
    save_file(weights, str(wrong), metadata={"r2r_router": json.dumps({**meta, "model": {**meta["model"], "hidden_size": 64}})})
    with pytest.raises(CheckpointError, match=r"weights do not match the stored config.*hidden_in.0.weight has shape \[32\], expected \[64\]"):
        load_checkpoint(wrong)


# ---- served over gRPC ---------------------------------------------------------------------------------
async def test_health_and_info(entropy_server, neural_server):
    for handle, strategy in ((entropy_server, "entropy"), (neural_server, "neural")):
        channel, stub = stub_for(handle)
        async with channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", SERVICE_NAME):
                resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            info = await stub.GetInfo(router_pb2.GetRouterInfoRequest())
            assert info.strategy == strategy
    channel, stub = stub_for(neural_server)
    async with channel:
        info = await stub.GetInfo(router_pb2.GetRouterInfoRequest())
    assert (info.hidden_size, info.top_k, info.slm_name, info.llm_name) == (H, K, "tiny-slm", "tiny-llm")
    assert info.default_threshold == pytest.approx(0.42) and info.checkpoint.endswith("router.safetensors")


async def test_baselines_over_grpc(entropy_server, top1_server):
    batch = random_batch(40, seed=8)
    request = router_pb2.ScoreRequest(batch_id=7, features=batch.to_protos())
    expected = [(entropy_server, np.clip(batch.entropy.numpy() / np.log(V), 0, 1)),
                (top1_server, 1 - batch.top1_prob.numpy())]
    for handle, want in expected:
        channel, stub = stub_for(handle)
        async with channel:
            resp = await stub.Score(request)
        assert resp.batch_id == 7 and resp.score_ms > 0 and not resp.error
        np.testing.assert_array_equal(np.array(resp.probabilities, dtype=np.float32), want.astype(np.float32))
    # The baselines do not need the tensors: a batch without hidden states is fine.
    channel, stub = stub_for(entropy_server)
    async with channel:
        slim = await stub.Score(router_pb2.ScoreRequest(features=random_batch(3, seed=9, hidden=0).to_protos()))
        assert len(slim.probabilities) == 3
        empty = await stub.Score(router_pb2.ScoreRequest(batch_id=3))
        assert empty.batch_id == 3 and list(empty.probabilities) == []


async def test_neural_over_grpc_matches_in_process(trained, neural_server):
    model, path = trained
    batch = random_batch(64, seed=10)
    want = NeuralStrategy.from_checkpoint(str(path)).score(batch).float()
    assert torch.allclose(want, model.predict_proba(batch), atol=1e-6)  # float64 serving vs float32 model
    channel, stub = stub_for(neural_server)
    async with channel:
        unary = await stub.Score(router_pb2.ScoreRequest(batch_id=1, features=batch.to_protos()))
        call = stub.ScoreStream()
        for i in range(3):
            await call.write(router_pb2.ScoreRequest(batch_id=100 + i, features=batch.select(slice(i * 20, i * 20 + 20)).to_protos()))
        streamed = [await call.read() for _ in range(3)]
        await call.done_writing()
    assert torch.equal(torch.tensor(list(unary.probabilities)), want)
    assert [r.batch_id for r in streamed] == [100, 101, 102]
    assert [p for r in streamed for p in r.probabilities] == list(unary.probabilities)[:60]


def bad_batches() -> dict[str, tuple[list, str]]:
    small = random_batch(4, seed=11, hidden=16).to_protos()
    short = random_batch(4, seed=12).to_protos()
    short[2].token_embedding.data = short[2].token_embedding.data[:-3]
    nan = random_batch(4, seed=13)
    nan.topk_logits[1, 0] = float("nan")
    return {"hidden size": (small, "features[0]: hidden_state has 16 values, the router expects 32"),
            "byte count": (short, "features[2]: token_embedding: tensor of shape [32] and dtype DTYPE_FLOAT32 "
                                  "needs 128 bytes, got 125"),
            "nan": (nan.to_protos(), "features[1]: topk_logits contains NaN or infinity")}


async def test_bad_batches_unary(neural_server):
    channel, stub = stub_for(neural_server)
    async with channel:
        for feats, message in bad_batches().values():
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Score(router_pb2.ScoreRequest(features=feats))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details() == message


async def test_bad_batch_keeps_stream_open(neural_server, trained):
    path = trained[1]
    good = random_batch(5, seed=14)
    channel, stub = stub_for(neural_server)
    async with channel:
        call = stub.ScoreStream()
        answers = []
        for i, (feats, message) in enumerate(bad_batches().values()):
            await call.write(router_pb2.ScoreRequest(batch_id=2 * i, features=feats))
            await call.write(router_pb2.ScoreRequest(batch_id=2 * i + 1, features=good.to_protos()))
            answers.append((await call.read(), await call.read(), message))
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
    want = NeuralStrategy.from_checkpoint(str(path)).score(good).float()
    for i, (bad, ok, message) in enumerate(answers):
        assert (bad.batch_id, bad.error, list(bad.probabilities)) == (2 * i, message, [])
        assert ok.batch_id == 2 * i + 1 and not ok.error
        assert torch.equal(torch.tensor(list(ok.probabilities)), want)


def test_neural_strategy_is_batch_invariant(trained):
    model, path = trained
    strategy = NeuralStrategy.from_checkpoint(str(path))
    batch = random_batch(48, seed=15)
    probs = strategy.score(batch)
    assert probs.dtype == torch.float64 and probs.shape == (48,)
    assert torch.allclose(probs, model.predict_proba(batch).double(), atol=1e-6)
    # What the wire carries (float32) must not depend on which rows share the batch.
    one_by_one = torch.cat([strategy.score(batch.select([i])) for i in range(48)])
    assert torch.equal(one_by_one.float(), probs.float())
    assert strategy.score(FeatureBatch.empty(H, K)).shape == (0,)
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is not converted


# ---- random router (the control at a matched LLM share) ---------------------------------------------
def test_random_strategy_draws_uniformly():
    batch = random_batch(5000, seed=16, hidden=0)
    strategy = RandomStrategy()
    scores = strategy.score(batch)
    assert scores.dtype == torch.float64 and scores.shape == (5000,)
    assert bool(((scores >= 0) & (scores < 1)).all())
    assert torch.equal(scores.float().double(), scores)  # exact on the float32 wire, so still < 1 there
    assert strategy.default_threshold == 0.9
    share = float((scores >= strategy.default_threshold).double().mean())
    assert abs(share - 0.10) <= 0.015, share
    assert abs(float(scores.mean()) - 0.5) < 0.02
    assert strategy.score(FeatureBatch.empty(0, K)).shape == (0,)


def test_random_strategy_is_seeded_and_batch_invariant():
    batch = random_batch(200, seed=17, hidden=0)
    scores = RandomStrategy(seed=0).score(batch)
    assert torch.equal(RandomStrategy(seed=0).score(batch), scores)
    other = RandomStrategy(seed=1).score(batch)
    assert float((other != scores).double().mean()) > 0.99
    # Keyed on each row, not drawn from a stream: order, batch splits and top_k do not matter.
    order = torch.randperm(200, generator=torch.Generator().manual_seed(0))
    assert torch.equal(RandomStrategy().score(batch.select(order)), scores[order])
    one_by_one = torch.cat([RandomStrategy().score(batch.select([i])) for i in range(200)])
    assert torch.equal(one_by_one, scores)
    narrow = FeatureBatch.random(200, 0, 2, vocab_size=V, generator=torch.Generator().manual_seed(17))
    assert torch.equal(RandomStrategy().score(narrow), scores)
    # One token id in many contexts still draws independently.
    same_token = FeatureBatch(batch.hidden, batch.topk_logits, batch.token_embedding,
                              torch.zeros(200, dtype=torch.long), batch.entropy, batch.top1_prob, batch.vocab_size)
    assert len(set(RandomStrategy().score(same_token).tolist())) > 190


def test_random_strategy_loads():
    strategy = load_strategy("random", None, seed=7)
    assert isinstance(strategy, RandomStrategy) and strategy.name == "random" and strategy.seed == 7
    assert not strategy.reads_tensors and load_strategy("random").seed == 0
    args = add_router_args(__import__("argparse").ArgumentParser()).parse_args(["--strategy", "random", "--seed", "3"])
    assert (args.strategy, args.seed) == ("random", 3)
    assert add_router_args(__import__("argparse").ArgumentParser()).parse_args([]).seed == 0


async def test_random_over_grpc_matches_in_process():
    batch = random_batch(64, seed=18, hidden=0)
    handle = await start_router("random", seed=5)
    try:
        channel, stub = stub_for(handle)
        async with channel:
            info = await stub.GetInfo(router_pb2.GetRouterInfoRequest())
            resp = await stub.Score(router_pb2.ScoreRequest(batch_id=1, features=batch.to_protos()))
    finally:
        await handle.stop(0)
    assert info.strategy == "random" and info.default_threshold == pytest.approx(0.9)
    assert torch.equal(torch.tensor(list(resp.probabilities)), RandomStrategy(seed=5).score(batch).float())
