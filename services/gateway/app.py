"""The HTTP app (Starlette on uvicorn) and its runners: `r2r gateway --coordinator HOST:PORT --port 8000`.

Each request becomes one coordinator `Generate` stream through the async SDK. A streamed answer waits for the
coordinator's first event before it sends HTTP headers, so a refused request (bad input, over the
concurrency limit, coordinator down) gets its proper status code, not a 200 with an error inside. A client
that goes away — mid-stream or while a non-streamed answer is being generated — cancels the gRPC call, which
ends the generation and frees its KV on every worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Callable

import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from r2r_client import AsyncR2RClient, R2RError
from r2r_serve.common.logging import get_logger
from r2r_serve.common.security import (ClientTLS, ServerTLS, add_client_tls_args, add_server_tls_args,
                                       client_tls_from_args, server_tls_from_args)
from r2r_serve.gateway.schema import Formatter, GatewayError, ModelTable, Plan, parse_chat, parse_completion
from r2r_serve.gateway.schema import from_r2r_error

log = get_logger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024


@dataclass
class GatewaySettings:
    coordinator: str = "127.0.0.1:50051"
    model_name: str = "r2r"
    default_temperature: float = 1.0     # OpenAI's default when a request names none
    request_timeout_s: float = 0.0       # gRPC deadline per request; 0 = none
    health_timeout_s: float = 2.0
    # The coordinator link. A user request forwards its own `Authorization: Bearer` key to the coordinator (the
    # coordinator alone decides who gets in); `token` is used only for the gateway's own calls (/health).
    token: str | None = field(default=None, repr=False)
    coordinator_tls: ClientTLS | None = None
    https: ServerTLS | None = None       # serve HTTPS (with a client CA: require client certificates)


def add_gateway_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", default="127.0.0.1:50051", help="coordinator HOST:PORT")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default="r2r", help="the model id clients send for R2R (default: r2r)")
    p.add_argument("--default-temperature", type=float, default=1.0,
                   help="temperature when a request sets none (OpenAI's default is 1; 0 = greedy)")
    p.add_argument("--request-timeout-s", type=float, default=0.0, help="deadline per request; 0 = none")
    p.add_argument("--drain-s", type=float, default=30.0, help="on SIGTERM, wait this long for open requests")
    p.add_argument("--token", default=os.environ.get("R2R_TOKEN") or None,
                   help="bearer token for the gateway's own coordinator calls (/health); requests forward their "
                        "own 'Authorization: Bearer' API key [env R2R_TOKEN]")
    add_client_tls_args(p, "the coordinator")
    add_server_tls_args(p)  # --tls-cert/--tls-key here = HTTPS


def settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    return GatewaySettings(coordinator=args.coordinator, model_name=args.model_name,
                           default_temperature=args.default_temperature, request_timeout_s=args.request_timeout_s,
                           token=args.token, coordinator_tls=client_tls_from_args(args),
                           https=server_tls_from_args(args))


def bearer_token(request: Request) -> str | None:
    """The request's `Authorization: Bearer <key>` (OpenAI clients send their API key so), or None."""
    scheme, _, key = request.headers.get("authorization", "").strip().partition(" ")
    return (key.strip() or None) if scheme.lower() == "bearer" else None


def _json(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def error_response(err: GatewayError, request_id: str | None = None) -> JSONResponse:
    headers = dict(err.headers)
    if request_id:
        headers["x-request-id"] = request_id
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


class Gateway:
    """Shared state: the coordinator client (made inside the running loop) and the model table."""

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self._client: AsyncR2RClient | None = None
        self.models = ModelTable(settings.model_name)
        self.info = None

    @property
    def client(self) -> AsyncR2RClient:
        if self._client is None:
            tls = self.settings.coordinator_tls
            kw = {} if tls is None else dict(tls=True, tls_ca=tls.ca, tls_client_cert=tls.cert,
                                             tls_client_key=tls.key, tls_server_name=tls.server_name)
            self._client = AsyncR2RClient(self.settings.coordinator, **kw)  # no token: each call brings its own
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def server_info(self, token: str | None = None):
        """GetServerInfo (with the caller's bearer `token`; None = none); refreshes the SLM/LLM model ids. Raises
        GatewayError when the coordinator fails."""
        try:
            info = await self.client.server_info(timeout=self.settings.health_timeout_s, token=token)
        except R2RError as exc:
            raise from_r2r_error(exc) from None
        self.info = info
        self.models.slm, self.models.llm = info.slm_model or None, info.llm_model or None
        return info

    async def resolve_models(self, model, token: str | None = None) -> None:
        """Make sure the SLM/LLM ids are known before a request names a model other than ours."""
        if isinstance(model, str) and model not in self.models.ids():
            await self.server_info(token)


# ---- one generation, as an ASGI response ---------------------------------------------------------

async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class Generation:
    """Runs one coordinator stream and writes the HTTP answer (SSE or JSON), racing a disconnect watch: if the
    client leaves first, the writer is cancelled and the gRPC call with it."""

    def __init__(self, gw: Gateway, plan: Plan, request_id: str, endpoint: str, token: str | None = None):
        self.gw, self.plan, self.request_id, self.endpoint = gw, plan, request_id, endpoint
        self.token = token  # the request's API key, forwarded to the coordinator
        prefix = "chatcmpl-" if plan.kind == "chat" else "cmpl-"
        self.fmt = Formatter(plan, prefix + request_id, int(time.time()))
        self.stream = None
        self.done = False
        self.client_gone = False
        self.status = 0
        self.started = time.perf_counter()

    async def __call__(self, scope, receive, send) -> None:
        with structlog.contextvars.bound_contextvars(request_id=self.request_id):
            writer = asyncio.ensure_future(self._write(send))
            watcher = asyncio.ensure_future(_wait_disconnect(receive))
            try:
                await asyncio.wait({writer, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not writer.done():
                    log.info("client_disconnected", endpoint=self.endpoint, stream=self.plan.stream)
                    self.client_gone = True
                    self.cancel()
                    writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
            finally:
                for task in (writer, watcher):
                    task.cancel()
                self.cancel()
                await asyncio.gather(writer, watcher, return_exceptions=True)

    def cancel(self) -> None:
        if self.stream is not None and not self.done:
            self.stream.cancel()

    async def _write(self, send) -> None:
        timeout = self.gw.settings.request_timeout_s or None
        self.stream = self.gw.client.stream(self.plan.prompt, timeout=timeout, request_id=self.request_id,
                                            token=self.token, **self.plan.params)
        events = self.stream.__aiter__()
        tokens = []
        try:
            try:
                first = await anext(events, None)
            except R2RError as exc:
                self.done = True
                if not self.client_gone:
                    await self._send_error(send, from_r2r_error(exc))
                return
            if first is not None:
                tokens.append(first)
            if self.plan.stream:
                await self._write_stream(send, first, events, tokens)
            else:
                async for tok in events:
                    tokens.append(tok)
                self.done = True
                stats = self.stream.stats
                body = self.fmt.response(self.stream.text, tokens, stats)
                await self._send_json(send, 200, body)
                self._log_finished(stats)
        except R2RError as exc:  # non-streamed: nothing sent yet
            self.done = True
            if not self.client_gone:
                await self._send_error(send, from_r2r_error(exc))
        finally:
            if not self.done:
                self.stream.cancel()
            await events.aclose()

    async def _write_stream(self, send, first, events, tokens) -> None:
        self.status = 200
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"), (b"x-request-id", self.request_id.encode())]})

        async def event(obj) -> None:
            if obj is not None:
                await send({"type": "http.response.body", "body": b"data: " + _json(obj) + b"\n\n",
                            "more_body": True})

        await event(self.fmt.role_chunk())
        try:
            if first is not None:
                await event(self.fmt.token_chunk(first))
                async for tok in events:
                    tokens.append(tok)
                    await event(self.fmt.token_chunk(tok))
            self.done = True
            stats = self.stream.stats
            await event(self.fmt.tail_chunk(stats.text_tail))
            await event(self.fmt.finish_chunk(stats))
            if self.plan.include_usage:
                await event(self.fmt.usage_chunk(stats))
            self._log_finished(stats)
        except R2RError as exc:  # after the headers: an error event, as OpenAI's streams do
            self.done = True
            if self.client_gone:
                return
            err = from_r2r_error(exc)
            log.info("request_failed", endpoint=self.endpoint, status=err.status, error=err.message)
            await event(err.body())
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    async def _send_json(self, send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        self.status = status
        payload = _json(body)
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
               (b"x-request-id", self.request_id.encode())]
        raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": payload, "more_body": False})

    async def _send_error(self, send, err: GatewayError) -> None:
        log.info("request_failed", endpoint=self.endpoint, status=err.status, error=err.message)
        await self._send_json(send, err.status, err.body(), err.headers)

    def _log_finished(self, stats) -> None:
        log.info("request_finished", endpoint=self.endpoint, stream=self.plan.stream,
                 finish=stats.finish_reason, prompt_tokens=stats.prompt_tokens,
                 completion_tokens=stats.completion_tokens, llm_tokens=stats.llm_tokens,
                 total_s=round(time.perf_counter() - self.started, 3))


# ---- routes --------------------------------------------------------------------------------------

async def _read_json(request: Request):
    size = 0
    chunks = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise GatewayError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", code="body_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise GatewayError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None


def _request_id(request: Request) -> str:
    rid = request.headers.get("x-request-id", "")
    if rid and len(rid) <= 64 and rid.replace("-", "").replace("_", "").isalnum():
        return rid
    return uuid.uuid4().hex[:24]


def _generation_endpoint(parse, endpoint: str):
    async def handler(request: Request):
        gw: Gateway = request.app.state.gateway
        rid = _request_id(request)
        token = bearer_token(request)
        try:
            body = await _read_json(request)
            if isinstance(body, dict):
                await gw.resolve_models(body.get("model"), token)
            plan = parse(body, gw.models, gw.settings.default_temperature)
        except GatewayError as err:
            log.info("request_rejected", request_id=rid, endpoint=endpoint, status=err.status, param=err.param,
                     code=err.code, error=err.message)
            return error_response(err, rid)
        log.info("request_accepted", request_id=rid, endpoint=endpoint, model=plan.model, stream=plan.stream,
                 **{k: v for k, v in plan.params.items() if k != "stop"})
        return Generation(gw, plan, rid, endpoint, token)

    return handler


def _model_card(model_id: str, created: int, role: str, info) -> dict:
    card = {"id": model_id, "object": "model", "created": created, "owned_by": "r2r-serve"}
    extra = {"role": role}
    if info is not None:
        extra.update(slm_model=info.slm_model, llm_model=info.llm_model)
        if role == "r2r":
            extra.update(router_strategy=info.router_strategy, default_threshold=round(info.default_threshold, 6),
                         max_context=info.max_context)
    card["r2r"] = extra
    return card


def _model_cards(gw: Gateway) -> list[dict]:
    created = int(time.time())
    cards = {}
    for model_id, role in ((gw.models.name, "r2r"), (gw.models.slm, "slm"), (gw.models.llm, "llm")):
        if model_id and model_id not in cards:
            cards[model_id] = _model_card(model_id, created, role, gw.info)
    return list(cards.values())


async def list_models(request: Request):
    gw: Gateway = request.app.state.gateway
    try:
        await gw.server_info(bearer_token(request))
    except GatewayError as err:
        return error_response(err)
    return JSONResponse({"object": "list", "data": _model_cards(gw)})


async def get_model(request: Request):
    gw: Gateway = request.app.state.gateway
    try:
        await gw.server_info(bearer_token(request))
    except GatewayError as err:
        return error_response(err)
    model_id = request.path_params["model"]
    for card in _model_cards(gw):
        if card["id"] == model_id:
            return JSONResponse(card)
    return error_response(GatewayError(404, f"The model '{model_id}' does not exist", param="model",
                                       code="model_not_found"))


async def health(request: Request):
    gw: Gateway = request.app.state.gateway
    try:
        info = await gw.server_info(gw.settings.token)
    except GatewayError as err:
        return JSONResponse({"status": "unavailable", "coordinator": gw.settings.coordinator, "error": err.message},
                            status_code=503)
    return JSONResponse({"status": "ok", "coordinator": gw.settings.coordinator, "slm_model": info.slm_model,
                         "llm_model": info.llm_model, "active_sessions": info.active_sessions,
                         "max_concurrent_sessions": info.max_concurrent_sessions, "version": info.version})


async def _http_error(request: Request, exc: HTTPException):
    type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
    message = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": None}},
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _server_error(request: Request, exc: Exception):
    log.exception("gateway_error", path=request.url.path)
    return JSONResponse({"error": {"message": "internal error in the gateway", "type": "server_error",
                                   "param": None, "code": "internal_error"}}, status_code=500)


def build_app(coordinator: str | GatewaySettings, **settings) -> Starlette:
    """The ASGI app for a coordinator target (HOST:PORT) or full GatewaySettings."""
    if isinstance(coordinator, GatewaySettings):
        cfg = coordinator
    else:
        cfg = GatewaySettings(coordinator=coordinator, **settings)
    gw = Gateway(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await gw.close()

    app = Starlette(routes=[
        Route("/v1/completions", _generation_endpoint(parse_completion, "completions"), methods=["POST"]),
        Route("/v1/chat/completions", _generation_endpoint(parse_chat, "chat.completions"), methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ], exception_handlers={HTTPException: _http_error, Exception: _server_error}, lifespan=lifespan)
    app.state.gateway = gw
    return app


# ---- runners -------------------------------------------------------------------------------------

def _uvicorn_config(app, host: str, port: int, drain_s: float) -> uvicorn.Config:
    https: ServerTLS | None = app.state.gateway.settings.https
    tls = {} if https is None else dict(
        ssl_certfile=https.cert, ssl_keyfile=https.key, ssl_ca_certs=https.client_ca,
        ssl_cert_reqs=ssl.CERT_REQUIRED if https.client_ca else ssl.CERT_NONE)
    return uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="on",
                          timeout_graceful_shutdown=max(1, int(drain_s)), server_header=False, **tls)


async def run_gateway(args: argparse.Namespace) -> None:
    """`r2r gateway`: serve until SIGINT/SIGTERM: then stop accepting, give open requests up to --drain-s, exit
    (a second signal stops at once)."""
    settings = settings_from_args(args)
    app = build_app(settings)
    gw: Gateway = app.state.gateway
    try:
        info = await gw.server_info(settings.token)
        log.info("coordinator_ready", coordinator=settings.coordinator, slm=info.slm_model, llm=info.llm_model)
    except GatewayError as err:  # start anyway: /health says 503 until the coordinator answers
        log.warning("coordinator_unreachable", coordinator=settings.coordinator, error=err.message)
    server = _EmbeddedServer(_uvicorn_config(app, args.host, args.port, args.drain_s))
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        log.info("gateway_draining", signal=sig.name, drain_s=args.drain_s)
        if server.should_exit:  # a second signal: stop now
            server.force_exit = True
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    log.info("gateway_listening", host=args.host, port=args.port, model=settings.model_name,
             scheme="https" if settings.https else "http",
             coordinator_tls=settings.coordinator_tls is not None, own_token=settings.token is not None)
    try:
        await server.serve()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    log.info("gateway_stopped")


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handlers (in tests, or with run_gateway's)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


@dataclass
class GatewayHandle:
    server: uvicorn.Server
    task: asyncio.Task
    app: Starlette
    host: str
    port: int
    scheme: str = "http"

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    async def stop(self, timeout_s: float = 5.0) -> None:
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout_s)
        except asyncio.TimeoutError:
            self.server.force_exit = True
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


def _listening_socket(host: str, port: int) -> socket.socket:
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say so (socket.create_server's
    # proto=0 sockets pass that on to accepted connections, and keep-alive answers then wait ~40 ms on
    # Nagle + delayed ACK).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def start_gateway(coordinator: str | GatewaySettings, host: str = "127.0.0.1", port: int = 0,
                        drain_s: float = 2.0, **settings) -> GatewayHandle:
    """Start the gateway in the running loop (port 0 = a free one); `await handle.stop()` ends it."""
    app = build_app(coordinator, **settings)
    sock = _listening_socket(host, port)
    server = _EmbeddedServer(_uvicorn_config(app, host, port, drain_s))
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            sock.close()
            exc = task.exception() if not task.cancelled() else None
            raise RuntimeError(f"the gateway failed to start: {exc!r}")
        await asyncio.sleep(0.01)
    scheme = "https" if app.state.gateway.settings.https else "http"
    return GatewayHandle(server, task, app, host, sock.getsockname()[1], scheme)


def wait_http_healthy(url: str, timeout_s: float, alive: Callable[[], bool] = lambda: True,
                      interval_s: float = 0.2, ssl_context: ssl.SSLContext | None = None) -> None:
    """Block until GET url answers 200 (for launchers: `r2r serve --gateway-port`). Raises TimeoutError, or
    RuntimeError when `alive()` turns false. `ssl_context`: for an https URL (e.g. trusting a private CA)."""
    end = time.monotonic() + timeout_s
    while True:
        if not alive():
            raise RuntimeError("the process exited")
        try:
            with urllib.request.urlopen(url, timeout=2.0, context=ssl_context) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > end:
            raise TimeoutError(f"{url} did not answer 200 within {timeout_s}s")
        time.sleep(interval_s)
