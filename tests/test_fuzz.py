"""Hostile input: property-based tests (hypothesis) over every RPC of every service.

Random and malformed messages — out-of-range token ids, absurd positions, NaN/inf sampling parameters,
wrong tensor sizes, byte counts and dtypes, duplicate or unknown session ids, enormous (bounded) batches,
absurd thresholds and max_tokens, and random bytes as the serialized request — must each get a clear
INVALID_ARGUMENT / NOT_FOUND / RESOURCE_EXHAUSTED (or a per-item status inside a worker batch), never
INTERNAL/UNKNOWN, and must not disturb other sessions: a known greedy answer is the same before and after
the fuzzing, and no session leaks on the workers.

Hypothesis drives sync gRPC channels from a worker thread (`asyncio.to_thread`), so the in-process
servers keep running on the event loop meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
from collections import Counter

import grpc
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import TOP_K, wait_until
from r2r_serve.proto import (common_pb2, coordinator_pb2, coordinator_pb2_grpc, router_pb2, router_pb2_grpc,
                             worker_pb2, worker_pb2_grpc)

pytestmark = pytest.mark.timeout(300)

CLEAR = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = "fuzz-"  # every session id the fuzzer sends starts with this, so it can release them all
VOCAB = 384     # the tiny pair's vocabulary (checked against the workers below)
EXAMPLES = 40
# R2R_FUZZ_SCALE=N: N times the examples, freshly random (a longer hunt); default: a fixed, fast set.
SCALE = int(os.environ.get("R2R_FUZZ_SCALE", "1"))

TRIED: Counter = Counter()  # bad/random inputs tried per RPC, printed at the end (README figures)
LIVE = Counter()            # good answers checked while the fuzzer ran
FUZZ_SESSIONS: set[str] = set()


def fuzz_settings(n: int = EXAMPLES):
    return settings(max_examples=n * SCALE, deadline=None, database=None, derandomize=SCALE == 1,
                    suppress_health_check=list(HealthCheck))


def expect_clear(exc: grpc.RpcError, what: str, extra=()) -> None:
    code = exc.code()
    assert code in CLEAR or code in extra, f"{what}: {code} {exc.details()!r} (expected a clear status)"
    assert exc.details(), f"{what}: {code} without a message"


# ---- strategies ------------------------------------------------------------------------------------
any_f32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
token_ids = st.one_of(st.integers(0, VOCAB - 1), st.integers(0, VOCAB - 1),
                      st.integers(-2**31, 2**31 - 1), st.sampled_from([-1, VOCAB, VOCAB + 1, 2**31 - 1]))


@st.composite
def sampling_params(draw):
    kw = dict(temperature=draw(st.one_of(st.just(0.0), st.floats(0.01, 3.0), any_f32,
                                         st.sampled_from([1e-30, 1e-45, 1e30, -0.0]))),
              top_p=draw(st.one_of(st.just(0.0), st.floats(0.01, 1.0), any_f32)),
              top_k=draw(st.one_of(st.just(0), st.integers(-5, 2 * VOCAB), st.integers(-2**31, 2**31 - 1))))
    seed = draw(st.none() | st.integers(0, 2**64 - 1))
    if seed is not None:
        kw["seed"] = seed
    return common_pb2.SamplingParams(**kw)


session_ids = st.one_of(st.sampled_from([f"{FUZZ}a", f"{FUZZ}b", f"{FUZZ}c"]),
                        st.text(max_size=40).map(lambda s: FUZZ + s), st.just(""))


@st.composite
def extend_items(draw):
    sid = draw(session_ids)
    if sid:
        FUZZ_SESSIONS.add(sid)
    return worker_pb2.ExtendItem(
        session_id=sid,
        position=draw(st.one_of(st.integers(0, 8), st.integers(0, 2000), st.integers(0, 2**32 - 1))),
        tokens=draw(st.lists(token_ids, max_size=24) | st.lists(st.integers(0, VOCAB - 1), min_size=1000,
                                                                  max_size=1100)),
        sampling=draw(sampling_params()), want_features=draw(st.booleans()))


def random_tensor(draw, good_width: int):
    dtype = draw(st.sampled_from([common_pb2.DTYPE_FLOAT32, common_pb2.DTYPE_FLOAT64, common_pb2.DTYPE_FLOAT16,
                                  common_pb2.DTYPE_BFLOAT16, common_pb2.DTYPE_UNSPECIFIED, 7, 2**20]))
    shape = draw(st.one_of(st.just([good_width]), st.lists(st.integers(0, 2**32 - 1), max_size=4),
                           st.lists(st.sampled_from([0, 1, 2, 65536, 2**32 - 1]), max_size=5),
                           st.integers(0, 64).map(lambda n: [n])))
    itemsize = {1: 4, 2: 2, 3: 2, 4: 8}.get(dtype, 4)
    count = math.prod(shape) if shape else 0
    if count <= 4096 and draw(st.booleans()):
        import struct

        values = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=count,
                               max_size=count))
        fmt = {4: "f", 8: "d", 2: "e"}[itemsize]
        try:
            data = b"".join(struct.pack("<" + fmt, v) for v in values)
        except (OverflowError, struct.error):
            data = bytes(count * itemsize)
    else:
        data = draw(st.binary(max_size=512))
    return common_pb2.Tensor(shape=shape, dtype=dtype, data=data)


@st.composite
def router_features(draw, hidden: int = 32, top_k: int = TOP_K):
    f = common_pb2.RouterFeatures(
        token_id=draw(token_ids), entropy=draw(st.floats(allow_nan=True, allow_infinity=True)),
        top1_prob=draw(st.floats(allow_nan=True, allow_infinity=True)),
        vocab_size=draw(st.one_of(st.just(VOCAB), st.integers(0, 2**32 - 1))))
    for name, width in (("hidden_state", hidden), ("topk_logits", top_k), ("token_embedding", hidden)):
        if draw(st.integers(0, 4)):  # usually present
            getattr(f, name).CopyFrom(random_tensor(draw, width))
    return f


@st.composite
def generate_requests(draw):
    req = coordinator_pb2.GenerateRequest(request_id=draw(st.text(max_size=20)))
    kind = draw(st.sampled_from(["prompt", "chat", "ids", "none"]))
    if kind == "prompt":
        req.prompt = draw(st.one_of(st.text(max_size=60), st.sampled_from(["def add(a, b):", " ", "x" * 5000])))
    elif kind == "chat":
        for _ in range(draw(st.integers(0, 3))):
            req.chat.messages.add(role=draw(st.sampled_from(["user", "system", "assistant", "wizard", ""])),
                                  content=draw(st.text(max_size=30)))
        if not req.chat.messages:
            req.chat.SetInParent()
    elif kind == "ids":
        req.prompt_token_ids.ids.extend(draw(st.lists(token_ids, max_size=20) |
                                             st.lists(st.integers(0, VOCAB - 1), min_size=1000, max_size=1030)))
        req.prompt_token_ids.SetInParent()
    # Valid max_tokens stay small (bounded time); 0 = the server default.
    req.max_tokens = draw(st.one_of(st.integers(-3, 6), st.sampled_from([-2**31, 1024, 4097, 2**31 - 1])))
    req.sampling.CopyFrom(draw(sampling_params()))
    req.stop.extend(draw(st.lists(st.text(max_size=4), max_size=3) | st.lists(st.just("a"), min_size=17,
                                                                            max_size=18)))
    req.stop_token_ids.extend(draw(st.lists(token_ids, max_size=3)))
    if draw(st.booleans()):
        req.threshold = draw(st.one_of(any_f32, st.sampled_from([0.0, 0.5, 1.0, 1.5, 1e38, -1.0])))
    req.logprobs = draw(st.booleans())
    req.timeout_ms = draw(st.one_of(st.just(0), st.just(0), st.integers(1, 2**32 - 1)))
    req.ignore_eos = draw(st.booleans())
    return req


def has_default_max_tokens(req) -> bool:
    return req.max_tokens == 0


# ---- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
async def baseline(services):
    """A known greedy answer (through SLM, router and LLM), recorded before any fuzzing."""
    from r2r_client import AsyncR2RClient

    assert services.slm.servicer.engine.vocab_size == VOCAB
    async with AsyncR2RClient(services.target) as c:
        result = await c.generate("def add(a, b):", max_tokens=24, threshold=0.9, ignore_eos=True)
    assert 0 < result.stats.llm_tokens < 24, "the baseline should exercise SLM, router and LLM"
    return result.token_ids


@pytest.fixture(scope="module")
async def neural_router_target(tmp_path_factory):
    """A neural router (random weights) that expects hidden size 32 and top-8: size checks get exercised."""
    from r2r_serve.router.app import start_router
    from r2r_serve.router.checkpoint import save_checkpoint
    from r2r_serve.router.mlp import RouterConfig, RouterMLP

    path = save_checkpoint(tmp_path_factory.mktemp("fuzz-router") / "r.safetensors",
                           RouterMLP(RouterConfig(hidden_size=32, top_k=TOP_K)).eval())
    handle = await start_router("neural", str(path))
    yield f"127.0.0.1:{handle.port}"
    await handle.stop(0.2)


@contextlib.asynccontextmanager
async def live_session(services, baseline):
    """A real generation repeated on the event loop while the fuzzer runs in its thread: it shares worker
    batches with the fuzzer's items (and is evicted by its enormous batches) and must keep giving the
    baseline answer."""
    from r2r_client import AsyncR2RClient

    stop = asyncio.Event()

    async def loop() -> int:
        n = 0
        async with AsyncR2RClient(services.target) as c:
            while not stop.is_set() or n == 0:
                r = await c.generate("def add(a, b):", max_tokens=24, threshold=0.9, ignore_eos=True)
                assert r.token_ids == baseline, "a session was disturbed by the fuzzer's requests"
                n += 1
        return n

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        stop.set()
        LIVE["answers"] += await task


async def release_fuzz_sessions(services) -> None:
    ids = sorted(FUZZ_SESSIONS)
    for target in (services.slm_target, services.llm_target):
        async with grpc.aio.insecure_channel(target) as ch:
            await worker_pb2_grpc.ModelWorkerStub(ch).Release(worker_pb2.ReleaseRequest(session_ids=ids))


# ---- workers -------------------------------------------------------------------------------------------
def check_extend_response(req, resp, role: str) -> None:
    assert resp.batch_id == req.batch_id
    assert len(resp.results) == len(req.items)
    for item, r in zip(req.items, resp.results):
        assert r.session_id == item.session_id
        assert r.status in (worker_pb2.EXTEND_OK, worker_pb2.EXTEND_RESYNC, worker_pb2.EXTEND_INVALID,
                            worker_pb2.EXTEND_OVER_CAPACITY)
        if r.status == worker_pb2.EXTEND_OK:
            assert r.held_tokens == item.position + len(item.tokens)
            assert 0 <= r.token < VOCAB and math.isfinite(r.logprob) and r.logprob <= 0
            assert r.HasField("features") == (item.want_features and role == "slm") or not item.want_features
        elif r.status in (worker_pb2.EXTEND_INVALID, worker_pb2.EXTEND_OVER_CAPACITY):
            assert r.error


@pytest.mark.parametrize("role", ["slm", "llm"])
async def test_worker_extend_fuzz(services, baseline, role):
    target = services.slm_target if role == "slm" else services.llm_target

    @fuzz_settings(60)
    @given(items=st.lists(extend_items(), max_size=6), batch_id=st.integers(0, 2**64 - 1))
    def run(items, batch_id):
        req = worker_pb2.ExtendRequest(batch_id=batch_id, items=items)
        TRIED["worker.Extend"] += 1
        try:
            resp = stub.Extend(req, timeout=60)
        except grpc.RpcError as exc:
            expect_clear(exc, f"Extend {req}"[:2000])
            return
        check_extend_response(req, resp, role)

    with grpc.insecure_channel(target) as channel:
        stub = worker_pb2_grpc.ModelWorkerStub(channel)
        async with live_session(services, baseline):
            await asyncio.to_thread(run)
    await release_fuzz_sessions(services)


async def test_worker_enormous_batches_and_stream(services, baseline):
    """Batches up to and past the item limit, on the unary and the stream form; the stream survives
    every rejected batch and answers each by its batch_id."""

    @fuzz_settings(12)
    @given(n=st.sampled_from([0, 1, 300, 1024, 1025, 3000]), tokens=st.integers(1, 3),
           unique=st.booleans())
    def run(n, tokens, unique):
        ids = [f"{FUZZ}big{i if unique else i % 7}" for i in range(n)]
        FUZZ_SESSIONS.update(ids)
        req = worker_pb2.ExtendRequest(batch_id=n, items=[worker_pb2.ExtendItem(session_id=s, tokens=[1] * tokens)
                                                          for s in ids])
        TRIED["worker.Extend(enormous)"] += 1
        try:
            check_extend_response(req, stub.Extend(req, timeout=120), "slm")
        except grpc.RpcError as exc:
            expect_clear(exc, f"Extend of {n} items")
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and n > 1024

    @fuzz_settings(20)
    @given(batches=st.lists(st.lists(extend_items(), max_size=4), min_size=1, max_size=5))
    def stream(batches):
        reqs = [worker_pb2.ExtendRequest(batch_id=i + 1, items=items) for i, items in enumerate(batches)]
        reqs.append(worker_pb2.ExtendRequest(batch_id=99, items=[worker_pb2.ExtendItem(
            session_id=f"{FUZZ}x", tokens=[1]) for _ in range(1025)]))  # rejected, stream survives
        FUZZ_SESSIONS.add(f"{FUZZ}x")
        TRIED["worker.ExtendStream"] += len(reqs)
        answers = {r.batch_id: r for r in stub.ExtendStream(iter(reqs), timeout=120)}
        assert sorted(answers) == sorted(r.batch_id for r in reqs)
        assert "at most 1024" in answers[99].error
        for req in reqs[:-1]:
            assert not answers[req.batch_id].error, answers[req.batch_id].error
            check_extend_response(req, answers[req.batch_id], "slm")

    with grpc.insecure_channel(services.slm_target) as channel:
        stub = worker_pb2_grpc.ModelWorkerStub(channel)
        async with live_session(services, baseline):
            await asyncio.to_thread(run)
            await asyncio.to_thread(stream)
    await release_fuzz_sessions(services)


async def test_worker_release_and_info_fuzz(services, baseline):
    @fuzz_settings(30)
    @given(ids=st.lists(st.text(max_size=50).map(lambda s: FUZZ + "never-" + s) | st.just(""), max_size=50))
    def run(ids):
        TRIED["worker.Release"] += 1
        assert stub.Release(worker_pb2.ReleaseRequest(session_ids=ids), timeout=10).released == 0
        for rpc, req in ((stub.GetInfo, worker_pb2.GetInfoRequest()), (stub.GetLoad, worker_pb2.GetLoadRequest()),
                         (stub.GetTokenizer, worker_pb2.GetTokenizerRequest())):
            assert rpc(req, timeout=10).ByteSize() > 0

    with grpc.insecure_channel(services.llm_target) as channel:
        stub = worker_pb2_grpc.ModelWorkerStub(channel)
        await asyncio.to_thread(run)


# ---- router --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["entropy", "neural"])
async def test_router_fuzz(services, neural_router_target, kind):
    target = f"127.0.0.1:{services.router.port}" if kind == "entropy" else neural_router_target

    def check(req, resp):
        assert len(resp.probabilities) == len(req.features)
        assert all(0.0 <= p <= 1.0 for p in resp.probabilities), list(resp.probabilities)

    @fuzz_settings(60)
    @given(features=st.lists(router_features(), max_size=5), batch_id=st.integers(0, 2**64 - 1))
    def run(features, batch_id):
        req = router_pb2.ScoreRequest(batch_id=batch_id, features=features)
        TRIED["router.Score"] += 1
        try:
            resp = stub.Score(req, timeout=10)
        except grpc.RpcError as exc:
            expect_clear(exc, f"Score {req}"[:3000])
            return
        assert resp.batch_id == batch_id
        check(req, resp)

    @fuzz_settings(15)
    @given(batches=st.lists(st.lists(router_features(), max_size=3), min_size=1, max_size=4))
    def stream(batches):
        reqs = [router_pb2.ScoreRequest(batch_id=i, features=f) for i, f in enumerate(batches)]
        TRIED["router.ScoreStream"] += len(reqs)
        answers = list(stub.ScoreStream(iter(reqs), timeout=10))
        assert [a.batch_id for a in answers] == [r.batch_id for r in reqs]
        for req, resp in zip(reqs, answers):
            if resp.error:
                assert not resp.error.startswith("internal error"), resp.error
            else:
                check(req, resp)

    with grpc.insecure_channel(target) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        await asyncio.to_thread(run)
        await asyncio.to_thread(stream)
        TRIED["router.GetInfo"] += 1
        assert (await asyncio.to_thread(stub.GetInfo, router_pb2.GetRouterInfoRequest(), timeout=10)).strategy == kind


# ---- coordinator ---------------------------------------------------------------------------------------
async def test_coordinator_fuzz(services, baseline):
    extra = (grpc.StatusCode.DEADLINE_EXCEEDED,)  # only for requests that set a timeout_ms

    @fuzz_settings(60)
    @given(req=generate_requests(), streamed=st.booleans())
    def run(req, streamed):
        TRIED["coordinator.Generate" if streamed else "coordinator.Complete"] += 1
        try:
            if streamed:
                events = list(stub.Generate(req, timeout=60))
                assert events and events[-1].HasField("final")
                stats, n = events[-1].final, len(events) - 1
            else:
                result = stub.Complete(req, timeout=60)
                stats, n = result.stats, len(result.token_ids)
        except grpc.RpcError as exc:
            expect_clear(exc, f"{'Generate' if streamed else 'Complete'} {req}"[:3000],
                         extra if req.timeout_ms else ())
            return
        assert stats.completion_tokens == n
        assert n <= (req.max_tokens or 256)
        assert stats.finish_reason != coordinator_pb2.FINISH_REASON_UNSPECIFIED

    with grpc.insecure_channel(services.target) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        async with live_session(services, baseline):
            await asyncio.to_thread(run)
        TRIED["coordinator.GetServerInfo"] += 1
        info = await asyncio.to_thread(stub.GetServerInfo, coordinator_pb2.GetServerInfoRequest(), timeout=10)
        assert info.max_context == 1024


# ---- random bytes as the serialized request, every method ----------------------------------------------
METHODS = [
    ("worker", "/r2r.v1.ModelWorker/Extend", "unary", worker_pb2.ExtendRequest),
    ("worker", "/r2r.v1.ModelWorker/ExtendStream", "stream", worker_pb2.ExtendRequest),
    ("worker", "/r2r.v1.ModelWorker/Release", "unary", worker_pb2.ReleaseRequest),
    ("worker", "/r2r.v1.ModelWorker/GetInfo", "unary", worker_pb2.GetInfoRequest),
    ("worker", "/r2r.v1.ModelWorker/GetLoad", "unary", worker_pb2.GetLoadRequest),
    ("worker", "/r2r.v1.ModelWorker/GetTokenizer", "unary", worker_pb2.GetTokenizerRequest),
    ("router", "/r2r.v1.Router/Score", "unary", router_pb2.ScoreRequest),
    ("router", "/r2r.v1.Router/ScoreStream", "stream", router_pb2.ScoreRequest),
    ("router", "/r2r.v1.Router/GetInfo", "unary", router_pb2.GetRouterInfoRequest),
    ("coordinator", "/r2r.v1.Coordinator/Generate", "server_stream", coordinator_pb2.GenerateRequest),
    ("coordinator", "/r2r.v1.Coordinator/Complete", "unary", coordinator_pb2.GenerateRequest),
    ("coordinator", "/r2r.v1.Coordinator/GetServerInfo", "unary", coordinator_pb2.GetServerInfoRequest),
]


def parses(message_class, payload: bytes) -> bool:
    try:
        message_class.FromString(payload)
        return True
    except Exception:
        return False


@pytest.mark.parametrize("service,method,kind,message_class", METHODS,
                         ids=[m.rsplit("/", 1)[1] for _, m, _, _ in METHODS])
async def test_random_bytes_as_request(services, baseline, service, method, kind, message_class):
    target = {"worker": services.slm_target, "router": f"127.0.0.1:{services.router.port}",
              "coordinator": services.target}[service]

    @fuzz_settings(25)
    @given(payload=st.binary(max_size=300))
    def run(payload):
        TRIED[f"raw-bytes {service}.{method.rsplit('/', 1)[1]}"] += 1
        try:
            if kind == "unary":
                channel.unary_unary(method)(payload, timeout=30)
            elif kind == "server_stream":
                list(channel.unary_stream(method)(payload, timeout=30))
            else:
                list(channel.stream_stream(method)(iter([payload, payload]), timeout=30))
        except grpc.RpcError as exc:
            if not parses(message_class, payload):
                # Bytes that are no protobuf message: the servers' DecodeGuard answers INVALID_ARGUMENT
                # (grpcio alone would say UNKNOWN). The service keeps serving.
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
                assert "not a valid protobuf message" in (exc.details() or ""), exc.details()
                return
            # A payload that happens to parse is a (random) valid message: any clear status.
            expect_clear(exc, f"{method} <- {payload!r}", (grpc.StatusCode.DEADLINE_EXCEEDED,))

    engine = services.slm.servicer.engine
    before = set(engine.kv._sessions)
    with grpc.insecure_channel(target) as channel:  # no serializers: bytes in, bytes out
        await asyncio.to_thread(run)
    # Bytes that parse as an Extend with items create sessions of random names: drop them again.
    FUZZ_SESSIONS.update(set(engine.kv._sessions) - before)


# ---- afterwards: nothing disturbed ---------------------------------------------------------------------
async def test_after_fuzzing_state_is_intact(services, baseline):
    from r2r_client import AsyncR2RClient

    await release_fuzz_sessions(services)
    async with AsyncR2RClient(services.target) as c:
        again = await c.generate("def add(a, b):", max_tokens=24, threshold=0.9, ignore_eos=True)
    assert again.token_ids == baseline

    async def no_sessions() -> bool:
        for target in (services.slm_target, services.llm_target):
            async with grpc.aio.insecure_channel(target) as ch:
                if (await worker_pb2_grpc.ModelWorkerStub(ch).GetLoad(worker_pb2.GetLoadRequest())).active_sessions:
                    return False
        return services.coord.servicer.active == 0

    await wait_until(no_sessions, timeout_s=10)
    print(f"\nfuzz: {sum(TRIED.values())} bad/random inputs tried: " +
          ", ".join(f"{k}={v}" for k, v in sorted(TRIED.items())) +
          f"; {LIVE['answers']} concurrent good answers unchanged; lost=0")
