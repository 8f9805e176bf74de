"""grpc.aio servicer of the model worker (r2r.v1.ModelWorker)."""

from __future__ import annotations

import asyncio
import time

import grpc

from r2r_serve.common.logging import get_logger
from r2r_serve.proto import worker_pb2, worker_pb2_grpc
from r2r_serve.worker.batcher import EngineBatcher
from r2r_serve.worker.engine import INVALID, OK, OVER_CAPACITY, RESYNC, ExtendWork, ModelEngine
from r2r_serve.worker.sampling import Sampling

log = get_logger(__name__)

_STATUS = {OK: worker_pb2.EXTEND_OK, RESYNC: worker_pb2.EXTEND_RESYNC, INVALID: worker_pb2.EXTEND_INVALID,
           OVER_CAPACITY: worker_pb2.EXTEND_OVER_CAPACITY}


class BatchRejected(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class WorkerServicer(worker_pb2_grpc.ModelWorkerServicer):
    def __init__(self, engine: ModelEngine, batcher: EngineBatcher, max_batch_items: int = 1024):
        self.engine = engine
        self.batcher = batcher
        self.max_batch_items = max_batch_items

    async def _extend(self, request: worker_pb2.ExtendRequest) -> worker_pb2.ExtendResponse:
        if len(request.items) > self.max_batch_items:
            raise BatchRejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"batch has {len(request.items)} items; this worker takes at most {self.max_batch_items}")
        works = [ExtendWork(session_id=it.session_id, position=it.position, tokens=list(it.tokens),
                            sampling=Sampling.from_proto(it.sampling), want_features=it.want_features,
                            verify_from=it.verify_from)
                 for it in request.items]
        started = time.perf_counter()
        outcomes = await self.batcher.extend(works) if works else []
        response = worker_pb2.ExtendResponse(batch_id=request.batch_id,
                                             forward_ms=(time.perf_counter() - started) * 1000)
        for o in outcomes:
            r = response.results.add(session_id=o.session_id, status=_STATUS[o.status], token=o.token,
                                     logprob=o.logprob, held_tokens=o.held_tokens, error=o.error)
            if o.features is not None:
                r.features.CopyFrom(o.features)
            if o.verification is not None:
                v = o.verification
                r.verify_start = v.start
                r.verify_tokens.extend(v.tokens)
                r.verify_logprobs.extend(v.logprobs)
                r.verify_choice_logprobs.extend(v.choice_logprobs)
        return response

    async def Extend(self, request, context):
        try:
            return await self._extend(request)
        except BatchRejected as exc:
            await context.abort(exc.code, str(exc))

    async def ExtendStream(self, request_iterator, context):
        """One response per request, matched by batch_id; requests are served concurrently (the batcher
        merges them), so responses may come back out of order."""
        done: asyncio.Queue = asyncio.Queue()
        pending = 0
        reading = True

        async def answer(req):
            try:
                resp = await self._extend(req)
            except BatchRejected as exc:
                resp = worker_pb2.ExtendResponse(batch_id=req.batch_id, error=str(exc))
            except Exception as exc:  # never kill the stream for one batch
                log.exception("extend_failed", batch_id=req.batch_id)
                resp = worker_pb2.ExtendResponse(batch_id=req.batch_id, error=f"internal error: {exc}")
            await done.put(resp)

        async def read():
            nonlocal pending, reading
            try:
                async for req in request_iterator:
                    pending += 1
                    task = asyncio.create_task(answer(req))
                    answering.add(task)
                    task.add_done_callback(answering.discard)
            finally:
                reading = False
                await done.put(None)

        answering: set[asyncio.Task] = set()  # strong references: the loop only keeps weak ones
        reader = asyncio.create_task(read())
        try:
            while reading or pending:
                item = await done.get()
                if item is None:
                    continue
                pending -= 1
                yield item
        finally:
            reader.cancel()
            for task in answering:
                task.cancel()

    async def Release(self, request, context):
        # Answered at once: waiting on the engine thread would put a release behind every queued forward (a
        # long one outlasted the coordinator's deadline and leaked the session's KV). The sessions are refused
        # from now on; their KV is freed after the forward in progress.
        released = self.engine.mark_released(list(request.session_ids))
        self.batcher.call_soon(self.engine.free_released)
        return worker_pb2.ReleaseResponse(released=released)

    async def GetInfo(self, request, context):
        return worker_pb2.WorkerInfo(**self.engine.info())

    async def GetLoad(self, request, context):
        kv = self.engine.kv
        return worker_pb2.WorkerLoad(active_sessions=len(kv), held_tokens=kv.held_tokens,
                                     batches=self.engine.batches, evictions=kv.evictions,
                                     inflight_items=self.batcher.inflight_items, forward_s=self.engine.forward_s,
                                     prefill_s=self.engine.forward_s_by_kind["prefill"],
                                     decode_s=self.engine.forward_s_by_kind["decode"])

    async def GetTokenizer(self, request, context):
        return worker_pb2.TokenizerFiles(files=self.engine.tokenizer_files, fingerprint=self.engine.fingerprint)
