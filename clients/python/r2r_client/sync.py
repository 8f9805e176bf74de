"""Blocking client for the R2R coordinator (no event loop needed)."""

from __future__ import annotations

import time

import grpc

from r2r_client.credentials import channel_credentials, channel_options, token_metadata
from r2r_client.errors import from_rpc_error
from r2r_client.retry import RetryPolicy
from r2r_client.streaming import StreamBase
from r2r_client.types import Prompt, Result, build_request
from r2r_serve.proto import coordinator_pb2, coordinator_pb2_grpc

_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]


class Stream(StreamBase):
    """Iterator of Token; after it ends, `stats` and `text` are set. `cancel()` stops the server side."""

    def __iter__(self):
        while True:
            try:
                for msg in self._call:
                    tok = self._consume(msg)
                    if tok is not None:
                        yield tok
                return
            except grpc.RpcError as exc:
                delay = self._retry_delay(exc.code())
                if delay is None:
                    raise from_rpc_error(exc) from None
                time.sleep(delay)
                self._reopen()


class R2RClient:
    """Blocking client; `token` and the TLS options as for AsyncR2RClient."""

    def __init__(self, target: str = "127.0.0.1:50051", *, credentials: grpc.ChannelCredentials | None = None,
                 wait_for_ready: bool = False, token: str | None = None, tls: bool = False, tls_ca=None,
                 tls_client_cert=None, tls_client_key=None, tls_server_name: str | None = None,
                 retry: RetryPolicy = RetryPolicy()):
        self.target = target
        self.retry = retry
        creds = channel_credentials(credentials, tls=tls, tls_ca=tls_ca, tls_client_cert=tls_client_cert,
                                    tls_client_key=tls_client_key)
        options = channel_options(_OPTIONS, tls_server_name)
        self._channel = (grpc.secure_channel(target, creds, options=options) if creds
                         else grpc.insecure_channel(target, options=options))
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        self._wait_for_ready = wait_for_ready
        self._token = token

    def __repr__(self) -> str:  # never shows the token
        return f"R2RClient({self.target!r})"

    def _metadata(self, token: str | None):
        return token_metadata(token or self._token)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._channel.close()

    def stream(self, prompt: Prompt, *, timeout: float | None = None, token: str | None = None,
               **params) -> Stream:
        req = build_request(prompt, **params)
        metadata = self._metadata(token)

        def start(t):
            return self._stub.Generate(req, timeout=t, wait_for_ready=self._wait_for_ready, metadata=metadata)

        return Stream(start, timeout, req.logprobs, self.retry)

    def generate(self, prompt: Prompt, *, timeout: float | None = None, token: str | None = None,
                 **params) -> Result:
        stream = self.stream(prompt, timeout=timeout, token=token, **params)
        tokens = list(stream)
        return Result(request_id=stream.request_id, text=stream.text, tokens=tokens, stats=stream.stats)

    def server_info(self, timeout: float | None = 10.0, token: str | None = None) -> coordinator_pb2.ServerInfo:
        attempt = 1
        while True:
            try:
                return self._stub.GetServerInfo(coordinator_pb2.GetServerInfoRequest(), timeout=timeout,
                                                wait_for_ready=self._wait_for_ready, metadata=self._metadata(token))
            except grpc.RpcError as exc:
                if not self.retry.should_retry(exc.code(), attempt, delivered_tokens=False):
                    raise from_rpc_error(exc) from None
                time.sleep(self.retry.delay_s(attempt))
                attempt += 1
