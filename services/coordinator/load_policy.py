"""LLM alone under load: above N concurrent requests, routed requests stop routing and the LLM writes every token.

Why: R2R saves time where the LLM's decode is bound by reading its weights (batch 1, a GPU at modest batch):
the SLM's cheap steps replace most LLM steps and a catch-up of tens of tokens costs about one step. Under
heavy concurrency on a compute-bound device (a small CPU serving 8-16 sessions) the LLM's batched decode
already costs about what its catch-ups cost per token, so R2R's SLM steps and router calls only add work:
the LLM alone is faster there, and writes the LLM's own answer. vLLM offers the same switch for
speculative decoding (`speculative_disable_by_batch_size`); unlike speculation, R2R's text changes (towards
the LLM's), so each answer reports how many of its tokens were written this way.

The decision is made per step, from the number of active requests: a session switches to the LLM alone when
the load is above N and routes again once it falls to N // 2 or below (each pool catches the session up lazily,
as for any routed token). The gap is hysteresis: going back costs the SLM a prefill of everything the LLM
wrote meanwhile (on a 2-core CPU ~1 s for 250 tokens, ten SLM steps), worth paying only well below the
crossover, not each time one of N + 1 sessions finishes. Only routed requests switch: an explicit SLM-only
(threshold > 1) or LLM-only request keeps its mode, and verify mode (a request asking for the LLM's judgement
of every SLM token) is left alone. The bench harness's concurrency sweep shows where the LLM alone overtakes
R2R on a machine: set N there.
"""

from __future__ import annotations

from r2r_serve.common import metrics
from r2r_serve.coordinator.pool import RouterClient, WorkerPool
from r2r_serve.coordinator.session import Session


class LlmOnlyUnderLoad:
    def __init__(self, above_sessions: int | None):
        if above_sessions is not None and above_sessions < 0:
            raise ValueError("llm_only_above_sessions must be >= 0 (or None: off)")
        self.above_sessions = above_sessions  # None: off

    @staticmethod
    def eligible(s: Session) -> bool:
        return 0.0 < s.threshold <= 1.0 and s.rollback_below <= 0.0

    def wants_llm_only(self, s: Session, active: int) -> bool:
        """Should the session's next step be the LLM's alone, with `active` requests running?"""
        if self.above_sessions is None or not self.eligible(s):
            return False
        return active > (self.above_sessions // 2 if s.llm_only_by_load else self.above_sessions)

    def update(self, s: Session, active: int, slm: WorkerPool, router: RouterClient, llm: WorkerPool) -> None:
        """Before a step: put the session in (or out of) LLM-only mode for the current load."""
        wanted = self.wants_llm_only(s, active)
        if wanted == s.llm_only_by_load:
            return
        s.llm_only_by_load = wanted
        # The early extend went to the pool of the mode just left; the other pools' batches need not wait.
        s.drop_lookahead()
        if wanted:
            slm.leaving(s.session_id, s.slm)
            router.leaving(s.session_id)
        else:
            llm.leaving(s.session_id, s.llm)
        metrics.LOAD_MODE_SWITCHES.labels("llm_only" if wanted else "routed").inc()
