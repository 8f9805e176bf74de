"""Worker-side continuous batching: requests that arrive while a forward runs are merged into the next one.

The coordinator already batches per replica; this merges what several streams (coordinators, tools)
send at once, and serialises every touch of the engine on one thread, so KV state has a single writer.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from r2r_serve.common import metrics
from r2r_serve.common.logging import get_logger
from r2r_serve.common.memory import PeriodicHeapTrim
from r2r_serve.worker.engine import ExtendOutcome, ExtendWork, ModelEngine

log = get_logger(__name__)


class EngineBatcher:
    def __init__(self, engine: ModelEngine, trim_heap_every_s: float = 30.0):
        self.engine = engine
        self._heap = PeriodicHeapTrim(trim_heap_every_s)
        self._resident_gauge = metrics.WORKER_RESIDENT_BYTES.labels(engine.config.role)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._pending: list[tuple[list[ExtendWork], asyncio.Future]] = []
        self._wakeup = asyncio.Event()
        self._runner: asyncio.Task | None = None
        self.inflight_items = 0
        self._queue_gauge = metrics.WORKER_QUEUE_ITEMS.labels(engine.config.role)

    def start(self) -> None:
        self._runner = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._runner:
            self._runner.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def extend(self, works: list[ExtendWork]) -> list[ExtendOutcome]:
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((works, fut))
        self.inflight_items += len(works)
        self._queue_gauge.set(self.inflight_items)
        self._wakeup.set()
        try:
            return await fut
        finally:
            self.inflight_items -= len(works)
            self._queue_gauge.set(self.inflight_items)

    async def call(self, fn, *args):
        """Run fn on the engine thread, after the forward in progress."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def call_soon(self, fn, *args) -> None:
        """Queue fn for the engine thread without waiting for it (its errors are logged, not raised)."""
        def done(fut):
            if not fut.cancelled() and fut.exception() is not None:
                log.error("engine_call_failed", call=getattr(fn, "__name__", str(fn)), error=str(fut.exception()))
        try:
            self.executor.submit(fn, *args).add_done_callback(done)
        except RuntimeError:  # the executor is shut down: the worker is stopping, its KV goes with it
            pass

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                taken, deferred, sessions = [], [], set()
                for works, fut in self._pending:
                    ids = {w.session_id for w in works}
                    # A session's second request must see the first one's KV: run it in the next forward.
                    (deferred if ids & sessions else taken).append((works, fut))
                    if not ids & sessions:
                        sessions |= ids
                self._pending = deferred
                merged = [w for works, _ in taken for w in works]
                try:
                    outcomes = await self.call(self.engine.extend, merged)
                except Exception as exc:  # a bug or a device error: fail these requests, keep serving
                    for _, fut in taken:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                start = 0
                for works, fut in taken:
                    if not fut.done():
                        fut.set_result(outcomes[start: start + len(works)])
                    start += len(works)
                if self._heap.due():  # checked here: no engine-thread round trip on the other forwards
                    await self.call(self._trim_heap)

    def _trim_heap(self) -> None:
        """On the engine thread, between forwards: give freed activation pages back to the OS."""
        trimmed = self._heap.maybe_trim()
        if trimmed is None:
            return
        before, after = trimmed
        self._resident_gauge.set(after * 2**30)
        if before - after >= 0.25:  # only trims worth knowing about, so a steady worker logs nothing
            log.info("heap_trimmed", resident_before_gib=round(before, 2), resident_gib=round(after, 2))
