"""Continuous batching over one long-lived bidirectional gRPC stream.

Callers `submit` single items; a loop takes everything that queued up while the previous batch was in
flight, sends it as one request down the stream and hands each caller its own result. A broken stream is
re-opened (with backoff) and the batch re-sent: requests carry absolute positions, so a resend is safe.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, Callable, Generic, TypeVar

import grpc

from r2r_serve.common import metrics
from r2r_serve.common.logging import get_logger

log = get_logger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class PeerUnavailable(Exception):
    """The peer could not be reached within the reconnect budget."""


class BatchRejected(Exception):
    """The peer answered the batch with an error (bad input, over a limit)."""


class StreamBatcher(Generic[Item, Result]):
    def __init__(self, name: str, open_stream: Callable[[], grpc.aio.StreamStreamCall],
                 make_request: Callable[[int, list[Item]], Any], split_response: Callable[[Any], list[Result]],
                 max_batch: int = 256, reconnect_timeout_s: float = 30.0, pool: str = "",
                 coalesce_s: float = 0.005):
        self.name = name
        self._open_stream = open_stream
        self._make_request = make_request
        self._split_response = split_response
        self.max_batch = max_batch
        self.coalesce_s = coalesce_s
        self._awaited: set = set()  # keys of the last delivered batch's callers that have not come back yet
        self.coalesce_timeouts = 0  # batches cut because an awaited caller did not come back in coalesce_s
        self._arrival = asyncio.Event()
        self.reconnect_timeout_s = reconnect_timeout_s
        self._queue: list[tuple[Item, asyncio.Future, object]] = []  # (item, caller's future, caller's key)
        self._inflight: list[tuple[Item, asyncio.Future, object]] = []
        self._wakeup = asyncio.Event()
        self._ids = itertools.count(1)
        self._call: grpc.aio.StreamStreamCall | None = None
        self._task: asyncio.Task | None = None
        self.batches_sent = 0
        self.items_sent = 0
        self.largest_batch = 0
        self.healthy = True
        self._depth_gauge = metrics.POOL_QUEUE_DEPTH.labels(pool or name)
        self._batch_hist = metrics.POOL_BATCH_SIZE.labels(pool or name)
        self._coalesce_timeouts = metrics.POOL_COALESCE_TIMEOUTS.labels(pool or name)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """No batch queued or in flight: a forward sent now runs at once."""
        return not self._queue and not self._inflight

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def close(self) -> None:
        stranded = [*self._inflight, *self._queue]  # before the cancelled loop forgets its batch
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._call is not None:
            self._call.cancel()
        # Callers of the batch in flight and of queued items must not wait forever: they move elsewhere.
        for _, fut, _ in stranded + self._queue:
            if not fut.done():
                fut.set_exception(PeerUnavailable(f"{self.name}: closed"))
        self._depth_gauge.dec(len(self._queue))
        self._inflight, self._queue = [], []

    async def submit(self, item: Item, key=None) -> Result:
        """`key` names the caller (a session id): a caller of the last batch is waited for (briefly) before
        the next batch is cut, until it submits again or `leave`s. Callers without a key are never waited for."""
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut, key))
        self._depth_gauge.inc()
        self._awaited.discard(key)
        self._arrival.set()
        self._wakeup.set()
        return await fut

    def leave(self, key) -> None:
        """Caller `key` will not submit again soon (its session finished, or went to another pool): the next
        batch need not wait for it. A no-op for a caller the batcher is not waiting for."""
        if key in self._awaited:
            self._awaited.discard(key)
            self._arrival.set()

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                await self._coalesce()
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch:]
                self._depth_gauge.dec(len(batch))
                # Callers that went away (cancelled) need no answer.
                batch = [entry for entry in batch if not entry[1].done()]
                if not batch:
                    continue
                self._inflight = batch
                try:
                    results = await self._send([item for item, _, _ in batch])
                except Exception as exc:
                    for _, fut, _ in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                finally:
                    self._inflight = []
                for (_, fut, _), result in zip(batch, results):
                    if not fut.done():
                        fut.set_result(result)
                # Callers that already queued again (a lookahead) or gave this answer up are not waited for.
                queued = {key for _, _, key in self._queue}
                self._awaited = {key for _, fut, key in batch
                                 if key is not None and key not in queued and not fut.cancelled()}

    async def _coalesce(self) -> None:
        """Before cutting a batch, wait (at most `coalesce_s`) for the callers of the last batch to come back.

        Sessions that share a forward get their results together, but each streams its token to its client
        and may visit the router before it submits its next step. Cutting a batch at the first arrival
        splits them into phase groups that alternate on the peer for the rest of their answers (measured:
        8 sessions ran as 2-3 sequential forwards per step). Waiting for the released callers merges the
        groups again: the group that queued while the last batch ran joins the callers coming back. Callers
        that will not come back soon say so (`leave`); one that vanishes silently costs `coalesce_s` once
        (counted in `coalesce_timeouts`)."""
        if self.coalesce_s <= 0:
            self._awaited.clear()
            return
        try:
            # One window for the whole wait: arrivals that do not complete the batch do not extend it.
            async with asyncio.timeout(self.coalesce_s):
                while self._awaited and len(self._queue) < self.max_batch:
                    self._arrival.clear()
                    await self._arrival.wait()
        except TimeoutError:
            self.coalesce_timeouts += 1
            self._coalesce_timeouts.inc()
        self._awaited.clear()

    async def _send(self, items: list[Item]) -> list[Result]:
        batch_id = next(self._ids)
        request = self._make_request(batch_id, items)
        deadline = asyncio.get_running_loop().time() + self.reconnect_timeout_s
        delay = 0.05
        while True:
            try:
                if self._call is None:
                    self._call = self._open_stream()
                await self._call.write(request)
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    raise ConnectionError("stream closed by peer")
                self.healthy = True
                break
            except (grpc.aio.AioRpcError, ConnectionError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
                # InvalidStateError: the call already ended (e.g. the peer closed the connection while idle)
                self.healthy = False
                if self._call is not None:
                    self._call.cancel()
                self._call = None
                if asyncio.get_running_loop().time() + delay > deadline:
                    reason = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                    raise PeerUnavailable(f"{self.name} unreachable for {self.reconnect_timeout_s:.0f}s: "
                                          f"{reason}") from exc
                log.warning("stream_broken", peer=self.name, error=str(exc)[:200], retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        if response.batch_id != batch_id:
            raise RuntimeError(f"{self.name}: answer for batch {response.batch_id}, expected {batch_id}")
        if response.error:
            raise BatchRejected(f"{self.name}: {response.error}")
        self.batches_sent += 1
        self.items_sent += len(items)
        self.largest_batch = max(self.largest_batch, len(items))
        self._batch_hist.observe(len(items))
        return self._split_response(response)
