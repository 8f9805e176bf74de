"""One answer's tokens on their way to the client: appended as the loop makes them, released once final.

Without verify mode a token is final as soon as it is made. In verify mode (verify.py) a token waits until the
LLM has judged it, and a rollback drops the tokens after the rejected one before any was sent, so a client
never sees a token taken back. Released tokens pass through the streaming detokenizer (stop strings) and
become TokenEvents.
"""

from __future__ import annotations

import time

from r2r_serve.common import metrics
from r2r_serve.coordinator.detokenizer import StreamingDetokenizer
from r2r_serve.coordinator.session import Session, StepResult
from r2r_serve.proto import common_pb2, coordinator_pb2

STOP_PROBE_TOKENS = 8  # judged tokens before the unjudged tail that the stop-string probe decodes with it


class AnswerStream:
    def __init__(self, session: Session, detok: StreamingDetokenizer, request_id: str, logprobs: bool,
                 started: float):
        self.s = session
        self.detok = detok
        self.request_id = request_id
        self.logprobs = logprobs
        self.pending: list[StepResult] = []  # the steps of positions prompt_len + released ... end of history
        self.released = 0                    # completion tokens sent to the client
        self.llm_tokens = 0                  # of those, written by the LLM
        self.load_llm_only_tokens = 0        # of those, written by the LLM alone because of the load
        self.started = self.last_at = started
        self.ttft = 0.0

    @property
    def generated(self) -> int:
        """Completion tokens in the history, released or not (what the length budget counts)."""
        return len(self.s.history) - self.s.prompt_len

    def take(self, step: StepResult) -> None:
        """Append a step's token. A verify-mode rollback cut the history back first: drop the steps it cut."""
        if step.rollback_to >= 0:
            del self.pending[step.rollback_to - self.s.prompt_len - self.released:]
        self.s.history.append(step.token)
        self.pending.append(step)
        if not self.s.verifying:
            self.s.verified = len(self.s.history)

    def drop_cut(self, step: StepResult) -> None:
        """A rollback whose token ends the answer (not appended): drop the steps it cut."""
        if step.rollback_to >= 0:
            del self.pending[step.rollback_to - self.s.prompt_len - self.released:]

    def release(self) -> list[coordinator_pb2.GenerateResponse]:
        """Events for every final token not yet sent, up to a stop string if one completes."""
        final = min(self.s.verified, len(self.s.history)) - self.s.prompt_len
        events = []
        while self.released < final and self.detok.stopped_by is None:
            step = self.pending.pop(0)
            text = self.detok.add(step.token)
            now = time.perf_counter()
            if self.released == 0:
                self.ttft = now - self.started
                metrics.TTFT.observe(self.ttft)
            else:
                metrics.ITL.observe(now - self.last_at)
            self.last_at = now
            is_llm = step.provenance == common_pb2.PROVENANCE_LLM
            self.llm_tokens += is_llm
            if step.by_load:
                self.load_llm_only_tokens += 1
                metrics.LOAD_LLM_ONLY_TOKENS.inc()
            metrics.TOKENS.labels("llm" if is_llm else "slm").inc()
            events.append(coordinator_pb2.GenerateResponse(request_id=self.request_id, token=coordinator_pb2.TokenEvent(
                index=self.released, token_id=step.token, text=text, provenance=step.provenance,
                logprob=step.logprob if self.logprobs else 0.0, router_probability=step.router_probability)))
            self.released += 1
        return events

    def stop_in_tail(self) -> bool:
        """Verify mode: does the unjudged tail (with a few tokens before it) spell a stop string? Then the LLM
        should judge it now rather than at the next routed token. A probe only: the detokenizer decides."""
        if not self.detok.stops or self.s.verified >= len(self.s.history):
            return False
        start = max(self.s.prompt_len, self.s.verified - STOP_PROBE_TOKENS)
        text = self.detok.tokenizer.decode(self.s.history[start:], skip_special_tokens=True)
        return any(stop in text for stop in self.detok.stops)
