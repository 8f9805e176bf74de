"""Verify mode: the LLM judges the SLM's tokens as it reads them and rolls back a strong disagreement.

The idea is BiLD's (Kim et al. 2023, "Speculative Decoding with Big Little Decoder"), on R2R's data path. A
routed token makes the LLM read every token since its last call (the catch-up, ARCHITECTURE.md step 3), and
that forward predicts each of those positions anyway. In verify mode the worker returns, for each SLM-written
token it reads, its own choice there and the probability it gives the SLM's token (ExtendItem.verify_from).
The first token the LLM gives less than `rollback_below`, and would not have written itself, is replaced by the
LLM's choice; everything after it is dropped (both cursors go back there, so each worker crops its KV on its
next extend) and the answer goes on from that position.

A token is final once the LLM has read it: `Session.verified` is the first position not yet judged. The
servicer streams tokens up to there (in bursts, at routed tokens) and never takes one back. When the answer
would end (an SLM-proposed EOS or stop token, the length budget, a stop string in the unjudged tail), one more
LLM pass judges the tail (`verify_tail`); a rollback there lets the answer go on.

rollback_below = 1 rolls back every disagreement: each token is then the LLM's own choice after the tokens
before it, so the answer is the LLM's own (greedy: its generate()), at any router threshold — lossless
speculative decoding whose drafts end where the router routes. Lower values keep SLM tokens the LLM finds
plausible, and cost fewer rollbacks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from r2r_serve.common import metrics
from r2r_serve.proto import common_pb2, worker_pb2


@dataclass
class Rollback:
    position: int   # the first position whose token is replaced
    token: int      # the LLM's choice there
    logprob: float  # the LLM's log-probability of it


def first_rollback(result: worker_pb2.ExtendResult, fed: list[int], rollback_below: float) -> Rollback | None:
    """The first judged token of `fed` (the history the LLM just read) the LLM rejects, or None."""
    limit = math.log(rollback_below) if 0.0 < rollback_below < 1.0 else None  # None: any disagreement
    for i, (choice, logprob) in enumerate(zip(result.verify_tokens, result.verify_logprobs)):
        position = result.verify_start + i
        if choice != fed[position] and (limit is None or logprob < limit):
            return Rollback(position, choice, result.verify_choice_logprobs[i])
    return None


def apply_rollback(s, rollback: Rollback, fed_length: int) -> None:
    """Cut the session back to `rollback.position` (the servicer appends the LLM's token there). `fed_length`:
    how many tokens the LLM had just read; those from the position on are dropped."""
    s.drop_lookahead()
    del s.history[rollback.position:]
    # KV past a cursor is never trusted: each worker crops to it on its next extend.
    s.slm.cursor = min(s.slm.cursor, rollback.position)
    s.llm.cursor = min(s.llm.cursor, rollback.position)
    s.verified = rollback.position + 1  # the LLM's token there is final
    s.rollbacks += 1
    s.discarded_tokens += fed_length - rollback.position
    metrics.VERIFY_ROLLBACKS.inc()
    metrics.VERIFY_DISCARDED_TOKENS.inc(fed_length - rollback.position)


def judge(s, result: worker_pb2.ExtendResult, fed: list[int]) -> Rollback | None:
    """Read an LLM answer that judged `fed`: roll the session back to the first rejected token, or mark all of
    `fed` final. Returns the rollback made, if any."""
    if len(result.verify_tokens):
        s.verify_passes += 1
        metrics.VERIFY_JUDGED_TOKENS.inc(len(result.verify_tokens))
    rollback = first_rollback(result, fed, s.rollback_below)
    if rollback is None:
        s.verified = max(s.verified, len(fed))
    else:
        apply_rollback(s, rollback, len(fed))
    return rollback


async def verify_tail(s, llm, final_token: int | None):
    """Before the answer ends: the LLM judges the tokens it has not read yet, and `final_token` (an SLM-proposed
    EOS or stop token, not in the history) after them. Returns the rollback's StepResult, or None when all of
    it stands (the session's tokens, and `final_token`, are then final)."""
    from r2r_serve.coordinator.session import StepResult

    fed = s.history + ([final_token] if final_token is not None else [])
    if s.verified >= len(fed):
        return None
    result = await llm.extend(s.session_id, s.llm, fed, s.sampling, want_features=False, verify_from=s.verified)
    llm.leaving(s.session_id, s.llm)
    rollback = judge(s, result, fed)
    if rollback is None:
        return None
    return StepResult(rollback.token, common_pb2.PROVENANCE_LLM, rollback.logprob, -1.0, rollback_to=rollback.position)
