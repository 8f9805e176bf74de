"""TLS, mutual TLS and bearer-token authentication, with certificates made at test time.

One set of services runs with every internal link on mutual TLS (workers and router accept only clients
holding a certificate signed by the test CA: the coordinator), a coordinator serving TLS on its public port
and requiring a bearer token, and an OpenAI gateway in front of it that forwards the API key. Its greedy
answers must equal the plain session services'.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import grpc
import openai
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from structlog.testing import capture_logs

from conftest import worker_config
from r2r_client import AsyncR2RClient, R2RClient, Unauthenticated, Unavailable
from r2r_serve.common.health import wait_serving
from r2r_serve.common.security import (BearerTokenInterceptor, SecurityConfigError, aio_channel, client_tls,
                                       generate_dev_certs, load_tokens, server_tls)
from r2r_serve.coordinator.app import start_coordinator
from r2r_serve.gateway.app import GatewaySettings, start_gateway
from r2r_serve.proto import worker_pb2, worker_pb2_grpc
from r2r_serve.router.app import start_router
from r2r_serve.worker.app import start_worker

TOKEN = "s3cret-token-0123456789abcdef"
OTHER_TOKEN = "second-token-for-rotation"
WRONG = "wrong-token-fedcba9876543210"
PROMPT = "def add(a, b):"
PARAMS = dict(max_tokens=12, threshold=0.9)  # greedy; on the tiny pair some tokens go to the LLM
ENV_NO_SECURITY = {k: v for k, v in os.environ.items() if not k.startswith(("R2R_TLS", "R2R_AUTH", "R2R_TOKEN"))}


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return generate_dev_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def rogue(tmp_path_factory):
    """Another CA's certificates: valid TLS, but not signed by the CA the services trust."""
    return generate_dev_certs(tmp_path_factory.mktemp("rogue-tls"))


@pytest_asyncio.fixture(scope="module")
async def secure(tiny_pair, certs, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("tokens") / "tokens"
    token_file.write_text(f"# accepted tokens\n{TOKEN}\n\n{OTHER_TOKEN}\n")
    internal = certs.server(mutual=True)
    slm = await start_worker(worker_config(tiny_pair["slm"], "slm"), tls=internal)
    llm = await start_worker(worker_config(tiny_pair["llm"], "llm"), tls=internal)
    router = await start_router("entropy", tls=internal)
    coord = await start_coordinator(f"127.0.0.1:{slm.port}", f"127.0.0.1:{llm.port}", f"127.0.0.1:{router.port}",
                                    tls=certs.server(mutual=False), upstream_tls=certs.client(),
                                    auth_tokens=load_tokens(token_file=str(token_file)), connect_timeout_s=30)
    gateway = await start_gateway(GatewaySettings(coordinator=f"127.0.0.1:{coord.port}",
                                                  coordinator_tls=certs.client(with_cert=False), token=TOKEN))
    ns = type("Secure", (), dict(slm=slm, llm=llm, router=router, coord=coord, gateway=gateway,
                                 target=f"127.0.0.1:{coord.port}", slm_target=f"127.0.0.1:{slm.port}"))
    yield ns
    await gateway.stop()
    for handle in (coord, router, slm, llm):
        await handle.stop(0.5)


async def _get_info(target: str, tls) -> worker_pb2.WorkerInfo:
    async with aio_channel(target, tls) as channel:
        return await worker_pb2_grpc.ModelWorkerStub(channel).GetInfo(worker_pb2.GetInfoRequest(), timeout=5)


# ---- mutual TLS on the internal links ------------------------------------------------------------------

async def test_mtls_worker_serves_only_clients_with_a_certificate_from_its_ca(secure, certs, rogue):
    info = await _get_info(secure.slm_target, certs.client())  # the coordinator's certificate
    assert info.model_name
    for refused in (None,                                       # plain text to a TLS port
                    certs.client(with_cert=False),              # TLS, but no client certificate
                    client_tls(str(certs.ca), str(rogue.client_cert), str(rogue.client_key))):  # another CA's
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await _get_info(secure.slm_target, refused)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError) as exc:  # and the client refuses a server its CA did not sign
        await _get_info(secure.slm_target, client_tls(str(rogue.ca), str(certs.client_cert), str(certs.client_key)))
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_health_checks_work_over_mtls(secure, certs):
    await asyncio.to_thread(wait_serving, secure.slm_target, 10, tls=certs.client())
    with pytest.raises(TimeoutError, match="UNAVAILABLE"):
        await asyncio.to_thread(wait_serving, secure.slm_target, 0.5)  # a plain probe cannot get in


# ---- the public port: TLS + bearer token -------------------------------------------------------------

async def test_tls_coordinator_answers_as_the_plain_services(secure, certs, client):
    expected = await client.generate(PROMPT, **PARAMS)
    async with AsyncR2RClient(secure.target, tls_ca=str(certs.ca), token=TOKEN) as c:
        got = await c.generate(PROMPT, **PARAMS)
        streamed = [t async for t in c.stream(PROMPT, token=OTHER_TOKEN, **PARAMS)]  # any token of the file
    assert got.text == expected.text and got.token_ids == expected.token_ids and got.sources == expected.sources
    assert "llm" in got.sources and [t.token_id for t in streamed] == expected.token_ids


async def test_coordinator_requires_a_bearer_token(secure, certs):
    async with AsyncR2RClient(secure.target, tls_ca=certs.ca.read_bytes()) as c:
        with pytest.raises(Unauthenticated, match="Bearer <token>"):
            await c.server_info()
        with pytest.raises(Unauthenticated):
            await c.generate(PROMPT, **PARAMS)
        with pytest.raises(Unauthenticated, match="not accepted"):
            await c.generate(PROMPT, token=WRONG, **PARAMS)
        assert (await c.server_info(token=TOKEN)).slm_model
    async with aio_channel(secure.target, client_tls(str(certs.ca))) as channel:  # probes need no token
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        assert "r2r.v1.Coordinator" in [s.name async for r in responses for s in r.list_services_response.service]
        malformed = channel.unary_unary("/r2r.v1.Coordinator/GetServerInfo", request_serializer=lambda m: b"",
                                        response_deserializer=lambda b: b)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await malformed(None, metadata=(("authorization", f"Basic {TOKEN}"),), timeout=5)
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in exc.value.details()
    async with AsyncR2RClient(secure.target, token=TOKEN) as plain:  # a TLS port does not talk plain text
        with pytest.raises(Unavailable):
            await plain.server_info(timeout=3)


async def test_sync_client_with_tls_and_token(secure, certs):
    def blocking():
        with R2RClient(secure.target, tls_ca=str(certs.ca), token=TOKEN) as c:
            result = c.generate(PROMPT, **PARAMS)
        with R2RClient(secure.target, tls_ca=str(certs.ca)) as c, pytest.raises(Unauthenticated):
            c.generate(PROMPT, **PARAMS)
        return result

    result = await asyncio.to_thread(blocking)
    assert result.stats.completion_tokens == len(result.tokens) > 0


async def test_no_token_appears_in_any_log_line(secure, certs):
    with capture_logs() as logs:
        async with AsyncR2RClient(secure.target, tls_ca=str(certs.ca)) as c:
            for token in (None, WRONG, TOKEN):
                try:
                    await c.generate(PROMPT, token=token, max_tokens=3)
                except Unauthenticated:
                    pass
        async with openai.AsyncOpenAI(base_url=secure.gateway.base_url + "/v1", api_key=WRONG, max_retries=0,
                                      timeout=30) as oai:
            with pytest.raises(openai.AuthenticationError):
                await oai.completions.create(model="r2r", prompt=PROMPT, max_tokens=3)
    text = json.dumps(logs, default=str)
    assert any(e["event"] == "unauthenticated" for e in logs) and any(e["event"] == "request_finished" for e in logs)
    assert TOKEN not in text and WRONG not in text and OTHER_TOKEN not in text


# ---- the gateway forwards the OpenAI API key -----------------------------------------------------------

async def test_gateway_forwards_the_api_key(secure, client):
    expected = await client.generate(PROMPT, **PARAMS)
    base = secure.gateway.base_url + "/v1"
    async with openai.AsyncOpenAI(base_url=base, api_key=TOKEN, max_retries=0, timeout=30) as oai:
        resp = await oai.completions.create(model="r2r", prompt=PROMPT, max_tokens=12, temperature=0,
                                            extra_body={"r2r_threshold": 0.9})
        assert resp.choices[0].text == expected.text
        assert [m.id for m in (await oai.models.list()).data][0] == "r2r"
    async with openai.AsyncOpenAI(base_url=base, api_key=WRONG, max_retries=0, timeout=30) as oai:
        with pytest.raises(openai.AuthenticationError) as exc:
            await oai.chat.completions.create(model="r2r", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=3, stream=True)
        assert exc.value.status_code == 401 and exc.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            await oai.models.list()
    import httpx2

    async with httpx2.AsyncClient(base_url=secure.gateway.base_url, timeout=30) as http:
        anonymous = await http.post("/v1/completions", json={"model": "r2r", "prompt": PROMPT, "max_tokens": 3})
        assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Bearer"
        assert "Bearer" in anonymous.json()["error"]["message"]
        assert (await http.get("/v1/models")).status_code == 401
        health = await http.get("/health")  # the gateway's own token, not the caller's
        assert health.status_code == 200 and health.json()["status"] == "ok"


# ---- configuration ---------------------------------------------------------------------------------------

def test_configuration_errors_are_clear(tmp_path, certs):
    with pytest.raises(SecurityConfigError, match="--tls-key"):
        server_tls(cert=str(certs.server_cert))
    with pytest.raises(SecurityConfigError, match="cannot read the TLS key"):
        server_tls(str(certs.server_cert), str(tmp_path / "missing.key"))
    with pytest.raises(SecurityConfigError, match="--tls-client-key"):
        client_tls(ca=str(certs.ca), cert=str(certs.client_cert))
    (tmp_path / "empty").write_text("# nothing\n\n")
    with pytest.raises(SecurityConfigError, match="no token"):
        load_tokens(token_file=str(tmp_path / "empty"))
    with pytest.raises(SecurityConfigError, match="spaces"):
        load_tokens("two words")
    assert server_tls() is None and client_tls() is None and load_tokens() == []
    assert generate_dev_certs(certs.dir).ca.read_bytes() == certs.ca.read_bytes()  # reused, not re-made
    check = BearerTokenInterceptor([TOKEN]).check
    assert check([("authorization", f"Bearer {TOKEN}")]) is None
    assert check([("authorization", f"bearer   {TOKEN} ")]) is None
    assert check([]) == BearerTokenInterceptor.MISSING
    assert check([("authorization", TOKEN)]) == BearerTokenInterceptor.MALFORMED
    assert check([("authorization", f"Bearer {TOKEN}x")]) == BearerTokenInterceptor.REJECTED


async def test_generate_cli_over_tls_with_a_token(secure, certs):
    base = [sys.executable, "-m", "r2r_serve.cli", "generate", PROMPT, "--raw", "--target", secure.target,
            "--max-tokens", "4", "--threshold", "1.5", "--json", "--color", "never", "--tls-ca", str(certs.ca)]

    def run(*extra):  # in a thread: the services answer from this test's event loop
        return subprocess.run([*base, *extra], capture_output=True, text=True, timeout=120, env=ENV_NO_SECURITY)

    ok = await asyncio.to_thread(run, "--token", TOKEN)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["stats"]["completion_tokens"] <= 4
    denied = await asyncio.to_thread(run)
    assert denied.returncode == 2 and "UNAUTHENTICATED" in denied.stdout + denied.stderr


def test_serve_runs_the_whole_deployment_with_mtls_and_a_token(tiny_pair, tmp_path):
    """`r2r serve --tls-dir --auth-token` as real processes: throwaway certificates are made, every internal link
    is mutual TLS, the public ports (coordinator, HTTPS gateway) serve TLS, the launcher's health checks get
    through, the prompt is answered with the token, and no log line holds it."""
    from r2r_serve.launcher import free_port

    secret = "serve-secret-token-424242"
    out = subprocess.run(
        [sys.executable, "-m", "r2r_serve.cli", "serve", "--tiny", str(tiny_pair["slm"].parent),
         "--port", str(free_port()), "--gateway-port", str(free_port()), "--log-dir", str(tmp_path / "logs"),
         "--tls-dir", str(tmp_path / "tls"), "--auth-token", secret, "--prompt", "Reverse a string",
         "--max-tokens", "6", "--threshold", "0.9", "--color", "never", "--threads", "1"],
        capture_output=True, text=True, timeout=300, env={**ENV_NO_SECURITY, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "gateway on https://" in out.stdout and "— " in out.stdout and " tokens · LLM wrote" in out.stdout
    assert sorted(p.name for p in (tmp_path / "tls").iterdir()) == ["ca.pem", "client.key", "client.pem",
                                                                    "server.key", "server.pem"]
    assert ((tmp_path / "tls" / "server.key").stat().st_mode & 0o777) == 0o600
    logs = {p.name: p.read_text() for p in (tmp_path / "logs").iterdir()}
    assert set(logs) == {"slm.log", "llm.log", "router.log", "coordinator.log", "gateway.log"}
    events = {name: [json.loads(l) for l in text.splitlines() if l.startswith("{")] for name, text in logs.items()}
    for name in ("slm.log", "llm.log", "router.log"):
        assert any(e["event"] == "tls_enabled" and e["mtls"] for e in events[name]), name
    assert any(e["event"] == "auth_enabled" for e in events["coordinator.log"])
    assert any(e["event"] == "request_finished" for e in events["coordinator.log"])
    assert not any(secret in text for text in [*logs.values(), out.stdout, out.stderr])
    assert not any("BEGIN" in text for text in logs.values())  # no certificate or key contents either
