"""The OpenAI-compatible HTTP gateway, driven by the official `openai` client against the session's services:
answers equal the coordinator's own (SDK) answers, streaming chunks follow OpenAI's format, unsupported
fields and coordinator errors map to OpenAI-style HTTP errors, and a client that leaves frees the session."""

from __future__ import annotations

import argparse
import asyncio
import json

import httpx2
import openai
import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from conftest import wait_until
from r2r_serve.coordinator.app import start_coordinator
from r2r_serve.coordinator.servicer import CoordinatorSettings
from r2r_serve.gateway.app import add_gateway_args, start_gateway
from r2r_serve.proto import worker_pb2, worker_pb2_grpc

import grpc

PROMPT = "def add(a, b):"
CHAT = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Reverse a string"}]
THRESHOLD = 0.9  # on the tiny pair the entropy router sends some tokens to the LLM at this threshold


async def worker_sessions(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        load = await worker_pb2_grpc.ModelWorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest())
    return load.active_sessions


async def all_released(services) -> bool:
    return (await worker_sessions(services.slm_target) == 0 and await worker_sessions(services.llm_target) == 0
            and services.coord.servicer.active == 0)


@pytest_asyncio.fixture(scope="module")
async def gateway(services):
    handle = await start_gateway(services.target)
    yield handle
    await handle.stop()


@pytest_asyncio.fixture
async def oai(gateway):
    async with openai.AsyncOpenAI(base_url=gateway.base_url + "/v1", api_key="dummy", max_retries=0,
                                  timeout=30) as c:
        yield c


def extra(obj, key):
    """An extra (non-OpenAI) field of a response object, as a user of the official client reads it."""
    return obj.model_extra[key]


# ---- answers equal the coordinator's ------------------------------------------------------------

async def test_completion_equals_the_coordinator(oai, client):
    ref = await client.generate(PROMPT, max_tokens=16, threshold=THRESHOLD)
    resp = await oai.completions.create(model="r2r", prompt=PROMPT, max_tokens=16, temperature=0,
                                        extra_body={"r2r_threshold": THRESHOLD})
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    choice = resp.choices[0]
    assert choice.text == ref.text
    assert choice.finish_reason == {"eos": "stop", "stop": "stop", "length": "length"}[ref.stats.finish_reason]
    assert resp.usage.completion_tokens == ref.stats.completion_tokens == len(ref.tokens)
    assert resp.usage.prompt_tokens == ref.stats.prompt_tokens
    assert resp.usage.total_tokens == ref.stats.prompt_tokens + ref.stats.completion_tokens
    r2r = extra(resp, "r2r")
    assert r2r["token_ids"] == ref.token_ids and r2r["sources"] == ref.sources
    assert r2r["llm_tokens"] == ref.stats.llm_tokens and r2r["llm_share"] == pytest.approx(ref.stats.llm_share)


async def test_verify_mode_through_the_gateway(oai, client):
    """r2r_rollback_below reaches the coordinator: the answer is the coordinator's verify-mode answer, and the
    r2r summary says how many rollbacks it took; out of range it is a 400 naming the field."""
    import openai

    ref = await client.generate(PROMPT, max_tokens=16, threshold=THRESHOLD, rollback_below=1.0)
    resp = await oai.completions.create(model="r2r", prompt=PROMPT, max_tokens=16, temperature=0,
                                        extra_body={"r2r_threshold": THRESHOLD, "r2r_rollback_below": 1.0})
    assert resp.choices[0].text == ref.text
    r2r = extra(resp, "r2r")
    assert r2r["token_ids"] == ref.token_ids and r2r["rollbacks"] == ref.stats.rollbacks > 0
    with pytest.raises(openai.BadRequestError) as err:
        await oai.completions.create(model="r2r", prompt=PROMPT, max_tokens=4, extra_body={"r2r_rollback_below": 2})
    assert "r2r_rollback_below" in str(err.value)
    # The draft length reaches it too (2 here: the answer's SLM runs are no longer than that).
    ref = await client.generate(PROMPT, max_tokens=16, threshold=2.0, rollback_below=0.5, max_draft_tokens=2)
    resp = await oai.completions.create(model="r2r", prompt=PROMPT, max_tokens=16, temperature=0, extra_body={
        "r2r_threshold": 2.0, "r2r_rollback_below": 0.5, "r2r_max_draft_tokens": 2})
    assert extra(resp, "r2r")["token_ids"] == ref.token_ids and ref.stats.verify_passes >= 16 // 3
    with pytest.raises(openai.BadRequestError) as err:
        await oai.completions.create(model="r2r", prompt=PROMPT, max_tokens=4, extra_body={
            "r2r_rollback_below": 1.0, "r2r_max_draft_tokens": -1})
    assert "r2r_max_draft_tokens" in str(err.value)
    # ... and the draft stop: a probability only a certain SLM reaches ends every draft at once.
    ref = await client.generate(PROMPT, max_tokens=16, threshold=2.0, rollback_below=0.5, min_draft_probability=0.9999)
    resp = await oai.completions.create(model="r2r", prompt=PROMPT, max_tokens=16, temperature=0, extra_body={
        "r2r_threshold": 2.0, "r2r_rollback_below": 0.5, "r2r_min_draft_probability": 0.9999})
    assert extra(resp, "r2r")["token_ids"] == ref.token_ids and ref.stats.llm_tokens > 16 // 2
    with pytest.raises(openai.BadRequestError) as err:
        await oai.completions.create(model="r2r", prompt=PROMPT, max_tokens=4, extra_body={
            "r2r_rollback_below": 1.0, "r2r_min_draft_probability": 1.5})
    assert "r2r_min_draft_probability" in str(err.value)


async def test_streamed_completion_equals_the_coordinator(oai, client):
    ref = await client.generate(PROMPT, max_tokens=16, threshold=THRESHOLD)
    stream = await oai.completions.create(model="r2r", prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
                                          stream_options={"include_usage": True},
                                          extra_body={"r2r_threshold": THRESHOLD})
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.text
    per_token = [extra(c, "r2r") for c in chunks if c.model_extra.get("r2r") and "source" in extra(c, "r2r")]
    assert [t["source"] for t in per_token] == ref.sources
    assert [t["token_id"] for t in per_token] == ref.token_ids
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and extra(finals[0], "r2r")["llm_tokens"] == ref.stats.llm_tokens
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref.stats.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


async def test_token_id_prompt(oai, client, hf):
    ids = hf.tokenizer(PROMPT)["input_ids"]
    ref = await client.generate(ids, max_tokens=8, threshold=THRESHOLD)
    for prompt in (ids, [ids]):
        resp = await oai.completions.create(model="r2r", prompt=prompt, max_tokens=8, temperature=0,
                                            extra_body={"r2r_threshold": THRESHOLD})
        assert resp.choices[0].text == ref.text and resp.usage.prompt_tokens == len(ids)


async def test_chat_equals_the_coordinator(oai, client):
    ref = await client.generate(CHAT, max_tokens=12, threshold=THRESHOLD)
    resp = await oai.chat.completions.create(model="r2r", messages=CHAT, max_completion_tokens=12, temperature=0,
                                             extra_body={"r2r_threshold": THRESHOLD})
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert resp.choices[0].message.role == "assistant" and resp.choices[0].message.content == ref.text
    assert resp.usage.completion_tokens == ref.stats.completion_tokens
    assert resp.usage.prompt_tokens == ref.stats.prompt_tokens
    assert extra(resp, "r2r")["sources"] == ref.sources

    stream = await oai.chat.completions.create(model="r2r", messages=CHAT, max_tokens=12, temperature=0,
                                               stream=True, extra_body={"r2r_threshold": THRESHOLD})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert [extra(c, "r2r")["source"] for c in chunks if "source" in (c.model_extra.get("r2r") or {})] == ref.sources
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [
        "length" if ref.stats.finish_reason == "length" else "stop"]


async def test_chat_text_parts_and_developer_role(oai, client):
    ref = await client.generate(CHAT, max_tokens=6, threshold=THRESHOLD)
    messages = [{"role": "developer", "content": "You write Python."},
                {"role": "user", "content": [{"type": "text", "text": "Reverse a string"}]}]
    resp = await oai.chat.completions.create(model="r2r", messages=messages, max_tokens=6, temperature=0,
                                             extra_body={"r2r_threshold": THRESHOLD})
    assert resp.choices[0].message.content == ref.text


async def test_stop_strings(oai, client):
    full = await client.generate(PROMPT, max_tokens=24, threshold=2.0, ignore_eos=True)
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
    assert stop.strip(), "pick a visible stop string"
    ref = await client.generate(PROMPT, max_tokens=24, threshold=2.0, ignore_eos=True, stop=[stop])
    assert ref.stats.finish_reason == "stop" and stop not in ref.text
    for stops in (stop, [stop, "\x00never"]):
        resp = await oai.completions.create(model="r2r", prompt=PROMPT, max_tokens=24, temperature=0, stop=stops,
                                            extra_body={"r2r_threshold": 2.0, "ignore_eos": True})
        assert resp.choices[0].text == ref.text and resp.choices[0].finish_reason == "stop"
        assert extra(resp, "r2r")["stop_sequence"] == stop
    stream = await oai.completions.create(model="r2r", prompt=PROMPT, max_tokens=24, temperature=0, stop=stop,
                                          stream=True, extra_body={"r2r_threshold": 2.0, "ignore_eos": True})
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_seeded_sampling_and_top_p(oai, client):
    ref = await client.generate(PROMPT, max_tokens=8, threshold=THRESHOLD, temperature=0.8, top_p=0.9, seed=7)
    resp = await oai.completions.create(model="r2r", prompt=PROMPT, max_tokens=8, temperature=0.8, top_p=0.9,
                                        seed=7, extra_body={"r2r_threshold": THRESHOLD})
    assert resp.choices[0].text == ref.text


async def test_logprobs(oai, client):
    ref = await client.generate(PROMPT, max_tokens=6, threshold=THRESHOLD, logprobs=True)
    resp = await oai.completions.create(model="r2r", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0,
                                        extra_body={"r2r_threshold": THRESHOLD})
    lp = resp.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([t.logprob for t in ref.tokens])
    assert lp.tokens == [t.text for t in ref.tokens] and lp.top_logprobs is None
    assert lp.text_offset[0] == 0

    chat = await oai.chat.completions.create(model="r2r", messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                             extra_body={"r2r_threshold": THRESHOLD})
    ref = await client.generate(CHAT, max_tokens=6, threshold=THRESHOLD, logprobs=True)
    assert [e.logprob for e in chat.choices[0].logprobs.content] == pytest.approx([t.logprob for t in ref.tokens])
    assert all(e.top_logprobs == [] for e in chat.choices[0].logprobs.content)

    stream = await oai.chat.completions.create(model="r2r", messages=CHAT, max_tokens=6, temperature=0,
                                               logprobs=True, stream=True, extra_body={"r2r_threshold": THRESHOLD})
    streamed = [e.logprob async for c in stream if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == pytest.approx([t.logprob for t in ref.tokens])


# ---- models and health ---------------------------------------------------------------------------

async def test_models_and_single_model_ids(oai, client, services):
    info = await client.server_info()
    ids = [m.id async for m in oai.models.list()]
    assert ids == ["r2r", info.slm_model, info.llm_model]
    card = await oai.models.retrieve("r2r")
    assert card.id == "r2r" and extra(card, "r2r")["slm_model"] == info.slm_model
    # The SLM's / LLM's own ids run that model alone.
    for model, threshold in ((info.slm_model, 2.0), (info.llm_model, 0.0)):
        ref = await client.generate(PROMPT, max_tokens=6, threshold=threshold)
        resp = await oai.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0)
        assert resp.choices[0].text == ref.text and resp.model == model
        assert set(extra(resp, "r2r")["sources"]) == {"slm" if threshold else "llm"}
    with pytest.raises(openai.NotFoundError) as info_:
        await oai.completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=2)
    assert info_.value.body["code"] == "model_not_found" and "gpt-4o" in info_.value.body["message"]


async def test_health(gateway):
    async with httpx2.AsyncClient(base_url=gateway.base_url) as http:
        r = await http.get("/health")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        r = await http.get("/v1/nothing")
        assert r.status_code == 404 and "error" in r.json()
    dead = await start_gateway("127.0.0.1:1")  # nothing listens there
    try:
        async with httpx2.AsyncClient(base_url=dead.base_url) as http:
            r = await http.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "unavailable"
            r = await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable_error"
    finally:
        await dead.stop()


# ---- refusals ------------------------------------------------------------------------------------

REFUSED = [
    ("chat", dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
    ("chat", dict(extra_body={"functions": [{"name": "f", "parameters": {}}]}), "functions"),
    ("chat", dict(response_format={"type": "json_object"}), "response_format"),
    ("chat", dict(logit_bias={"5": 10}), "logit_bias"),
    ("chat", dict(presence_penalty=0.5), "presence_penalty"),
    ("chat", dict(frequency_penalty=0.5), "frequency_penalty"),
    ("chat", dict(n=2), "n"),
    ("chat", dict(logprobs=True, top_logprobs=2), "top_logprobs"),
    ("chat", dict(extra_body={"foo": 1}), "foo"),
    ("chat", dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content[0].type"),
    ("chat", dict(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
    ("chat", dict(max_tokens=3, max_completion_tokens=4), "max_tokens"),
    ("chat", dict(temperature=3.0), "temperature"),
    ("completions", dict(best_of=2), "best_of"),
    ("completions", dict(echo=True), "echo"),
    ("completions", dict(suffix="x"), "suffix"),
    ("completions", dict(logprobs=2), "logprobs"),
    ("completions", dict(n=3), "n"),
    ("completions", dict(prompt=["one", "two"]), "prompt"),
    ("completions", dict(stream_options={"include_usage": True}), "stream_options"),
    ("completions", dict(stop=[""]), "stop"),
    ("completions", dict(extra_body={"r2r_threshold": "high"}), "r2r_threshold"),
    ("completions", dict(max_tokens=0), "max_tokens"),
]


@pytest.mark.parametrize("endpoint,kwargs,param", REFUSED, ids=[f"{e}-{p}" for e, _, p in REFUSED])
async def test_unsupported_fields_are_400(oai, endpoint, kwargs, param):
    kwargs = dict(kwargs)
    with pytest.raises(openai.BadRequestError) as info:
        if endpoint == "chat":
            kwargs.setdefault("messages", CHAT)
            await oai.chat.completions.create(model="r2r", max_tokens=kwargs.pop("max_tokens", 2), **kwargs)
        else:
            kwargs.setdefault("prompt", PROMPT)
            await oai.completions.create(model="r2r", max_tokens=kwargs.pop("max_tokens", 2), **kwargs)
    err = info.value
    assert err.status_code == 400
    assert err.body["type"] == "invalid_request_error" and err.body["param"] == param
    assert param.split(".")[0].split("[")[0] in err.body["message"]


async def test_off_values_of_unsupported_fields_are_accepted(oai):
    resp = await oai.chat.completions.create(model="r2r", messages=CHAT, max_tokens=2, n=1, presence_penalty=0,
                                             frequency_penalty=0, logit_bias={}, user="u1", tools=None,
                                             response_format={"type": "text"})
    assert resp.usage.completion_tokens <= 2


async def test_coordinator_errors_keep_their_message(oai):
    with pytest.raises(openai.BadRequestError) as info:
        await oai.completions.create(model="r2r", prompt=[5, 99_999], max_tokens=2)
    assert "outside the vocabulary" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:  # streamed: refused before any byte of the stream
        await oai.completions.create(model="r2r", prompt=[7] * 1100, max_tokens=2, stream=True)
    assert "context is 1024 tokens" in info.value.body["message"]


async def test_deadline_maps_to_504_and_to_a_stream_error(services):
    gw = await start_gateway(services.target, request_timeout_s=0.3)
    try:
        async with openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key="dummy", max_retries=0) as c:
            with pytest.raises(openai.InternalServerError) as info:
                await c.completions.create(model="r2r", prompt="class Stack:", max_tokens=900, temperature=0,
                                           extra_body={"r2r_threshold": 0.0, "ignore_eos": True})
            assert info.value.status_code == 504
            stream = await c.completions.create(model="r2r", prompt="class Stack:", max_tokens=900, temperature=0,
                                                stream=True, extra_body={"r2r_threshold": 0.0, "ignore_eos": True})
            with pytest.raises(openai.APIError) as info:
                async for _ in stream:
                    pass
            assert info.value.body["code"] == "timeout"
    finally:
        await gw.stop()
    await wait_until(lambda: all_released(services))


async def test_over_the_concurrency_bound_is_429(services):
    coord = await start_coordinator(services.slm_target, services.llm_target, f"127.0.0.1:{services.router.port}",
                                    CoordinatorSettings(max_concurrent_sessions=1))
    gw = await start_gateway(f"127.0.0.1:{coord.port}")
    try:
        async with openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key="dummy", max_retries=0) as c:
            long = await c.completions.create(model="r2r", prompt="class Stack:", max_tokens=1000, temperature=0,
                                              stream=True, extra_body={"r2r_threshold": THRESHOLD,
                                                                       "ignore_eos": True})
            it = long.__aiter__()
            await it.__anext__()  # running
            with pytest.raises(openai.RateLimitError) as info:
                await c.completions.create(model="r2r", prompt=PROMPT, max_tokens=2)
            assert info.value.status_code == 429 and "limit of 1 concurrent" in info.value.body["message"]
            assert info.value.response.headers["retry-after"] == "1"
            await long.close()  # the client leaves: the slot frees
            await wait_until(lambda: _idle(coord))
            resp = await c.completions.create(model="r2r", prompt=PROMPT, max_tokens=2)
            assert resp.usage.completion_tokens <= 2
    finally:
        await gw.stop()
        await coord.stop(0.5)
    await wait_until(lambda: all_released(services))


async def _idle(coord) -> bool:
    return coord.servicer.active == 0


# ---- a client that leaves ------------------------------------------------------------------------

async def test_disconnect_mid_stream_releases_the_session(oai, services):
    with capture_logs() as logs:
        stream = await oai.chat.completions.create(model="r2r", messages=CHAT, max_tokens=800, temperature=0,
                                                   stream=True, extra_body={"r2r_threshold": THRESHOLD,
                                                                            "ignore_eos": True})
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 6:
                assert await worker_sessions(services.slm_target) == 1
                assert services.coord.servicer.active == 1
                break
        await stream.close()
        await wait_until(lambda: all_released(services))
    assert_cancelled_early(logs, 800)


def assert_cancelled_early(logs, max_tokens: int) -> None:
    """The gateway saw the client leave, and the coordinator (done with the request: the caller waited for
    that) never logged it as finished: it was cancelled, not run to its end."""
    events = [e["event"] for e in logs]
    assert "client_disconnected" in events and "request_finished" not in events, events
    assert all(e["completion_tokens"] < max_tokens for e in logs if e["event"] == "request_cancelled")


async def test_disconnect_while_a_non_streamed_answer_runs(gateway, services):
    body = {"model": "r2r", "prompt": "class Stack:", "max_tokens": 1000, "temperature": 0,
            "r2r_threshold": THRESHOLD, "ignore_eos": True}
    with capture_logs() as logs:
        async with httpx2.AsyncClient(base_url=gateway.base_url) as http:
            task = asyncio.ensure_future(http.post("/v1/completions", json=body, timeout=30))
            await wait_until(lambda: _busy(services), timeout_s=5)
            task.cancel()  # the client gives up: its connection closes
            await asyncio.gather(task, return_exceptions=True)
        await wait_until(lambda: all_released(services))
    assert_cancelled_early(logs, 1000)


async def _busy(services) -> bool:
    return services.coord.servicer.active == 1


# ---- odds and ends -------------------------------------------------------------------------------

async def test_raw_sse_format(gateway):
    body = {"model": "r2r", "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True}
    async with httpx2.AsyncClient(base_url=gateway.base_url) as http:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            raw = "".join([part async for part in r.aiter_text()])
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    async with httpx2.AsyncClient(base_url=gateway.base_url) as http:
        r = await http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_cli_arguments():
    p = argparse.ArgumentParser()
    add_gateway_args(p)
    args = p.parse_args(["--coordinator", "10.0.0.1:50051", "--model-name", "coder"])
    assert (args.coordinator, args.host, args.port, args.model_name) == ("10.0.0.1:50051", "127.0.0.1", 8000,
                                                                          "coder")
