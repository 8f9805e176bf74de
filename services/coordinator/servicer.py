"""The public Coordinator service: validation, admission, the per-request generation loop, streaming."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

import grpc
import structlog
from asyncio_throttle import Throttler

from r2r_serve import __version__
from r2r_serve.common import metrics
from r2r_serve.common.logging import get_logger
from r2r_serve.coordinator.batcher import BatchRejected, PeerUnavailable
from r2r_serve.coordinator.detokenizer import StreamingDetokenizer
from r2r_serve.coordinator.load_policy import LlmOnlyUnderLoad
from r2r_serve.coordinator.pool import ExtendFailed, RouterClient, WorkerPool
from r2r_serve.coordinator.prefetch import LlmPrefetcher
from r2r_serve.coordinator.requests import ChatOptions, Limits, check_rest, max_new_tokens, prompt_ids
from r2r_serve.coordinator.session import Session, r2r_step
from r2r_serve.coordinator.stream import AnswerStream
from r2r_serve.coordinator.verify import verify_tail
from r2r_serve.coordinator.shares import threshold_for_share
from r2r_serve.proto import common_pb2, coordinator_pb2, coordinator_pb2_grpc

log = get_logger(__name__)


@dataclass
class CoordinatorSettings:
    max_concurrent_sessions: int = 64
    max_new_sessions_per_s: float = 0.0   # 0 = no rate limit
    max_prompt_tokens: int = 8192
    max_new_tokens: int = 4096
    default_max_tokens: int = 256
    default_threshold: float | None = None  # None = the router's own default
    router_fallback: str = "llm"            # when the router is unreachable: llm | slm | fail
    llm_prefetch_min_tokens: int = 0        # eager LLM catch-up of lags >= this while the LLM is idle; 0 = off
    lookahead: bool = True                  # send each next extend before the router has judged the token
    lookahead_min_probability: float = 0.0  # ... unless the SLM gives its proposal less than this (lookahead.py)
    llm_only_above_sessions: int | None = None  # above this many active requests the LLM writes alone; None = off
    verify_max_draft: int = 0               # verify mode's default max_draft_tokens (coordinator.proto); 0 = at routes
    verify_min_draft_probability: float = 0.0  # verify mode's default min_draft_probability; 0 = off
    chat: ChatOptions = field(default_factory=ChatOptions)


def _ending(token: int, eos: set[int]) -> int:
    """The finish reason of an answer ended by `token`: EOS, or one of the request's stop token ids."""
    return coordinator_pb2.FINISH_REASON_EOS if token in eos else coordinator_pb2.FINISH_REASON_STOP


class _Rejected(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, settings: CoordinatorSettings, tokenizer, slm: WorkerPool, llm: WorkerPool,
                 router: RouterClient, eos_token_ids: set[int]):
        self.settings = settings
        self.tokenizer = tokenizer
        self.slm, self.llm, self.router = slm, llm, router
        self.prefetcher = LlmPrefetcher(llm, settings.llm_prefetch_min_tokens)
        self.load_policy = LlmOnlyUnderLoad(settings.llm_only_above_sessions)
        self.eos_token_ids = eos_token_ids
        self.limits = Limits(max_prompt_tokens=settings.max_prompt_tokens, max_new_tokens=settings.max_new_tokens,
                             default_max_tokens=settings.default_max_tokens,
                             context=min(slm.info.max_tokens_per_session, llm.info.max_tokens_per_session),
                             vocab_size=min(slm.info.vocab_size, llm.info.vocab_size))
        threshold = settings.default_threshold
        self.default_threshold = float(router.info.default_threshold if threshold is None else threshold)
        self.active = 0
        self.accepting = True
        self.throttler = (Throttler(rate_limit=max(1, int(settings.max_new_sessions_per_s)), period=1.0)
                          if settings.max_new_sessions_per_s > 0 else None)
        self._background: set[asyncio.Task] = set()

    # ---- RPCs ----------------------------------------------------------------------------------
    async def Generate(self, request, context):
        async for response in self._guarded(request, context):
            yield response

    async def Complete(self, request, context):
        result = coordinator_pb2.GenerateResult()
        text = []
        async for response in self._guarded(request, context):
            result.request_id = response.request_id
            if response.HasField("token"):
                t = response.token
                text.append(t.text)
                result.token_ids.append(t.token_id)
                result.provenance.append(t.provenance)
                if request.logprobs:
                    result.logprobs.append(t.logprob)
            else:
                text.append(response.final.text_tail)
                result.stats.CopyFrom(response.final)
        result.text = "".join(text)
        return result

    async def GetServerInfo(self, request, context):
        return coordinator_pb2.ServerInfo(
            slm_model=self.slm.info.model_name, llm_model=self.llm.info.model_name,
            router_strategy=self.router.info.strategy, default_threshold=self.default_threshold,
            tokenizer_fingerprint=self.slm.info.tokenizer_fingerprint,
            slm_endpoints=[r.endpoint for r in self.slm.replicas], llm_endpoints=[r.endpoint for r in self.llm.replicas],
            router_endpoint=self.router.endpoint, max_concurrent_sessions=self.settings.max_concurrent_sessions,
            active_sessions=self.active, max_context=self.limits.context, version=__version__)

    # ---- the loop ------------------------------------------------------------------------------
    async def _guarded(self, request, context):
        """Admission + error mapping around one generation."""
        request_id = request.request_id or uuid.uuid4().hex[:16]
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self._admit()
            except _Rejected as exc:
                log.info("request_rejected", reason=str(exc))
                metrics.REQUESTS.labels("rejected").inc()
                await context.abort(exc.code, str(exc))
            metrics.ACTIVE_SESSIONS.inc()
            outcome = "cancelled"  # unless the loop ends otherwise: a cancellation raises past every handler
            try:
                async for response in self._generate(request_id, request, context):
                    yield response
                outcome = "finished"
            except ValueError as exc:
                outcome = "invalid"
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except TimeoutError:
                outcome = "deadline"
                log.info("request_deadline_exceeded")
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's timeout expired")
            except ExtendFailed as exc:
                outcome = "over_capacity" if exc.over_capacity else "error"
                code = grpc.StatusCode.RESOURCE_EXHAUSTED if exc.over_capacity else grpc.StatusCode.INTERNAL
                await context.abort(code, str(exc))
            except (PeerUnavailable, BatchRejected) as exc:
                outcome = "unavailable"
                log.warning("request_failed", error=str(exc))
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            finally:
                self.active -= 1
                metrics.ACTIVE_SESSIONS.dec()
                metrics.REQUESTS.labels(outcome).inc()

    async def _admit(self) -> None:
        """Take a slot or refuse at once; on success the caller owns one unit of `self.active`."""
        if not self.accepting:
            raise _Rejected(grpc.StatusCode.UNAVAILABLE, "the coordinator is draining; retry on another replica")
        if self.throttler is not None:
            try:  # wait briefly for a slot in the rate window, never queue without bound
                async with asyncio.timeout(0.05):
                    await self.throttler.acquire()
            except TimeoutError:
                raise _Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"more than {self.settings.max_new_sessions_per_s:g} new requests per second; "
                                "retry later") from None
        # No await between this check and the increment: concurrent requests cannot both take the last slot.
        if self.active >= self.settings.max_concurrent_sessions:
            raise _Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"the server is at its limit of {self.settings.max_concurrent_sessions} concurrent "
                            "requests; retry later")
        self.active += 1

    async def _generate(self, request_id: str, req, context):
        started = time.perf_counter()
        ids = prompt_ids(req, self.tokenizer, self.limits, self.settings.chat)
        budget = max_new_tokens(req, len(ids), self.limits)
        check_rest(req, self.limits)
        if req.HasField("llm_share"):
            threshold = threshold_for_share(self.router.info.threshold_curve, req.llm_share, self.router.info.strategy)
        else:
            threshold = req.threshold if req.HasField("threshold") else self.default_threshold
        stop_ids = set(req.stop_token_ids)
        eos = set() if req.ignore_eos else self.eos_token_ids
        session = Session(session_id=f"{request_id}-{uuid.uuid4().hex[:8]}", history=list(ids), prompt_len=len(ids),
                          sampling=req.sampling, threshold=threshold, lookahead=self.settings.lookahead,
                          lookahead_min_prob=self.settings.lookahead_min_probability,
                          final_tokens=frozenset(eos | stop_ids), rollback_below=req.rollback_below,
                          max_draft=req.max_draft_tokens if req.HasField("max_draft_tokens")
                          else self.settings.verify_max_draft,
                          min_draft_prob=req.min_draft_probability if req.HasField("min_draft_probability")
                          else self.settings.verify_min_draft_probability)
        structlog.contextvars.bind_contextvars(session_id=session.session_id)
        log.info("request_started", prompt_tokens=len(ids), max_tokens=budget, threshold=threshold,
                 rollback_below=req.rollback_below or None, max_draft=session.max_draft if session.verifying else None,
                 min_draft_prob=session.min_draft_prob if session.verifying else None)
        detok = StreamingDetokenizer(self.tokenizer, ids, list(req.stop))
        answer = AnswerStream(session, detok, request_id, req.logprobs, started)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + req.timeout_ms / 1000 if req.timeout_ms else None
        try:
            finish = None
            while finish is None:
                # Why the answer would end now; an SLM-proposed last token; a stop string only the probe saw.
                ending, final_token, probed = None, None, False
                if answer.generated >= budget:
                    ending = coordinator_pb2.FINISH_REASON_LENGTH
                else:
                    self.load_policy.update(session, self.active, self.slm, self.router, self.llm)
                    self.prefetcher.poke(session)  # first the prompt, while the SLM prefills it too
                    # The deadline bounds each step, never a `yield`: a timeout that fired while the consumer
                    # holds the generator would cancel gRPC's own write instead of this loop.
                    async with asyncio.timeout_at(deadline):
                        step = await r2r_step(session, self.slm, self.router, self.llm, self.settings.router_fallback,
                                              may_continue=answer.generated + 1 < budget)
                    if step.token in session.final_tokens:
                        answer.drop_cut(step)
                        ending = _ending(step.token, eos)
                        if step.provenance == common_pb2.PROVENANCE_SLM:
                            final_token = step.token
                    else:
                        answer.take(step)
                        for event in answer.release():
                            yield event
                        if detok.stopped_by is not None:
                            finish = coordinator_pb2.FINISH_REASON_STOP
                            break
                        if session.verifying and answer.stop_in_tail():
                            ending, probed = coordinator_pb2.FINISH_REASON_STOP, True
                if ending is None:
                    continue
                if session.verifying:
                    # The answer would end here: the LLM judges what it has not read yet first.
                    async with asyncio.timeout_at(deadline):
                        back = await verify_tail(session, self.llm, final_token)
                    goes_on = back is not None and back.token not in session.final_tokens
                    if goes_on:
                        answer.take(back)  # rolled back: the answer goes on from the LLM's token
                    elif back is not None:
                        answer.drop_cut(back)  # the LLM ends the answer earlier, with its own token
                        ending, probed = _ending(back.token, eos), False
                    for event in answer.release():
                        yield event
                    if detok.stopped_by is not None:
                        finish = coordinator_pb2.FINISH_REASON_STOP
                        break
                    if goes_on or probed:  # a probe's false alarm: the released text holds no stop string
                        continue
                finish = ending
            count = answer.released
            total = time.perf_counter() - started
            metrics.REQUEST_SECONDS.observe(total)
            stats = coordinator_pb2.GenerationStats(
                finish_reason=finish, prompt_tokens=len(ids), completion_tokens=count, llm_tokens=answer.llm_tokens,
                llm_share=answer.llm_tokens / count if count else 0.0, time_to_first_token_s=answer.ttft,
                total_s=total, tokens_per_s=count / total if total > 0 else 0.0,
                stop_sequence=detok.stopped_by or "", text_tail=detok.finish(), verify_passes=session.verify_passes,
                rollbacks=session.rollbacks, discarded_tokens=session.discarded_tokens,
                load_llm_only_tokens=answer.load_llm_only_tokens)
            log.info("request_finished", finish=coordinator_pb2.FinishReason.Name(finish), completion_tokens=count,
                     llm_tokens=answer.llm_tokens, total_s=round(total, 3), tokens_per_s=round(stats.tokens_per_s, 2),
                     **({"rollbacks": session.rollbacks, "verify_passes": session.verify_passes}
                        if session.verifying else {}),
                     **({"load_llm_only_tokens": answer.load_llm_only_tokens} if answer.load_llm_only_tokens else {}))
            yield coordinator_pb2.GenerateResponse(request_id=request_id, final=stats)
        except asyncio.CancelledError:
            log.info("request_cancelled", completion_tokens=answer.released)
            raise
        finally:
            # Done: no batcher should wait for this session's next step, nor run its eager catch-up.
            self.prefetcher.cancel(session)
            session.drop_lookahead()
            self.slm.leaving(session.session_id, session.slm)
            self.router.leaving(session.session_id)
            self.llm.leaving(session.session_id, session.llm)
            self._release_later(session)

    def _release_later(self, session: Session) -> None:
        """Free the session's KV everywhere; runs even when this request was cancelled."""
        async def release():
            await asyncio.gather(self.slm.release(session.session_id, session.slm),
                                 self.llm.release(session.session_id, session.llm))
        task = asyncio.get_running_loop().create_task(release())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self, grace_s: float) -> None:
        """Stop taking requests; wait (up to grace_s) for running ones to finish."""
        self.accepting = False
        loop = asyncio.get_running_loop()
        end = loop.time() + grace_s
        while self.active and loop.time() < end:
            await asyncio.sleep(0.1)
        await self.flush_releases()

    async def flush_releases(self, timeout_s: float = 5.0) -> None:
        """Wait for pending KV releases, so stopping never strands KV on the workers."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout_s)
