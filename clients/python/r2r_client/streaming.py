"""What the async and blocking streams share: reading the coordinator's messages into tokens, text and
stats, and deciding whether a failed call may be re-opened (RetryPolicy) within the call's deadline."""

from __future__ import annotations

import time

from r2r_client.retry import RetryPolicy
from r2r_client.types import Stats, Token, stats_from_proto, token_from_proto


class StreamBase:
    """`start(timeout)` opens the call; it is called again for a retry."""

    def __init__(self, start, timeout: float | None, with_logprobs: bool, retry: RetryPolicy):
        self._start = start
        self._deadline = time.monotonic() + timeout if timeout is not None else None
        self._call = start(timeout)
        self._retry = retry
        self._with_logprobs = with_logprobs
        self._cancelled = False
        self._delivered = False
        self._attempt = 1
        self._parts: list[str] = []
        self.request_id = ""
        self.stats: Stats | None = None

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    def _consume(self, msg) -> Token | None:
        """One coordinator message -> the Token to hand out (None for the final stats)."""
        self.request_id = msg.request_id
        if msg.HasField("token"):
            tok = token_from_proto(msg.token, self._with_logprobs)
            self._parts.append(tok.text)
            self._delivered = True
            return tok
        self.stats = stats_from_proto(msg.final)
        self._parts.append(self.stats.text_tail)
        return None

    def _retry_delay(self, code) -> float | None:
        """Seconds to wait before re-opening the call after failure `code`, or None: raise it."""
        remaining = None if self._deadline is None else self._deadline - time.monotonic()
        delay = self._retry.delay_s(self._attempt)
        if (self._cancelled or not self._retry.should_retry(code, self._attempt, self._delivered)
                or (remaining is not None and remaining <= delay)):
            return None
        return delay

    def _reopen(self) -> None:
        self._attempt += 1
        remaining = None if self._deadline is None else self._deadline - time.monotonic()
        self._call = self._start(remaining)
