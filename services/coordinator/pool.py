"""Worker pools and the router client: endpoints, one batching stream each, KV-affinity placement.

A session is placed on the least-loaded replica of a pool the first time it needs that pool and stays
there (its KV lives there). The coordinator tracks, per session and pool, how many tokens the replica
holds (the cursor); every extend sends only history[cursor:].
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc

from r2r_serve.common.logging import get_logger
from r2r_serve.common.server import channel_options
from r2r_serve.coordinator.batcher import PeerUnavailable, StreamBatcher
from r2r_serve.proto import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

log = get_logger(__name__)


class ExtendFailed(Exception):
    """An extend the coordinator cannot repair (invalid item, over the worker's capacity)."""

    def __init__(self, message: str, over_capacity: bool = False):
        super().__init__(message)
        self.over_capacity = over_capacity


@dataclass
class ExtendItemRequest:
    session_id: str
    position: int
    tokens: list[int]
    sampling: common_pb2.SamplingParams
    want_features: bool


class WorkerReplica:
    def __init__(self, endpoint: str, role: str, max_message_bytes: int, reconnect_timeout_s: float):
        self.endpoint = endpoint
        self.role = role
        self.channel = grpc.aio.insecure_channel(endpoint, options=channel_options(max_message_bytes))
        self.stub = worker_pb2_grpc.ModelWorkerStub(self.channel)
        self.info: worker_pb2.WorkerInfo | None = None
        self.sessions: set[str] = set()
        self.batcher = StreamBatcher(
            f"{role}@{endpoint}", open_stream=lambda: self.stub.ExtendStream(),
            make_request=self._make_request, split_response=lambda r: list(r.results),
            reconnect_timeout_s=reconnect_timeout_s)

    @staticmethod
    def _make_request(batch_id: int, items: list[ExtendItemRequest]) -> worker_pb2.ExtendRequest:
        req = worker_pb2.ExtendRequest(batch_id=batch_id)
        for it in items:
            req.items.add(session_id=it.session_id, position=it.position, tokens=it.tokens,
                          sampling=it.sampling, want_features=it.want_features)
        return req

    async def connect(self, timeout_s: float) -> worker_pb2.WorkerInfo:
        self.info = await self.stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=timeout_s, wait_for_ready=True)
        self.batcher.start()
        return self.info

    async def release(self, session_ids: list[str]) -> None:
        try:
            await self.stub.Release(worker_pb2.ReleaseRequest(session_ids=session_ids), timeout=5.0)
        except grpc.aio.AioRpcError as exc:  # the replica is gone; so is the KV
            log.warning("release_failed", replica=self.endpoint, error=exc.details())

    async def close(self) -> None:
        await self.batcher.close()
        await self.channel.close()


@dataclass
class Placement:
    replica: WorkerReplica | None = None
    cursor: int = 0  # tokens of the session this replica holds KV for


class WorkerPool:
    def __init__(self, role: str, endpoints: list[str], max_message_bytes: int, reconnect_timeout_s: float = 30.0):
        if not endpoints:
            raise ValueError(f"no {role} worker endpoints given")
        self.role = role
        self.replicas = [WorkerReplica(e, role, max_message_bytes, reconnect_timeout_s) for e in endpoints]

    @property
    def info(self) -> worker_pb2.WorkerInfo:
        return self.replicas[0].info

    async def connect(self, timeout_s: float) -> None:
        infos = await asyncio.gather(*(r.connect(timeout_s) for r in self.replicas))
        prints = {i.tokenizer_fingerprint for i in infos}
        if len(prints) > 1:
            raise RuntimeError(f"{self.role} replicas disagree on the tokenizer: "
                               + ", ".join(f"{r.endpoint}={r.info.tokenizer_fingerprint}" for r in self.replicas))

    def place(self, placement: Placement) -> WorkerReplica:
        if placement.replica is None:
            placement.replica = min(self.replicas, key=lambda r: (not r.batcher.healthy, len(r.sessions)))
            placement.cursor = 0
        return placement.replica

    async def extend(self, session_id: str, placement: Placement, history: list[int],
                     sampling: common_pb2.SamplingParams, want_features: bool) -> worker_pb2.ExtendResult:
        """Bring the session's replica up to `history` and return its next-token result. Resyncs (a
        restarted or evicting worker) are repaired by re-sending history from what the worker holds."""
        for _ in range(8):
            replica = self.place(placement)
            replica.sessions.add(session_id)
            item = ExtendItemRequest(session_id, placement.cursor, history[placement.cursor:], sampling, want_features)
            try:
                result = await replica.batcher.submit(item)
            except PeerUnavailable:
                # Move the session to another replica if there is one: it costs a re-prefill only.
                others = [r for r in self.replicas if r is not replica and r.batcher.healthy]
                if not others:
                    raise
                replica.sessions.discard(session_id)
                placement.replica = None
                continue
            if result.status == worker_pb2.EXTEND_OK:
                placement.cursor = result.held_tokens
                return result
            if result.status == worker_pb2.EXTEND_RESYNC:
                log.info("kv_resync", pool=self.role, replica=replica.endpoint, held=result.held_tokens,
                         assumed=placement.cursor)
                placement.cursor = min(result.held_tokens, placement.cursor)
                continue
            raise ExtendFailed(f"{self.role} worker: {result.error}",
                               over_capacity=result.status == worker_pb2.EXTEND_OVER_CAPACITY)
        raise ExtendFailed(f"{self.role} worker kept asking for resync of session {session_id}")

    async def release(self, session_id: str, placement: Placement) -> None:
        replica = placement.replica
        placement.replica = None
        if replica is not None:
            replica.sessions.discard(session_id)
            await replica.release([session_id])

    async def close(self) -> None:
        await asyncio.gather(*(r.close() for r in self.replicas))


class RouterClient:
    def __init__(self, endpoint: str, max_message_bytes: int, reconnect_timeout_s: float = 30.0):
        self.endpoint = endpoint
        self.channel = grpc.aio.insecure_channel(endpoint, options=channel_options(max_message_bytes))
        self.stub = router_pb2_grpc.RouterStub(self.channel)
        self.info: router_pb2.RouterInfo | None = None
        self.batcher = StreamBatcher(
            f"router@{endpoint}", open_stream=lambda: self.stub.ScoreStream(),
            make_request=lambda bid, feats: router_pb2.ScoreRequest(batch_id=bid, features=feats),
            split_response=lambda r: list(r.probabilities), reconnect_timeout_s=reconnect_timeout_s)

    async def connect(self, timeout_s: float) -> router_pb2.RouterInfo:
        self.info = await self.stub.GetInfo(router_pb2.GetRouterInfoRequest(), timeout=timeout_s, wait_for_ready=True)
        self.batcher.start()
        return self.info

    async def score(self, features: common_pb2.RouterFeatures) -> float:
        return await self.batcher.submit(features)

    async def close(self) -> None:
        await self.batcher.close()
        await self.channel.close()
