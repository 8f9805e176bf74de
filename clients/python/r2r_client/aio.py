"""Async client for the R2R coordinator."""

from __future__ import annotations

import grpc

import asyncio

from r2r_client.errors import Cancelled, from_rpc_error
from r2r_client.types import Prompt, Result, Stats, Token, build_request, stats_from_proto, token_from_proto
from r2r_serve.proto import coordinator_pb2, coordinator_pb2_grpc

_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]


class AsyncStream:
    """Async iterator of Token; after it ends, `stats` and `text` (tail included) are set.
    `cancel()` (or leaving the loop early and calling it) stops generation on the server."""

    def __init__(self, call, with_logprobs: bool):
        self._call = call
        self._with_logprobs = with_logprobs
        self.request_id = ""
        self.stats: Stats | None = None
        self._parts: list[str] = []
        self._cancelled = False

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        try:
            async for msg in self._call:
                self.request_id = msg.request_id
                if msg.HasField("token"):
                    tok = token_from_proto(msg.token, self._with_logprobs)
                    self._parts.append(tok.text)
                    yield tok
                else:
                    self.stats = stats_from_proto(msg.final)
                    self._parts.append(self.stats.text_tail)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        except asyncio.CancelledError:
            if self._cancelled:  # our own cancel(): a typed error, not a task cancellation
                raise Cancelled("the request was cancelled by this client") from None
            raise


class AsyncR2RClient:
    def __init__(self, target: str = "127.0.0.1:50051", *, credentials: grpc.ChannelCredentials | None = None,
                 wait_for_ready: bool = False):
        self.target = target
        self._channel = (grpc.aio.secure_channel(target, credentials, options=_OPTIONS) if credentials
                         else grpc.aio.insecure_channel(target, options=_OPTIONS))
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        self._wait_for_ready = wait_for_ready

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def stream(self, prompt: Prompt, *, timeout: float | None = None, **params) -> AsyncStream:
        """Start a generation; iterate the result for tokens. `timeout` (s) is the gRPC deadline.
        params: max_tokens, temperature, top_p, top_k, seed, stop, stop_token_ids, threshold, logprobs,
        ignore_eos, request_id."""
        req = build_request(prompt, **params)
        call = self._stub.Generate(req, timeout=timeout, wait_for_ready=self._wait_for_ready)
        return AsyncStream(call, req.logprobs)

    async def generate(self, prompt: Prompt, *, timeout: float | None = None, **params) -> Result:
        """Generate to the end and return the whole result (same parameters as `stream`)."""
        stream = self.stream(prompt, timeout=timeout, **params)
        tokens = [tok async for tok in stream]
        return Result(request_id=stream.request_id, text=stream.text, tokens=tokens, stats=stream.stats)

    async def server_info(self, timeout: float | None = 10.0) -> coordinator_pb2.ServerInfo:
        try:
            return await self._stub.GetServerInfo(coordinator_pb2.GetServerInfoRequest(), timeout=timeout,
                                                  wait_for_ready=self._wait_for_ready)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
