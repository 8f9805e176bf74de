"""Eager LLM catch-up: while a session's LLM replica has nothing to do, bring its KV up to the history.

A routed token normally makes the LLM read every token since its last call first (the lazy catch-up,
ARCHITECTURE.md step 3); a session's first routed token reads its whole prompt. With prefetching on, the
coordinator sends that catch-up ahead of need whenever the replica is idle (no batch queued or in flight)
and the session lags by at least `min_tokens` (all but its last token; a routed step feeds that one and
gets its answer from it): at session start (the prompt, batched with the other new
sessions) and after any step. The routed token then costs a short extend. The prefetch is an ordinary
extend whose next-token answer is thrown away, so KV is still written only for fed tokens and outputs are
unchanged (sampling is keyed by position) — up to rounding: in bf16 a catch-up split into two forwards can
round differently from one, as a different batch can, and flip a near-tie. Only sessions that may route prefetch: SLM-only sessions never
need the LLM, LLM-only ones call it every step anyway.

On a GPU the idle LLM's forward is nearly free. On a CPU whose cores the SLM shares, it is not: measure
(bench/) before turning it on there.
"""

from __future__ import annotations

import asyncio

from r2r_serve.common import metrics
from r2r_serve.common.logging import get_logger
from r2r_serve.coordinator.batcher import PeerUnavailable
from r2r_serve.coordinator.pool import WorkerPool
from r2r_serve.coordinator.session import Session
from r2r_serve.proto import common_pb2

log = get_logger(__name__)

_GREEDY = common_pb2.SamplingParams()  # the answer is discarded: the cheapest choice


class LlmPrefetcher:
    def __init__(self, llm: WorkerPool, min_tokens: int):
        self.llm = llm
        self.min_tokens = min_tokens

    @property
    def enabled(self) -> bool:
        return self.min_tokens > 0

    def poke(self, s: Session) -> None:
        """Start a background catch-up for `s` if it may route, lags enough, and its LLM replica is idle."""
        if not self.enabled or s.routes_never or s.routes_always or s.verifying:
            return  # verify mode: the LLM must judge the tokens it reads, and a prefetch judges none
        if s.llm_prefetch is not None and not s.llm_prefetch.done():
            return
        # All but the last token: a routed step must still feed the LLM at least one token to get its answer.
        lag = len(s.history) - 1 - (s.llm.cursor if s.llm.replica is not None else 0)
        if lag < self.min_tokens:
            return
        try:
            replica = self.llm.place(s.llm)
        except PeerUnavailable:  # no LLM replica now: the routed step will find out and report it
            return
        if not replica.batcher.idle:
            return
        s.llm_prefetch = asyncio.get_running_loop().create_task(self._catch_up(s, lag), name=f"prefetch-{s.session_id}")

    async def _catch_up(self, s: Session, lag: int) -> None:
        try:
            # A copy (a slice): the session keeps appending while this runs.
            await self.llm.extend(s.session_id, s.llm, s.history[:-1], _GREEDY, want_features=False,
                                  coalesce=False)
            metrics.LLM_PREFETCH_TOKENS.inc(lag)
        except Exception as exc:  # harmless: the routed step's own extend repairs or reports it
            log.info("llm_prefetch_failed", session_id=s.session_id, error=str(exc)[:200])

    @staticmethod
    def cancel(s: Session) -> None:
        """The session is over: a prefetch still queued need not run (one already sent is freed by Release)."""
        if s.llm_prefetch is not None:
            s.llm_prefetch.cancel()
            s.llm_prefetch = None
