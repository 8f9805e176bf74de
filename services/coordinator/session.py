"""One request's state and the R2R step (ARCHITECTURE.md, "One token").

history x[0..n): prompt + tokens so far. The SLM replica holds KV for x[0..s), the LLM replica for
x[0..l). Each step:
  1. SLM extends with x[s..n) and proposes t at position n, with router features;
  2. the router scores the features: p = P(divergent);
  3. if p >= threshold the LLM extends with x[l..n) (a lazy catch-up prefill) and its token replaces t;
  4. the chosen token is appended. Nothing is rolled back: KV is only ever written for fed tokens.
     (Verify mode, per request, is the exception by design: the LLM's catch-up judges the SLM tokens it
     reads and may cut the history back to the first it rejects; verify.py. There the LLM is also called,
     skipping steps 1-2, once `max_draft` SLM tokens wait for its judgement, and after step 1, without
     asking the router, where the SLM gives its proposal less than `min_draft_prob`.)
A threshold above 1 never asks the router or the LLM (the SLM alone); a threshold of 0 always routes, so
the SLM's proposal is not needed and is skipped (the LLM alone). When the router cannot be reached the
coordinator's fallback decides: "llm" (route, keep quality), "slm" (keep speed) or "fail". Under load
(--llm-only-above-sessions, load_policy.py) a routed session can step as an LLM-only one for a while.
With lookahead on, each step sends the next step's first extend as soon as its token is known, even before
the router has judged it (lookahead.py): the worker computes while the coordinator routes and streams.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

from r2r_serve.common import metrics
from r2r_serve.coordinator.batcher import PeerUnavailable
from r2r_serve.coordinator.lookahead import Lookahead
from r2r_serve.coordinator.pool import Placement, RouterClient, WorkerPool
from r2r_serve.coordinator.verify import judge
from r2r_serve.proto import common_pb2


def doubts(logprob: float, min_prob: float) -> bool:
    """The SLM gave its proposal (log-probability `logprob`) less than `min_prob`; a `min_prob` of 0 never doubts."""
    return min_prob > 0.0 and logprob < math.log(min_prob)


@dataclass
class StepResult:
    token: int
    provenance: int          # common_pb2.PROVENANCE_SLM / PROVENANCE_LLM
    logprob: float
    router_probability: float  # -1 when the router was not asked
    rollback_to: int = -1      # verify mode: the history was cut back to this position first (verify.py)
    by_load: bool = False      # written by the LLM alone because of the load (load_policy.py)


@dataclass
class Session:
    session_id: str
    history: list[int]
    prompt_len: int
    sampling: common_pb2.SamplingParams
    threshold: float
    slm: Placement = field(default_factory=Placement)
    llm: Placement = field(default_factory=Placement)
    llm_prefetch: asyncio.Task | None = None  # an eager LLM catch-up in flight (prefetch.py)
    lookahead: bool = False
    lookahead_min_prob: float = 0.0  # no lookahead on an unjudged SLM proposal the SLM gives less (lookahead.py)
    final_tokens: frozenset[int] = frozenset()  # tokens that end the answer (EOS, stop ids): nothing follows
    ahead: Lookahead | None = None  # the next step's extend, sent early (lookahead.py)
    rollback_below: float = 0.0  # verify mode (verify.py); 0 = off
    max_draft: int = 0           # verify mode: the LLM judges at least every this many SLM tokens; 0 = at routes
    min_draft_prob: float = 0.0  # verify mode: a draft ends where the SLM is less sure of its token; 0 = off
    llm_only_by_load: bool = False  # above --llm-only-above-sessions: the LLM writes every token (load_policy.py)
    verified: int = 0            # verify mode: tokens before this position are final (the LLM has judged them)
    verify_passes: int = 0
    rollbacks: int = 0
    discarded_tokens: int = 0

    def __post_init__(self):
        self.verified = max(self.verified, self.prompt_len)

    @property
    def verifying(self) -> bool:
        """Verify mode, where it means anything: an LLM-only session has no SLM tokens to judge."""
        return self.rollback_below > 0.0 and not self.routes_always

    def draft_full(self, ahead: int = 0) -> bool:
        """Verify mode: `ahead` tokens from now, the SLM will have written `max_draft` tokens the LLM has not
        judged, so the LLM writes the next one and judges them (speculative decoding's draft length)."""
        return self.verifying and self.max_draft > 0 and len(self.history) + ahead - self.verified >= self.max_draft

    def draft_ends_at(self, proposal_logprob: float) -> bool:
        """Verify mode: the SLM gives its proposal less than `min_draft_prob`, so the LLM writes this position
        (judging the draft) without asking the router. HF's assistant_confidence_threshold ends drafts the same
        way; a proposal the SLM doubts is one the LLM is likely to reject, with everything drafted after it."""
        return self.verifying and doubts(proposal_logprob, self.min_draft_prob)

    @property
    def routes_never(self) -> bool:
        return self.threshold > 1.0

    @property
    def routes_always(self) -> bool:
        return self.threshold <= 0.0 or self.llm_only_by_load

    async def settle_prefetch(self) -> None:
        """Wait for an eager catch-up in flight, so the LLM cursor is current before the LLM is called again.
        Shielded: a step cancelled meanwhile must not cut a forward that other sessions share."""
        task, self.llm_prefetch = self.llm_prefetch, None
        if task is not None and not task.done():
            await asyncio.shield(task)

    async def next_result(self, pool: WorkerPool, placement: Placement, want_features: bool, verify_from: int = 0):
        """This step's answer from `pool`: the lookahead's if it guessed this history, else a new extend."""
        ahead = self.ahead
        if ahead is not None and ahead.pool is pool:
            self.ahead = None
            if ahead.matches(self.history) and not verify_from:
                return await ahead.result()
            ahead.discard()
        return await pool.extend(self.session_id, placement, self.history, self.sampling, want_features,
                                 verify_from=verify_from)

    def look_ahead(self, pool: WorkerPool, placement: Placement, token: int, want_features: bool,
                   may_continue: bool) -> None:
        """Send the extend that follows `token` now, if there will be a next step."""
        if self.lookahead and may_continue and token not in self.final_tokens:
            self.ahead = Lookahead.start(pool, placement, self.session_id, self.history, token, self.sampling,
                                         want_features)

    def drop_lookahead(self) -> None:
        """The answer is over (or the next step goes elsewhere): the early extend is not needed."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None:
            ahead.discard()


async def r2r_step(s: Session, slm: WorkerPool, router: RouterClient, llm: WorkerPool,
                   router_fallback: str = "llm", may_continue: bool = True) -> StepResult:
    """One token. Between steps a session tells each pool's batcher it will not be back soon (`leaving`), so
    the batch forming there is cut without waiting for it. `may_continue`: a step may follow this one
    (the length budget is not spent), so a lookahead is worth sending."""
    p = -1.0
    if not s.routes_always and not s.draft_full():
        proposal = await s.next_result(slm, s.slm, want_features=not s.routes_never)
        doubted = s.draft_ends_at(proposal.logprob)
        # Sent before the router answers: the SLM's next forward overlaps the scoring and the streaming. Not
        # when the draft is full after this token (the next step skips the SLM) or ends here, nor for a
        # proposal the SLM doubts (likely routed: on shared cores that forward would slow the LLM's catch-up).
        likely_routed = not s.routes_never and doubts(proposal.logprob, s.lookahead_min_prob)
        s.look_ahead(slm, s.slm, proposal.token, want_features=not s.routes_never,
                     may_continue=may_continue and not s.draft_full(ahead=1) and not doubted and not likely_routed)
        if s.routes_never and not doubted:
            return StepResult(proposal.token, common_pb2.PROVENANCE_SLM, proposal.logprob, p)
        to_llm = doubted
        if not doubted:
            try:
                p = await router.score(proposal.features, s.session_id)
                metrics.ROUTER_PROBABILITY.observe(p)
                to_llm = p >= s.threshold
            except PeerUnavailable:
                if router_fallback == "fail":
                    raise
                metrics.ROUTER_FALLBACKS.labels(router_fallback).inc()
                to_llm = router_fallback == "llm"
        if not to_llm:
            return StepResult(proposal.token, common_pb2.PROVENANCE_SLM, proposal.logprob, p)
        # The LLM step takes a while: the SLM's and the router's next batches need not wait for this session.
        slm.leaving(s.session_id, s.slm)
        router.leaving(s.session_id)
    await s.settle_prefetch()
    metrics.LLM_CATCHUP_TOKENS.observe(len(s.history) - (s.llm.cursor if s.llm.replica else 0))
    answer = await s.next_result(llm, s.llm, want_features=False, verify_from=s.verified if s.verifying else 0)
    if s.verifying:
        rollback = judge(s, answer, s.history)
        if rollback is not None:  # the history was cut back: the LLM's token replaces an earlier SLM token
            llm.leaving(s.session_id, s.llm)
            s.look_ahead(slm, s.slm, rollback.token, want_features=not s.routes_never, may_continue=may_continue)
            return StepResult(rollback.token, common_pb2.PROVENANCE_LLM, rollback.logprob, -1.0,
                              rollback_to=rollback.position)
        s.verified = len(s.history) + 1  # the LLM's own token, appended next, is final too
    if s.routes_always:
        s.look_ahead(llm, s.llm, answer.token, want_features=False, may_continue=may_continue)
    else:
        llm.leaving(s.session_id, s.llm)  # its next step starts on the SLM: the LLM's next batch goes without it
        if s.ahead is None or s.ahead.token != answer.token:
            # The LLM changed the token the SLM's lookahead assumed: start over from the LLM's.
            s.drop_lookahead()
            s.look_ahead(slm, s.slm, answer.token, want_features=not s.routes_never, may_continue=may_continue)
    return StepResult(answer.token, common_pb2.PROVENANCE_LLM, answer.logprob, p, by_load=s.llm_only_by_load)
