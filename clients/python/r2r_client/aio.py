"""Async client for the R2R coordinator."""

from __future__ import annotations

import asyncio

import grpc

from r2r_client.credentials import channel_credentials, channel_options, token_metadata
from r2r_client.errors import Cancelled, from_rpc_error
from r2r_client.retry import RetryPolicy
from r2r_client.streaming import StreamBase
from r2r_client.types import Prompt, Result, build_request
from r2r_serve.proto import coordinator_pb2, coordinator_pb2_grpc

_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]


class AsyncStream(StreamBase):
    """Async iterator of Token; after it ends, `stats` and `text` (tail included) are set.
    `cancel()` (or leaving the loop early and calling it) stops generation on the server."""

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        while True:
            try:
                async for msg in self._call:
                    tok = self._consume(msg)
                    if tok is not None:
                        yield tok
                return
            except grpc.aio.AioRpcError as exc:
                delay = self._retry_delay(exc.code())
                if delay is None:
                    raise from_rpc_error(exc) from None
                await asyncio.sleep(delay)
                self._reopen()
            except asyncio.CancelledError:
                if self._cancelled:  # our own cancel(): a typed error, not a task cancellation
                    raise Cancelled("the request was cancelled by this client") from None
                raise


class AsyncR2RClient:
    """`token`: sent as `authorization: Bearer <token>` on every call (a coordinator run with --auth-token).
    TLS: `credentials` (any grpc.ChannelCredentials), or `tls=True` (system roots) / `tls_ca` (the CA's PEM
    path or bytes), plus `tls_client_cert`/`tls_client_key` for mutual TLS; `tls_server_name` overrides the
    name expected in the server's certificate."""

    def __init__(self, target: str = "127.0.0.1:50051", *, credentials: grpc.ChannelCredentials | None = None,
                 wait_for_ready: bool = False, token: str | None = None, tls: bool = False, tls_ca=None,
                 tls_client_cert=None, tls_client_key=None, tls_server_name: str | None = None,
                 retry: RetryPolicy = RetryPolicy()):
        self.target = target
        self.retry = retry
        creds = channel_credentials(credentials, tls=tls, tls_ca=tls_ca, tls_client_cert=tls_client_cert,
                                    tls_client_key=tls_client_key)
        options = channel_options(_OPTIONS, tls_server_name)
        self._channel = (grpc.aio.secure_channel(target, creds, options=options) if creds
                         else grpc.aio.insecure_channel(target, options=options))
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        self._wait_for_ready = wait_for_ready
        self._token = token

    def __repr__(self) -> str:  # never shows the token
        return f"AsyncR2RClient({self.target!r})"

    def _metadata(self, token: str | None):
        return token_metadata(token or self._token)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def stream(self, prompt: Prompt, *, timeout: float | None = None, token: str | None = None,
               **params) -> AsyncStream:
        """Start a generation; iterate the result for tokens. `timeout` (s) is the gRPC deadline; `token`
        overrides the client's bearer token for this call.
        params: max_tokens, temperature, top_p, top_k, seed, stop, stop_token_ids, threshold, llm_share, rollback_below,
        max_draft_tokens, min_draft_probability, logprobs, ignore_eos, request_id."""
        req = build_request(prompt, **params)
        metadata = self._metadata(token)

        def start(t):
            return self._stub.Generate(req, timeout=t, wait_for_ready=self._wait_for_ready, metadata=metadata)

        return AsyncStream(start, timeout, req.logprobs, self.retry)

    async def generate(self, prompt: Prompt, *, timeout: float | None = None, token: str | None = None,
                       **params) -> Result:
        """Generate to the end and return the whole result (same parameters as `stream`)."""
        stream = self.stream(prompt, timeout=timeout, token=token, **params)
        tokens = [tok async for tok in stream]
        return Result(request_id=stream.request_id, text=stream.text, tokens=tokens, stats=stream.stats)

    async def server_info(self, timeout: float | None = 10.0, token: str | None = None) -> coordinator_pb2.ServerInfo:
        attempt = 1
        while True:
            try:
                return await self._stub.GetServerInfo(coordinator_pb2.GetServerInfoRequest(), timeout=timeout,
                                                      wait_for_ready=self._wait_for_ready,
                                                      metadata=self._metadata(token))
            except grpc.aio.AioRpcError as exc:
                if not self.retry.should_retry(exc.code(), attempt, delivered_tokens=False):
                    raise from_rpc_error(exc) from None
                await asyncio.sleep(self.retry.delay_s(attempt))
                attempt += 1
