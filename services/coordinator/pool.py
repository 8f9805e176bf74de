"""Worker pools and the router client: replicas, one batching stream each, KV-affinity placement.

A session is placed on the least-loaded replica of a pool the first time it needs that pool and stays
there (its KV lives there). The coordinator tracks, per session and pool, how many tokens the replica
holds (the cursor); every extend sends only history[cursor:]. Replicas come from a list or from DNS
names re-resolved periodically; a replica that disappears costs its sessions a re-prefill elsewhere.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc

from r2r_serve.common import metrics
from r2r_serve.common.logging import get_logger
from r2r_serve.common.security import ClientTLS, aio_channel
from r2r_serve.common.server import channel_options
from r2r_serve.coordinator.batcher import PeerUnavailable, StreamBatcher
from r2r_serve.coordinator.endpoints import is_dns, resolve_all, split_endpoints
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
    verify_from: int = 0


class WorkerReplica:
    def __init__(self, endpoint: str, role: str, max_message_bytes: int, reconnect_timeout_s: float,
                 tls: ClientTLS | None = None):
        self.endpoint = endpoint
        self.role = role
        self.channel = aio_channel(endpoint, tls, channel_options(max_message_bytes))
        self.stub = worker_pb2_grpc.ModelWorkerStub(self.channel)
        self.info: worker_pb2.WorkerInfo | None = None
        self.sessions: set[str] = set()
        self.reported_load = 0      # active sessions + queued items the worker last reported
        self.placed_since_poll = 0  # sessions this coordinator placed here since that report
        self.closed = False
        self._sessions_gauge = metrics.POOL_REPLICA_SESSIONS.labels(role, endpoint)
        self.batcher = StreamBatcher(
            f"{role}@{endpoint}", open_stream=lambda: self.stub.ExtendStream(),
            make_request=self._make_request, split_response=lambda r: list(r.results),
            reconnect_timeout_s=reconnect_timeout_s, pool=role)

    @property
    def load(self) -> int:
        return self.reported_load + self.placed_since_poll

    @property
    def available(self) -> bool:
        return not self.closed and self.batcher.healthy

    def add_session(self, session_id: str) -> None:
        if session_id not in self.sessions:
            self.sessions.add(session_id)
            self.placed_since_poll += 1
            self._sessions_gauge.set(len(self.sessions))

    def drop_session(self, session_id: str) -> None:
        self.sessions.discard(session_id)
        self._sessions_gauge.set(len(self.sessions))

    @staticmethod
    def _make_request(batch_id: int, items: list[ExtendItemRequest]) -> worker_pb2.ExtendRequest:
        req = worker_pb2.ExtendRequest(batch_id=batch_id)
        for it in items:
            req.items.add(session_id=it.session_id, position=it.position, tokens=it.tokens,
                          sampling=it.sampling, want_features=it.want_features, verify_from=it.verify_from)
        return req

    async def connect(self, timeout_s: float) -> worker_pb2.WorkerInfo:
        self.info = await self.stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=timeout_s, wait_for_ready=True)
        self.batcher.start()
        return self.info

    async def poll_load(self) -> None:
        try:
            load = await self.stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=2.0)
        except grpc.aio.AioRpcError:
            return  # the stream's own failure handling marks the replica unhealthy
        self.reported_load = load.active_sessions + load.inflight_items
        self.placed_since_poll = 0

    async def release(self, session_ids: list[str], attempts: int = 4, timeout_s: float = 5.0) -> None:
        """Free the sessions' KV here. A release that times out or finds the replica unreachable is tried
        again (with backoff): given up, it would leave KV that only LRU eviction ever frees."""
        delay = 0.5
        for attempt in range(1, attempts + 1):
            if self.closed:
                return
            try:
                await self.stub.Release(worker_pb2.ReleaseRequest(session_ids=session_ids), timeout=timeout_s)
                return
            except grpc.aio.AioRpcError as exc:
                retryable = exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
                if not retryable or attempt == attempts:  # a replica that is gone took the KV with it
                    log.warning("release_failed", replica=self.endpoint, error=exc.details(), attempts=attempt)
                    return
                log.info("release_retry", replica=self.endpoint, error=exc.details(), attempt=attempt)
            await asyncio.sleep(delay)
            delay *= 2

    async def close(self) -> None:
        self.closed = True
        await self.batcher.close()
        await self.channel.close()
        try:
            metrics.POOL_REPLICA_SESSIONS.remove(self.role, self.endpoint)
        except KeyError:  # another pool in this process (tests) already removed it
            pass


@dataclass
class Placement:
    replica: WorkerReplica | None = None
    cursor: int = 0  # tokens of the session this replica holds KV for


class WorkerPool:
    def __init__(self, role: str, specs: str | list[str], max_message_bytes: int, reconnect_timeout_s: float = 30.0,
                 refresh_s: float = 10.0, load_poll_s: float = 1.0, tls: ClientTLS | None = None):
        self.role = role
        self.tls = tls  # channels to the replicas: plain when None
        self.specs = split_endpoints(specs)
        if not self.specs:
            raise ValueError(f"no {role} worker endpoints given")
        self.max_message_bytes = max_message_bytes
        self.reconnect_timeout_s = reconnect_timeout_s
        self.refresh_s = refresh_s
        self.load_poll_s = load_poll_s
        self.replicas: list[WorkerReplica] = []
        self.info: worker_pb2.WorkerInfo | None = None
        self._tasks: list[asyncio.Task] = []
        self._replicas_gauge = metrics.POOL_REPLICAS.labels(role)

    async def connect(self, timeout_s: float) -> None:
        """Connect to every replica there is now (waiting up to timeout_s for at least one)."""
        deadline = time.monotonic() + timeout_s
        endpoints = await resolve_all(self.specs)
        while not endpoints and time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            endpoints = await resolve_all(self.specs)
        if not endpoints:
            raise RuntimeError(f"no {self.role} workers found at {', '.join(self.specs)}")
        await asyncio.gather(*(self._add(e, max(1.0, deadline - time.monotonic())) for e in endpoints))
        if not self.replicas:
            raise RuntimeError(f"no {self.role} worker at {', '.join(endpoints)} could be reached")
        loop = asyncio.get_running_loop()
        if any(is_dns(s) for s in self.specs):
            self._tasks.append(loop.create_task(self._refresh_loop(), name=f"{self.role}-dns"))
        self._tasks.append(loop.create_task(self._poll_loop(), name=f"{self.role}-load"))

    async def _add(self, endpoint: str, timeout_s: float) -> None:
        replica = WorkerReplica(endpoint, self.role, self.max_message_bytes, self.reconnect_timeout_s, self.tls)
        try:
            info = await replica.connect(timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.warning("replica_unreachable", pool=self.role, replica=endpoint, error=exc.details())
            await replica.close()
            return
        if self.info is not None and info.tokenizer_fingerprint != self.info.tokenizer_fingerprint:
            log.error("replica_refused", pool=self.role, replica=endpoint,
                      reason=f"tokenizer {info.tokenizer_fingerprint} != pool's {self.info.tokenizer_fingerprint}")
            await replica.close()
            raise RuntimeError(f"{self.role} replicas disagree on the tokenizer: {endpoint} has "
                               f"{info.tokenizer_fingerprint}, others {self.info.tokenizer_fingerprint}")
        self.info = self.info or info
        self.replicas.append(replica)
        self._replicas_gauge.set(len(self.replicas))
        log.info("replica_added", pool=self.role, replica=endpoint)

    async def _remove(self, replica: WorkerReplica) -> None:
        self.replicas.remove(replica)
        self._replicas_gauge.set(len(self.replicas))
        log.info("replica_removed", pool=self.role, replica=replica.endpoint, sessions=len(replica.sessions))
        await replica.close()  # queued items fail with PeerUnavailable: their sessions move

    async def refresh(self) -> None:
        endpoints = await resolve_all(self.specs)
        if not endpoints:
            return  # a resolver hiccup must not drop every replica
        current = {r.endpoint: r for r in self.replicas}
        for ep in endpoints:
            if ep not in current:
                try:
                    await self._add(ep, 10.0)
                except RuntimeError as exc:
                    log.error("replica_refused", pool=self.role, error=str(exc))
        for ep, replica in current.items():
            if ep not in endpoints:
                await self._remove(replica)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("refresh_failed", pool=self.role)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.gather(*(r.poll_load() for r in list(self.replicas)))
            await asyncio.sleep(self.load_poll_s)

    def place(self, placement: Placement) -> WorkerReplica:
        if placement.replica is not None and placement.replica.closed:
            placement.replica = None
        if placement.replica is None:
            candidates = [r for r in self.replicas if r.available] or [r for r in self.replicas if not r.closed]
            if not candidates:
                raise PeerUnavailable(f"no {self.role} worker is available")
            placement.replica = min(candidates, key=lambda r: r.load)
            placement.cursor = 0
        return placement.replica

    async def extend(self, session_id: str, placement: Placement, history: list[int],
                     sampling: common_pb2.SamplingParams, want_features: bool,
                     coalesce: bool = True, verify_from: int = 0) -> worker_pb2.ExtendResult:
        """Bring the session's replica up to `history` and return its next-token result. Resyncs (a
        restarted or evicting worker) are repaired by re-sending history from what the worker holds.
        coalesce=False: the replica's next batch need not wait for this session (a one-off background call).
        verify_from: verify mode, the worker also judges the fed tokens from that position on."""
        for _ in range(8):
            replica = self.place(placement)
            replica.add_session(session_id)
            item = ExtendItemRequest(session_id, placement.cursor, history[placement.cursor:], sampling, want_features,
                                     verify_from)
            try:
                result = await replica.batcher.submit(item, key=session_id if coalesce else None)
            except PeerUnavailable:
                # Move the session to another replica if there is one: it costs a re-prefill only.
                replica.drop_session(session_id)
                if not any(r.available for r in self.replicas if r is not replica):
                    raise
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

    def leaving(self, session_id: str, placement: Placement) -> None:
        """The session will not step on this pool for a while: its replica's next batch need not wait for it."""
        if placement.replica is not None:
            placement.replica.batcher.leave(session_id)

    async def release(self, session_id: str, placement: Placement) -> None:
        replica = placement.replica
        placement.replica = None
        if replica is not None:
            replica.drop_session(session_id)
            await replica.release([session_id])

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*(r.close() for r in self.replicas))


class RouterClient:
    """One long-lived scoring stream. After a failure the router counts as down for `retry_after_s`:
    steps then use the coordinator's fallback at once instead of each waiting for a reconnect."""

    def __init__(self, endpoint: str, max_message_bytes: int, reconnect_timeout_s: float = 2.0,
                 retry_after_s: float = 5.0, tls: ClientTLS | None = None):
        self.endpoint = endpoint
        self.retry_after_s = retry_after_s
        self.down_until = 0.0
        self.channel = aio_channel(endpoint, tls, channel_options(max_message_bytes))
        self.stub = router_pb2_grpc.RouterStub(self.channel)
        self.info: router_pb2.RouterInfo | None = None
        self.batcher = StreamBatcher(
            f"router@{endpoint}", open_stream=lambda: self.stub.ScoreStream(),
            make_request=lambda bid, feats: router_pb2.ScoreRequest(batch_id=bid, features=feats),
            split_response=lambda r: list(r.probabilities), reconnect_timeout_s=reconnect_timeout_s, pool="router")

    async def connect(self, timeout_s: float) -> router_pb2.RouterInfo:
        self.info = await self.stub.GetInfo(router_pb2.GetRouterInfoRequest(), timeout=timeout_s, wait_for_ready=True)
        self.batcher.start()
        return self.info

    async def score(self, features: common_pb2.RouterFeatures, session_id: str | None = None) -> float:
        if time.monotonic() < self.down_until:
            raise PeerUnavailable(f"router {self.endpoint} is down")
        try:
            return await self.batcher.submit(features, key=session_id)
        except PeerUnavailable:
            self.down_until = time.monotonic() + self.retry_after_s
            raise

    def leaving(self, session_id: str) -> None:
        """The session will not be scored again soon: the next scoring batch need not wait for it."""
        self.batcher.leave(session_id)

    async def close(self) -> None:
        await self.batcher.close()
        await self.channel.close()
