"""Which failed calls the SDK repeats, and when.

Only what is safe: a call that failed with UNAVAILABLE (the coordinator restarting, a connection that
broke) *before any token reached the caller*. A generation is free of side effects, so re-sending it is
harmless; once tokens were delivered, a repeat would hand them out twice, so that failure is raised.
RESOURCE_EXHAUSTED (the server is full) is retried only when asked: the caller may prefer to shed load.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3               # tries in all, the first included; 1 = never retry
    backoff_s: float = 0.2          # wait before the second try; doubles each time
    max_backoff_s: float = 2.0
    retry_overloaded: bool = False  # also retry RESOURCE_EXHAUSTED

    def should_retry(self, code: grpc.StatusCode, attempt: int, delivered_tokens: bool) -> bool:
        if delivered_tokens or attempt >= self.attempts:
            return False
        return code == grpc.StatusCode.UNAVAILABLE or (
            self.retry_overloaded and code == grpc.StatusCode.RESOURCE_EXHAUSTED)

    def delay_s(self, attempt: int) -> float:
        """Wait after failed try number `attempt` (1-based)."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))


NO_RETRY = RetryPolicy(attempts=1)
